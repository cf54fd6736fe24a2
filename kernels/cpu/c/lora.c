/* Multi-LoRA shrink and expand on the CPU: one call per projection for every adapter segment
   of a step, parallel over (segment, block) work items with OpenMP. Activations and sums are
   float32; the adapter weights are float32 (`_f32`) or bfloat16 (`_bf16w`, half the bytes to
   read, widened exactly in registers).

   A segment is the batch rows rows[seg_start[s] .. seg_start[s + 1]) of one adapter slot. The
   work is memory-bound (each slot's weights are read once per step for a few tokens), so each
   item reads its block of weights once from memory and reuses it from L1 for all the
   segment's tokens.

   Items are handed out `guided` (big chunks first, then smaller): a decode item is a fraction
   of a microsecond of work, and with `dynamic, 1` the threads spend it fighting over the shared
   item counter, so a second thread buys nothing (benchmarks/RESULTS.md, "CPU kernels"). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

#define RANK_ROWS_PER_ITEM 16
/* Shrink: tokens per block (their x rows stay in L1 while the item's rank rows pass). */
#define SHRINK_TOKENS 8
#define OUT_COLS_PER_ITEM 64
#define OUT_VECTORS (OUT_COLS_PER_ITEM / 16)
/* Rank-major expand (expand_stream_item): outputs per item, tokens per pass over its weights. */
#define STREAM_COLS 256
#define STREAM_TOKENS 8
/* Both kernels prefetch the next 4 weight rows of their item while they read the current 4,
   into L2 (`prefetcht2`: an L1 prefetch would hold one of the core's few line-fill buffers for
   the whole trip to memory), and never past the segment's rank (rows there are padding; fetching
   them costs bandwidth). 4 rows ahead measured best (benchmarks/RESULTS.md, "CPU kernels"). */

/* Each kernel body below is one always-inlined function taking the weight type as a `bf16`
   flag, instantiated by one exported function per type. The OpenMP region must sit in the
   exported function itself: GCC outlines a parallel region before it inlines anything, so a
   region inside a shared body would test the flag at run time on every weight load. */

/* out[t][j] = dot(xr[t], ar[j]) over n elements for a TT x 4 tile: TT tokens, 4 weight rows,
   16-wide vector accumulators, one horizontal sum per result; a scalar tail past the last 16.
   pf: the rows to prefetch meanwhile (a row of ar itself where there is none to fetch). */
#define DEFINE_DOT_TILE(TT)                                                                        \
    ALWAYS_INLINE void dot_tile_##TT(const float *const xr[], const void *const ar[4], const void *const pf[4], \
                                     int64_t n, float out[4][4], int bf16)                        \
    {                                                                                             \
        v16 acc[TT][4];                                                                           \
        for (int t = 0; t < TT; t++)                                                              \
            for (int j = 0; j < 4; j++) acc[t][j] = (v16){0};                                     \
        int64_t i = 0;                                                                            \
        for (; i + 16 <= n; i += 16) {                                                            \
            v16 xv[TT], av[4];                                                                    \
            for (int t = 0; t < TT; t++) xv[t] = *(const v16 *)(xr[t] + i);                       \
            for (int j = 0; j < 4; j++) av[j] = load_weight16(weight_at(ar[j], i, bf16), bf16);    \
            for (int j = 0; j < 4; j++) __builtin_prefetch(weight_at(pf[j], i, bf16), 0, 1);               \
            for (int t = 0; t < TT; t++)                                                          \
                for (int j = 0; j < 4; j++) acc[t][j] += xv[t] * av[j];                           \
        }                                                                                         \
        for (int t = 0; t < TT; t++)                                                              \
            for (int j = 0; j < 4; j++) {                                                         \
                float s = hsum16(acc[t][j]);                                                      \
                for (int64_t k = i; k < n; k++)                                                   \
                    s += xr[t][k] * load_weight1(weight_at(ar[j], k, bf16), bf16);                \
                out[t][j] = s;                                                                    \
            }                                                                                     \
    }
