/* Multi-LoRA shrink and expand on the CPU: one call per projection for every adapter segment
   of a step, parallel over (segment, block) work items with OpenMP. Activations and sums are
   float32; the adapter weights are float32 (`_f32`) or bfloat16 (`_bf16w`, half the bytes to
   read, widened exactly in registers).

   A segment is the batch rows rows[seg_start[s] .. seg_start[s + 1]) of one adapter slot. The
   work is memory-bound (each slot's weights are read once per step for a few tokens), so each
   item reads its block of weights once from memory and reuses it from L1 for all the
   segment's tokens.

   Items are handed out `guided` (big chunks first, then smaller): a decode item is a fraction
   of a microsecond of work, and with `dynamic, 1` the two threads spent it fighting over the
   shared item counter, so the second thread bought nothing (a decode expand of 32 adapters, two
   tokens each, into 1536 outputs: 250 us on one thread or two; guided: 126 us on two). */
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

#define RANK_ROWS_PER_ITEM 16
#define OUT_COLS_PER_ITEM 64

/* out[t][j] = dot(xr[t], ar[j]) over n elements for a TT x 4 tile: TT tokens, 4 weight rows,
   16 + 8-wide vector accumulators, one horizontal sum per result. */
#define DEFINE_DOT_TILE(TT)                                                                        \
    ALWAYS_INLINE void dot_tile_##TT(const float *const xr[], const void *const ar[4], int64_t n,  \
                                     float out[4][4], int bf16)                                   \
    {                                                                                             \
        v16 acc[TT][4];                                                                           \
        v8 acc8[TT][4];                                                                           \
        for (int t = 0; t < TT; t++)                                                              \
            for (int j = 0; j < 4; j++) {                                                         \
                acc[t][j] = (v16){0};                                                             \
                acc8[t][j] = (v8){0};                                                             \
            }                                                                                     \
        int64_t i = 0;                                                                            \
        for (; i + 16 <= n; i += 16) {                                                            \
            v16 xv[TT], av[4];                                                                    \
            for (int t = 0; t < TT; t++) xv[t] = *(const v16 *)(xr[t] + i);                       \
            for (int j = 0; j < 4; j++) av[j] = load_weight16(weight_at(ar[j], i, bf16), bf16);    \
            for (int t = 0; t < TT; t++)                                                          \
                for (int j = 0; j < 4; j++) acc[t][j] += xv[t] * av[j];                           \
        }                                                                                         \
        for (; i + 8 <= n; i += 8) {                                                              \
            v8 xv[TT], av[4];                                                                     \
            for (int t = 0; t < TT; t++) xv[t] = *(const v8 *)(xr[t] + i);                        \
            for (int j = 0; j < 4; j++) av[j] = load_weight8(weight_at(ar[j], i, bf16), bf16);     \
            for (int t = 0; t < TT; t++)                                                          \
                for (int j = 0; j < 4; j++) acc8[t][j] += xv[t] * av[j];                          \
        }                                                                                         \
        for (int t = 0; t < TT; t++)                                                              \
            for (int j = 0; j < 4; j++) {                                                         \
                float s = hsum16(acc[t][j]) + hsum8(acc8[t][j]);                                  \
                for (int64_t k = i; k < n; k++)                                                   \
                    s += xr[t][k] * load_weight1(weight_at(ar[j], k, bf16), bf16);                \
                out[t][j] = s;                                                                    \
            }                                                                                     \
    }
DEFINE_DOT_TILE(4)
DEFINE_DOT_TILE(2)
DEFINE_DOT_TILE(1)

/* The widest tile that `left` tokens fill; returns how many tokens it computed. */
ALWAYS_INLINE int64_t dot_tile(const float *const xr[4], const void *const ar[4], int64_t n, int64_t left,
                               float out[4][4], int bf16)
{
    if (left >= 4) { dot_tile_4(xr, ar, n, out, bf16); return 4; }
    if (left >= 2) { dot_tile_2(xr, ar, n, out, bf16); return 2; }
    dot_tile_1(xr, ar, n, out, bf16);
    return 1;
}

/* y[row, j] = x[row] . A[slot, j, :in_dim] for j < rank, for the rows of every segment.
   A[slot, j, k] lies at a + slot * a_slot_stride + j * a_row_stride + k. Other y entries are
   left as they are. Returns 0, or -1 when out of memory (nothing written). */
