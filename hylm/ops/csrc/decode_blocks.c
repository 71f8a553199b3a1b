/* Whole pre-norm blocks for a few tokens in one call each, for decode steps, speculative verification and MTP
 * drafts, where a block's PyTorch composition is dozens of dispatches for microseconds of arithmetic:
 *
 *   hylm_rmsnorm_rows:  out = rmsnorm(x) * w
 *   hylm_attention_rows: out = x + o_proj(attention(q, k, v of rmsnorm(x))), the new tokens' k and v stored into
 *                        the paged cache first, each token attending to its sequence's positions up to its own
 *                        through hylm_paged_decode (paged_decode.c)
 *
 * (The MoE block is hylm_moe_rows in moe_rows.c, the Mamba step hylm_mamba_steps in mamba_step.c.)
 * Weights as in rows.h: row-major [out, in], or column-major where the *_t flag is set; everything fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "norm.h"
#include "rows.h"

int hylm_paged_decode(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t R,
                      const int64_t *tables, int64_t table_stride, const int64_t *lengths, int B, int H, int G,
                      int D, int64_t block_size, float scale, int splits, float *work, float *out);

int hylm_rmsnorm_rows(const float *x, const float *w, float eps, int64_t R, int64_t D, float *out) {
    if (R < 0 || D < 1) return -1;
    for (int64_t r = 0; r < R; r++) rmsnorm_row(x + r * D, w, eps, D, out + r * D);
    return 0;
}

/* x [N, D] (N new tokens: entry n has its sequence's block table tables[n] and sees lengths[n] positions, its
 * own last; its k and v go to cache row new_rows[n]); caches [Hkv, cache_rows, hd] fp32; work: at least
 * N * Hkv * splits * (G * hd + 2 * G) floats. out [N, D] may not alias x. */
int hylm_attention_rows(const float *x, int64_t N, int64_t D, const float *norm_w, float eps, const float *wq,
                        int wq_t, const float *wk, int wk_t, const float *wv, int wv_t, const float *wo, int wo_t,
                        int64_t Hq, int64_t Hkv, int64_t hd, float *k_cache, float *v_cache, int64_t cache_rows,
                        const int64_t *new_rows, const int64_t *tables, int64_t width, const int64_t *lengths,
                        int64_t block_size, float scale, int splits, float *work, float *out) {
    if (N < 1 || D < 1 || Hkv < 1 || Hq % Hkv != 0 || hd < 1) return -1;
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
        if (new_rows[n] < 0 || new_rows[n] >= cache_rows) {
            free(buf);
            return -2;
        }
        for (int64_t g = 0; g < Hkv; g++) {
            memcpy(k_cache + (g * cache_rows + new_rows[n]) * hd, k + n * KD + g * hd, (size_t)hd * sizeof(float));
            memcpy(v_cache + (g * cache_rows + new_rows[n]) * hd, v + n * KD + g * hd, (size_t)hd * sizeof(float));
        }
    }
    int rc = hylm_paged_decode(q, k_cache, v_cache, 0, cache_rows, tables, width, lengths, (int)N, (int)Hkv,
                               (int)(Hq / Hkv), (int)hd, block_size, scale, splits, work, attn);
    if (rc == 0) {
#pragma omp parallel
        rows_product(attn, wo, wo_t, out, N, QD, D);
        for (int64_t i = 0; i < N * D; i++) out[i] += x[i];
    }
    free(buf);
    return rc;
}
