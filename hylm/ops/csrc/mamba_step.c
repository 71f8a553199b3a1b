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

int hylm_mamba_steps(const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride, float *conv,
                     const float *conv_w, const float *conv_b, int64_t K, const float *dt_bias, const float *A,
                     const float *D, float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b,
                     int64_t t, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N, float *work, float *y,
                     float *conv_after, float *ssm_after) {
    if (b < 1 || t < 1 || K < 1 || H % G != 0 || C != H * P + 2 * G * N) return -1;
    const int64_t d_inner = H * P, heads_per_group = H / G;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < b; i++) {
        float *state = conv + slot[i] * C * (K - 1);
        for (int64_t j = 0; j < t; j++) {  /* token j of sequence i is packed row i * t + j */
            const float *x = xbc + (i * t + j) * xbc_stride;
            float *out = work + (i * t + j) * C;
            for (int64_t c = 0; c < C; c++) {
                float *st = state + c * (K - 1);
                const float *w = conv_w + c * K;
                float acc = x[c] * w[K - 1];
                for (int64_t q = 0; q < K - 1; q++) acc += st[q] * w[q];
                if (conv_b) acc += conv_b[c];
                for (int64_t q = 0; q + 1 < K - 1; q++) st[q] = st[q + 1];
                if (K > 1) st[K - 2] = x[c];
                out[c] = acc / (1.0f + expf(-acc));  /* SiLU */
            }
            if (conv_after)
                for (int64_t e = 0; e < C * (K - 1); e++) conv_after[(i * t + j) * C * (K - 1) + e] = state[e];
        }
    }
#pragma omp parallel for collapse(2) schedule(static)
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
                if (ssm_after) {
                    float *dst = ssm_after + (row * H + h) * P * N;
                    for (int64_t e = 0; e < P * N; e++) dst[e] = s[e];
                }
            }
        }
    }
    return 0;
}
