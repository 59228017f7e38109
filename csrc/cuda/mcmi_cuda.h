/*
 * mcmi_cuda.h: the C interface of the CUDA kernels (CUDA C, no torch).
 *
 * Same problems and results as the CPU kernels of mcmi.h; every pointer in
 * the problem and every output is device memory, and `stream` is the
 * cudaStream_t to launch on (asynchronous: errors of the launch itself are
 * CUDA's to report). Results are deterministic: every reduction has a fixed
 * order, and class sums use no floating-point atomics.
 *
 * Labels are read on the device, so they cannot raise without a device sync:
 * a row whose label is neither ignore_index nor in [0, classes) gets NaN as
 * its loss (hence a NaN mean or sum) and NaN gradients, and no memory is
 * indexed with it. Centroid rows are not checked for summing to 1 here.
 */
#ifndef MCMI_CUDA_H
#define MCMI_CUDA_H

#include "../mcmi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of device workspace each entry point needs for this problem. */
size_t mcmi_cuda_loss_workspace(const mcmi_problem *p);
size_t mcmi_cuda_class_sums_workspace(const mcmi_problem *p);

/* As mcmi_cpu_loss. */
mcmi_status mcmi_cuda_loss(const mcmi_problem *p, void *loss,
                           int64_t loss_stride, void *grad, int64_t grad_stride,
                           void *workspace, void *stream);

/* As mcmi_cpu_class_sums (sums are float32, float64 for float64 logits). */
mcmi_status mcmi_cuda_class_sums(const mcmi_problem *p, int log_probs,
                                 void *sums, int64_t sums_stride,
                                 int64_t *counts, void *workspace,
                                 void *stream);

/* As mcmi_cpu_ema_update; workspace of mcmi_cuda_class_sums_workspace. */
mcmi_status mcmi_cuda_ema_update(const mcmi_problem *p, double momentum,
                                 void *centroids, int64_t centroids_stride,
                                 uint8_t *seen, void *workspace, void *stream);

/* As mcmi_cpu_scale_rows. */
mcmi_status mcmi_cuda_scale_rows(mcmi_dtype dtype, void *x, int64_t rows,
                                 int64_t cols, int64_t stride,
                                 const void *scale, int64_t scale_stride,
                                 void *stream);

#ifdef __cplusplus
}
#endif

#endif /* MCMI_CUDA_H */
