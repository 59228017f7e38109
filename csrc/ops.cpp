// ops.cpp: the mcmi ops on the CPU, over the kernels of mcmi.h (the ops
// themselves are in ops.h; the CUDA backend is in ops_cuda.cpp).
#include "ops.h"

namespace mcmi_shim {
namespace {

// The CPU kernels run on torch's intra-op thread count; they check labels
// and centroid row sums on the host and report the first bad one.
struct CpuBackend {
  static constexpr const char *kDevice = "CPU";
  static bool on_device(const Tensor &t) { return t.is_cpu(); }

  explicit CpuBackend(const Tensor &first)
      : like(first),
        threads(static_cast<int>(torch::stable::get_num_threads())) {}

  mcmi_status loss(const mcmi_problem &problem, void *loss, int64_t loss_stride,
                   void *grad, int64_t grad_stride) {
    Tensor scratch = workspace(
        like, mcmi_cpu_loss_workspace(&problem, threads, grad != nullptr));
    return mcmi_cpu_loss(&problem, loss, loss_stride, grad, grad_stride,
                         scratch.mutable_data_ptr(), threads, &bad_index);
  }
  mcmi_status class_sums(const mcmi_problem &problem, bool log_probs,
                         void *sums, int64_t sums_stride, int64_t *counts) {
    Tensor scratch = workspace(like, mcmi_cpu_class_sums_workspace(&problem));
    return mcmi_cpu_class_sums(&problem, log_probs ? 1 : 0, sums, sums_stride,
                               counts, scratch.mutable_data_ptr(), threads,
                               &bad_index);
  }
  mcmi_status ema_update(const mcmi_problem &problem, double momentum,
                         void *centroids, int64_t centroids_stride,
                         uint8_t *seen) {
    Tensor scratch = workspace(like, mcmi_cpu_ema_workspace(&problem, threads));
    return mcmi_cpu_ema_update(&problem, momentum, centroids, centroids_stride,
                               seen, scratch.mutable_data_ptr(), threads,
                               &bad_index);
  }
  mcmi_status scale_rows(mcmi_dtype dtype, void *x, int64_t rows, int64_t cols,
                         int64_t stride, const void *scale,
                         int64_t scale_stride) const {
    return mcmi_cpu_scale_rows(dtype, x, rows, cols, stride, scale,
                               scale_stride, threads);
  }
  void check(mcmi_status status, const char *, int64_t classes,
             int64_t ignore_index) const {
    check_status(status, bad_index, classes, ignore_index);
  }

  Tensor like; // a tensor on the op's device, for workspaces
  int threads;
  // The row of the first bad label, or the class of a bad centroid row.
  int64_t bad_index = -1;
};

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CPU, m) {
  mcmi_shim::impl_ops<mcmi_shim::CpuBackend>(m);
}
