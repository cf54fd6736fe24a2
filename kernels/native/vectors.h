/* GCC/Clang vector types: 16 and 8 floats, unaligned (aligned(4)) so any row can be loaded.
   With -march=native they become AVX-512 or AVX2 registers, whichever the machine has. */
#ifndef LORAFLEET_VECTORS_H
#define LORAFLEET_VECTORS_H

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));

static inline float hsum16(v16 v) { float s = 0.f; for (int i = 0; i < 16; i++) s += v[i]; return s; }
static inline float hsum8(v8 v) { float s = 0.f; for (int i = 0; i < 8; i++) s += v[i]; return s; }

#endif
