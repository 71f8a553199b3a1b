/* Greedy multi-token-prediction drafts in one call: the draft loop of an MTP block made of one attention block
 * and one MoE block (Nemotron 3's `*E`), for A sequences at a time.
 *
 * Between two drafts the loop does a dozen small things (the head's argmax, an embedding row, two norms, the
 * input projection, the two blocks, the final norm): as PyTorch and ctypes calls from Python they cost several
 * times their arithmetic on a small model. Here they run back to back with the same kernels the Python path
 * calls (rows.h products, hylm_attention_rows, hylm_moe_rows, rmsnorm_row), so the drafts are the same tokens.
 *
 *   tok[a, 0]     = argmax(lm_head prev[a])                      prev [A, D]: the MTP's output at its last position
 *   for s in 1..steps-1:
 *     x           = eh_proj [rmsnorm(emb[tok[a, s-1]]) * enorm_w, rmsnorm(prev[a]) * hnorm_w]          [A, D]
 *     x           = attention block (x), the new keys / values at cache rows new_rows[s-1, a], each token seeing
 *                   lengths[s-1, a] positions of its sequence's blocks tables[a]
 *     prev        = rmsnorm(moe block (x)) * final_w
 *     tok[a, s]   = argmax(lm_head prev[a])
 * Weights as in rows.h (row-major [out, in], or column-major where *_t is set); the attention and MoE arguments
 * are those of hylm_attention_rows (decode_blocks.c) and hylm_moe_rows (moe_rows.c). argmax: the first of equal
 * maxima, as torch.argmax. prev is overwritten. All fp32; tok int64 [A, steps].
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "norm.h"
#include "rows.h"

int hylm_attention_rows(const float *x, int64_t N, int64_t D, const float *norm_w, float eps, const float *wq,
                        int wq_t, const float *wk, int wk_t, const float *wv, int wv_t, const float *wo, int wo_t,
                        int64_t Hq, int64_t Hkv, int64_t hd, float *k_cache, float *v_cache, int64_t cache_rows,
                        const int64_t *new_rows, const int64_t *tables, int64_t width, const int64_t *lengths,
                        int64_t block_size, float scale, int splits, float *work, float *out);
int hylm_moe_rows(const float *x, int64_t R, int64_t D, const float *router, const float *correction_bias,
                  int64_t E, int64_t top_k, int normalize, float scaling, const float *fc1, int fc1_t, int64_t L,
                  const float *up, const float *down, int64_t I, const float *fc2, int fc2_t,
                  const float *shared_up, int shared_up_t, const float *shared_down, int shared_down_t, int64_t S,
                  const float *norm_w, float eps, int residual, float *out);

static void head_argmax(const float *prev, const float *head, int head_t, float *logits, int64_t A, int64_t D,
                        int64_t V, int64_t *tok, int64_t steps, int64_t s) {
#pragma omp parallel
    rows_product(prev, head, head_t, logits, A, D, V);
    for (int64_t a = 0; a < A; a++) {
        const float *l = logits + a * V;
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++)
            if (l[v] > l[best]) best = v;
        tok[a * steps + s] = best;
    }
}

int hylm_mtp_greedy(int64_t A, int64_t D, int64_t V, int64_t steps, float *prev, const float *emb,
                    const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps, const float *eh_proj,
                    int eh_proj_t, const float *final_w, float final_eps, const float *head, int head_t,
                    /* the attention block: hylm_attention_rows' arguments from norm_w on */
                    const float *a_norm_w, float a_eps, const float *wq, int wq_t, const float *wk, int wk_t,
                    const float *wv, int wv_t, const float *wo, int wo_t, int64_t Hq, int64_t Hkv, int64_t hd,
                    float *k_cache, float *v_cache, int64_t cache_rows, const int64_t *new_rows,
                    const int64_t *tables, int64_t width, const int64_t *lengths, int64_t block_size, float scale,
                    int splits, float *work,
                    /* the MoE block: hylm_moe_rows' arguments from router to eps */
                    const float *router, const float *correction_bias, int64_t E, int64_t top_k, int normalize,
                    float scaling, const float *fc1, int fc1_t, int64_t L, const float *up, const float *down,
                    int64_t I, const float *fc2, int fc2_t, const float *shared_up, int shared_up_t,
                    const float *shared_down, int shared_down_t, int64_t S, const float *m_norm_w, float m_eps,
                    int64_t *tok) {
    if (A < 1 || D < 1 || V < 1 || steps < 1) return -1;
    float *buf = malloc((size_t)(A * (V + 2 * D + 2 * D)) * sizeof(float));
    if (!buf) return -5;
    float *logits = buf, *cat = logits + A * V, *x = cat + 2 * A * D, *y = x + A * D;
    int rc = 0;
    head_argmax(prev, head, head_t, logits, A, D, V, tok, steps, 0);
    for (int64_t s = 1; s < steps && rc == 0; s++) {
        for (int64_t a = 0; a < A; a++) {
            const int64_t t = tok[a * steps + s - 1];
            rmsnorm_row(emb + t * D, enorm_w, enorm_eps, D, cat + a * 2 * D);
            rmsnorm_row(prev + a * D, hnorm_w, hnorm_eps, D, cat + a * 2 * D + D);
        }
#pragma omp parallel
        rows_product(cat, eh_proj, eh_proj_t, x, A, 2 * D, D);
        rc = hylm_attention_rows(x, A, D, a_norm_w, a_eps, wq, wq_t, wk, wk_t, wv, wv_t, wo, wo_t, Hq, Hkv, hd,
                                 k_cache, v_cache, cache_rows, new_rows + (s - 1) * A, tables, width,
                                 lengths + (s - 1) * A, block_size, scale, splits, work, y);
        if (rc) break;
        rc = hylm_moe_rows(y, A, D, router, correction_bias, E, top_k, normalize, scaling, fc1, fc1_t, L, up, down,
                           I, fc2, fc2_t, shared_up, shared_up_t, shared_down, shared_down_t, S, m_norm_w, m_eps, 1,
                           x);
        if (rc) break;
        for (int64_t a = 0; a < A; a++) rmsnorm_row(x + a * D, final_w, final_eps, D, prev + a * D);
        head_argmax(prev, head, head_t, logits, A, D, V, tok, steps, s);
    }
    free(buf);
    return rc;
}
