/* GCC/Clang vector types: 16 floats, unaligned (aligned(4)) so any row can be loaded.
   With -march=native they become AVX-512 or AVX2 registers, whichever the machine has. */
#ifndef LORAFLEET_VECTORS_H
#define LORAFLEET_VECTORS_H

#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* The sum of the 16 lanes. As a plain loop (no -ffast-math) it is 15 dependent scalar adds;
   AVX-512 does it as a shuffle tree in 8 instructions (another order of summation). */
static inline float hsum16(v16 v)
{
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

/* Weights are float32 or bfloat16. A bfloat16 is the top half of a float32, so widening is a
   16-bit shift: exact, and cheap beside the memory read it halves. Kernel bodies take the
   weight type as a constant `bf16` flag and are always inlined into one function per type,
   so the compiler drops the branch (see lora.c). */
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element i of a weight row. */
ALWAYS_INLINE const void *weight_at(const void *w, int64_t i, int bf16)
{
    return bf16 ? (const void *)((const uint16_t *)w + i) : (const void *)((const float *)w + i);
}

ALWAYS_INLINE v16 load_weight16(const void *w, int bf16)
{
    if (!bf16) return *(const v16 *)w;
#ifdef __AVX512F__
    /* One widening load and one shift; GCC's generic conversion below splits into 256-bit halves. */
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16);
#else
    return (v16)(__builtin_convertvector(*(const u16x16 *)w, u32x16) << 16);
#endif
}

ALWAYS_INLINE float load_weight1(const void *w, int bf16)
{
    if (bf16) {
        union { uint32_t u; float f; } widened = { (uint32_t)*(const uint16_t *)w << 16 };
        return widened.f;
    }
    return *(const float *)w;
}

#endif
