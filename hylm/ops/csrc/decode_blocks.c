/* Whole pre-norm blocks for a few tokens in one call each, for decode steps, speculative verification and MTP
 * drafts, where a block's PyTorch composition is dozens of dispatches for microseconds of arithmetic:
 *
 *   hylm_rmsnorm_rows:  out = rmsnorm(x) * w
 *   hylm_attention_rows: out = x + o_proj(attention(q, k, v of rmsnorm(x))), the new tokens' k and v stored into
 *                        the paged cache first, each token attending to its sequence's positions up to its own
 *                        through hylm_paged_decode (paged_decode.c)
 *
 * (The MoE block is hylm_moe_rows in moe_rows.c, the Mamba step hylm_mamba_steps in mamba_step.c.)
 * Weights as in rows.h: row-major [out, in], column-major or in panels as the *_t flag says; everything fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "norm.h"
#include "rows.h"
#include "vec.h"

int hylm_paged_decode(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t R,
                      const int64_t *tables, int64_t table_stride, const int64_t *lengths, int B, int H, int G,
                      int D, int64_t block_size, float scale, int splits, float *work, float *out);

int hylm_rmsnorm_rows(const float *x, const float *w, float eps, int64_t R, int64_t D, float *out) {
    if (R < 0 || D < 1) return -1;
    for (int64_t r = 0; r < R; r++) rmsnorm_row(x + r * D, w, eps, D, out + r * D);
    return 0;
}

/* x [N, D] (N new tokens: entry n has its sequence's block table at tables + n * table_stride (0: one table for
 * all) and sees lengths[n] positions, its own last; its k and v go to cache row new_rows[n]); caches
 * [Hkv, cache_rows, hd] fp32; work: at least
 * N * Hkv * splits * (G * hd + 2 * G) floats. out [N, D] may not alias x. */
int hylm_attention_rows(const float *x, int64_t N, int64_t D, const float *norm_w, float eps, const float *wq,
                        int wq_t, const float *wk, int wk_t, const float *wv, int wv_t, const float *wo, int wo_t,
                        int64_t Hq, int64_t Hkv, int64_t hd, float *k_cache, float *v_cache, int64_t cache_rows,
                        const int64_t *new_rows, const int64_t *tables, int64_t table_stride,
                        const int64_t *lengths, int64_t block_size, float scale, int splits, float *work, float *out) {
    if (N < 1 || D < 1 || Hkv < 1 || Hq % Hkv != 0 || hd < 1) return -1;
    for (int64_t n = 0; n < N; n++)  /* checked before anything is written */
        if (new_rows[n] < 0 || new_rows[n] >= cache_rows) return -2;
    const int64_t QD = Hq * hd, KD = Hkv * hd;
    float *buf = malloc((size_t)(N * (D + QD + 2 * KD + QD)) * sizeof(float));
    if (!buf) return -5;
    float *h = buf, *q = h + N * D, *k = q + N * QD, *v = k + N * KD, *attn = v + N * KD;
    for (int64_t n = 0; n < N; n++) rmsnorm_row(x + n * D, norm_w, eps, D, h + n * D);
#pragma omp parallel
    {
        rows_product(h, wq, wq_t, q, N, D, QD);
        rows_product(h, wk, wk_t, k, N, D, KD);
        rows_product(h, wv, wv_t, v, N, D, KD);
    }
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < Hkv; g++) {
            memcpy(k_cache + (g * cache_rows + new_rows[n]) * hd, k + n * KD + g * hd, (size_t)hd * sizeof(float));
            memcpy(v_cache + (g * cache_rows + new_rows[n]) * hd, v + n * KD + g * hd, (size_t)hd * sizeof(float));
        }
    }
    int rc = hylm_paged_decode(q, k_cache, v_cache, 0, cache_rows, tables, table_stride, lengths, (int)N, (int)Hkv,
                               (int)(Hq / Hkv), (int)hd, block_size, scale, splits, work, attn);
    if (rc == 0) {
#pragma omp parallel
        rows_product(attn, wo, wo_t, out, N, QD, D);
        for (int64_t i = 0; i < N * D; i++) out[i] += x[i];
    }
    free(buf);
    return rc;
}

