/* Paged decode attention for float32 on the CPU: one query per sequence, read straight from the
   head-major paged cache (no gathered copy of the context), online softmax over blocks.

   Cache layout: the block_size x head_dim floats of (block, kv head) lie contiguous at
   cache + block * block_stride + head * head_stride. Query head h reads kv head h / q_per_kv. */
#include <math.h>
#include <stdint.h>

#include "vectors.h"

#define MAX_Q_PER_KV 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK_SIZE 64

/* Limits of the fixed-size per-item buffers; the Python side checks them before calling. */
int64_t lorafleet_attention_limits(int64_t which)
{
    return which == 0 ? MAX_Q_PER_KV : which == 1 ? MAX_HEAD_DIM : MAX_BLOCK_SIZE;
}

/* w[p] = exp(s[p] - shift) for p < n. With AVX-512, 16 at a time: 2^t as a degree-6 polynomial
   of t's fraction (|error| ~1e-7 relative, float32's own rounding) scaled by 2^round(t) with
   vscalefps, which also flushes far-negative arguments to 0 as expf does. Scalar expf per score
   took about a third of the kernel's time. */
static inline void exp_shifted(float *w, const float *s, float shift, int64_t n)
{
#ifdef __AVX512F__
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), base = _mm512_set1_ps(shift);
    static const float c[7] = {1.0f, 0.693147180559945309f, 0.240226506959100712f, 0.0555041086648215799f,
                               0.00961812910762847717f, 0.00133335581464284434f, 0.000154035303933816099f};
    for (int64_t p = 0; p < n; p += 16) {
        __mmask16 lanes = n - p >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - p)) - 1);
        __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + p), base), log2e);
        __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 f = _mm512_sub_ps(t, whole), poly = _mm512_set1_ps(c[6]);
        for (int k = 5; k >= 0; k--) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c[k]));
        _mm512_mask_storeu_ps(w + p, lanes, _mm512_scalef_ps(poly, whole));
    }
#else
    for (int64_t p = 0; p < n; p++) w[p] = expf(s[p] - shift);
#endif
}

static inline float dot(const float *a, const float *b, int64_t n)
{
    v16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += *(const v16 *)(a + i) * *(const v16 *)(b + i);
    float s = hsum16(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[q_rows[i], h] = softmax(scale * q . K) V over the seq_lens[seqs[i]] cached positions of
   batch entry seqs[i], for i < n_seqs. Returns 0, or -1 when a shape exceeds the limits. */
int lorafleet_paged_decode_attention_f32(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                                         const float *k_cache, const float *v_cache,
                                         int64_t block_stride, int64_t head_stride,
                                         int64_t block_size, int64_t head_dim, int64_t n_heads, int64_t kv_heads,
                                         const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                                         const int64_t *seqs, const int64_t *q_rows, int64_t n_seqs, float scale)
{
    int64_t q_per_kv = n_heads / kv_heads;
    if (q_per_kv > MAX_Q_PER_KV || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK_SIZE || q_per_kv * kv_heads != n_heads)
        return -1;
    #pragma omp parallel for schedule(guided)  /* as in lora.c: no fight over an item counter */
    for (int64_t item = 0; item < n_seqs * kv_heads; item++) {
        int64_t i = item / kv_heads, h = item % kv_heads, b = seqs[i], len = seq_lens[b];
        const float *qh = q + q_rows[i] * q_stride + h * q_per_kv * head_dim;
        const int32_t *table = block_tables + b * table_stride;
        float acc[MAX_Q_PER_KV][MAX_HEAD_DIM], running_max[MAX_Q_PER_KV], total[MAX_Q_PER_KV], score[MAX_BLOCK_SIZE],
            weight[MAX_BLOCK_SIZE];
        for (int64_t g = 0; g < q_per_kv; g++) {
            running_max[g] = -INFINITY;
            total[g] = 0.f;
            for (int64_t d = 0; d < head_dim; d++) acc[g][d] = 0.f;
        }
        for (int64_t start = 0; start < len; start += block_size) {
            int64_t n = len - start < block_size ? len - start : block_size;
            int64_t offset = (int64_t)table[start / block_size] * block_stride + h * head_stride;
            const float *kb = k_cache + offset, *vb = v_cache + offset;
            if (start + block_size < len) {
                /* Blocks lie anywhere in the cache: fetch the next one while this one computes,
                   or each block starts with a wait on memory the prefetcher could not foresee. */
                int64_t next = (int64_t)table[start / block_size + 1] * block_stride + h * head_stride;
                for (int64_t line = 0; line < block_size * head_dim; line += 16) {
                    __builtin_prefetch(k_cache + next + line);
                    __builtin_prefetch(v_cache + next + line);
                }
            }
            for (int64_t g = 0; g < q_per_kv; g++) {
                const float *qg = qh + g * head_dim;
                float block_max = running_max[g];
                for (int64_t p = 0; p < n; p++) {
                    score[p] = dot(qg, kb + p * head_dim, head_dim) * scale;
                    if (score[p] > block_max) block_max = score[p];
                }
                /* Rescale what was summed under the old maximum (exp(-inf) = 0 on the first block). */
                float correction = expf(running_max[g] - block_max);
                running_max[g] = block_max;
                total[g] *= correction;
                for (int64_t d = 0; d < head_dim; d++) acc[g][d] *= correction;
                exp_shifted(weight, score, block_max, n);
                for (int64_t p = 0; p < n; p++) {
                    float w = weight[p];
                    const float *vr = vb + p * head_dim;
                    total[g] += w;
                    for (int64_t d = 0; d < head_dim; d++) acc[g][d] += w * vr[d];
                }
            }
        }
        for (int64_t g = 0; g < q_per_kv; g++) {
            float *o = out + q_rows[i] * out_stride + (h * q_per_kv + g) * head_dim;
            float inverse = total[g] > 0.f ? 1.f / total[g] : 0.f;
            for (int64_t d = 0; d < head_dim; d++) o[d] = acc[g][d] * inverse;
        }
    }
    return 0;
}
