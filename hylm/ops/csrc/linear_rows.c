/* y = x W^T (+ b) for 2-8 rows of x over a weight that fits in the CPU's caches: speculative verification,
 * small decode batches.
 *
 * MKL and oneDNN spend far more time per multiply-add on such products than on one row (a [6, 192] x
 * [192, 1664] product costs ~3x a [1, 192] one here). This kernel takes a tile of 4 output features at a
 * time and runs every group of up to 4 rows against it while its weights are in L1, with up to 16 vector
 * accumulators (4 outputs x 4 rows) and one transposing reduction per tile.
 *
 * Layouts (row-major, no padding): x [R, K], W [N, K], b [N] or NULL, y [R, N]; all fp32.
 * Compiled by hylm/ops/native.py with the other sources of this directory.
 */
#include <stdint.h>
#include <string.h>

#include "vec.h"

/* outputs n0..n0+3 for rows r0..r0+J-1 (K a multiple of 8): out[j * 4 + o] = x[r0 + j] . W[n0 + o].
 * Always inlined with a constant J (1..4), so that the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, const float *W, int64_t K, int64_t r0,
                                                       int64_t n0, const int J, float *out) {
    v8 acc[16] = {0};
    const float *w0 = W + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t k = 0; k < K; k += 8) {
        v8 a = load8(w0 + k), b = load8(w1 + k), c = load8(w2 + k), d = load8(w3 + k);
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

static inline float dot(const float *a, const float *b, int64_t K) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; k++) s += a[k] * b[k];
    return s;
}

int hylm_linear_rows(const float *x, const float *W, const float *bias, float *y, int64_t R, int64_t K,
                     int64_t N) {
    if (R < 1 || K < 1 || N < 1) return -1;
    const int64_t tiles = N / 4;
    const int vector_k = K % 8 == 0;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 4;
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            int64_t rows = R - r0 < 4 ? R - r0 : 4;
            if (vector_k) {
                float out[16];
                switch (rows) {
                    case 1: tile(x, W, K, r0, n0, 1, out); break;
                    case 2: tile(x, W, K, r0, n0, 2, out); break;
                    case 3: tile(x, W, K, r0, n0, 3, out); break;
                    default: tile(x, W, K, r0, n0, 4, out);
                }
                for (int64_t j = 0; j < rows; j++)
                    for (int o = 0; o < 4; o++) y[(r0 + j) * N + n0 + o] = out[j * 4 + o];
            } else {
                for (int64_t j = 0; j < rows; j++)
                    for (int o = 0; o < 4; o++) y[(r0 + j) * N + n0 + o] = dot(x + (r0 + j) * K, W + (n0 + o) * K, K);
            }
        }
    }
    for (int64_t n = tiles * 4; n < N; n++)  /* the last N % 4 outputs */
        for (int64_t r = 0; r < R; r++) y[r * N + n] = dot(x + r * K, W + n * K, K);
    if (bias)
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = 0; n < N; n++) y[r * N + n] += bias[n];
    return 0;
}


/* The same product with the weight stored column-major (hylm's CPU layout for Linear weights, see
 * hylm/model/layout.py): Wt [K, N] contiguous. Each output tile of 32 features is a sum of rows of Wt scaled
 * by x's entries, so the vectors run along the outputs and need no reduction. */
static inline __attribute__((always_inline)) void tile_t(const float *x, const float *Wt, int64_t K, int64_t N,
                                                         int64_t r0, int64_t n0, const int J, float *y) {
    v8 acc[16] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *w = Wt + k * N + n0;
        v8 a = load8(w), b = load8(w + 8), c = load8(w + 16), d = load8(w + 24);
        for (int j = 0; j < J; j++) {
            float s = x[(r0 + j) * K + k];
            acc[4 * j] += s * a;
            acc[4 * j + 1] += s * b;
            acc[4 * j + 2] += s * c;
            acc[4 * j + 3] += s * d;
        }
    }
    for (int j = 0; j < J; j++) memcpy(y + (r0 + j) * N + n0, acc + 4 * j, 4 * sizeof(v8));
}

int hylm_linear_rows_t(const float *x, const float *Wt, const float *bias, float *y, int64_t R, int64_t K,
                       int64_t N) {
    if (R < 1 || K < 1 || N < 1) return -1;
    const int64_t tiles = N / 32;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        for (int64_t r0 = 0; r0 < R; r0 += 4) {
            switch (R - r0 < 4 ? R - r0 : 4) {
                case 1: tile_t(x, Wt, K, N, r0, t * 32, 1, y); break;
                case 2: tile_t(x, Wt, K, N, r0, t * 32, 2, y); break;
                case 3: tile_t(x, Wt, K, N, r0, t * 32, 3, y); break;
                default: tile_t(x, Wt, K, N, r0, t * 32, 4, y);
            }
        }
    }
    for (int64_t r = 0; r < R; r++) {  /* the last N % 32 outputs */
        float *yr = y + r * N;
        for (int64_t n = tiles * 32; n < N; n++) yr[n] = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float s = x[r * K + k];
            const float *w = Wt + k * N;
            for (int64_t n = tiles * 32; n < N; n++) yr[n] += s * w[n];
        }
    }
    if (bias)
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = 0; n < N; n++) y[r * N + n] += bias[n];
    return 0;
}
