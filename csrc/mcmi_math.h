/*
 * mcmi_math.h: float32 and float64 exp and log that the compiler can
 * vectorize, and the series of the KL's per-element function.
 *
 * Plain arithmetic and integer bit operations only (no calls, no branches),
 * so that `#pragma omp simd` loops calling them become SIMD code on every
 * x86-64 level (and on other targets). The float32 pair is Cephes-style (a
 * Cody-Waite range reduction and a minimax polynomial), the float64 pair
 * fdlibm's; all are within 2 ulp of the exact result over their domains
 * (tests/c checks this). The same code is used for vector and scalar
 * iterations and for every instruction set (the kernels are built without
 * contraction into FMA), so a value never depends on where it falls in a
 * loop or on the CPU. The CPU kernels call no libm function: glibc picks
 * its exp and log by CPU, and they round differently.
 */
#ifndef MCMI_MATH_H
#define MCMI_MATH_H

#include <stdint.h>

#include "mcmi_dtype.h"

/* The series of g is shared with the CUDA kernels. */
#ifdef __CUDACC__
#define MCMI_HOST_DEVICE __host__ __device__
#else
#define MCMI_HOST_DEVICE
#endif

/*
 * e^x for x <= 88.376 (2^127.5; the kernels only take exp of numbers <= 0).
 * NaN gives NaN, x < -87.3 gives 0 (results below FLT_MIN are flushed to
 * 0), x > 88.376 gives +inf.
 */
MCMI_HELPER float mcmi_expf(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  /* Clamped in two steps, each one SIMD max or min that keeps a NaN x. */
  const float xl = x < lo ? lo : x;
  const float xc = xl > hi ? hi : xl;
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
  const float y = x > hi ? (float)INFINITY : p * scale;
  return x < lo ? 0.0f : y;
}

/*
 * log x for finite x >= FLT_MIN (normal numbers: the kernels take the log
 * of max(Q, floor) with floor >= FLT_MIN). NaN gives NaN.
 */
MCMI_HELPER float mcmi_logf(float x) {
  /* x = 2^k * m with m in [sqrt(1/2), sqrt(2)). */
  uint32_t ix = mcmi_f32_bits(x) + (0x3F800000u - 0x3F3504F3u);
  const float k = (float)((int32_t)(ix >> 23) - 0x7F);
  ix = (ix & 0x007FFFFFu) + 0x3F3504F3u;
  const float f = mcmi_f32_from_bits(ix) - 1.0f;
  const float z = f * f;
  /* The polynomial by Estrin's scheme: a shorter dependency chain than
   * Horner's, so more elements are in flight at once. */
  const float z2 = z * z;
  const float a =
      7.0376836292e-2f * z2 + ((-1.1514610310e-1f * f + 1.1676998740e-1f) * z +
                               (-1.2420140846e-1f * f + 1.4249322787e-1f));
  const float b = (-1.6668057665e-1f * f + 2.0000714765e-1f) * z +
                  (-2.4999993993e-1f * f + 3.3333331174e-1f);
  float y = (a * z2 + b) * f * z;
  y = y + k * -2.12194440e-4f - 0.5f * z;
  const float result = f + y + k * 0.693359375f;
  return x != x ? x : result;
}

/*
 * e^x in float64 (fdlibm's e_exp.c, branch-free): n = round(x / ln 2), r =
 * x - n ln 2 in two parts, e^r by its rational approximation, times 2^n
 * formed as 2^n1 2^n2 (both normal, so that results down to the smallest
 * subnormal come out). NaN gives NaN, x < -745.134 gives 0, x > 709.783
 * gives +inf.
 */
MCMI_HELPER double mcmi_exp(double x) {
  const double lo = -7.45133219101941108420e+02,
               hi = 7.09782712893383973096e+02;
  const double xl = x < lo ? lo : x;
  const double xc = xl > hi ? hi : xl;
  /* n = round(x / ln 2) by the 1.5 * 2^52 trick; its low bits are n. */
  const double shifter = 6755399441055744.0;
  const uint64_t shifter_bits = 0x4338000000000000u;
  const double t = xc * 1.44269504088896338700e+00 + shifter;
  const double n = t - shifter;
  const double r_hi = xc - n * 6.93147180369123816490e-01; /* exact */
  const double r_lo = n * 1.90821492927058770002e-10;
  const double r = r_hi - r_lo;
  const double r2 = r * r;
  const double c =
      r - r2 * (1.66666666666666019037e-01 +
                r2 * (-2.77777777770155933842e-03 +
                      r2 * (6.61375632143793436117e-05 +
                            r2 * (-1.65339022054652515390e-06 +
                                  r2 * 4.13813679705723846039e-08))));
  const double y = 1.0 - ((r_lo - (r * c) / (2.0 - c)) - r_hi);
  /* n in [-1075, 1024] after the clamp: n1 = round(n / 2) and n2 = n - n1
   * are both in [-538, 512], valid exponents of normal numbers. */
  const double t1 = n * 0.5 + shifter;
  const double t2 = (n - (t1 - shifter)) + shifter;
  const uint64_t e1 = (mcmi_f64_bits(t1) - shifter_bits + 1023u) & 0x7FFu;
  const uint64_t e2 = (mcmi_f64_bits(t2) - shifter_bits + 1023u) & 0x7FFu;
  const double v =
      (y * mcmi_f64_from_bits(e1 << 52)) * mcmi_f64_from_bits(e2 << 52);
  const double big = x > hi ? (double)INFINITY : v;
  return x < lo ? 0.0 : big;
}

