/* Decode attention over a paged KV cache on the CPU: one new query token per sequence, grouped query heads.
 *
 * PyTorch's CPU attention kernels read one query row per KV head at 5-15 GB/s; decode at long context is
 * nothing but that read. This kernel streams each sequence's K and V once (the G query heads that share a
 * KV head are scored against each key row while it is in cache), splits long sequences into ranges that run
 * on different threads (flash-decoding), and merges the ranges by their log-sum-exp.
 *
 * Layouts (row-major, no padding):
 *   q        [B, H, G, D] fp32            (H = KV heads, G = query heads per KV head)
 *   k, v     [H, R, D] fp32 or bf16       (R cache rows; row of position p = table[p / bs] * bs + p % bs)
 *   tables   [B, table_stride] int64      block ids of each sequence in position order
 *   lengths  [B] int64                    positions each sequence attends to (its context + the new token)
 *   work     [B * H * splits, G * D + 2 * G] fp32 scratch
 *   out      [B, H, G, D] fp32
 * Compiled by hylm/ops/native.py with the system C compiler and OpenMP (the libgomp PyTorch already loaded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define TILE 128
#define MAX_G 16
#define MAX_D 512

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* exp(x) for x <= 0 in a form the compiler vectorises (libm's expf is a scalar call per score, which alone
 * capped the kernel at ~13 GB/s per core): x = (n + f) ln 2 with |f| <= 1/2, 2^f by its degree-6 Taylor
 * polynomial in f ln 2 (relative error < 2e-7), 2^n put into the exponent bits. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  /* exp(-87) ~ 1.6e-38: still a normal float, and far below anything summed */
    float t = x * 1.44269504088896341f;
    float n = floorf(t + 0.5f);
    float r = (t - n) * 0.693147180559945309f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* `count` consecutive cache elements from `offset` as fp32: a pointer into an fp32 cache, or a bf16 cache's
 * values converted into buf (TILE * MAX_D floats). */
