/* Greedy multi-token-prediction drafts in one call: the MTP's catch-up over the positions it has not seen and its
 * draft loop, for an MTP block made of one attention block and one MoE block (Nemotron 3's `*E`), for A sequences
 * at a time.
 *
 * Between two drafts the loop does a dozen small things (the head's argmax, an embedding row, two norms, the
 * input projection, the two blocks, the final norm): as PyTorch and ctypes calls from Python they cost several
 * times their arithmetic on a small model. Here they run back to back with the same kernels the Python path
 * calls (rows.h products, hylm_attention_rows, hylm_moe_rows, rmsnorm_row), so the drafts are the same tokens.
 *
 *   catch-up, N rows (sequence a: rows offsets[a]..offsets[a+1]-1, positions starts[a].. of its blocks tables[a],
 *   the positions the MTP has not seen, each with the target's hidden state hidden[n] and the token after it,
 *   tokens[n]):
 *     x             = eh_proj [rmsnorm(emb[tokens[n]]) * enorm_w, rmsnorm(hidden[n]) * hnorm_w]      [N, D]
 *     x             = attention block (x): each row's key and value stored at its position, the row seeing its
 *                     sequence's positions up to its own
 *     prev[a]       = rmsnorm(moe block (x[offsets[a+1] - 1])) * final_w (the MoE on each sequence's last row only)
 *     tok[a, 0]     = argmax(lm_head prev[a])
 *   for s in 1..steps-1 (sequence a's draft s at the position s - 1 after its catch-up's last):
 *     x             = eh_proj [rmsnorm(emb[tok[a, s-1]]) * enorm_w, rmsnorm(prev[a]) * hnorm_w]     [A, D]
 *     x             = attention block (x)
 *     prev          = rmsnorm(moe block (x)) * final_w
 *     tok[a, s]     = argmax(lm_head prev[a])
 * Position p of sequence a is cache row tables[a][p / block_size] * block_size + p % block_size (tables: A rows
 * of table_width block ids, table_stride apart); every block written is checked against cache_rows first.
 * Weights as in rows.h (row-major [out, in], column-major or in panels as *_t says); the attention and MoE arguments
 * are those of hylm_attention_rows (decode_blocks.c) and hylm_moe_rows (moe_rows.c); `work` holds the attention's
 * scratch for N rows in cu_splits ranges and for A rows in `splits`. argmax: the first of equal maxima, as
 * torch.argmax. prev_out (or NULL) receives the last prev [A, D]. All fp32; tokens, offsets, starts, tables and
 * tok int64 (tok [A, steps]).
 *
 * Dynamic draft length: with min_confidence > 0, the loop stops at the first draft s >= 1 at which every
 * sequence's draft has a probability (softmax of its logits, the MTP's own confidence) below min_confidence, and
 * that draft is dropped; *drafted receives the number of drafts made (columns 0..*drafted-1 of tok). A draft the
 * MTP is unsure of is mostly rejected, and verifying it costs a row of the target's forward.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "norm.h"
#include "rows.h"
#include "vec.h"

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

/* softmax probability of logit l[best] = max of l [V]: 1 / sum(exp(l - l[best])) */
static float top_probability(const float *l, int64_t V, float top) {
    v8 sums = {0};
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) sums += exp8(load8(l + v) - top);
    float total = 0.0f;
    for (int j = 0; j < 8; j++) total += sums[j];
    for (; v < V; v++) total += expf(l[v] - top);
    return 1.0f / total;
}

/* each sequence's draft s (the argmax of its logits); returns whether any of them has a probability of at least
 * min_confidence (always true when min_confidence <= 0) */
static int head_argmax(const float *prev, const float *head, int head_t, float *logits, int64_t A, int64_t D,
                       int64_t V, int64_t *tok, int64_t steps, int64_t s, float min_confidence) {
#pragma omp parallel
    rows_product(prev, head, head_t, logits, A, D, V);
    int confident = min_confidence <= 0.0f;
    for (int64_t a = 0; a < A; a++) {
        const float *l = logits + a * V;
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++)
            if (l[v] > l[best]) best = v;
        tok[a * steps + s] = best;
        if (!confident && top_probability(l, V, l[best]) >= min_confidence) confident = 1;
    }
    return confident;
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

/* cache row and visible length of position p of the sequence whose blocks are `table` */
static inline void place(const int64_t *table, int64_t block_size, int64_t p, int64_t *row, int64_t *length) {
    *row = table[p / block_size] * block_size + p % block_size;
    *length = p + 1;
}

