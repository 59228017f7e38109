/*
 * mcmi_dtype.h: loads and stores of the 16-bit float formats, in plain C.
 */
#ifndef MCMI_DTYPE_H
#define MCMI_DTYPE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The helpers here and in mcmi_math.h are inlined wherever they are used,
 * so that each of the CPU kernels' instruction sets (mcmi_cpu.c) gets its
 * own copy of them, not a call to one compiled for another. */
#if defined(__GNUC__) && !defined(__CUDACC__)
#define MCMI_HELPER static inline __attribute__((always_inline))
#else
#define MCMI_HELPER static inline
#endif

MCMI_HELPER float mcmi_f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

MCMI_HELPER uint32_t mcmi_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

MCMI_HELPER double mcmi_f64_from_bits(uint64_t u) {
  double f;
  memcpy(&f, &u, sizeof f);
  return f;
}

MCMI_HELPER uint64_t mcmi_f64_bits(double f) {
  uint64_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

MCMI_HELPER float mcmi_bf16_load(uint16_t h) {
  return mcmi_f32_from_bits((uint32_t)h << 16);
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
MCMI_HELPER uint16_t mcmi_bf16_store(float f) {
  uint32_t u = mcmi_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return (uint16_t)((u >> 16) | 0x0040u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/*
 * IEEE binary16 <-> binary32 without branches, exact for every value
 * (subnormals, infinities and NaN included); stores round to nearest even.
 * The constants rebias the exponent and let the FPU do the rounding.
 */
MCMI_HELPER float mcmi_f16_load(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normal =
      mcmi_f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal =
      mcmi_f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits =
      two_w < (1u << 27) ? mcmi_f32_bits(subnormal) : mcmi_f32_bits(normal);
  return mcmi_f32_from_bits(sign | bits);
}

MCMI_HELPER uint16_t mcmi_f16_store(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = mcmi_f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) {
    bias = 0x71000000u;
  }
  base = mcmi_f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = mcmi_f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

#endif /* MCMI_DTYPE_H */
