/* t tokens of a Mamba-2 mixer for each of b sequences (decode: t = 1; speculative verification: the drafts
 * plus one, with the states after every token copied out for rollback), from the in_proj output to the SSM
 * output, with the conv and SSM states updated in place in the state pool's slots.
 *
 * On a small model the single-token step is a chain of ~25 tiny PyTorch ops per layer (conv shift, SiLU,
 * softplus, exp, the state update, the C read-out), each costing more in dispatch than in arithmetic. Here it
 * is two passes: the causal conv + SiLU per channel, then the recurrence per head. Same arithmetic as
 * hylm/ops/conv1d.causal_conv1d_step and hylm/ops/ssd.ssd_step (tested against them).
 *
 *   xbc      [b * t, C] with row stride xbc_stride (a view into the in_proj output), C = d_inner + 2 G N
 *   dt       [b * t, H] with row stride dt_stride (raw: softplus(dt + dt_bias), clamped to [dt_min, dt_max])
 *   conv     [slots, C, K-1] pool, oldest position first; conv_w [C, K]; conv_b [C] or NULL
 *   A        [H] (= -exp(A_log)); D [H] or NULL; ssm [slots, H, P, N] pool; slot [b]
 *   work     [b * t, C] scratch: the SiLU'd conv outputs; y [b * t, H, P]
 *   conv_after [b, t, C, K-1], ssm_after [b, t, H, P, N]: the states after each token, or NULL
 * All fp32.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The work of hylm_mamba_steps for the threads of the calling team: each `omp for` is orphaned, so inside a
 * parallel region (hylm_mamba_rows) the team shares it, and outside one the caller does it all. The conv runs
 * per channel over the t tokens, the recurrence per head: with one sequence (batch-1 decode and verification)
 * both still split across threads. */
void hylm_mamba_steps_team(const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride, float *conv,
                           const float *conv_w, const float *conv_b, int64_t K, const float *dt_bias, const float *A,
                           const float *D, float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b,
                           int64_t t, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N, float *work, float *y,
                           float *conv_after, float *ssm_after) {
    const int64_t d_inner = H * P, heads_per_group = H / G, W = K - 1;
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < b; i++) {
        for (int64_t c = 0; c < C; c++) {
            float *st = conv + (slot[i] * C + c) * W;
            const float *w = conv_w + c * K;
            for (int64_t j = 0; j < t; j++) {  /* token j of sequence i is packed row i * t + j */
                const int64_t row = i * t + j;
                const float xc = xbc[row * xbc_stride + c];
                float acc = xc * w[K - 1];
                for (int64_t q = 0; q < W; q++) acc += st[q] * w[q];
                if (conv_b) acc += conv_b[c];
                for (int64_t q = 0; q + 1 < W; q++) st[q] = st[q + 1];
                if (W > 0) st[W - 1] = xc;
                work[row * C + c] = acc / (1.0f + expf(-acc));  /* SiLU */
                if (conv_after)
                    for (int64_t q = 0; q < W; q++) conv_after[(row * C + c) * W + q] = st[q];
            }
        }
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < b; i++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / heads_per_group;
            float *s = ssm + (slot[i] * H + h) * P * N;
            for (int64_t j = 0; j < t; j++) {
                const int64_t row = i * t + j;
                float d = dt[row * dt_stride + h] + dt_bias[h];
                d = d > 20.0f ? d : log1pf(expf(d));  /* softplus, PyTorch's threshold */
                d = d < dt_min ? dt_min : (d > dt_max ? dt_max : d);
                const float dA = expf(d * A[h]);
                const float *xs = work + row * C + h * P;
                const float *Bv = work + row * C + d_inner + g * N;
                const float *Cv = work + row * C + d_inner + G * N + g * N;
                float *yo = y + (row * H + h) * P;
                for (int64_t p = 0; p < P; p++) {
                    const float xdt = xs[p] * d;
                    float *sp = s + p * N;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t n = 0; n < N; n++) {
                        sp[n] = sp[n] * dA + xdt * Bv[n];
                        acc += sp[n] * Cv[n];
                    }
                    yo[p] = acc + (D ? D[h] * xs[p] : 0.0f);
                }
                if (ssm_after) memcpy(ssm_after + (row * H + h) * P * N, s, (size_t)(P * N) * sizeof(float));
            }
        }
    }
}

int hylm_mamba_steps_check(int64_t b, int64_t t, int64_t K, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N) {
    return b < 1 || t < 1 || K < 1 || G < 1 || H % G != 0 || C != H * P + 2 * G * N ? -1 : 0;
}

int hylm_mamba_steps(const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride, float *conv,
                     const float *conv_w, const float *conv_b, int64_t K, const float *dt_bias, const float *A,
                     const float *D, float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b,
                     int64_t t, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N, float *work, float *y,
                     float *conv_after, float *ssm_after) {
    if (hylm_mamba_steps_check(b, t, K, C, H, P, G, N)) return -1;
#pragma omp parallel
    hylm_mamba_steps_team(xbc, xbc_stride, dt, dt_stride, conv, conv_w, conv_b, K, dt_bias, A, D, dt_min, dt_max,
                          ssm, slot, b, t, C, H, P, G, N, work, y, conv_after, ssm_after);
    return 0;
}
