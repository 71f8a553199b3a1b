/* Products of a few rows (1-8) with a cache-resident fp32 weight, shared by linear_rows.c and moe_rows.c.
 *
 * MKL and oneDNN spend far more time per multiply-add on such products than on one row (a [6, 192] x
 * [192, 1664] product costs ~3x a [1, 192] one here). For a row-major weight W [N, K] a tile of 4 output
 * features at a time runs every group of up to 4 rows against it while its weights are in L1, with up to 16
 * vector accumulators (4 outputs x 4 rows) and one transposing reduction per tile. For a column-major weight
 * (hylm's CPU layout for Linear weights, see hylm/model/layout.py: Wt [K, N] contiguous) each tile of 32
 * outputs is a sum of rows of Wt scaled by x's entries, so the vectors run along the outputs.
 *
 * For up to 8 rows over a column-major weight the tiles lose to a streaming order whenever the weight comes from
 * DRAM (every weight of a model larger than L3, and every step's after an lm_head has streamed through it): a
 * 32-output tile reads 128 bytes from each of K rows far apart, more concurrent streams than the prefetchers
 * follow. rows_stream instead gives each thread one contiguous range of outputs and reads 8 rows of Wt at a
 * time along it, in runs of up to ROWS_STREAM_BLOCK outputs whose y rows stay in L1/L2, prefetching the next 8
 * rows. Measured on 2 cores with cold caches, 1 row: [512 -> 2320] 0.19 vs 0.31 ms, [512 -> 512] 0.08 vs 0.15
 * ms; 4-8 rows gain alike. The same holds for a weight that comes from L3, as every weight of a forward does
 * once the model is larger than L2: hylm-tiny's Mamba in_proj [192 -> 908] for 4 verified tokens inside
 * the engine took 82-95 us as tiles, 36 us streamed (15 us either way when a loop keeps it in L2).
 *
 * `rows_product` shares its tiles out with an orphaned `omp for`: inside a parallel region the team splits
 * them (and waits at the end), outside one the caller computes them all.
 */
#ifndef HYLM_ROWS_H
#define HYLM_ROWS_H

#include <stdint.h>
#include <string.h>

#include <omp.h>

#include "vec.h"

#define ROWS_TILE_AHEAD 8 /* rows of W prefetched ahead of a tile (the tile after next) */

/* outputs n0..n0+3 for rows r0..r0+J-1 (K a multiple of 8): out[j * 4 + o] = x[r0 + j] . W[n0 + o].
 * Always inlined with a constant J (1..4), so that the accumulators live in registers. A thread's tiles read W's
 * rows in order, but each is short (4 K floats): without asking for the tile after next, a MoE layer's experts
 * (74 KB each on hylm-tiny) came from L3 at ~10 GB/s per core. Measured in the engine, alternating per call:
 * experts of a 1-token step 8.6-9.7 -> 6.3-6.6 us, of a 4-token verification 26-32 -> 18-20 us. Prefetches past
 * W's end are hints, never faults. */
static inline __attribute__((always_inline)) void rows_tile(const float *x, const float *W, int64_t K, int64_t r0,
                                                            int64_t n0, const int J, float *out) {
    v8 acc[16] = {0};
    const float *w0 = W + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t b = 0; b < 4 * K; b += 16) __builtin_prefetch(w0 + ROWS_TILE_AHEAD * K + b, 0, 3);
    for (int64_t k = 0; k < K; k += 8) {
        v8 a = load8(w0 + k), b = load8(w1 + k), c = load8(w2 + k), d = load8(w3 + k);
#pragma GCC unroll 4
        for (int j = 0; j < J; j++) {
            v8 p = load8(x + (r0 + j) * K + k);
            acc[4 * j] += p * a;
            acc[4 * j + 1] += p * b;
            acc[4 * j + 2] += p * c;
            acc[4 * j + 3] += p * d;
        }
    }
    v8 lo = sum_lanes8(acc), hi = sum_lanes8(acc + 8);
    memcpy(out, &lo, sizeof lo);
    memcpy(out + 8, &hi, sizeof hi);
}

static inline float rows_dot(const float *a, const float *b, int64_t K) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; k++) s += a[k] * b[k];
    return s;
}

/* outputs n0..n0+31 of rows r0..r0+J-1 over Wt [K, N] into out [J, 32]. With `last` (a partial tile: fewer
 * than 32 outputs remain, see rows_tail) the last row of Wt is read from there, zero-padded; the other rows'
 * lanes past N read the start of the next row, in bounds and discarded. */
