/* RMSNorm of rows in fp32, as hylm/model/norm.py computes it: x * rsqrt(mean(x^2) + eps) * w. */
#ifndef HYLM_NORM_H
#define HYLM_NORM_H

#include <math.h>
#include <stdint.h>

static inline void rmsnorm_row(const float *x, const float *w, float eps, int64_t D, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) out[i] = w[i] * (x[i] * r);
}

#endif
