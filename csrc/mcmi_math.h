/*
 * mcmi_math.h: float32 exp and log that the compiler can vectorize.
 *
 * Plain arithmetic and integer bit operations only (no calls, no branches),
 * so that `#pragma omp simd` loops calling them become SIMD code on every
 * x86-64 level (and on other targets). Both are Cephes-style: a Cody-Waite
 * range reduction and a minimax polynomial, within 2 ulp of the exact
 * result over their domains (tests/c checks this). The same code is used
 * for vector and scalar iterations, so a value never depends on where it
 * falls in a loop.
 */
#ifndef MCMI_MATH_H
#define MCMI_MATH_H

#include <stdint.h>

#include "mcmi_dtype.h"

/*
 * e^x for x <= 88.376 (2^127.5; the kernels only take exp of numbers <= 0).
 * NaN gives NaN, x < -87.3 gives 0 (results below FLT_MIN are flushed to
 * 0), x > 88.376 gives +inf.
 */
static inline float mcmi_expf(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  /* n = round(x / ln 2) by the 1.5 * 2^23 trick; its low bits are n. */
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  /* 2^n from the bits of t (no float-to-int conversion: NaN stays UB-free).
   * n is in [-126, 127] after the clamp, so the exponent field is valid. */
  const uint32_t biased = (mcmi_f32_bits(t) - 0x4B400000u + 127u) & 0xFFu;
  const float scale = mcmi_f32_from_bits(biased << 23);
  const float y = p * scale;
  return x < lo ? 0.0f : (x > hi ? (float)INFINITY : y);
}

/*
 * log x for finite x >= FLT_MIN (normal numbers: the kernels take the log
 * of max(Q, floor) with floor >= FLT_MIN). NaN gives NaN.
 */
static inline float mcmi_logf(float x) {
  /* x = 2^k * m with m in [sqrt(1/2), sqrt(2)). */
  uint32_t ix = mcmi_f32_bits(x) + (0x3F800000u - 0x3F3504F3u);
  const float k = (float)((int32_t)(ix >> 23) - 0x7F);
  ix = (ix & 0x007FFFFFu) + 0x3F3504F3u;
  const float f = mcmi_f32_from_bits(ix) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + k * -2.12194440e-4f - 0.5f * z;
  const float result = f + y + k * 0.693359375f;
  return x != x ? x : result;
}

#endif /* MCMI_MATH_H */
