/* t tokens of a Mamba-2 mixer for each of b sequences (decode: t = 1; speculative verification: the drafts
 * plus one, with the states after every token copied out for rollback; a prompt or a prefill chunk: any t),
 * from the in_proj output to the SSM output, with the conv and SSM states updated in place in the state pool's
 * slots. SiLU's exponential is exp8 (vec.h, < 2.3e-7 relative error).
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

#include "vec.h"

#define CONV_BLOCK 64   /* channels per work item of the conv */
#define CONV_MAX_KERNEL 16

/* channels c0..c0+nc-1 (nc <= CONV_BLOCK) of one sequence over its t tokens (rows row0..row0+t-1): the
 * window of the last K-1 inputs and the taps held transposed, so that every token's step runs along the
 * channels (one contiguous stretch of its xbc row), SiLU included. */
static void conv_channels(const float *xbc, int64_t xbc_stride, float *state, const float *conv_w,
                          const float *conv_b, int64_t K, int64_t C, int64_t c0, int64_t nc, int64_t row0,
                          int64_t t, float *work, float *conv_after) {
    const int64_t W = K - 1;
    float win[CONV_MAX_KERNEL][CONV_BLOCK], taps[CONV_MAX_KERNEL][CONV_BLOCK], bias[CONV_BLOCK];
    for (int64_t c = 0; c < nc; c++) {
        for (int64_t q = 0; q < W; q++) win[q][c] = state[(c0 + c) * W + q];
        for (int64_t q = 0; q < K; q++) taps[q][c] = conv_w[(c0 + c) * K + q];
        bias[c] = conv_b ? conv_b[c0 + c] : 0.0f;
    }
    for (int64_t j = 0; j < t; j++) {  /* token j of the sequence is packed row row0 + j */
        const float *x = xbc + (row0 + j) * xbc_stride + c0;
        float *out = work + (row0 + j) * C + c0;
        if (j >= W && !conv_after) {  /* the window is the previous W rows themselves: read them in place */
            int64_t c = 0;
            for (; c + 8 <= nc; c += 8) {
                v8 acc = load8(x + c) * load8(&taps[K - 1][c]);
                for (int64_t q = 0; q < W; q++) acc += load8(x + c + (q - W) * xbc_stride) * load8(&taps[q][c]);
                *(v8u *)(out + c) = acc + load8(&bias[c]);
            }
            for (; c < nc; c++) {
                float acc = x[c] * taps[K - 1][c];
                for (int64_t q = 0; q < W; q++) acc += x[c + (q - W) * xbc_stride] * taps[q][c];
                out[c] = acc + bias[c];
            }
        } else {
#pragma omp simd
            for (int64_t c = 0; c < nc; c++) {
                float acc = x[c] * taps[K - 1][c];
                for (int64_t q = 0; q < W; q++) acc += win[q][c] * taps[q][c];
                acc += bias[c];
                for (int64_t q = 0; q + 1 < W; q++) win[q][c] = win[q + 1][c];
                if (W > 0) win[W - 1][c] = x[c];
                out[c] = acc;
            }
        }
        int64_t c = 0;
        for (; c + 8 <= nc; c += 8) {  /* SiLU */
            v8 a = load8(out + c);
            *(v8u *)(out + c) = a / (1.0f + exp8(-a));
        }
        for (; c < nc; c++) out[c] = out[c] / (1.0f + expf(-out[c]));
        if (conv_after)
            for (int64_t cc = 0; cc < nc; cc++)
                for (int64_t q = 0; q < W; q++) conv_after[(j * C + c0 + cc) * W + q] = win[q][cc];
    }
    if (t > W && !conv_after)  /* the window after the last token: the last W rows */
        for (int64_t q = 0; q < W; q++) {
            const float *x = xbc + (row0 + t - W + q) * xbc_stride + c0;
            for (int64_t c = 0; c < nc; c++) win[q][c] = x[c];
        }
    for (int64_t c = 0; c < nc; c++)
        for (int64_t q = 0; q < W; q++) state[(c0 + c) * W + q] = win[q][c];
}