ALWAYS_INLINE int lora_shrink(const float *x, int64_t x_stride, int64_t in_dim,
                              const void *a, int64_t a_slot_stride, int64_t a_row_stride,
                              float *y, int64_t y_stride,
                              int64_t n_seg, const int64_t *seg_start, const int64_t *rows,
                              const int64_t *seg_slot, const int64_t *seg_rank, int bf16)
{
    int64_t n_items = 0;
    for (int64_t s = 0; s < n_seg; s++) n_items += (seg_rank[s] + RANK_ROWS_PER_ITEM - 1) / RANK_ROWS_PER_ITEM;
    if (n_items == 0) return 0;
    int64_t *item_seg = malloc(sizeof(int64_t) * 2 * n_items);
    if (item_seg == NULL) return -1;
    int64_t *item_row = item_seg + n_items;
    for (int64_t s = 0, k = 0; s < n_seg; s++)
        for (int64_t j = 0; j < seg_rank[s]; j += RANK_ROWS_PER_ITEM, k++) {
            item_seg[k] = s;
            item_row[k] = j;
        }
    #pragma omp parallel for schedule(guided)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t s = item_seg[it], j_end = item_row[it] + RANK_ROWS_PER_ITEM;
        if (j_end > seg_rank[s]) j_end = seg_rank[s];
        const void *as = weight_at(a, seg_slot[s] * a_slot_stride, bf16);
        int64_t t0 = seg_start[s], t1 = seg_start[s + 1];
        for (int64_t j = item_row[it]; j < j_end; j += 4) {
            const void *ar[4];
            for (int q = 0; q < 4; q++) ar[q] = weight_at(as, (j + q < j_end ? j + q : j_end - 1) * a_row_stride, bf16);
            for (int64_t t = t0, done; t < t1; t += done) {
                const float *xr[4];
                for (int p = 0; p < 4; p++) xr[p] = x + rows[t + p < t1 ? t + p : t1 - 1] * x_stride;
                float out[4][4];
                done = dot_tile(xr, ar, in_dim, t1 - t, out, bf16);
                for (int64_t p = 0; p < done; p++)
                    for (int q = 0; q < 4 && j + q < j_end; q++) y[rows[t + p] * y_stride + j + q] = out[p][q];
            }
        }
    }
    free(item_seg);
    return 0;
}

#define SHRINK_PARAMS(W) const float *x, int64_t x_stride, int64_t in_dim, const W *a, int64_t a_slot_stride, \
    int64_t a_row_stride, float *y, int64_t y_stride, int64_t n_seg, const int64_t *seg_start,                \
    const int64_t *rows, const int64_t *seg_slot, const int64_t *seg_rank
#define SHRINK_ARGS x, x_stride, in_dim, a, a_slot_stride, a_row_stride, y, y_stride, n_seg, seg_start, rows, \
    seg_slot, seg_rank

int lorafleet_lora_shrink_f32(SHRINK_PARAMS(float)) { return lora_shrink(SHRINK_ARGS, 0); }
int lorafleet_lora_shrink_bf16w(SHRINK_PARAMS(uint16_t)) { return lora_shrink(SHRINK_ARGS, 1); }

/* acc[p][q] += sum over j < r of yl[2j + p] * B row j's outputs 16q .. 16q + 15, for two tokens p:
   every B load feeds two FMAs. */
ALWAYS_INLINE void expand_rows(v16 acc[2][4], const float *yl, const void *b_rows, int64_t b_row_stride, int64_t r,
                               int bf16)
{
    for (int64_t j = 0; j < r; j++) {
        const void *bj = weight_at(b_rows, j * b_row_stride, bf16);
        for (int q = 0; q < 4; q++) {
            v16 bv = load_weight16(weight_at(bj, 16 * q, bf16), bf16);
            acc[0][q] += yl[2 * j] * bv;
            acc[1][q] += yl[2 * j + 1] * bv;
        }
    }
}

/* base[row, o] += scaling[s] * y[row, :rank] . B[slot, o, :rank], for the rows of every segment.
   y[row, j] lies at y + row * y_stride + j * y_col_stride (fused projections interleave their
   ranks) and B[slot, o, j] at b + slot * b_slot_stride + o * b_out_stride + j * b_rank_stride.

   With b_out_stride == 1 (the engine's rank-major pool) an item's 64 outputs of B are rank
   contiguous rows; any other layout is first transposed into a per-thread buffer. Each token is
   then rank broadcast-FMAs into 4 vectors, two tokens at a time so every B load feeds two FMAs.
   Returns 0, or -1 when out of memory (base then holds a partial sum: the caller raises). */