DEFINE_DOT_TILE(4)
DEFINE_DOT_TILE(2)
DEFINE_DOT_TILE(1)

/* The widest tile that `left` tokens fill; returns how many tokens it computed. */
ALWAYS_INLINE int64_t dot_tile(const float *const xr[4], const void *const ar[4], const void *const pf[4], int64_t n,
                               int64_t left, float out[4][4], int bf16)
{
    if (left >= 4) { dot_tile_4(xr, ar, pf, n, out, bf16); return 4; }
    if (left >= 2) { dot_tile_2(xr, ar, pf, n, out, bf16); return 2; }
    dot_tile_1(xr, ar, pf, n, out, bf16);
    return 1;
}

/* ---- shrink ---------------------------------------------------------------------------------

   y[row, j] = x[row] . A[slot, j, :in_dim] for j < rank, for the rows of every segment.
   A[slot, j, k] lies at a + slot * a_slot_stride + j * a_row_stride + k (in elements). Other y
   entries are left as they are. Returns 0, or -1 when out of memory (nothing written). */
#define SHRINK_PARAMS(W) const float *x, int64_t x_stride, int64_t in_dim, const W *a, int64_t a_slot_stride, \
    int64_t a_row_stride, float *y, int64_t y_stride, int64_t n_seg, const int64_t *seg_start,                \
    const int64_t *rows, const int64_t *seg_slot, const int64_t *seg_rank
#define SHRINK_ARGS x, x_stride, in_dim, a, a_slot_stride, a_row_stride, y, y_stride, n_seg, seg_start, rows, \
    seg_slot, seg_rank

/* The work list: item k is rank rows item[n + k] .. + RANK_ROWS_PER_ITEM of segment item[k]. */
static int64_t *shrink_items(int64_t n_seg, const int64_t *seg_rank, int64_t *n_items)
{
    int64_t n = 0;
    for (int64_t s = 0; s < n_seg; s++) n += (seg_rank[s] + RANK_ROWS_PER_ITEM - 1) / RANK_ROWS_PER_ITEM;
    *n_items = n;
    int64_t *items = malloc(sizeof(int64_t) * 2 * (n ? n : 1));
    if (items == NULL) return NULL;
    for (int64_t s = 0, k = 0; s < n_seg; s++)
        for (int64_t j = 0; j < seg_rank[s]; j += RANK_ROWS_PER_ITEM, k++) {
            items[k] = s;
            items[n + k] = j;
        }
    return items;
}

ALWAYS_INLINE void shrink_item(SHRINK_PARAMS(void), int64_t s, int64_t j_begin, int bf16)
{
    (void)n_seg;
    int64_t j_end = j_begin + RANK_ROWS_PER_ITEM < seg_rank[s] ? j_begin + RANK_ROWS_PER_ITEM : seg_rank[s];
    const void *as = weight_at(a, seg_slot[s] * a_slot_stride, bf16);
    /* Token blocks outermost: a block's x rows stay in L1 across the item's rank rows (a whole
       prefill chunk per 4 rank rows streamed x from L3: 1024-token runs ran slower than MKL). */
    for (int64_t t0 = seg_start[s], t_end = seg_start[s + 1]; t0 < t_end; t0 += SHRINK_TOKENS) {
        int64_t t1 = t_end - t0 < SHRINK_TOKENS ? t_end : t0 + SHRINK_TOKENS;
        for (int64_t j = j_begin; j < j_end; j += 4) {
            const void *ar[4], *pf[4];
            for (int q = 0; q < 4; q++) ar[q] = weight_at(as, (j + q < j_end ? j + q : j_end - 1) * a_row_stride, bf16);
            for (int q = 0; q < 4; q++) pf[q] = j + 4 + q < seg_rank[s] ? weight_at(as, (j + 4 + q) * a_row_stride, bf16) : ar[q];
            for (int64_t t = t0, done; t < t1; t += done) {
                const float *xr[4];
                for (int p = 0; p < 4; p++) xr[p] = x + rows[t + p < t1 ? t + p : t1 - 1] * x_stride;
                float out[4][4];
                done = dot_tile(xr, ar, pf, in_dim, t1 - t, out, bf16);
                for (int64_t p = 0; p < done; p++)
                    for (int q = 0; q < 4 && j + q < j_end; q++) y[rows[t + p] * y_stride + j + q] = out[p][q];
            }
        }
    }
}

