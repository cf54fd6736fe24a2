/* GCC/Clang vector types: 16 and 8 floats, unaligned (aligned(4)) so any row can be loaded.
   With -march=native they become AVX-512 or AVX2 registers, whichever the machine has. */
#ifndef LORAFLEET_VECTORS_H
#define LORAFLEET_VECTORS_H

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));

static inline float hsum16(v16 v) { float s = 0.f; for (int i = 0; i < 16; i++) s += v[i]; return s; }
static inline float hsum8(v8 v) { float s = 0.f; for (int i = 0; i < 8; i++) s += v[i]; return s; }

/* Weights are float32 or bfloat16. A bfloat16 is the top half of a float32, so widening is a
   16-bit shift: exact, and cheap beside the memory read it halves. Kernel bodies take the
   weight type as a constant `bf16` flag and are always inlined into one exported function per
   type, so the compiler drops the branch. */
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element i of a weight row. */
ALWAYS_INLINE const void *weight_at(const void *w, int64_t i, int bf16)
{
    return bf16 ? (const void *)((const uint16_t *)w + i) : (const void *)((const float *)w + i);
}

ALWAYS_INLINE v16 load_weight16(const void *w, int bf16)
{
    if (bf16) return (v16)(__builtin_convertvector(*(const u16x16 *)w, u32x16) << 16);
    return *(const v16 *)w;
}

ALWAYS_INLINE v8 load_weight8(const void *w, int bf16)
{
    if (bf16) return (v8)(__builtin_convertvector(*(const u16x8 *)w, u32x8) << 16);
    return *(const v8 *)w;
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