static inline __attribute__((always_inline)) void rows_tile_t(const float *x, const float *Wt, const float *last,
                                                              int64_t K, int64_t N, int64_t r0, int64_t n0,
                                                              const int J, float *out) {
    v8 acc[16] = {0};
    for (int64_t k = 0; k < K; k++) {
        /* the row ROWS_TILE_AHEAD below: the tile's 128 bytes per row are far apart (N floats), so the hardware
         * prefetchers do not follow; measured in the engine, alternating per call, 9-32-row batches' products
         * took 13% less time with it */
        __builtin_prefetch(Wt + (k + ROWS_TILE_AHEAD) * N + n0, 0, 3);
        __builtin_prefetch(Wt + (k + ROWS_TILE_AHEAD) * N + n0 + 16, 0, 3);
        const float *w = last && k == K - 1 ? last : Wt + k * N + n0;
        v8 a = load8(w), b = load8(w + 8), c = load8(w + 16), d = load8(w + 24);
#pragma GCC unroll 4
        for (int j = 0; j < J; j++) {
            float s = x[(r0 + j) * K + k];
            acc[4 * j] += s * a;
            acc[4 * j + 1] += s * b;
            acc[4 * j + 2] += s * c;
            acc[4 * j + 3] += s * d;
        }
    }
    memcpy(out, acc, (size_t)J * 4 * sizeof(v8));
}

/* columns n0..n0+m-1 (m <= 32) of every row through rows_tile_t, 4 rows at a time */
static inline void rows_tile_t_all(const float *x, const float *Wt, const float *last, float *y, int64_t R,
                                   int64_t K, int64_t N, int64_t n0, int64_t m) {
    float out[4 * 32];
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const int64_t J = R - r0 < 4 ? R - r0 : 4;
        switch (J) {
            case 1: rows_tile_t(x, Wt, last, K, N, r0, n0, 1, out); break;
            case 2: rows_tile_t(x, Wt, last, K, N, r0, n0, 2, out); break;
            case 3: rows_tile_t(x, Wt, last, K, N, r0, n0, 3, out); break;
            default: rows_tile_t(x, Wt, last, K, N, r0, n0, 4, out);
        }
        for (int64_t j = 0; j < J; j++) memcpy(y + (r0 + j) * N + n0, out + 32 * j, (size_t)m * sizeof(float));
    }
}

/* rows r0.. (up to 4 of R) of one 4-output tile of a row-major W */
static inline void rows_tile_any(const float *x, const float *W, float *y, int64_t R, int64_t K, int64_t N,
                                 int64_t n0) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
        int64_t rows = R - r0 < 4 ? R - r0 : 4;
        if (K % 8 == 0) {
            float out[16];
            switch (rows) {
                case 1: rows_tile(x, W, K, r0, n0, 1, out); break;
                case 2: rows_tile(x, W, K, r0, n0, 2, out); break;
                case 3: rows_tile(x, W, K, r0, n0, 3, out); break;
                default: rows_tile(x, W, K, r0, n0, 4, out);
            }
            for (int64_t j = 0; j < rows; j++)
                for (int o = 0; o < 4; o++) y[(r0 + j) * N + n0 + o] = out[j * 4 + o];
        } else {
            for (int64_t j = 0; j < rows; j++)
                for (int o = 0; o < 4; o++) y[(r0 + j) * N + n0 + o] = rows_dot(x + (r0 + j) * K, W + (n0 + o) * K, K);
        }
    }
}

/* the outputs from n_lo on (the last N % tile ones), every row. Column-major: one padded 32-wide tile (see
 * rows_tile_t: its reads past N stay in bounds because a full tile precedes it, N >= 32), else a scalar pass
 * over the rows of Wt. */
static inline void rows_tail(const float *x, const float *W, int transposed, float *y, int64_t R, int64_t K,
                             int64_t N, int64_t n_lo) {
    if (!transposed) {
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = n_lo; n < N; n++) y[r * N + n] = rows_dot(x + r * K, W + n * K, K);
        return;
    }
    if (n_lo == 0) {
        for (int64_t r = 0; r < R; r++) {
            float *yr = y + r * N;
            for (int64_t n = 0; n < N; n++) yr[n] = 0.0f;
            for (int64_t k = 0; k < K; k++)
                for (int64_t n = 0; n < N; n++) yr[n] += x[r * K + k] * W[k * N + n];
        }
        return;
    }
    float last[32] = {0};
    memcpy(last, W + (K - 1) * N + n_lo, (size_t)(N - n_lo) * sizeof(float));
    rows_tile_t_all(x, W, last, y, R, K, N, n_lo, N - n_lo);
}

#define ROWS_STREAM_MAX_ROWS 8
#define ROWS_STREAM_MIN_OUTPUTS 64 /* below, the tiles (32 outputs each) keep both threads busy */
#define ROWS_STREAM_BLOCK 2048 /* outputs per run: 8 KB of each row of Wt, y's rows at most 64 KB */