#define DEFINE_SHRINK(NAME, W, BF16)                                                              \
    int NAME(SHRINK_PARAMS(W))                                                                    \
    {                                                                                             \
        int64_t n_items;                                                                          \
        int64_t *items = shrink_items(n_seg, seg_rank, &n_items);                                 \
        if (items == NULL) return -1;                                                             \
        _Pragma("omp parallel for schedule(guided)")                                              \
        for (int64_t it = 0; it < n_items; it++) shrink_item(SHRINK_ARGS, items[it], items[n_items + it], BF16); \
        free(items);                                                                              \
        return 0;                                                                                 \
    }
DEFINE_SHRINK(lorafleet_lora_shrink_f32, float, 0)
DEFINE_SHRINK(lorafleet_lora_shrink_bf16w, uint16_t, 1)

/* ---- expand ---------------------------------------------------------------------------------

   base[row, o] += scaling[s] * y[row, :rank] . B[slot, o, :rank], for the rows of every segment.
   y[row, j] lies at y + row * y_stride + j * y_col_stride (fused projections interleave their
   ranks) and B[slot, o, j] at b + slot * b_slot_stride + o * b_out_stride + j * b_rank_stride.

   With b_out_stride == 1 (the engine's rank-major pool: B[slot] is `rank` rows of out_dim
   weights) an item is up to STREAM_COLS outputs of one segment, read as rank runs of 1 KB in
   memory order (`expand_stream_item`). Any other layout takes items of 64 outputs, first
   transposed into a per-thread float buffer; each token is then rank broadcast-FMAs into 4
   vectors, two tokens at a time so every B load feeds two FMAs. Returns 0, or -1 when out of
   memory (base then holds a partial sum: the caller raises). */
#define EXPAND_PARAMS(W) const float *y, int64_t y_stride, int64_t y_col_stride, const W *b, int64_t b_slot_stride, \
    int64_t b_out_stride, int64_t b_rank_stride, int64_t out_dim, float *base, int64_t base_stride, int64_t n_seg, \
    const int64_t *seg_start, const int64_t *rows, const int64_t *seg_slot, const int64_t *seg_rank,                \
    const float *seg_scaling
#define EXPAND_ARGS y, y_stride, y_col_stride, b, b_slot_stride, b_out_stride, b_rank_stride, out_dim, base,       \
    base_stride, n_seg, seg_start, rows, seg_slot, seg_rank, seg_scaling

/* acc[p][q] += sum over j < r of yl[2j + p] * bt row j's outputs 16q .. 16q + 15, for two tokens p. */
ALWAYS_INLINE void expand_rows(v16 acc[2][OUT_VECTORS], const float *yl, const float *bt, int64_t r)
{
    for (int64_t j = 0; j < r; j++)
        for (int q = 0; q < OUT_VECTORS; q++) {
            v16 bv = *(const v16 *)(bt + j * OUT_COLS_PER_ITEM + 16 * q);
            acc[0][q] += yl[2 * j] * bv;
            acc[1][q] += yl[2 * j + 1] * bv;
        }
}

/* One 4-row block of expand_stream_item over the item's columns: sums[p] (+)= w[p] . B rows bq,
   for nt tokens. `first` (a constant at each call) starts the sums instead of adding to them,
   and asks for the tokens' output runs meanwhile (outs[p]), with write intent: they are read
   and written once the block loop is done, and in a prefill chunk they are long out of cache. */