/* The work of hylm_mamba_steps for the threads of the calling team: each `omp for` is orphaned, so inside a
 * parallel region (hylm_mamba_rows) the team shares it, and outside one the caller does it all. The conv runs
 * per block of channels over the t tokens, the recurrence per head: with one sequence (batch-1 decode,
 * verification, a prompt) both still split across threads. */
void hylm_mamba_steps_team(const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride, float *conv,
                           const float *conv_w, const float *conv_b, int64_t K, const float *dt_bias, const float *A,
                           const float *D, float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b,
                           int64_t t, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N, float *work, float *y,
                           float *conv_after, float *ssm_after) {
    const int64_t d_inner = H * P, heads_per_group = H / G, W = K - 1, blocks = (C + CONV_BLOCK - 1) / CONV_BLOCK;
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < b; i++) {
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t c0 = blk * CONV_BLOCK, nc = C - c0 < CONV_BLOCK ? C - c0 : CONV_BLOCK;
            conv_channels(xbc, xbc_stride, conv + slot[i] * C * W, conv_w, conv_b, K, C, c0, nc, i * t, t, work,
                          conv_after ? conv_after + i * t * C * W : NULL);
        }
    }
#pragma omp for collapse(2) schedule(static) nowait
    for (int64_t i = 0; i < b; i++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / heads_per_group;
            float *restrict s = ssm + (slot[i] * H + h) * P * N;
            for (int64_t j = 0; j < t; j++) {
                const int64_t row = i * t + j;
                float d = dt[row * dt_stride + h] + dt_bias[h];
                d = d > 20.0f ? d : log1pf(expf(d));  /* softplus, PyTorch's threshold */
                d = d < dt_min ? dt_min : (d > dt_max ? dt_max : d);
                const float dA = expf(d * A[h]);
                if (j + 1 < t) {  /* the next token's row was written by the conv, maybe on the other core */
                    const float *next = work + (row + 1) * C;
                    for (int64_t e = 0; e < P; e += 16) __builtin_prefetch(next + h * P + e, 0, 3);
                    for (int64_t e = 0; e < N; e += 16) {
                        __builtin_prefetch(next + d_inner + g * N + e, 0, 3);
                        __builtin_prefetch(next + d_inner + G * N + g * N + e, 0, 3);
                    }
                }
                const float *restrict xs = work + row * C + h * P;
                const float *restrict Bv = work + row * C + d_inner + g * N;
                const float *restrict Cv = work + row * C + d_inner + G * N + g * N;
                float *yo = y + (row * H + h) * P;
                int64_t p = 0;
                if (N % 8 == 0) {
                    /* 8 rows of the state at a time: 8 independent sums (one chain of dependent adds would set
                     * the pace), reduced together */
                    for (; p + 8 <= P; p += 8) {
                        v8 acc[8] = {{0}};
                        float xdt[8];
                        for (int r = 0; r < 8; r++) xdt[r] = xs[p + r] * d;
                        for (int64_t n = 0; n < N; n += 8) {
                            const v8 bv = load8(Bv + n), cv = load8(Cv + n);
#pragma GCC unroll 8
                            for (int r = 0; r < 8; r++) {
                                float *sp = s + (p + r) * N + n;
                                v8 v = load8(sp) * dA + xdt[r] * bv;
                                *(v8u *)sp = v;
                                acc[r] += v * cv;
                            }
                        }
                        v8 sums = sum_lanes8(acc);
                        for (int r = 0; r < 8; r++) yo[p + r] = sums[r] + (D ? D[h] * xs[p + r] : 0.0f);
                    }
                }
                for (; p < P; p++) {
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
                /* kept for a rollback that most steps never make: past the caches (half of a 4-token verification's
                 * recurrence time went to reading in the lines these copies overwrite) */
                if (ssm_after) copy_streaming(ssm_after + (row * H + h) * P * N, s, P * N);
            }
        }
    }
    stream_fence();  /* the copies visible before the team moves on */
#pragma omp barrier
}

int hylm_mamba_steps_check(int64_t b, int64_t t, int64_t K, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N) {
    return b < 1 || t < 1 || K < 1 || K > CONV_MAX_KERNEL || G < 1 || H % G != 0 || C != H * P + 2 * G * N ? -1 : 0;
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