static inline const float *tile_rows(const void *cache, int bf16, int64_t offset, int64_t count, float *buf) {
    if (!bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
#pragma omp simd
    for (int64_t i = 0; i < count; i++) buf[i] = bf16_to_f32(src[i]);
    return buf;
}

/* exp_nonpositive on eight lanes (the compiler does not vectorise the scalar one's bit cast). Rounding t to
 * the nearest integer as trunc(t - 1/2) holds for t <= 0. */
static inline v8 exp8_nonpositive(v8 x) {
    const v8 lowest = {-87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f, -87.0f};
    v8i below = x < lowest;
    x = (v8)(((v8i)x & ~below) | ((v8i)lowest & below));
    v8 t = x * 1.44269504088896341f;
    v8i ni = __builtin_convertvector(t - 0.5f, v8i);
    v8 r = (t - __builtin_convertvector(ni, v8)) * 0.693147180559945309f;
    v8 poly = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    return poly * (v8)((ni + 127) << 23);
}

/* Softmax attention of G query rows over positions [lo, hi) of one sequence and KV head, unnormalised:
 * acc[g] = sum_p exp(s_gp - m_g) v_p, l[g] = sum_p exp(s_gp - m_g), m[g] = max_p s_gp.
 * Always inlined into one copy per common head size, so that the D-long loops are unrolled and the dot
 * products' horizontal sums are short: with D a runtime value they cost more than the memory reads. */
static inline __attribute__((always_inline)) void attend_range_d(
        const float *q, const void *kc, const void *vc, int bf16, int64_t head_offset, const int64_t *table,
        int64_t block_size, int64_t lo, int64_t hi, int G, const int D, float scale, float *restrict acc,
        float *m, float *l, float *tile_buf) {
    float s[MAX_G * TILE];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int64_t p = lo; p < hi;) {
        /* a tile: up to TILE positions whose rows are consecutive in the cache (blocks handed out in order
         * usually are), so that the per-tile work below is shared by many rows */
        int64_t block = table[p / block_size], in_block = p % block_size;
        int64_t row0 = block * block_size + in_block;
        int64_t n = block_size - in_block;
        while (n < TILE && p + n < hi && table[(p + n) / block_size] == block + (p + n) / block_size - p / block_size)
            n += block_size;
        if (n > hi - p) n = hi - p;
        if (n > TILE) n = TILE;
        const float *K = tile_rows(kc, bf16, head_offset + row0 * D, n * D, tile_buf);
        /* scores, four rows at a time: four independent dot products keep the FMA units busy where one
         * would wait on its own accumulator */
        for (int g = 0; g < G; g++) {
            const float *restrict qg = q + (int64_t)g * D;
            float *sg = s + g * TILE;
            int64_t i = 0;
            if (D % 8 == 0)
                for (; i + 8 <= n; i += 8) {  /* eight rows: eight vector accumulators, one reduction */
                    v8 part[8] = {0};
                    for (int d = 0; d < D; d += 8) {
                        v8 x = load8(qg + d);
                        for (int r = 0; r < 8; r++) part[r] += x * load8(K + (i + r) * D + d);
                    }
                    v8 dots = sum_lanes8(part) * scale;
                    memcpy(sg + i, &dots, sizeof dots);
                }
            for (; i + 4 <= n; i += 4) {
                const float *restrict k0 = K + i * D, *restrict k1 = k0 + D, *restrict k2 = k1 + D,
                            *restrict k3 = k2 + D;
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
                for (int d = 0; d < D; d++) {
                    float x = qg[d];
                    d0 += x * k0[d];
                    d1 += x * k1[d];
                    d2 += x * k2[d];
                    d3 += x * k3[d];
                }
                sg[i] = d0 * scale;
                sg[i + 1] = d1 * scale;
                sg[i + 2] = d2 * scale;
                sg[i + 3] = d3 * scale;
            }
            for (; i < n; i++) {
                const float *restrict k = K + i * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qg[d] * k[d];
                sg[i] = dot * scale;
            }
        }
        for (int g = 0; g < G; g++) {
            float *sg = s + g * TILE;
            float mx = sg[0];
            for (int64_t i = 1; i < n; i++) mx = sg[i] > mx ? sg[i] : mx;
            if (mx > m[g]) {  /* a new running maximum: rescale what was summed so far */
                float c = expf(m[g] - mx);
                l[g] *= c;
                float *ag = acc + (int64_t)g * D;
                for (int d = 0; d < D; d++) ag[d] *= c;
                m[g] = mx;
            }
            float sum = 0.0f, mg = m[g];
            int64_t i = 0;
            v8 sums = {0};
            for (; i + 8 <= n; i += 8) {
                v8 e = exp8_nonpositive(load8(sg + i) - mg);
                memcpy(sg + i, &e, sizeof e);
                sums += e;
            }
            for (int j = 0; j < 8; j++) sum += sums[j];
            for (; i < n; i++) {
                sg[i] = exp_nonpositive(sg[i] - mg);
                sum += sg[i];
            }
            l[g] += sum;
        }
        const float *V = tile_rows(vc, bf16, head_offset + row0 * D, n * D, tile_buf);
        /* weighted values, four rows per pass over the accumulator */
        for (int g = 0; g < G; g++) {
            const float *sg = s + g * TILE;
            float *restrict ag = acc + (int64_t)g * D;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                const float *restrict v0 = V + i * D, *restrict v1 = v0 + D, *restrict v2 = v1 + D,
                            *restrict v3 = v2 + D;
                float w0 = sg[i], w1 = sg[i + 1], w2 = sg[i + 2], w3 = sg[i + 3];
#pragma omp simd
                for (int d = 0; d < D; d++) ag[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
            }
            for (; i < n; i++) {
                const float *restrict v = V + i * D;
                float w = sg[i];
#pragma omp simd
                for (int d = 0; d < D; d++) ag[d] += w * v[d];
            }
        }
        p += n;
    }
}