ALWAYS_INLINE void stream_block(float sums[STREAM_TOKENS][STREAM_COLS], const float w[STREAM_TOKENS][4],
                                const void *const bq[4], const void *const ahead[4], float *const outs[STREAM_TOKENS],
                                int64_t nt, int64_t width, int first, int bf16)
{
    int64_t o = 0;
    for (; o + 16 <= width; o += 16) {
        for (int q = 0; q < 4; q++) __builtin_prefetch(weight_at(ahead[q], o, bf16), 0, 1);
        v16 b0 = load_weight16(weight_at(bq[0], o, bf16), bf16), b1 = load_weight16(weight_at(bq[1], o, bf16), bf16);
        v16 b2 = load_weight16(weight_at(bq[2], o, bf16), bf16), b3 = load_weight16(weight_at(bq[3], o, bf16), bf16);
        for (int64_t p = 0; p < nt; p++) {
            v16 term = w[p][0] * b0 + w[p][1] * b1 + w[p][2] * b2 + w[p][3] * b3;
            if (first) {
                __builtin_prefetch(outs[p] + o, 1, 3);
                *(v16 *)&sums[p][o] = term;
            } else {
                *(v16 *)&sums[p][o] += term;
            }
        }
    }
    for (; o < width; o++)
        for (int64_t p = 0; p < nt; p++) {
            float term = 0.f;
            for (int q = 0; q < 4; q++) term += w[p][q] * load_weight1(weight_at(bq[q], o, bf16), bf16);
            sums[p][o] = first ? term : sums[p][o] + term;
        }
}

/* Rank-major B, an item of `width` <= STREAM_COLS outputs from column o0 of segment s: per
   pass of up to STREAM_TOKENS tokens, each 4 rank rows' runs of the item's columns are read once
   and added, weighted by the tokens' y, into sums that stay in L1; the sums go into base once
   at the end. Against items of 64 outputs, two tokens at a time (B read once per token pair,
   256 bytes a row): a decode step of 8 bfloat16 adapters 16% faster, and a step's prefill runs
   in one call faster than MKL's matmul per run (see lora_plan.py). */
ALWAYS_INLINE void expand_stream_item(EXPAND_PARAMS(void), int64_t s, int64_t o0, int64_t width, int bf16)
{
    (void)n_seg; (void)b_out_stride;
    int64_t r = seg_rank[s];
    float scale = seg_scaling[s];
    const void *bs = weight_at(b, seg_slot[s] * b_slot_stride + o0, bf16);
    for (int64_t t0 = seg_start[s], t1 = seg_start[s + 1]; t0 < t1; t0 += STREAM_TOKENS) {
        int64_t nt = t1 - t0 < STREAM_TOKENS ? t1 - t0 : STREAM_TOKENS;
        float sums[STREAM_TOKENS][STREAM_COLS] __attribute__((aligned(64)));
        float *outs[STREAM_TOKENS];
        for (int64_t p = 0; p < nt; p++) outs[p] = base + rows[t0 + p] * base_stride + o0;
        for (int64_t j = 0; j < r; j += 4) {
            /* Rows past the rank read row j again with weight 0: a full 4-row block every time. */
            const void *bq[4];
            float w[STREAM_TOKENS][4];
            for (int q = 0; q < 4; q++) bq[q] = weight_at(bs, (j + q < r ? j + q : j) * b_rank_stride, bf16);
            for (int64_t p = 0; p < nt; p++) {
                const float *yr = y + rows[t0 + p] * y_stride;
                for (int q = 0; q < 4; q++) w[p][q] = j + q < r ? yr[(j + q) * y_col_stride] * scale : 0.f;
            }
            /* The next block's rows, prefetched as this one's are read (see the top of the file). */
            const void *ahead[4];
            for (int q = 0; q < 4; q++) ahead[q] = j + 4 + q < r ? weight_at(bs, (j + 4 + q) * b_rank_stride, bf16) : bq[q];
            if (j == 0)
                stream_block(sums, w, bq, ahead, outs, nt, width, 1, bf16);
            else
                stream_block(sums, w, bq, ahead, outs, nt, width, 0, bf16);
        }
        for (int64_t p = 0; p < nt; p++) {
            int64_t o = 0;
            for (; o + 16 <= width; o += 16) *(v16 *)(outs[p] + o) += *(const v16 *)&sums[p][o];
            for (; o < width; o++) outs[p][o] += sums[p][o];
        }
    }
}