int hylm_mtp_greedy(int64_t A, int64_t D, int64_t V, int64_t steps, int64_t N, const int64_t *offsets,
                    const int64_t *starts, const int64_t *tokens, const float *hidden, const float *emb,
                    const float *enorm_w, float enorm_eps, const float *hnorm_w, float hnorm_eps, const float *eh_proj,
                    int eh_proj_t, const float *final_w, float final_eps, const float *head, int head_t,
                    /* the attention block: hylm_attention_rows' arguments from norm_w to cache_rows */
                    const float *a_norm_w, float a_eps, const float *wq, int wq_t, const float *wk, int wk_t,
                    const float *wv, int wv_t, const float *wo, int wo_t, int64_t Hq, int64_t Hkv, int64_t hd,
                    float *k_cache, float *v_cache, int64_t cache_rows,
                    /* where its keys and values go: each sequence's block table, table_width entries */
                    const int64_t *tables, int64_t table_stride, int64_t table_width, int64_t block_size,
                    float scale, int cu_splits, int splits, float *work,
                    /* the MoE block: hylm_moe_rows' arguments from router to eps */
                    const float *router, const float *correction_bias, int64_t E, int64_t top_k, int normalize,
                    float scaling, const float *fc1, int fc1_t, int64_t L, const float *up, const float *down,
                    int64_t I, const float *fc2, int fc2_t, const float *shared_up, int shared_up_t,
                    const float *shared_down, int shared_down_t, int64_t S, const float *m_norm_w, float m_eps,
                    float min_confidence, int64_t *tok, int64_t *drafted, float *prev_out) {
    if (A < 1 || D < 1 || V < 1 || steps < 1 || N < A || block_size < 1 || offsets[0] != 0 || offsets[A] != N)
        return -1;
    for (int64_t a = 0; a < A; a++) {
        if (offsets[a + 1] <= offsets[a] || starts[a] < 0) return -1;
        /* every position it writes: its catch-up's, then steps - 1 more */
        const int64_t last = starts[a] + offsets[a + 1] - offsets[a] + steps - 2;
        if (last / block_size >= table_width) return -3;
        for (int64_t b = 0; b <= last / block_size; b++) {
            const int64_t block = tables[a * table_stride + b];
            if (block < 0 || (block + 1) * block_size > cache_rows) return -3;
        }
    }
    for (int64_t n = 0; n < N; n++)
        if (tokens[n] < 0 || tokens[n] >= V) return -2;
    const int64_t R = N > A ? N : A;
    float *buf = malloc((size_t)(A * V + R * 4 * D + A * D) * sizeof(float));
    int64_t *ids = malloc((size_t)(A + 2 * R) * sizeof(int64_t));
    /* the catch-up's tokens each need their sequence's table: one row per token unless there is one sequence */
    int64_t *cu_tables = A > 1 ? malloc((size_t)(N * table_width) * sizeof(int64_t)) : NULL;
    if (!buf || !ids || (A > 1 && !cu_tables)) {
        free(buf), free(ids), free(cu_tables);
        return -5;
    }
    float *logits = buf, *cat = logits + A * V, *x = cat + 2 * R * D, *y = x + R * D, *prev = y + R * D;
    int64_t *rows = ids + A, *lengths = rows + R;
    for (int64_t a = 0; a < A; a++)
        for (int64_t n = offsets[a]; n < offsets[a + 1]; n++) {
            place(tables + a * table_stride, block_size, starts[a] + n - offsets[a], rows + n, lengths + n);
            if (cu_tables) memcpy(cu_tables + n * table_width, tables + a * table_stride,
                                  (size_t)table_width * sizeof(int64_t));
        }
    mtp_input(tokens, hidden, N, D, emb, enorm_w, enorm_eps, hnorm_w, hnorm_eps, eh_proj, eh_proj_t, cat, x);
    int rc = hylm_attention_rows(x, N, D, a_norm_w, a_eps, wq, wq_t, wk, wk_t, wv, wv_t, wo, wo_t, Hq, Hkv, hd,
                                 k_cache, v_cache, cache_rows, rows, cu_tables ? cu_tables : tables,
                                 cu_tables ? table_width : 0, lengths, block_size, scale, cu_splits, work, y);
    for (int64_t a = 0; a < A && rc == 0; a++)  /* the MoE and the head read each sequence's last row only */
        memcpy(x + a * D, y + (offsets[a + 1] - 1) * D, (size_t)D * sizeof(float));
    *drafted = 0;
    for (int64_t s = 0; s < steps && rc == 0; s++) {
        if (s > 0) {  /* the next position reads the previous draft and the MTP's own output there */
            for (int64_t a = 0; a < A; a++) {
                ids[a] = tok[a * steps + s - 1];
                place(tables + a * table_stride, block_size, starts[a] + offsets[a + 1] - offsets[a] + s - 1,
                      rows + a, lengths + a);
            }
            mtp_input(ids, prev, A, D, emb, enorm_w, enorm_eps, hnorm_w, hnorm_eps, eh_proj, eh_proj_t, cat, x);
            rc = hylm_attention_rows(x, A, D, a_norm_w, a_eps, wq, wq_t, wk, wk_t, wv, wv_t, wo, wo_t, Hq, Hkv, hd,
                                     k_cache, v_cache, cache_rows, rows, tables, table_stride, lengths, block_size,
                                     scale, splits, work, y);
            if (rc) break;
            memcpy(x, y, (size_t)(A * D) * sizeof(float));
        }
        rc = hylm_moe_rows(x, A, D, router, correction_bias, E, top_k, normalize, scaling, fc1, fc1_t, L, up, down,
                           I, fc2, fc2_t, shared_up, shared_up_t, shared_down, shared_down_t, S, m_norm_w, m_eps, 1,
                           y);
        if (rc) break;
        for (int64_t a = 0; a < A; a++) rmsnorm_row(y + a * D, final_w, final_eps, D, prev + a * D);
        *drafted = s + 1;
        if (!head_argmax(prev, head, head_t, logits, A, D, V, tok, steps, s, min_confidence) && s > 0) {
            *drafted = s;
            break;
        }
    }
    if (rc == 0 && prev_out) memcpy(prev_out, prev, (size_t)(A * D) * sizeof(float));
    free(buf), free(ids), free(cu_tables);
    return rc;
}
