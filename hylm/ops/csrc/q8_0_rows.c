/* y = x W^T (+ b) for 1-64 rows of x over a GGUF Q8_0 weight kept packed: decode steps and small decode batches
 * of a quantized model, where the product is a read of the weight. The weight is read once, 8.5 bits per
 * element, and dequantised in registers; the tiled PyTorch path (hylm/model/gguf_quant.q8_0_linear) writes and
 * reads an fp32 copy of every tile, more memory traffic than an fp32 weight.
 *
 * Layouts (no padding): x [R, K] fp32, q int8 [N, K], d fp16 [N, K/32] (the scale of each block of 32 along a
 * row: W[n, 32 b + k] = d[n, b] * q[n, 32 b + k]), b [N] fp32 or NULL, y [R, N] fp32. K a multiple of 32.
 * Each thread takes one contiguous range of outputs, so that it reads its rows of q front to back.
 */
#include <stdint.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <omp.h>

#include "vec.h"

#define Q8_0_MAX_ROWS 64  /* decode batches; longer inputs dequantise tiles for a GEMM */
#define Q8_0_CHUNK_ROWS 8

/* 8 int8 -> 8 floats (GCC's generic conversion of an int8 vector goes element by element: the AVX2 forms) */
static inline v8 load_q8(const int8_t *p) {
#if defined(__AVX2__)
    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    v8 v;
    memcpy(&v, &f, sizeof v);
    return v;
#else
    return (v8){p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
#endif
}

/* IEEE half -> float (the scales; F16C's instruction where the compiler targets it) */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal half: normalise */
        uint32_t e = 113;
        uint32_t m = man;
        while (!(m & 0x400)) m <<= 1, e--;
        bits = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline float hsum8(v8 v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* output n for J rows of x (J a constant after inlining, so that the sums stay in registers) */
static inline __attribute__((always_inline)) void q8_0_output(const float *x, const int8_t *qn, const uint16_t *dn,
                                                              float b, float *y, int64_t K, int64_t N, int64_t n,
                                                              const int J) {
    v8 acc[Q8_0_CHUNK_ROWS] = {{0}};
    for (int64_t blk = 0; blk < K / 32; blk++) {
        const v8 w0 = load_q8(qn + 32 * blk), w1 = load_q8(qn + 32 * blk + 8), w2 = load_q8(qn + 32 * blk + 16),
                 w3 = load_q8(qn + 32 * blk + 24);
        const float s = half_to_float(dn[blk]);
#pragma GCC unroll 8
        for (int r = 0; r < J; r++) {
            const float *xr = x + r * K + 32 * blk;
            v8 p = w0 * load8(xr) + w1 * load8(xr + 8);
            p += w2 * load8(xr + 16) + w3 * load8(xr + 24);
            acc[r] += p * s;
        }
    }
    for (int r = 0; r < J; r++) y[r * N + n] = hsum8(acc[r]) + b;
}

int hylm_q8_0_rows(const float *x, const int8_t *q, const uint16_t *d, const float *bias, float *y, int64_t R,
                   int64_t K, int64_t N) {
    if (R < 1 || R > Q8_0_MAX_ROWS || K < 32 || K % 32 != 0 || N < 1) return -1;
#pragma omp parallel
    {
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;  /* one contiguous range of outputs per thread */
        for (int64_t n = n0; n < n1; n++) {
            const int8_t *qn = q + n * K;
            const uint16_t *dn = d + n * (K / 32);
            const float b = bias ? bias[n] : 0.0f;
            /* the rows 8 at a time while this output's weight row is in L1 */
            for (int64_t r0 = 0; r0 < R; r0 += Q8_0_CHUNK_ROWS) {
                const float *xr = x + r0 * K;
                float *yr = y + r0 * N;
                switch (R - r0 < Q8_0_CHUNK_ROWS ? R - r0 : Q8_0_CHUNK_ROWS) {
                    case 1: q8_0_output(xr, qn, dn, b, yr, K, N, n, 1); break;
                    case 2: q8_0_output(xr, qn, dn, b, yr, K, N, n, 2); break;
                    case 3: q8_0_output(xr, qn, dn, b, yr, K, N, n, 3); break;
                    case 4: q8_0_output(xr, qn, dn, b, yr, K, N, n, 4); break;
                    case 5: q8_0_output(xr, qn, dn, b, yr, K, N, n, 5); break;
                    case 6: q8_0_output(xr, qn, dn, b, yr, K, N, n, 6); break;
                    case 7: q8_0_output(xr, qn, dn, b, yr, K, N, n, 7); break;
                    default: q8_0_output(xr, qn, dn, b, yr, K, N, n, 8);
                }
            }
        }
    }
    return 0;
}

/* one row of a Q8_0 weight (K elements, K/32 scales) dotted with x [K] */
static inline float q8_0_dot(const int8_t *q, const uint16_t *d, const float *x, int64_t K) {
    v8 acc = {0};
    for (int64_t b = 0; b < K / 32; b++) {
        const int8_t *qb = q + 32 * b;
        const float *xb = x + 32 * b;
        v8 p = load_q8(qb) * load8(xb) + load_q8(qb + 8) * load8(xb + 8);
        p += load_q8(qb + 16) * load8(xb + 16) + load_q8(qb + 24) * load8(xb + 24);
        acc += p * half_to_float(d[b]);
    }
    return hsum8(acc);
}

/* The routed experts of a MoE layer for R tokens with Q8_0 weights, in one call: out[r] = sum_j w[r, j] *
 * down[e] relu(up[e] x[r])^2 with e = ids[r, j]. up: q [E, I, Din], d [E, I, Din/32]; down: q [E, Dout, I],
 * d [E, Dout, I/32]; x [R, Din], ids int64 [R, top_k] (each in [0, E)), w fp32 [R, top_k], h: scratch
 * [R * top_k, I], out [R, Dout]. Din and I multiples of 32. Two phases in one parallel region: every
 * assignment's activations (split by output), then every token's weighted sum (split by output). */
int hylm_q8_0_experts_rows(const float *x, const int64_t *ids, const float *w, int64_t R, int64_t top_k,
                           const int8_t *up_q, const uint16_t *up_d, const int8_t *down_q, const uint16_t *down_d,
                           int64_t E, int64_t I, int64_t Din, int64_t Dout, float *h, float *out) {
    if (R < 1 || top_k < 1 || E < 1 || I < 32 || I % 32 || Din < 32 || Din % 32 || Dout < 1) return -1;
    for (int64_t a = 0; a < R * top_k; a++)
        if (ids[a] < 0 || ids[a] >= E) return -2;
    const int64_t A = R * top_k;
#pragma omp parallel
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t a = 0; a < A; a++) {
            for (int64_t i = 0; i < I; i++) {
                const int64_t e = ids[a];
                const int64_t row = e * I + i;
                float v = q8_0_dot(up_q + row * Din, up_d + row * (Din / 32), x + (a / top_k) * Din, Din);
                v = v > 0.0f ? v : 0.0f;
                h[a * I + i] = v * v;
            }
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int64_t o = 0; o < Dout; o++) {
                float s = 0.0f;
                for (int64_t j = 0; j < top_k; j++) {
                    const int64_t a = r * top_k + j, row = ids[a] * Dout + o;
                    s += w[a] * q8_0_dot(down_q + row * I, down_d + row * (I / 32), h + a * I, I);
                }
                out[r * Dout + o] = s;
            }
        }
    }
    return 0;
}