/* Expand items per segment for an output of out_dim columns: column blocks of the item's width. */
ALWAYS_INLINE int64_t expand_blocks(int64_t out_dim, int64_t b_out_stride)
{
    int64_t cols = b_out_stride == 1 ? STREAM_COLS : OUT_COLS_PER_ITEM;
    return (out_dim + cols - 1) / cols;
}

/* bt: OUT_COLS_PER_ITEM x max rank floats, yl: 2 x max rank floats (the thread's scratch). */
ALWAYS_INLINE void expand_item(EXPAND_PARAMS(void), int64_t it, float *bt, float *yl, int bf16)
{
    (void)n_seg;
    int64_t per_seg = expand_blocks(out_dim, b_out_stride);
    if (b_out_stride == 1) {
        int64_t s = it / per_seg, o0 = (it % per_seg) * STREAM_COLS;
        expand_stream_item(EXPAND_ARGS, s, o0, out_dim - o0 < STREAM_COLS ? out_dim - o0 : STREAM_COLS, bf16);
        return;
    }
    int64_t s = it / per_seg, o0 = (it % per_seg) * OUT_COLS_PER_ITEM;
    int64_t width = out_dim - o0 < OUT_COLS_PER_ITEM ? out_dim - o0 : OUT_COLS_PER_ITEM;
    int64_t r = seg_rank[s];
    float scale = seg_scaling[s];
    const void *bs = weight_at(b, seg_slot[s] * b_slot_stride + o0 * b_out_stride, bf16);
    for (int64_t j = 0; j < r; j++)
        for (int64_t o = 0; o < OUT_COLS_PER_ITEM; o++)
            bt[j * OUT_COLS_PER_ITEM + o] =
                o < width ? load_weight1(weight_at(bs, o * b_out_stride + j * b_rank_stride, bf16), bf16) : 0.f;
    int64_t t1 = seg_start[s + 1];
    for (int64_t t = seg_start[s]; t < t1; t += 2) {
        int pair = t + 1 < t1;
        const float *y0 = y + rows[t] * y_stride, *y1 = y + rows[t + pair] * y_stride;
        for (int64_t j = 0; j < r; j++) {
            yl[2 * j] = y0[j * y_col_stride] * scale;
            yl[2 * j + 1] = y1[j * y_col_stride] * scale;
        }
        v16 acc[2][OUT_VECTORS];
        for (int q = 0; q < OUT_VECTORS; q++) acc[0][q] = acc[1][q] = (v16){0};
        expand_rows(acc, yl, bt, r);
        for (int p = 0; p <= pair; p++) {
            float *out = base + rows[t + p] * base_stride + o0;
            if (width == OUT_COLS_PER_ITEM) {
                for (int q = 0; q < OUT_VECTORS; q++) *(v16 *)(out + 16 * q) += acc[p][q];
            } else {
                for (int64_t o = 0; o < width; o++) out[o] += acc[p][o / 16][o % 16];
            }
        }
    }
}

#define DEFINE_EXPAND(NAME, W, BF16)                                                              \
    int NAME(EXPAND_PARAMS(W))                                                                    \
    {                                                                                             \
        int64_t n_items = n_seg * expand_blocks(out_dim, b_out_stride), max_rank = 1;            \
        for (int64_t s = 0; s < n_seg; s++) if (seg_rank[s] > max_rank) max_rank = seg_rank[s]; \
        int failed = 0;                                                                           \
        _Pragma("omp parallel")                                                                   \
        {                                                                                         \
            float *bt = malloc(sizeof(float) * OUT_COLS_PER_ITEM * max_rank);                     \
            float *yl = malloc(sizeof(float) * 2 * max_rank);                                     \
            if (bt == NULL || yl == NULL) {                                                       \
                _Pragma("omp atomic write")                                                       \
                failed = 1;                                                                       \
            }                                                                                     \
            _Pragma("omp for schedule(guided)")                                                   \
            for (int64_t it = 0; it < n_items; it++)                                              \
                if (bt != NULL && yl != NULL) expand_item(EXPAND_ARGS, it, bt, yl, BF16);         \
            free(bt);                                                                             \
            free(yl);                                                                             \
        }                                                                                         \
        return failed ? -1 : 0;                                                                   \
    }