/* outputs c0..c1-1 of every row over Wt [K, N], 8 rows of Wt at a time */
static inline void rows_stream_block(const float *x, const float *Wt, float *y, int64_t R, int64_t K, int64_t N,
                                     int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; r++) memset(y + r * N + c0, 0, (size_t)(c1 - c0) * sizeof(float));
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const float *w = Wt + k * N;
        const int prefetch = k + 16 <= K;
        int64_t n = c0;
        for (; n + 8 <= c1; n += 8) {
            if (prefetch && (n & 15) == 0)  /* one per 64-byte line of the next 8 rows */
                for (int g = 8; g < 16; g++) __builtin_prefetch(w + g * N + n, 0, 3);
            v8 a[8];
            for (int g = 0; g < 8; g++) a[g] = load8(w + g * N + n);
            for (int64_t r = 0; r < R; r++) {
                const float *xr = x + r * K + k;
                v8 acc = load8(y + r * N + n);
                for (int g = 0; g < 8; g++) acc += xr[g] * a[g];
                *(v8u *)(y + r * N + n) = acc;
            }
        }
        for (; n < c1; n++)
            for (int64_t r = 0; r < R; r++) {
                float s = 0.0f;
                for (int g = 0; g < 8; g++) s += x[r * K + k + g] * w[g * N + n];
                y[r * N + n] += s;
            }
    }
    for (; k < K; k++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = c0; n < c1; n++) y[r * N + n] += x[r * K + k] * Wt[k * N + n];
}

/* Streaming order for up to 8 rows over a column-major weight. Only a weight kept in L1/L2 by a loop over it
 * runs faster as tiles, which keep their sums in registers over all of K (hylm-tiny's [192 -> 2048], 2 rows: 27
 * vs 43 us); inside a forward each weight comes from L3 or DRAM (the A/B run of benchmarks/bench_speculative.py:
 * 789 vs 695 tok/s plain, 787 vs 695 speculative, medians of 4). */
static inline int rows_streams(int transposed, int64_t R, int64_t N) {
    return transposed && N >= ROWS_STREAM_MIN_OUTPUTS && R <= ROWS_STREAM_MAX_ROWS;
}

/* the team's share of outputs, one contiguous range per thread (a multiple of 16 outputs: whole lines) */
static inline void rows_stream(const float *x, const float *Wt, float *y, int64_t R, int64_t K, int64_t N) {
    const int64_t T = omp_get_num_threads(), per = ((N + T - 1) / T + 15) / 16 * 16;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const int64_t n0 = t * per < N ? t * per : N, n1 = n0 + per < N ? n0 + per : N;
        for (int64_t c0 = n0; c0 < n1; c0 += ROWS_STREAM_BLOCK)
            rows_stream_block(x, Wt, y, R, K, N, c0, c0 + ROWS_STREAM_BLOCK < n1 ? c0 + ROWS_STREAM_BLOCK : n1);
    }
}

/* Layout ROWS_PANELS: the weight packed in panels of 16 outputs, Wp [ceil(N / 16), K, 16] (a panel is the 16
 * columns of Wt [K, N] it covers, contiguous; outputs past N zero). A panel is read front to back while its
 * 16 sums per row stay in registers, x's entries broadcast: every weight byte is read once, in order, whatever
 * the number of rows, with no reduction at the end, where Wt's rows (8 at a time, `rows_stream`) or W's rows
 * (4-output tiles) are short runs far apart. The sums run over k in order from zero, as in rows_stream and
 * rows_tile_t, so the results are those of the column-major paths bit for bit. Measured on 2 cores with every
 * weight from L3 (24 weights in turn): [192 -> 912] 1 row 13.3 vs 25.1 us streamed, 4 rows 29.4 vs 66.0 us;
 * [384 -> 192] 7.4 vs 12.3 and 13.5 vs 24.5 us. hylm/ops/linear.py packs the weights (`packed_weight`). */
#define ROWS_PANELS 2
#define ROWS_PANEL 16
#define ROWS_PANEL_AHEAD 256 /* floats ahead of each panel's reads to prefetch (16 of its K rows) */

