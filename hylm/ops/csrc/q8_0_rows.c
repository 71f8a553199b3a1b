/* y = x W^T (+ b) for 1-8 rows of x over a GGUF Q8_0 weight kept packed: decode steps and small decode batches
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

#define Q8_0_MAX_ROWS 8

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

/* outputs n0..n1-1 for J rows (a constant after inlining, so that the sums stay in registers) */
static inline __attribute__((always_inline)) void q8_0_outputs(const float *x, const int8_t *q, const uint16_t *d,
                                                               const float *bias, float *y, int64_t K, int64_t N,
                                                               int64_t n0, int64_t n1, const int J) {
    const int64_t blocks = K / 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *qn = q + n * K;
        const uint16_t *dn = d + n * blocks;
        v8 acc[Q8_0_MAX_ROWS] = {{0}};
        for (int64_t b = 0; b < blocks; b++) {
            const v8 w0 = load_q8(qn + 32 * b), w1 = load_q8(qn + 32 * b + 8), w2 = load_q8(qn + 32 * b + 16),
                     w3 = load_q8(qn + 32 * b + 24);
            const float s = half_to_float(dn[b]);
#pragma GCC unroll 8
            for (int r = 0; r < J; r++) {
                const float *xr = x + r * K + 32 * b;
                v8 p = w0 * load8(xr) + w1 * load8(xr + 8);
                p += w2 * load8(xr + 16) + w3 * load8(xr + 24);
                acc[r] += p * s;
            }
        }
        for (int r = 0; r < J; r++) y[r * N + n] = hsum8(acc[r]) + (bias ? bias[n] : 0.0f);
    }
}

int hylm_q8_0_rows(const float *x, const int8_t *q, const uint16_t *d, const float *bias, float *y, int64_t R,
                   int64_t K, int64_t N) {
    if (R < 1 || R > Q8_0_MAX_ROWS || K < 32 || K % 32 != 0 || N < 1) return -1;
#pragma omp parallel
    {
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;  /* one contiguous range of outputs per thread */
        switch (R) {
            case 1: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 1); break;
            case 2: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 2); break;
            case 3: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 3); break;
            case 4: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 4); break;
            case 5: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 5); break;
            case 6: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 6); break;
            case 7: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 7); break;
            default: q8_0_outputs(x, q, d, bias, y, K, N, n0, n1, 8);
        }
    }
    return 0;
}
