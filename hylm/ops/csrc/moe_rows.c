/* A LatentMoE layer for 1-64 tokens in one call: router, top-k, the latent projection, the chosen experts, the
 * projection back and the shared expert. Decode steps, speculative verification and MTP drafts run these
 * layers on a handful of rows, where the PyTorch composition costs ~30 dispatches of a few microseconds each
 * for a few microseconds of arithmetic.
 *
 * Per token x [D]:
 *   scores = sigmoid(router x) [E]; ids = top_k of scores + correction_bias; w = scores[ids]
 *   (/ (sum + 1e-20) if normalize) * scaling
 *   h = fc1 x [L] (x itself without a latent projection)
 *   y = sum_j w_j down[ids_j] relu(up[ids_j] h)^2 [L]
 *   out = fc2 y (y itself without one) + shared_down relu(shared_up x)^2 [D] (no term without a shared expert)
 * Layouts: x [R, D], router [E, D], up [E, I, L], down [E, L, I] row-major; fc1 [L, D], fc2 [D, L], shared_up
 * [S, D], shared_down [D, S] row-major, column-major or in panels as their *_t flag says (rows.h); all fp32, no biases.
 * The tokens routed to one expert run through it together (rows.h tiles), each phase's tiles shared by the
 * threads of one parallel region. With norm_w the input is rmsnorm(x) * norm_w (the block's pre-norm), with
 * residual the output adds x: the whole block x + moe(norm(x)) in one call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "norm.h"
#include "rows.h"

static inline void relu_square(float *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = a[i] > 0.0f ? a[i] : 0.0f;
        a[i] = v * v;
    }
}

/* an expert-grouped product: for each used expert u, rows start[u]..start[u]+count[u]-1 of x through
 * weights + expert[u] * N * K ([N, K] row-major) into the same rows of y [*, N] */
static inline void experts_product(const float *x, const float *weights, float *y, int64_t n_used,
                                   const int64_t *expert, const int64_t *start, const int64_t *count, int64_t K,
                                   int64_t N) {
    const int64_t tiles = N / 4, per = tiles + (N % 4 != 0);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_used * per; item++) {
        int64_t u = item / per, t = item % per;
        const float *W = weights + expert[u] * N * K, *xu = x + start[u] * K;
        float *yu = y + start[u] * N;
        if (t == tiles)
            rows_tail(xu, W, 0, yu, count[u], K, N, tiles * 4);
        else
            rows_tile_any(xu, W, yu, count[u], K, N, t * 4);
    }
}