/* 0, or -1 where a bf16 cache's tile buffer could not be allocated */
static int attend_range(const float *q, const void *kc, const void *vc, int bf16, int64_t head_offset,
                        const int64_t *table, int64_t block_size, int64_t lo, int64_t hi, int G, int D,
                        float scale, float *acc, float *m, float *l) {
    float *tile_buf = NULL;
    if (bf16 && !(tile_buf = malloc(sizeof(float) * TILE * (size_t)D))) return -1;
#define HEAD_SIZE(DD) \
    case DD: attend_range_d(q, kc, vc, bf16, head_offset, table, block_size, lo, hi, G, DD, scale, acc, m, l, tile_buf); break;
    switch (D) {
        HEAD_SIZE(32) HEAD_SIZE(48) HEAD_SIZE(64) HEAD_SIZE(80) HEAD_SIZE(96) HEAD_SIZE(128) HEAD_SIZE(256)
        default: attend_range_d(q, kc, vc, bf16, head_offset, table, block_size, lo, hi, G, D, scale, acc, m, l, tile_buf);
    }
#undef HEAD_SIZE
    free(tile_buf);
    return 0;
}

int hylm_paged_decode(const float *q, const void *k_cache, const void *v_cache, int bf16, int64_t R,
                      const int64_t *tables, int64_t table_stride, const int64_t *lengths, int B, int H, int G,
                      int D, int64_t block_size, float scale, int splits, float *work, float *out) {
    if (G < 1 || G > MAX_G || D < 1 || D > MAX_D || splits < 1 || block_size < 1) return -1;
    const int64_t stride = (int64_t)G * D + 2 * G;
    const int64_t items = (int64_t)B * H * splits;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t it = 0; it < items; it++) {
        int64_t b = it / ((int64_t)H * splits), h = (it / splits) % H, sp = it % splits;
        int64_t len = lengths[b];
        /* equal ranges, rounded up to whole blocks so that no tile straddles two threads' ranges */
        int64_t per = (len + splits - 1) / splits;
        per = (per + block_size - 1) / block_size * block_size;
        int64_t lo = sp * per, hi = lo + per < len ? lo + per : len;
        float *acc = work + it * stride, *m = acc + (int64_t)G * D, *l = m + G;
        if (lo >= hi) {
            for (int g = 0; g < G; g++) {
                m[g] = -INFINITY;
                l[g] = 0.0f;
            }
            memset(acc, 0, sizeof(float) * (size_t)G * D);
            continue;
        }
        failed |= attend_range(q + (b * H + h) * G * D, k_cache, v_cache, bf16, h * R * D, tables + b * table_stride,
                     block_size, lo, hi, G, D, scale, acc, m, l) != 0;
    }
    if (failed) return -2;
#pragma omp parallel for
    for (int64_t bh = 0; bh < (int64_t)B * H; bh++) {
        const float *part = work + bh * splits * stride;
        float *o = out + bh * G * D;
        for (int g = 0; g < G; g++) {
            float M = -INFINITY;
            for (int sp = 0; sp < splits; sp++) {
                float mi = part[sp * stride + (int64_t)G * D + g];
                M = mi > M ? mi : M;
            }
            float L = 0.0f;
            float *og = o + (int64_t)g * D;
            memset(og, 0, sizeof(float) * (size_t)D);
            for (int sp = 0; sp < splits; sp++) {
                const float *ps = part + sp * stride;
                float mi = ps[(int64_t)G * D + g];
                if (mi == -INFINITY) continue;
                float c = expf(mi - M);
                L += ps[(int64_t)G * D + G + g] * c;
                const float *ag = ps + (int64_t)g * D;
                for (int d = 0; d < D; d++) og[d] += c * ag[d];
            }
            float inv = 1.0f / L;
            for (int d = 0; d < D; d++) og[d] *= inv;
        }
    }
    return 0;
}