void hylm_mamba_steps_team(const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride, float *conv,
                           const float *conv_w, const float *conv_b, int64_t K, const float *dt_bias, const float *A,
                           const float *D, float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b,
                           int64_t t, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N, float *work, float *y,
                           float *conv_after, float *ssm_after);
int hylm_mamba_steps_check(int64_t b, int64_t t, int64_t K, int64_t C, int64_t H, int64_t P, int64_t G, int64_t N);

/* The Mamba-2 block for t new tokens of each of b sequences (packed by sequence, R = b * t rows of x [R, Dm]):
 * out = x + out_proj(gated_norm(ssm(conv(in_proj(rmsnorm(x)))), z)), the conv and SSM states of the pool's
 * slots updated in place (hylm_mamba_steps in mamba_step.c; conv_after / ssm_after: the states after every token,
 * or NULL). in_proj's output is [z (d_inner), xBC (C), dt (H)]; the gated norm is y * silu(z), normalised over
 * norm_groups groups of channels, times gnorm_w. */
int hylm_mamba_rows(const float *x, int64_t R, int64_t Dm, const float *norm_w, float eps, const float *w_in,
                    int w_in_t, const float *w_out, int w_out_t, float *conv, const float *conv_w,
                    const float *conv_b, int64_t K, const float *dt_bias, const float *A, const float *Dskip,
                    float dt_min, float dt_max, float *ssm, const int64_t *slot, int64_t b, int64_t t, int64_t C,
                    int64_t H, int64_t P, int64_t G, int64_t N, const float *gnorm_w, float gnorm_eps,
                    int64_t norm_groups, float *conv_after, float *ssm_after, float *out) {
    const int64_t d_inner = H * P, width = d_inner + C + H;
    if (R != b * t || R < 1 || Dm < 1 || norm_groups < 1 || d_inner % norm_groups != 0) return -1;
    if (hylm_mamba_steps_check(b, t, K, C, H, P, G, N)) return -1;
    float *buf = malloc((size_t)(R * (Dm + width + C + 2 * d_inner)) * sizeof(float));
    if (!buf) return -5;
    float *h = buf, *proj = h + R * Dm, *work = proj + R * width, *y = work + R * C, *gated = y + R * d_inner;
    const int64_t gs = d_inner / norm_groups;
    for (int64_t r = 0; r < R; r++) rmsnorm_row(x + r * Dm, norm_w, eps, Dm, h + r * Dm);
    /* one parallel region: every phase's `omp for` ends in a barrier, and no thread team is started per phase */
#pragma omp parallel
    {
        rows_product(h, w_in, w_in_t, proj, R, Dm, width);
        hylm_mamba_steps_team(proj + d_inner, width, proj + d_inner + C, width, conv, conv_w, conv_b, K, dt_bias, A,
                              Dskip, dt_min, dt_max, ssm, slot, b, t, C, H, P, G, N, work, y, conv_after, ssm_after);
#pragma omp for collapse(2) schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int64_t q = 0; q < norm_groups; q++) {
                const float *z = proj + r * width + q * gs, *yr = y + r * d_inner + q * gs;
                float *g = gated + r * d_inner + q * gs;
                int64_t i = 0;
                for (; i + 8 <= gs; i += 8) {  /* y * silu(z), SiLU's exponential as in the conv (exp8) */
                    const v8 zv = load8(z + i);
                    *(v8u *)(g + i) = load8(yr + i) * (zv / (1.0f + exp8(-zv)));
                }
                for (; i < gs; i++) g[i] = yr[i] * (z[i] / (1.0f + expf(-z[i])));
                rmsnorm_row(g, gnorm_w + q * gs, gnorm_eps, gs, g);
            }
        }
        rows_product(gated, w_out, w_out_t, out, R, d_inner, Dm);
    }
    for (int64_t i = 0; i < R * Dm; i++) out[i] += x[i];
    free(buf);
    return 0;
}
