/* Eight-lane fp32 vectors for hylm's C kernels (GCC/Clang vector extensions: AVX registers where the CPU
 * has them, SSE pairs else) and the reductions they share. */
#ifndef HYLM_VEC_H
#define HYLM_VEC_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { return *(const v8u *)p; }

/* (sum of a[0]'s lanes, ..., sum of a[7]'s lanes): a transposing reduction, 21 operations for eight sums
 * where eight separate horizontal sums would take ~56. */
static inline v8 sum_lanes8(const v8 *a) {
    const v8i lo_pairs = {0, 8, 1, 9, 4, 12, 5, 13}, hi_pairs = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i lo_quads = {0, 1, 8, 9, 4, 5, 12, 13}, hi_quads = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo_halves = {0, 1, 2, 3, 8, 9, 10, 11}, hi_halves = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 t[4], u[2];
    for (int j = 0; j < 4; j++)
        t[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], lo_pairs) + __builtin_shuffle(a[2 * j], a[2 * j + 1], hi_pairs);
    for (int j = 0; j < 2; j++)
        u[j] = __builtin_shuffle(t[2 * j], t[2 * j + 1], lo_quads) + __builtin_shuffle(t[2 * j], t[2 * j + 1], hi_quads);
    return __builtin_shuffle(u[0], u[1], lo_halves) + __builtin_shuffle(u[0], u[1], hi_halves);
}

/* e^x lane by lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (error < 2e-7
 * relative), 2^n through the exponent bits. Inputs are clamped to [-87.3, 88.3]: results underflow to ~1e-38
 * (not to 0) and never overflow, which the SiLU that uses it (mamba_step.c) absorbs. */
static inline v8 exp8(v8 x) {
    const v8 hi = {88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f};
    const v8 lo = {-87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f, -87.3f};
    v8i above = x > hi, below = x < lo; /* lanes of all ones where true */
    x = (v8)(((v8i)hi & above) | ((v8i)x & ~above));
    x = (v8)(((v8i)lo & below) | ((v8i)x & ~below));
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = x * 1.44269504088896341f + round_magic;
    n -= round_magic;
    v8 r = x - n * 0.693359375f;  /* ln2 in two parts, so that n * ln2 is exact enough */
    r -= n * -2.12194440e-4f;
    v8 p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale;
    __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* dst[0..n) = src[0..n) with stores that bypass the caches where the CPU has them (AVX, dst 32-byte aligned):
 * for data written once and read rarely, whose cache lines would otherwise be read first (a verification's
 * per-token states). Call stream_fence() before another thread reads it. */
static inline void copy_streaming(float *dst, const float *src, int64_t n) {
#ifdef __AVX__
    if (((uintptr_t)dst & 31) == 0 && n % 8 == 0) {
        for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
        return;
    }
#endif
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static inline void stream_fence(void) {
#ifdef __AVX__
    _mm_sfence();
#endif
}

#endif
