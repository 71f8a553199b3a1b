/* Greedy multi-token-prediction drafts in one call: the MTP's catch-up over the positions it has not seen and its
 * draft loop, for an MTP block made of one attention block and one MoE block (Nemotron 3's `*E`), for A sequences
 * at a time.
 *
 * Between two drafts the loop does a dozen small things (the head's argmax, an embedding row, two norms, the
 * input projection, the two blocks, the final norm): as PyTorch and ctypes calls from Python they cost several
 * times their arithmetic on a small model. Here they run back to back with the same kernels the Python path
 * calls (rows.h products, hylm_attention_rows, hylm_moe_rows, rmsnorm_row), so the drafts are the same tokens.
 *
 *   catch-up, N rows (sequence a: rows offsets[a]..offsets[a+1]-1, its positions the MTP has not seen, each with the
 *   target's hidden state hidden[n] and the token after it, tokens[n]):
 *     x             = eh_proj [rmsnorm(emb[tokens[n]]) * enorm_w, rmsnorm(hidden[n]) * hnorm_w]      [N, D]
 *     x             = attention block (x): keys / values at cache rows cu_rows[n], row n seeing cu_lengths[n]
 *                     positions of its sequence's blocks cu_tables[n]
 *     prev[a]       = rmsnorm(moe block (x[offsets[a+1] - 1])) * final_w (the MoE on each sequence's last row only)
 *     tok[a, 0]     = argmax(lm_head prev[a])
 *   for s in 1..steps-1:
 *     x             = eh_proj [rmsnorm(emb[tok[a, s-1]]) * enorm_w, rmsnorm(prev[a]) * hnorm_w]     [A, D]
 *     x             = attention block (x), keys / values at cache rows new_rows[s-1, a], each token seeing
 *                     lengths[s-1, a] positions of its sequence's blocks tables[a]
 *     prev          = rmsnorm(moe block (x)) * final_w
 *     tok[a, s]     = argmax(lm_head prev[a])
 * Weights as in rows.h (row-major [out, in], or column-major where *_t is set); the attention and MoE arguments
 * are those of hylm_attention_rows (decode_blocks.c: tables at a row stride, 0 for one table shared by all rows) and
 * hylm_moe_rows (moe_rows.c); `work` holds the attention's
 * scratch for N rows in cu_splits ranges and for A rows in `splits`. argmax: the first of equal maxima, as
 * torch.argmax. prev_out (or NULL) receives the last prev [A, D]. All fp32; tokens, offsets, rows, tables, lengths
 * and tok int64 (tok [A, steps]).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "norm.h"
#include "rows.h"

int hylm_attention_rows(const float *x, int64_t N, int64_t D, const float *norm_w, float eps, const float *wq,
                        int wq_t, const float *wk, int wk_t, const float *wv, int wv_t, const float *wo, int wo_t,
                        int64_t Hq, int64_t Hkv, int64_t hd, float *k_cache, float *v_cache, int64_t cache_rows,
                        const int64_t *new_rows, const int64_t *tables, int64_t table_stride, const int64_t *lengths,
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

static void mtp_input(const int64_t *tokens, const float *hidden, int64_t R, int64_t D, const float *emb,
                      const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps,
                      const float *eh_proj, int eh_proj_t, float *cat, float *x) {
    for (int64_t r = 0; r < R; r++) {
        rmsnorm_row(emb + tokens[r] * D, enorm_w, enorm_eps, D, cat + r * 2 * D);
        rmsnorm_row(hidden + r * D, hnorm_w, hnorm_eps, D, cat + r * 2 * D + D);
    }
#pragma omp parallel
    rows_product(cat, eh_proj, eh_proj_t, x, R, 2 * D, D);
}

int hylm_mtp_greedy(int64_t A, int64_t D, int64_t V, int64_t steps, int64_t N, const int64_t *offsets,
                    const int64_t *tokens, const float *hidden, const int64_t *cu_rows, const int64_t *cu_tables,
                    int64_t cu_table_stride, const int64_t *cu_lengths, int cu_splits, const float *emb,
                    const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps, const float *eh_proj,
                    int eh_proj_t, const float *final_w, float final_eps, const float *head, int head_t,
                    /* the attention block: hylm_attention_rows' arguments from norm_w on */
                    const float *a_norm_w, float a_eps, const float *wq, int wq_t, const float *wk, int wk_t,
                    const float *wv, int wv_t, const float *wo, int wo_t, int64_t Hq, int64_t Hkv, int64_t hd,
                    float *k_cache, float *v_cache, int64_t cache_rows, const int64_t *new_rows,
                    const int64_t *tables, int64_t table_stride, const int64_t *lengths, int64_t block_size,
                    float scale, int splits, float *work,
                    /* the MoE block: hylm_moe_rows' arguments from router to eps */
                    const float *router, const float *correction_bias, int64_t E, int64_t top_k, int normalize,
                    float scaling, const float *fc1, int fc1_t, int64_t L, const float *up, const float *down,
                    int64_t I, const float *fc2, int fc2_t, const float *shared_up, int shared_up_t,
                    const float *shared_down, int shared_down_t, int64_t S, const float *m_norm_w, float m_eps,
                    int64_t *tok, float *prev_out) {
    if (A < 1 || D < 1 || V < 1 || steps < 1 || N < A || offsets[0] != 0 || offsets[A] != N) return -1;
    for (int64_t a = 0; a < A; a++)
        if (offsets[a + 1] <= offsets[a]) return -1;
    for (int64_t n = 0; n < N; n++)
        if (tokens[n] < 0 || tokens[n] >= V) return -2;
    const int64_t R = N > A ? N : A;
    float *buf = malloc((size_t)(A * V + R * 4 * D + A * D) * sizeof(float));
    int64_t *ids = malloc((size_t)A * sizeof(int64_t));
    if (!buf || !ids) {
        free(buf), free(ids);
        return -5;
    }
    float *logits = buf, *cat = logits + A * V, *x = cat + 2 * R * D, *y = x + R * D, *prev = y + R * D;
    mtp_input(tokens, hidden, N, D, emb, enorm_w, enorm_eps, hnorm_w, hnorm_eps, eh_proj, eh_proj_t, cat, x);
    int rc = hylm_attention_rows(x, N, D, a_norm_w, a_eps, wq, wq_t, wk, wk_t, wv, wv_t, wo, wo_t, Hq, Hkv, hd,
                                 k_cache, v_cache, cache_rows, cu_rows, cu_tables, cu_table_stride, cu_lengths, block_size,
                                 scale, cu_splits, work, y);
    for (int64_t a = 0; a < A && rc == 0; a++)  /* the MoE and the head read each sequence's last row only */
        memcpy(x + a * D, y + (offsets[a + 1] - 1) * D, (size_t)D * sizeof(float));
    for (int64_t s = 0; s < steps && rc == 0; s++) {
        if (s > 0) {  /* the next position reads the previous draft and the MTP's own output there */
            for (int64_t a = 0; a < A; a++) ids[a] = tok[a * steps + s - 1];
            mtp_input(ids, prev, A, D, emb, enorm_w, enorm_eps, hnorm_w, hnorm_eps, eh_proj, eh_proj_t, cat, x);
            rc = hylm_attention_rows(x, A, D, a_norm_w, a_eps, wq, wq_t, wk, wk_t, wv, wv_t, wo, wo_t, Hq, Hkv, hd,
                                     k_cache, v_cache, cache_rows, new_rows + (s - 1) * A, tables, table_stride,
                                     lengths + (s - 1) * A, block_size, scale, splits, work, y);
            if (rc) break;
            memcpy(x, y, (size_t)(A * D) * sizeof(float));
        }
        rc = hylm_moe_rows(x, A, D, router, correction_bias, E, top_k, normalize, scaling, fc1, fc1_t, L, up, down,
                           I, fc2, fc2_t, shared_up, shared_up_t, shared_down, shared_down_t, S, m_norm_w, m_eps, 1,
                           y);
        if (rc) break;
        for (int64_t a = 0; a < A; a++) rmsnorm_row(y + a * D, final_w, final_eps, D, prev + a * D);
        head_argmax(prev, head, head_t, logits, A, D, V, tok, steps, s);
    }
    if (rc == 0 && prev_out) memcpy(prev_out, prev, (size_t)(A * D) * sizeof(float));
    free(buf), free(ids);
    return rc;
}
