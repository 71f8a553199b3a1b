/* y = x W^T (+ b) for 1-8 rows of x over a weight that fits in the CPU's caches: decode steps, small decode
 * batches, speculative verification. The tiles are in rows.h.
 *
 * Layouts (no padding): x [R, K], W [N, K] (hylm_linear_rows), Wt [K, N] (hylm_linear_rows_t) or its panels
 * [ceil(N / 16), K, 16] (hylm_linear_rows_panels, see rows.h), b [N] or NULL, y [R, N]; all fp32. Compiled by
 * hylm/ops/native.py with the other sources of this directory.
 */
#include <stdint.h>

#include "rows.h"

static int linear_rows(const float *x, const float *W, int transposed, const float *bias, float *y, int64_t R,
                       int64_t K, int64_t N) {
    if (R < 1 || K < 1 || N < 1) return -1;
#pragma omp parallel
    rows_product(x, W, transposed, y, R, K, N);
    if (bias)
        for (int64_t r = 0; r < R; r++)
            for (int64_t n = 0; n < N; n++) y[r * N + n] += bias[n];
    return 0;
}

int hylm_linear_rows(const float *x, const float *W, const float *bias, float *y, int64_t R, int64_t K, int64_t N) {
    return linear_rows(x, W, 0, bias, y, R, K, N);
}

int hylm_linear_rows_t(const float *x, const float *Wt, const float *bias, float *y, int64_t R, int64_t K,
                       int64_t N) {
    return linear_rows(x, Wt, 1, bias, y, R, K, N);
}

int hylm_linear_rows_panels(const float *x, const float *Wp, const float *bias, float *y, int64_t R, int64_t K,
                            int64_t N) {
    return linear_rows(x, Wp, ROWS_PANELS, bias, y, R, K, N);
}