int hylm_moe_rows(const float *x, int64_t R, int64_t D, const float *router, const float *correction_bias,
                  int64_t E, int64_t top_k, int normalize, float scaling, const float *fc1, int fc1_t, int64_t L,
                  const float *up, const float *down, int64_t I, const float *fc2, int fc2_t,
                  const float *shared_up, int shared_up_t, const float *shared_down, int shared_down_t, int64_t S,
                  const float *norm_w, float eps, int residual, float *out) {
    if (R < 1 || R > 64 || D < 1 || E < 1 || top_k < 1 || top_k > E || I < 1 || L < 1) return -1;
    if (!fc1 && L != D) return -2;
    if (!fc2 && L != D) return -3;
    if ((shared_up == NULL) != (shared_down == NULL) || (shared_up && S < 1)) return -4;
    const int64_t A = R * top_k;  /* token-expert assignments */
    const int64_t sizes[] = {norm_w ? R * D : 0, R * E, fc1 ? R * L : 0, shared_up ? R * S : 0, A * L, A * I,
                             A * L, R * L, fc2 ? R * D : 0, shared_up ? R * D : 0};
    int64_t total = 0;
    for (int i = 0; i < 10; i++) total += sizes[i];
    float *work = malloc((size_t)total * sizeof(float));
    int64_t *index = malloc((size_t)(5 * A + 2) * sizeof(int64_t));
    float *gate = malloc((size_t)A * sizeof(float));
    if (!work || !index || !gate) {
        free(work), free(index), free(gate);
        return -5;
    }
    float *normed = work, *logits = normed + sizes[0], *h = logits + sizes[1], *sa = h + sizes[2],
          *xe = sa + sizes[3], *act = xe + sizes[4], *ye = act + sizes[5], *ylat = ye + sizes[6],
          *routed = ylat + sizes[7], *shared = routed + sizes[8];
    const float *residual_x = x;
    if (norm_w) {  /* the block's pre-norm: the layer reads rmsnorm(x) * norm_w */
        for (int64_t r = 0; r < R; r++) rmsnorm_row(x + r * D, norm_w, eps, D, normed + r * D);
        x = normed;
    }
    int64_t *ids = index, *slot = ids + A, *expert = slot + A, *start = expert + A, *count = start + A;
    int64_t n_used = 0;
    const float *hin = fc1 ? h : x;  /* the experts' input rows [R, L] */

#pragma omp parallel
    {
        rows_product(x, router, 0, logits, R, D, E);
        if (fc1) rows_product(x, fc1, fc1_t, h, R, D, L);
        if (shared_up) rows_product(x, shared_up, shared_up_t, sa, R, D, S);
#pragma omp single
        {
            for (int64_t r = 0; r < R; r++) {
                float *lg = logits + r * E;
                for (int64_t e = 0; e < E; e++) lg[e] = 1.0f / (1.0f + expf(-lg[e]));  /* scores, in place */
                float sum = 0.0f;
                for (int64_t j = 0; j < top_k; j++) {  /* the top_k largest scores + bias, lowest id on ties */
                    int64_t best = -1;
                    float best_v = -INFINITY;
                    for (int64_t e = 0; e < E; e++) {
                        int taken = 0;
                        for (int64_t i = 0; i < j; i++) taken |= ids[r * top_k + i] == e;
                        float v = lg[e] + (correction_bias ? correction_bias[e] : 0.0f);
                        if (!taken && (best < 0 || v > best_v)) best = e, best_v = v;
                    }
                    ids[r * top_k + j] = best;
                    gate[r * top_k + j] = lg[best];
                    sum += lg[best];
                }
                for (int64_t j = 0; j < top_k; j++) {
                    float *w = gate + r * top_k + j;
                    *w = (normalize ? *w / (sum + 1e-20f) : *w) * scaling;
                }
            }
            /* assignments grouped by expert: slot[a] = where assignment a's row sits in xe */
            int64_t at = 0;
            for (int64_t e = 0; e < E; e++) {
                int64_t c = 0;
                for (int64_t a = 0; a < A; a++)
                    if (ids[a] == e) {
                        slot[a] = at + c;
                        memcpy(xe + (at + c) * L, hin + (a / top_k) * L, (size_t)L * sizeof(float));
                        c++;
                    }
                if (c) expert[n_used] = e, start[n_used] = at, count[n_used] = c, n_used++, at += c;
            }
            if (shared_up) relu_square(sa, R * S);
        }
        experts_product(xe, up, act, n_used, expert, start, count, L, I);
#pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) relu_square(act + a * I, I);
        experts_product(act, down, ye, n_used, expert, start, count, I, L);
#pragma omp single
        for (int64_t r = 0; r < R; r++) {
            float *yr = ylat + r * L;
            for (int64_t l = 0; l < L; l++) yr[l] = 0.0f;
            for (int64_t j = 0; j < top_k; j++) {
                const float *src = ye + slot[r * top_k + j] * L, w = gate[r * top_k + j];
                for (int64_t l = 0; l < L; l++) yr[l] += w * src[l];
            }
        }
        if (fc2) rows_product(ylat, fc2, fc2_t, routed, R, L, D);
        if (shared_up) rows_product(sa, shared_down, shared_down_t, shared, R, S, D);
    }
    const float *r_src = fc2 ? routed : ylat;
    for (int64_t i = 0; i < R * D; i++)
        out[i] = r_src[i] + (shared_up ? shared[i] : 0.0f) + (residual ? residual_x[i] : 0.0f);
    free(work), free(index), free(gate);
    return 0;
}