DEFINE_EXPAND(lorafleet_lora_expand_f32, float, 0)
DEFINE_EXPAND(lorafleet_lora_expand_bf16w, uint16_t, 1)

/* ---- apply: one projection group's shrink and all its expands in one call ---------------------

   Projections that read the same input (q, k, v; gate, up) share one A stack whose slot rows
   interleave the parts: row j * n_parts + i is part i's rank row j. One parallel region runs
   the shrink of the whole stack into y, then (after the barrier) the expand of every part into
   its own output, so a projection group pays one call and one thread wake-up instead of one per
   kernel. Where the segments share out evenly among the threads (`apply_plan_by_segment`),
   each thread instead takes whole segments, shrink and expands, largest first, with no barrier
   between them.

   parts: n_parts `lora_part`s (mirrored by kernels.cpu.native.LoraPart): B's address and
   strides, out_dim, and the byte offset from out_base and row stride of the part's output.
   (Callers with one output tensor pass its address as out_base and the parts' column offsets,
   fixed per layer; others pass out_base 0 and absolute addresses.) A part whose B is NULL is
   skipped (no adapter of the step adapts it). seg_rank is the adapters' own rank. y (the
   shrink's result, rows of y_stride >= ranks x n_parts floats) may be NULL: the kernel then
   uses a buffer of its own.
   Returns 0, or -1 when out of memory (the output may then hold a partial sum). */
typedef struct {
    const void *b;
    int64_t b_slot_stride, b_out_stride, b_rank_stride, out_dim;
    int64_t out_offset, out_stride;  /* the output: bytes from out_base, and its row stride */
} lora_part;
#define APPLY_MAX_PARTS 8
#define APPLY_PARAMS(W) const float *x, int64_t x_stride, int64_t in_dim, const W *a, int64_t a_slot_stride, \
    int64_t a_row_stride, float *y, int64_t y_stride, int64_t n_parts, const lora_part *parts, intptr_t out_base,  \
    int64_t n_seg, const int64_t *seg_start, const int64_t *rows, const int64_t *seg_slot, const int64_t *seg_rank, \
    const float *seg_scaling

/* The work lists of one apply: the shrink items of the stack (ranks × n_parts rows; the item
   schedule's only, none when by_segment) and where each part's expand items start (part i's
   are [first[i], first[i + 1]), n_seg column blocks of its out_dim each). */
typedef struct {
    int64_t *stack_rank, *shrink, n_shrink, first[APPLY_MAX_PARTS + 1], max_rank;
    int64_t *order;  /* segments by falling cost, when by_segment */
    int by_segment;
} apply_plan;

/* A segment's work, in units where a decode token's share is small: its weight bytes go with
   its rank, its arithmetic with rank x tokens. */
#define SEGMENT_COST_TOKENS 8
#define SEGMENT_COST(s) (seg_rank[s] * (seg_start[(s) + 1] - seg_start[s] + SEGMENT_COST_TOKENS))

/* Whether each thread can take whole segments (its shrink, then its expands: no barrier between
   the two, and one contiguous stream of weights per segment) and still share the work evenly:
   the threads, taking the largest segment left in turn, finish within 10% of an even share.
   Decode steps of several adapters do; a step of a few prefill runs does not. Sets
   plan->order then, segments by falling cost. -1 when out of memory. */
