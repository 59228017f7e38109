/*
 * test_util.h: what the plain-C and CUDA-C test programs share: a checking
 * macro with counters, a reproducible random source, and the store of a
 * value into a buffer of any dtype.
 */
#ifndef MCMI_TEST_UTIL_H
#define MCMI_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "mcmi.h"
#include "mcmi_dtype.h"

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    ++checks;                                                                  \
    if (!(cond)) {                                                             \
      ++failures;                                                              \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                     \
      fprintf(stderr, __VA_ARGS__);                                            \
      fputc('\n', stderr);                                                     \
    }                                                                          \
  } while (0)

/* xorshift64*: reproducible inputs without libc's rand state. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 2685821657736338717ull) >> 11) * 0x1.0p-53;
}

static double normal(void) {
  const double u = uniform() + 1e-300, v = uniform();
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* v, rounded to dtype t, as element i of x. */
static void store_any(mcmi_dtype t, void *x, int64_t i, double v) {
  switch (t) {
  case MCMI_FLOAT32:
    ((float *)x)[i] = (float)v;
    break;
  case MCMI_FLOAT64:
    ((double *)x)[i] = v;
    break;
  case MCMI_BFLOAT16:
    ((uint16_t *)x)[i] = mcmi_bf16_store((float)v);
    break;
  default:
    ((uint16_t *)x)[i] = mcmi_f16_store((float)v);
  }
}

#endif /* MCMI_TEST_UTIL_H */
