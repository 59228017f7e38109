// ops_cuda.cpp: the mcmi ops on CUDA, over the kernels of cuda/mcmi_cuda.h
// (the ops themselves are in ops.h). Compiled with -DUSE_CUDA, which declares
// torch's CUDA stream shim, into the separate library mcmi_torch._C_cuda
// that Python loads only when torch has CUDA.
#include <torch/csrc/stable/accelerator.h>

#include "cuda/mcmi_cuda.h"
#include "ops.h"

namespace mcmi_shim {
namespace {

// The CUDA kernels run on torch's current stream of the op's device, under a
// device guard, so CUDA graphs and several streams and devices work. Labels
// are checked on the device without a sync (cuda/mcmi_cuda.h): the loss turns
// a bad row into NaN; class sums and the EMA update stop with a device-side
// assertion that names the row, as torch's own label checks do.
struct CudaBackend {
  static constexpr const char *kDevice = "CUDA";
  static bool on_device(const Tensor &t) { return t.is_cuda(); }

  explicit CudaBackend(const Tensor &first)
      : guard(first.get_device_index()), like(first) {
    MCMI_CHECK(aoti_torch_get_current_cuda_stream(
                   first.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
               "mcmi: cannot get torch's current CUDA stream");
  }

  mcmi_status loss(const mcmi_problem &problem, void *loss, int64_t loss_stride,
                   void *grad, int64_t grad_stride) const {
    Tensor scratch = workspace(like, mcmi_cuda_loss_workspace(&problem));
    return mcmi_cuda_loss(&problem, loss, loss_stride, grad, grad_stride,
                          scratch.mutable_data_ptr(), stream);
  }
  mcmi_status class_sums(const mcmi_problem &problem, bool log_probs,
                         void *sums, int64_t sums_stride, int64_t *counts) {
    Tensor scratch = workspace(like, mcmi_cuda_class_sums_workspace(&problem));
    return mcmi_cuda_class_sums(&problem, log_probs ? 1 : 0, sums, sums_stride,
                                counts, scratch.mutable_data_ptr(), stream);
  }
  mcmi_status ema_update(const mcmi_problem &problem, double momentum,
                         void *centroids, int64_t centroids_stride,
                         uint8_t *seen) {
    Tensor scratch = workspace(like, mcmi_cuda_class_sums_workspace(&problem));
    return mcmi_cuda_ema_update(&problem, momentum, centroids, centroids_stride,
                                seen, scratch.mutable_data_ptr(), stream);
  }
  mcmi_status scale_rows(mcmi_dtype dtype, void *x, int64_t rows, int64_t cols,
                         int64_t stride, const void *scale,
                         int64_t scale_stride) const {
    return mcmi_cuda_scale_rows(dtype, x, rows, cols, stride, scale,
                                scale_stride, stream);
  }
  // Throws for a failed launch or a status; labels are checked on the device.
  void check(mcmi_status status, const char *op, int64_t classes,
             int64_t ignore_index) const {
    check_launch(status, op);
    check_status(status, -1, classes, ignore_index);
  }

  torch::stable::accelerator::DeviceGuard guard;
  Tensor like; // a tensor on the op's device, for workspaces
  void *stream = nullptr;
};

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CUDA, m) {
  mcmi_shim::impl_ops<mcmi_shim::CudaBackend>(m);
}