ALWAYS_INLINE int lora_expand(const float *y, int64_t y_stride, int64_t y_col_stride,
                              const void *b, int64_t b_slot_stride, int64_t b_out_stride, int64_t b_rank_stride,
                              int64_t out_dim, float *base, int64_t base_stride,
                              int64_t n_seg, const int64_t *seg_start, const int64_t *rows,
                              const int64_t *seg_slot, const int64_t *seg_rank, const float *seg_scaling, int bf16)
{
    int64_t per_seg = (out_dim + OUT_COLS_PER_ITEM - 1) / OUT_COLS_PER_ITEM;
    int64_t n_items = n_seg * per_seg, max_rank = 1;
    for (int64_t s = 0; s < n_seg; s++) if (seg_rank[s] > max_rank) max_rank = seg_rank[s];
    int failed = 0;
    #pragma omp parallel
    {
        float *bt = malloc(sizeof(float) * OUT_COLS_PER_ITEM * max_rank);
        float *yl = malloc(sizeof(float) * 2 * max_rank);
        if (bt == NULL || yl == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(guided)
        for (int64_t it = 0; it < n_items; it++) {
            if (bt == NULL || yl == NULL) continue;
            int64_t s = it / per_seg, o0 = (it % per_seg) * OUT_COLS_PER_ITEM;
            int64_t width = out_dim - o0 < OUT_COLS_PER_ITEM ? out_dim - o0 : OUT_COLS_PER_ITEM;
            int64_t r = seg_rank[s];
            float scale = seg_scaling[s];
            const void *bs = weight_at(b, seg_slot[s] * b_slot_stride + o0 * b_out_stride, bf16);
            const void *b_rows = bs;
            int b_rows_bf16 = bf16;
            int64_t b_row_stride = b_rank_stride;
            if (b_out_stride != 1 || width < OUT_COLS_PER_ITEM) {
                for (int64_t j = 0; j < r; j++)
                    for (int64_t o = 0; o < OUT_COLS_PER_ITEM; o++)
                        bt[j * OUT_COLS_PER_ITEM + o] =
                            o < width ? load_weight1(weight_at(bs, o * b_out_stride + j * b_rank_stride, bf16), bf16) : 0.f;
                b_rows = bt;
                b_rows_bf16 = 0;
                b_row_stride = OUT_COLS_PER_ITEM;
            }
            int64_t t1 = seg_start[s + 1];
            for (int64_t t = seg_start[s]; t < t1; t += 2) {
                int pair = t + 1 < t1;
                const float *y0 = y + rows[t] * y_stride, *y1 = y + rows[t + pair] * y_stride;
                for (int64_t j = 0; j < r; j++) {
                    yl[2 * j] = y0[j * y_col_stride] * scale;
                    yl[2 * j + 1] = y1[j * y_col_stride] * scale;
                }
                v16 acc[2][4];
                for (int q = 0; q < 4; q++) acc[0][q] = acc[1][q] = (v16){0};
                if (b_rows_bf16)
                    expand_rows(acc, yl, b_rows, b_row_stride, r, 1);
                else
                    expand_rows(acc, yl, b_rows, b_row_stride, r, 0);
                for (int p = 0; p <= pair; p++) {
                    float *out = base + rows[t + p] * base_stride + o0;
                    if (width == OUT_COLS_PER_ITEM) {
                        for (int q = 0; q < 4; q++) *(v16 *)(out + 16 * q) += acc[p][q];
                    } else {
                        for (int64_t o = 0; o < width; o++) out[o] += acc[p][o / 16][o % 16];
                    }
                }
            }
        }
        free(bt);
        free(yl);
    }
    return failed ? -1 : 0;
}

#define EXPAND_PARAMS(W) const float *y, int64_t y_stride, int64_t y_col_stride, const W *b, int64_t b_slot_stride, \
    int64_t b_out_stride, int64_t b_rank_stride, int64_t out_dim, float *base, int64_t base_stride, int64_t n_seg, \
    const int64_t *seg_start, const int64_t *rows, const int64_t *seg_slot, const int64_t *seg_rank,                \
    const float *seg_scaling
#define EXPAND_ARGS y, y_stride, y_col_stride, b, b_slot_stride, b_out_stride, b_rank_stride, out_dim, base,       \
    base_stride, n_seg, seg_start, rows, seg_slot, seg_rank, seg_scaling

int lorafleet_lora_expand_f32(EXPAND_PARAMS(float)) { return lora_expand(EXPAND_ARGS, 0); }
int lorafleet_lora_expand_bf16w(EXPAND_PARAMS(uint16_t)) { return lora_expand(EXPAND_ARGS, 1); }
