/*
 * mcmi_check.h: the argument checks that the CPU and the CUDA kernels share
 * (mcmi_check.c; internal to the kernels, not part of the C interface).
 *
 * Every entry point of mcmi.h and cuda/mcmi_cuda.h checks its arguments with
 * these before it touches memory and returns MCMI_ERROR_ARGUMENT when one
 * fails: the problem (mcmi_problem_ok, or mcmi_loss_problem_ok for the
 * loss), the momentum, and the extents of its outputs (mcmi_extent_ok). The
 * CPU kernels check labels with mcmi_check_targets (mcmi.h); the CUDA
 * kernels check them on the device (cuda/mcmi_cuda.h). The shim has checked
 * all of it before, with messages: these keep the kernels safe for any
 * caller.
 */
#ifndef MCMI_CHECK_H
#define MCMI_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "mcmi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Workspaces, buffers and every offset into them stay below this many
 * bytes, so that byte counts and element indices never overflow. */
#define MCMI_MAX_BYTES ((size_t)PTRDIFF_MAX - 64u)

/* Bytes of one element of logits (and of the loss and gradient). */
static inline size_t mcmi_logit_size(mcmi_dtype dtype) {
  return dtype == MCMI_FLOAT64   ? sizeof(double)
         : dtype == MCMI_FLOAT32 ? sizeof(float)
                                 : sizeof(uint16_t);
}

/* Bytes of one element of centroids, class sums and the EMA centroids:
 * float64 for float64 logits, float32 otherwise. */
static inline size_t mcmi_acc_size(mcmi_dtype dtype) {
  return dtype == MCMI_FLOAT64 ? sizeof(double) : sizeof(float);
}

/* A dtype the kernels know. */
int mcmi_dtype_ok(mcmi_dtype dtype);

/*
 * Rows of `cols` elements of `size` bytes, `stride` elements apart, have
 * every element index and byte offset representable: the last element sits
 * at (rows - 1) * stride + cols - 1. Outputs (`output` non-zero) must also
 * not overlap: stride >= cols whenever there are two rows or more.
 */
int mcmi_extent_ok(int64_t rows, int64_t stride, int64_t cols, size_t size,
                   int output);

/*
 * The problem is one the kernels take (mcmi.h, mcmi_problem): sizes,
 * temperature, dtype, log_centroids with centroids, K <= C with a CE term,
 * the extents of logits, target and centroids, and their pointers. The
 * reduction is the loss's alone (the other entry points ignore it).
 */
int mcmi_problem_ok(const mcmi_problem *p);

/* A problem of the loss: mcmi_problem_ok, and a known reduction. */
int mcmi_loss_problem_ok(const mcmi_problem *p);

/* A momentum of the EMA update: in (0, 1]. */
int mcmi_momentum_ok(double momentum);

/* The arguments of mcmi_cpu_scale_rows / mcmi_cuda_scale_rows. */
int mcmi_scale_rows_ok(mcmi_dtype dtype, const void *x, int64_t rows,
                       int64_t cols, int64_t stride, const void *scale,
                       int64_t scale_stride);

#ifdef __cplusplus
}
#endif

#endif /* MCMI_CHECK_H */