#define SEGMENT_MAX_THREADS 64
static int apply_plan_by_segment(apply_plan *plan, int64_t n_seg, const int64_t *seg_start, const int64_t *seg_rank)
{
    int64_t threads = omp_get_max_threads();
    plan->by_segment = 0;
    if (threads < 2 || threads > SEGMENT_MAX_THREADS || n_seg < threads) return 0;
    plan->order = malloc(sizeof(int64_t) * n_seg);
    if (plan->order == NULL) return -1;
    /* Insertion sort, largest first: a step has tens of segments. */
    for (int64_t k = 0; k < n_seg; k++) {
        int64_t j = k;
        for (; j > 0 && SEGMENT_COST(plan->order[j - 1]) < SEGMENT_COST(k); j--) plan->order[j] = plan->order[j - 1];
        plan->order[j] = k;
    }
    /* What the dynamic schedule will do: each segment to the thread that frees up first. */
    int64_t load[SEGMENT_MAX_THREADS] = {0}, total = 0, most = 0;
    for (int64_t k = 0; k < n_seg; k++) {
        int64_t least = 0;
        for (int64_t t = 1; t < threads; t++) if (load[t] < load[least]) least = t;
        load[least] += SEGMENT_COST(plan->order[k]);
        total += SEGMENT_COST(plan->order[k]);
    }
    for (int64_t t = 0; t < threads; t++) if (load[t] > most) most = load[t];
    plan->by_segment = most * threads * 10 <= total * 11;
    return 0;
}

/* The schedule an apply over these segments takes, for tests: 1 by segment, 0 by items. */
int lorafleet_lora_apply_by_segment(int64_t n_seg, const int64_t *seg_start, const int64_t *seg_rank)
{
    apply_plan plan = {0};
    int status = apply_plan_by_segment(&plan, n_seg, seg_start, seg_rank);
    free(plan.order);
    return status ? -1 : plan.by_segment;
}

static int apply_plan_init(apply_plan *plan, int64_t n_parts, const lora_part *parts, int64_t n_seg, const int64_t *seg_start,
                           const int64_t *seg_rank)
{
    plan->max_rank = 1;
    plan->n_shrink = 0;
    plan->shrink = plan->order = NULL;
    plan->stack_rank = malloc(sizeof(int64_t) * (n_seg ? n_seg : 1));
    if (plan->stack_rank == NULL) return -1;
    for (int64_t s = 0; s < n_seg; s++) {
        plan->stack_rank[s] = seg_rank[s] * n_parts;
        if (seg_rank[s] > plan->max_rank) plan->max_rank = seg_rank[s];
    }
    plan->first[0] = 0;
    for (int64_t i = 0; i < n_parts; i++) {
        const lora_part *p = parts + i;
        plan->first[i + 1] = plan->first[i] + (p->b ? n_seg * expand_blocks(p->out_dim, p->b_out_stride) : 0);
    }
    if (apply_plan_by_segment(plan, n_seg, seg_start, seg_rank)) return -1;
    if (plan->by_segment) return 0;  /* the shrink item list is the item schedule's alone */
    plan->shrink = shrink_items(n_seg, plan->stack_rank, &plan->n_shrink);
    return plan->shrink == NULL ? -1 : 0;
}

static void apply_plan_free(apply_plan *plan)
{
    free(plan->order);
    free(plan->shrink);
    free(plan->stack_rank);
}

/* Expand item `it` of the apply: find its part, then run it against that part's B and output. */
ALWAYS_INLINE void apply_expand_item(APPLY_PARAMS(void), const apply_plan *plan, int64_t it, float *bt, float *yl, int bf16)
{
    (void)x; (void)x_stride; (void)in_dim; (void)a; (void)a_slot_stride; (void)a_row_stride;
    int64_t i = 0;
    while (it >= plan->first[i + 1]) i++;
    const lora_part *p = parts + i;
    expand_item(y + i, y_stride, n_parts, p->b, p->b_slot_stride, p->b_out_stride, p->b_rank_stride, p->out_dim,
                (float *)(out_base + p->out_offset), p->out_stride, n_seg, seg_start, rows, seg_slot, seg_rank,
                seg_scaling, it - plan->first[i], bt, yl, bf16);
}

#define APPLY_ARGS x, x_stride, in_dim, a, a_slot_stride, a_row_stride, y, y_stride, n_parts, parts, out_base, n_seg, \
    seg_start, rows, seg_slot, seg_rank, seg_scaling

