/*
 * mcmi_cuda.h: the C interface of the CUDA kernels (CUDA C, no torch).
 *
 * Same problems and results as the CPU kernels of mcmi.h; every pointer in
 * the problem and every output is device memory, and `stream` is the
 * cudaStream_t to launch on. Calls are asynchronous; each returns
 * MCMI_ERROR_LAUNCH when a kernel launch failed (cudaGetLastError, which it
 * clears). Results are bitwise deterministic: every reduction has a fixed
 * order, and class sums use no floating-point atomics.
 *
 * Labels and centroids live on the device and are checked there, without a
 * sync. In the loss, a row whose label is neither ignore_index nor in
 * [0, classes), or whose given (not log) centroid row does not sum to 1
 * within MCMI_CENTROID_SUM_TOLERANCE, gets NaN as its loss (hence a NaN mean
 * or sum) and NaN gradients; no memory is indexed with a bad label. Class
 * sums and the EMA update stop at such a label with a device-side assertion
 * (as torch's own label checks do): the kernel prints the first bad row and
 * its label, and the host sees cudaErrorAssert ("device-side assert
 * triggered") at its next synchronizing call; the context is then unusable,
 * as after any device-side assertion.
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

/* As mcmi_cpu_class_sums (sums are float32, float64 for float64 logits,
 * summed in double); a bad label stops the kernel (above). */
mcmi_status mcmi_cuda_class_sums(const mcmi_problem *p, int log_probs,
                                 void *sums, int64_t sums_stride,
                                 int64_t *counts, void *workspace,
                                 void *stream);

/* As mcmi_cpu_ema_update, with the workspace of
 * mcmi_cuda_class_sums_workspace; a bad label stops the kernel (above). */
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