/*
 * log x in float64 (fdlibm's e_log.c, branch-free): x = 2^k (1 + f) with
 * 1 + f in [sqrt(1/2), sqrt(2)), s = f / (2 + f), and log(1 + f) = f -
 * f^2 / 2 + s (f^2 / 2 + R(s^2)). Subnormal x is scaled by 2^54 first.
 * NaN or x < 0 gives NaN, 0 gives -inf, +inf gives +inf.
 */
MCMI_HELPER double mcmi_log(double x) {
  const int sub = x < 2.2250738585072014e-308;
  const double xs = sub ? x * 18014398509481984.0 : x; /* 2^54 */
  /* The exponent of xs (after moving [sqrt(1/2), 1) up an octave) as a
   * double, without an integer conversion: 2^52 + e - (2^52 + 1023). */
  uint64_t ix = mcmi_f64_bits(xs) + (0x3FF0000000000000u - 0x3FE6A09E667F3BCDu);
  const double k = mcmi_f64_from_bits((ix >> 52) | 0x4330000000000000u) -
                   (4503599627370496.0 + 1023.0) - (sub ? 54.0 : 0.0);
  ix = (ix & 0x000FFFFFFFFFFFFFu) + 0x3FE6A09E667F3BCDu;
  const double f = mcmi_f64_from_bits(ix) - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s, w = z * z;
  const double t1 =
      w * (3.999999999940941908e-01 +
           w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double t2 =
      z * (6.666666666666735130e-01 +
           w * (2.857142874366239149e-01 +
                w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const double hfsq = 0.5 * f * f;
  const double y =
      k * 6.93147180369123816490e-01 -
      ((hfsq - (s * (hfsq + (t2 + t1)) + k * 1.90821492927058770002e-10)) - f);
  const double special = x == 0.0 ? -(double)INFINITY : (double)NAN;
  const double finite = x > 0.0 ? y : special;
  /* NaN stays NaN (it fails x > 0.0 and is returned as it is). */
  const double result = x == (double)INFINITY ? x : finite;
  return x != x ? x : result;
}

/*
 * 1/T as the product k * *k2 of two factors finite in an accumulation type
 * whose largest finite number is acc_max and smallest positive (subnormal)
 * number acc_min, applied as ((z - m) * k) * k2. *k2 is 1 (exact), or 2^64
 * when 1/T is beyond the type's range (a tiny T): then z == m still gives 0
 * and every z < m a product far below the range of exp, as 1/T itself
 * would; k is clamped to acc_max only where that holds for the smallest
 * nonzero difference too. k is at least acc_min, so that at a huge T a -inf
 * logit still gives -inf (never -inf * 0 = NaN), while every finite
 * difference gives a product within 1e-6 of 0. The CPU and CUDA kernels
 * both form 1/T this way.
 */
MCMI_HELPER MCMI_HOST_DEVICE double
mcmi_inv_temperature(double t, double acc_max, double acc_min, double *k2) {
  const double big = 18446744073709551616.0; /* 2^64 */
  const double inv = 1.0 / t;
  if (inv <= acc_max) {
    *k2 = 1.0;
    return inv > acc_min ? inv : acc_min;
  }
  const double k = 1.0 / (t * big);
  *k2 = big;
  return k < acc_max ? k : acc_max;
}

/*
 * g(x) = (x - 1) e^x + 1 for |x| <= 1/2, as its Taylor series
 * sum_{n >= 2} (n - 1) x^n / n! (through x^9 in float32, x^17 in float64:
 * the first term left out is below half an ulp of g). The KL of the kernels
 * is sum_j Q_j g(log(P_j / Q_j)) - (sum_j Q_j - 1) (docs/math.md); g has a
 * double root at 0, so it is formed without cancellation.
 */
MCMI_HELPER MCMI_HOST_DEVICE float mcmi_kl_g_f32(float x) {
  /* Estrin's scheme, as in mcmi_logf. */
  const float x2 = x * x;
  const float hi =
      (2.2045855379188714e-05f * x + 1.7361111111111112e-04f) * x2 +
      (1.1904761904761906e-03f * x + 6.9444444444444444e-03f);
  const float lo = (3.3333333333333333e-02f * x + 0.125f) * x2 +
                   (0.33333333333333333f * x + 0.5f);
  return (hi * (x2 * x2) + lo) * x2;
}

MCMI_HELPER MCMI_HOST_DEVICE double mcmi_kl_g_f64(double x) {
  double p = 4.498331606952833e-14;
  p = p * x + 7.169215998581078e-13;
  p = p * x + 1.0706029224547743e-11;
  p = p * x + 1.4911969277048643e-10;
  p = p * x + 1.9270852604185937e-09;
  p = p * x + 2.296443268665491e-08;
  p = p * x + 2.505210838544172e-07;
  p = p * x + 2.48015873015873e-06;
  p = p * x + 2.2045855379188714e-05;
  p = p * x + 1.7361111111111112e-04;
  p = p * x + 1.1904761904761906e-03;
  p = p * x + 6.944444444444444e-03;
  p = p * x + 3.333333333333333e-02;
  p = p * x + 0.125;
  p = p * x + 0.3333333333333333;
  p = p * x + 0.5;
  return p * x * x;
}

#endif /* MCMI_MATH_H */
