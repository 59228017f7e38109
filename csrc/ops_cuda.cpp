// ops_cuda.cpp: the mcmi ops on CUDA, over the kernels of cuda/mcmi_cuda.h
// (the ops themselves are in ops.h). Compiled with -DUSE_CUDA, which declares
// torch's CUDA stream shim, into the separate library mcmi_torch._C_cuda
// that Python loads only when torch has CUDA.
#include <cuda_runtime_api.h>
#include <torch/csrc/stable/accelerator.h>

#include "cuda/mcmi_cuda.h"
#include "ops.h"

namespace mcmi_shim {
namespace {

// The CUDA kernels run on torch's current stream of the op's device, under a
// device guard, so CUDA graphs and several streams and devices work. Labels
// are checked on the device without a sync: the loss turns a bad row into
// NaN (cuda/mcmi_cuda.h); class sums and the EMA update write the first bad
// row to a device int64 that check() reads back.
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
                                counts, device_bad_row(),
                                scratch.mutable_data_ptr(), stream);
  }
  mcmi_status ema_update(const mcmi_problem &problem, double momentum,
                         void *centroids, int64_t centroids_stride,
                         uint8_t *seen) {
    Tensor scratch = workspace(like, mcmi_cuda_class_sums_workspace(&problem));
    return mcmi_cuda_ema_update(&problem, momentum, centroids, centroids_stride,
                                seen, device_bad_row(),
                                scratch.mutable_data_ptr(), stream);
  }
  mcmi_status scale_rows(mcmi_dtype dtype, void *x, int64_t rows, int64_t cols,
                         int64_t stride, const void *scale,
                         int64_t scale_stride) const {
    return mcmi_cuda_scale_rows(dtype, x, rows, cols, stride, scale,
                                scale_stride, stream);
  }
  // Throws for a failed launch or a status, then for the first row with a
  // label out of range, as the CPU kernels do: one 8-byte copy and a stream
  // sync. The row is not read while the stream is captured into a CUDA
  // graph, where a sync is not allowed (the kernels then leave such rows out
  // of class sums, and the EMA update changes nothing).
  void check(mcmi_status status, const char *op, int64_t classes,
             int64_t ignore_index) const {
    check_launch(status, op);
    check_status(status, -1, classes, ignore_index);
    if (!bad_row.has_value()) {
      return;
    }
    cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MCMI_CHECK(cudaStreamIsCapturing(cuda_stream, &capture) == cudaSuccess,
               "mcmi: cannot query the CUDA stream's capture status");
    if (capture != cudaStreamCaptureStatusNone) {
      return;
    }
    int64_t row = -1;
    MCMI_CHECK(cudaMemcpyAsync(&row, bad_row->const_data_ptr(), sizeof row,
                               cudaMemcpyDeviceToHost,
                               cuda_stream) == cudaSuccess &&
                   cudaStreamSynchronize(cuda_stream) == cudaSuccess,
               "mcmi: reading the label check back from the GPU failed");
    check_status(row >= 0 ? MCMI_ERROR_TARGET : MCMI_OK, row, classes,
                 ignore_index);
  }

  // A device int64 for the first row with a bad label (class sums and the
  // EMA update).
  int64_t *device_bad_row() {
    bad_row = torch::stable::new_empty(like, {1}, ScalarType::Long);
    return static_cast<int64_t *>(bad_row->mutable_data_ptr());
  }

  torch::stable::accelerator::DeviceGuard guard;
  Tensor like; // a tensor on the op's device, for workspaces
  void *stream = nullptr;
  std::optional<Tensor> bad_row;
};

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CUDA, m) {
  mcmi_shim::impl_ops<mcmi_shim::CudaBackend>(m);
}