/* rows r0..r0+J-1 of P consecutive panels starting at panel p0 (2 P J <= 8 accumulators), into y [R, N] */
static inline __attribute__((always_inline)) void rows_panel_tile(const float *x, const float *Wp, float *y,
                                                                  int64_t K, int64_t N, int64_t r0, int64_t p0,
                                                                  const int P, const int J) {
    v8 acc[8] = {0};
    const float *w = Wp + p0 * K * ROWS_PANEL;
    for (int64_t k = 0; k < K; k++) {
#pragma GCC unroll 4
        for (int p = 0; p < P; p++) {
            const float *wk = w + (p * K + k) * ROWS_PANEL;
            __builtin_prefetch(wk + ROWS_PANEL_AHEAD, 0, 3);
            const v8 a = load8(wk), b = load8(wk + 8);
#pragma GCC unroll 4
            for (int j = 0; j < J; j++) {
                const float s = x[(r0 + j) * K + k];
                acc[2 * (j * P + p)] += s * a;
                acc[2 * (j * P + p) + 1] += s * b;
            }
        }
    }
    for (int j = 0; j < J; j++)
        for (int p = 0; p < P; p++) {
            const int64_t n0 = (p0 + p) * ROWS_PANEL;
            float *yr = y + (r0 + j) * N + n0;
            if (n0 + ROWS_PANEL <= N) {
                *(v8u *)yr = acc[2 * (j * P + p)];
                *(v8u *)(yr + 8) = acc[2 * (j * P + p) + 1];
            } else {  /* the last panel, partly padding */
                float tmp[ROWS_PANEL];
                memcpy(tmp, &acc[2 * (j * P + p)], 2 * sizeof(v8));
                memcpy(yr, tmp, (size_t)(N - n0) * sizeof(float));
            }
        }
}

/* panels p0..p1-1 for every row, in chunks of ROWS_PANEL_CHUNK panels: each chunk through every group of rows
 * while it is in L1/L2 (a weight is read from memory once, however many rows), 4 rows at a time over one panel,
 * or fewer rows over 2 or 4 panels at once, so that 8 sums are always in flight */
#define ROWS_PANEL_CHUNK 4
static inline void rows_panel_range(const float *x, const float *Wp, float *y, int64_t R, int64_t K, int64_t N,
                                    int64_t p0, int64_t p1) {
    for (int64_t c0 = p0; c0 < p1; c0 += ROWS_PANEL_CHUNK) {
        const int64_t c1 = c0 + ROWS_PANEL_CHUNK < p1 ? c0 + ROWS_PANEL_CHUNK : p1;
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            const int64_t J = R - r0 < 4 ? R - r0 : 4;
            int64_t p = c0;
            if (J == 1)
                for (; p + 4 <= c1; p += 4) rows_panel_tile(x, Wp, y, K, N, r0, p, 4, 1);
            if (J <= 2)
                for (; p + 2 <= c1; p += 2) {
                    if (J == 1) rows_panel_tile(x, Wp, y, K, N, r0, p, 2, 1);
                    else rows_panel_tile(x, Wp, y, K, N, r0, p, 2, 2);
                }
            for (; p < c1; p++) {
                switch (J) {
                    case 1: rows_panel_tile(x, Wp, y, K, N, r0, p, 1, 1); break;
                    case 2: rows_panel_tile(x, Wp, y, K, N, r0, p, 1, 2); break;
                    case 3: rows_panel_tile(x, Wp, y, K, N, r0, p, 1, 3); break;
                    default: rows_panel_tile(x, Wp, y, K, N, r0, p, 1, 4);
                }
            }
        }
    }
}

/* the team's share of the panels: one contiguous range per thread */
static inline void rows_panels(const float *x, const float *Wp, float *y, int64_t R, int64_t K, int64_t N) {
    const int64_t panels = (N + ROWS_PANEL - 1) / ROWS_PANEL, T = omp_get_num_threads(), per = (panels + T - 1) / T;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const int64_t p0 = t * per < panels ? t * per : panels, p1 = p0 + per < panels ? p0 + per : panels;
        rows_panel_range(x, Wp, y, R, K, N, p0, p1);
    }
}

/* y [R, N] = x [R, K] W^T; W row-major [N, K] (layout 0), its column-major copy Wt [K, N] (1), or its panels
 * (ROWS_PANELS). Orphaned worksharing: see the top of this file. */
static inline void rows_product(const float *x, const float *W, int transposed, float *y, int64_t R, int64_t K,
                                int64_t N) {
    if (transposed == ROWS_PANELS) {
        rows_panels(x, W, y, R, K, N);
        return;
    }
    if (rows_streams(transposed, R, N)) {
        rows_stream(x, W, y, R, K, N);
        return;
    }
    const int64_t width = transposed ? 32 : 4, tiles = N / width, items = tiles + (N % width != 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < items; t++) {
        if (t == tiles)
            rows_tail(x, W, transposed, y, R, K, N, tiles * width);
        else if (transposed)
            rows_tile_t_all(x, W, NULL, y, R, K, N, t * width, 32);
        else
            rows_tile_any(x, W, y, R, K, N, t * width);
    }
}

#endif
