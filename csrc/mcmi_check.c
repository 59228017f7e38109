/*
 * mcmi_check.c: the argument checks shared by the CPU and the CUDA kernels
 * (mcmi_check.h), and the label check of mcmi.h.
 */
#include "mcmi_check.h"

int mcmi_dtype_ok(mcmi_dtype dtype) {
  return (int)dtype >= 0 && (int)dtype < MCMI_DTYPE_COUNT;
}

int mcmi_extent_ok(int64_t rows, int64_t stride, int64_t cols, size_t size,
                   int output) {
  if (rows <= 0 || cols <= 0) {
    return rows >= 0 && cols >= 0;
  }
  if (stride < 0 || (output && rows > 1 && stride < cols)) {
    return 0;
  }
  size_t n, bytes;
  return !__builtin_mul_overflow((size_t)(rows - 1), (size_t)stride, &n) &&
         !__builtin_add_overflow(n, (size_t)cols, &n) &&
         !__builtin_mul_overflow(n, size, &bytes) && bytes <= MCMI_MAX_BYTES;
}

mcmi_status mcmi_check_targets(const int64_t *target, int64_t stride,
                               int64_t rows, int64_t classes,
                               int64_t ignore_index, int64_t *valid,
                               int64_t *bad_index) {
  if (rows < 0 || classes < 1 || (rows > 0 && target == NULL) ||
      !mcmi_extent_ok(rows, stride, 1, sizeof(int64_t), 0)) {
    return MCMI_ERROR_ARGUMENT;
  }
  int64_t n = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = target[i * stride];
    if (y == ignore_index) {
      continue;
    }
    if (y < 0 || y >= classes) {
      if (bad_index) {
        *bad_index = i;
      }
      return MCMI_ERROR_TARGET;
    }
    ++n;
  }
  if (valid) {
    *valid = n;
  }
  return MCMI_OK;
}

int mcmi_problem_ok(const mcmi_problem *p) {
  if (p == NULL || p->rows < 0 || p->cols < 1 || p->classes < 1 ||
      !(p->temperature > 0.0) || !mcmi_dtype_ok(p->dtype)) {
    return 0;
  }
  if (p->log_centroids && p->centroids == NULL) {
    return 0;
  }
  /* The cross-entropy term reads z[i, y_i]: labels must index the logits. */
  if (p->ce_weight != 0.0 && p->classes > p->cols) {
    return 0;
  }
  if (!mcmi_extent_ok(p->rows, p->logits_stride, p->cols,
                      mcmi_logit_size(p->dtype), 0) ||
      !mcmi_extent_ok(p->rows, p->target_stride, 1, sizeof(int64_t), 0) ||
      (p->centroids != NULL &&
       !mcmi_extent_ok(p->classes, p->centroids_stride, p->cols,
                       mcmi_acc_size(p->dtype), 0))) {
    return 0;
  }
  return p->rows == 0 || (p->logits != NULL && p->target != NULL);
}

int mcmi_loss_problem_ok(const mcmi_problem *p) {
  return mcmi_problem_ok(p) && p->reduction >= MCMI_REDUCTION_NONE &&
         p->reduction <= MCMI_REDUCTION_SUM;
}

int mcmi_momentum_ok(double momentum) {
  return momentum > 0.0 && momentum <= 1.0;
}

int mcmi_scale_rows_ok(mcmi_dtype dtype, const void *x, int64_t rows,
                       int64_t cols, int64_t stride, const void *scale,
                       int64_t scale_stride) {
  return mcmi_dtype_ok(dtype) &&
         mcmi_extent_ok(rows, stride, cols, mcmi_logit_size(dtype), 1) &&
         mcmi_extent_ok(rows, scale_stride, 1, mcmi_logit_size(dtype), 0) &&
         (rows == 0 || cols == 0 || (x != NULL && scale != NULL));
}