/* All of segment s: the shrink of its stack rows, then every live part's expand items. */
ALWAYS_INLINE void apply_segment(APPLY_PARAMS(void), const apply_plan *plan, int64_t s, float *bt, float *yl, int bf16)
{
    for (int64_t j = 0; j < plan->stack_rank[s]; j += RANK_ROWS_PER_ITEM)
        shrink_item(x, x_stride, in_dim, a, a_slot_stride, a_row_stride, y, y_stride, n_seg, seg_start, rows, seg_slot,
                    plan->stack_rank, s, j, bf16);
    for (int64_t i = 0; i < n_parts; i++) {
        const lora_part *p = parts + i;
        if (!p->b) continue;
        int64_t per_seg = expand_blocks(p->out_dim, p->b_out_stride);
        for (int64_t c = 0; c < per_seg; c++)
            apply_expand_item(APPLY_ARGS, plan, plan->first[i] + s * per_seg + c, bt, yl, bf16);
    }
}

/* y for a caller that passes NULL: rows up to the largest batch row the segments name, y_stride
   floats each. (A scratch tensor per call costs Python more than this malloc, which reuses the
   same free block call after call.) */
static float *apply_scratch(int64_t n_seg, const int64_t *seg_start, const int64_t *rows, int64_t y_stride)
{
    int64_t n_rows = 1;
    for (int64_t k = seg_start[0]; k < seg_start[n_seg]; k++)
        if (rows[k] >= n_rows) n_rows = rows[k] + 1;
    return malloc(sizeof(float) * n_rows * y_stride);
}

#define DEFINE_APPLY(NAME, W, BF16)                                                               \
    int NAME(APPLY_PARAMS(W))                                                                     \
    {                                                                                             \
        if (n_parts < 1 || n_parts > APPLY_MAX_PARTS) return -1;                                  \
        float *own_y = NULL;                                                                      \
        if (y == NULL && (y = own_y = apply_scratch(n_seg, seg_start, rows, y_stride)) == NULL) return -1; \
        apply_plan plan;                                                                          \
        int failed = apply_plan_init(&plan, n_parts, parts, n_seg, seg_start, seg_rank) != 0;     \
        if (!failed) {                                                                            \
            _Pragma("omp parallel")                                                               \
            {                                                                                     \
                float *bt = malloc(sizeof(float) * OUT_COLS_PER_ITEM * plan.max_rank);            \
                float *yl = malloc(sizeof(float) * 2 * plan.max_rank);                            \
                int ok = bt != NULL && yl != NULL;                                                \
                if (!ok) {                                                                        \
                    _Pragma("omp atomic write")                                                   \
                    failed = 1;                                                                   \
                }                                                                                 \
                if (plan.by_segment) {                                                            \
                    _Pragma("omp for schedule(dynamic, 1)")                                       \
                    for (int64_t k = 0; k < n_seg; k++)                                           \
                        if (ok) apply_segment(APPLY_ARGS, &plan, plan.order[k], bt, yl, BF16);    \
                } else {                                                                          \
                    _Pragma("omp for schedule(guided)")                                           \
                    for (int64_t it = 0; it < plan.n_shrink; it++)                                \
                        shrink_item(x, x_stride, in_dim, a, a_slot_stride, a_row_stride, y, y_stride, n_seg, seg_start, \
                                    rows, seg_slot, plan.stack_rank, plan.shrink[it], plan.shrink[plan.n_shrink + it], BF16); \
                    /* (the implicit barrier above: every y row is complete before an expand reads it) */ \
                    _Pragma("omp for schedule(guided)")                                           \
                    for (int64_t it = 0; it < plan.first[n_parts]; it++)                          \
                        if (ok) apply_expand_item(APPLY_ARGS, &plan, it, bt, yl, BF16);           \
                }                                                                                 \
                free(bt);                                                                         \
                free(yl);                                                                         \
            }                                                                                     \
        }                                                                                         \
        apply_plan_free(&plan);                                                                   \
        free(own_y);                                                                              \
        return failed ? -1 : 0;                                                                   \
    }
DEFINE_APPLY(lorafleet_lora_apply_f32, float, 0)
DEFINE_APPLY(lorafleet_lora_apply_bf16w, uint16_t, 1)
