// ops_cuda.cpp: CUDA implementations of the mcmi ops over the CUDA kernels
// (csrc/cuda). Every launch goes on torch's current stream of the tensors'
// device, under a device guard, so CUDA graphs and multiple streams and
// devices work. Compiled with -DUSE_CUDA (the CUDA stream getter of the
// stable C shim is declared under it).
#include <cuda_runtime_api.h>
#include <torch/csrc/stable/accelerator.h>

#include <tuple>
#include <vector>

#include "cuda/mcmi_cuda.h"
#include "shim.h"

namespace mcmi_shim {
namespace {

using torch::stable::accelerator::DeviceGuard;

void check_cuda(const Tensor &t, const char *name) {
  MCMI_CHECK(t.is_cuda(), "mcmi: ", name, " must be a CUDA tensor here");
}

void *current_stream(const Tensor &t) {
  void *stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return stream;
}

// Raises on a failed launch, else as check_status.
void check_cuda_status(mcmi_status st, const char *op, int64_t classes,
                       int64_t ignore_index) {
  MCMI_CHECK(st != MCMI_ERROR_LAUNCH, "mcmi: launching the CUDA kernels of ",
             op,
             " failed (a CUDA error was pending or the launch was refused)");
  check_status(st, -1, classes, ignore_index);
}

// Raises the CPU kernels' error for the first row with a label out of range,
// which the kernels wrote to bad_row on the device: one 8-byte copy and a
// stream sync. Skipped while the stream is captured into a CUDA graph, where
// a sync is not allowed (the kernels then leave such rows out of class sums,
// and the EMA update changes nothing).
void check_bad_row(const Tensor &bad_row, void *stream, int64_t classes,
                   int64_t ignore_index) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MCMI_CHECK(cudaStreamIsCapturing(s, &capture) == cudaSuccess,
             "mcmi: cannot query the CUDA stream's capture status");
  if (capture != cudaStreamCaptureStatusNone) {
    return;
  }
  int64_t bad = -1;
  MCMI_CHECK(cudaMemcpyAsync(&bad, bad_row.const_data_ptr(), sizeof bad,
                             cudaMemcpyDeviceToHost, s) == cudaSuccess &&
                 cudaStreamSynchronize(s) == cudaSuccess,
             "mcmi: reading the label check back from the GPU failed");
  if (bad >= 0) {
    check_status(MCMI_ERROR_TARGET, bad, classes, ignore_index);
  }
}

std::tuple<Tensor, Tensor>
loss_cuda(Tensor logits, Tensor target, std::optional<Tensor> centroids,
          bool log_centroids, int64_t num_classes, double temperature,
          double ce_weight, double cmi_weight, double floor,
          int64_t ignore_index, int64_t reduction, bool with_grad) {
  check_cuda(logits, "logits");
  DeviceGuard guard(logits.get_device_index());
  LossCall call = prepare_loss(logits, target, centroids, log_centroids,
                               num_classes, temperature, ce_weight, cmi_weight,
                               floor, ignore_index, reduction, with_grad);
  const mcmi_problem &p = call.in.problem;
  Tensor ws = workspace(logits, mcmi_cuda_loss_workspace(&p));
  const mcmi_status st =
      mcmi_cuda_loss(&p, call.loss.mutable_data_ptr(), call.loss_stride,
                     with_grad ? call.grad.mutable_data_ptr() : nullptr, p.cols,
                     ws.mutable_data_ptr(), current_stream(logits));
  check_cuda_status(st, "mcmi::loss", p.classes, ignore_index);
  return std::make_tuple(call.loss, call.grad);
}

void scale_grad_cuda(Tensor grad, Tensor scale) {
  check_cuda(grad, "grad");
  DeviceGuard guard(grad.get_device_index());
  check_scale_args(grad, scale);
  const int64_t scale_stride = scale.dim() == 0 ? 0 : scale.stride(0);
  const mcmi_status st = mcmi_cuda_scale_rows(
      logits_dtype(grad), grad.mutable_data_ptr(), grad.size(0), grad.size(1),
      grad.stride(0), scale.const_data_ptr(), scale_stride,
      current_stream(grad));
  MCMI_CHECK(st != MCMI_ERROR_LAUNCH,
             "mcmi: launching the CUDA kernel of mcmi::scale_grad_ failed");
  MCMI_CHECK(st == MCMI_OK, "mcmi: invalid arguments to scale_grad_");
}

std::tuple<Tensor, Tensor>
class_sums_cuda(Tensor logits, Tensor target, int64_t num_classes,
                double temperature, int64_t ignore_index, bool log_probs) {
  check_cuda(logits, "logits");
  DeviceGuard guard(logits.get_device_index());
  ClassSumsCall call = prepare_class_sums(logits, target, num_classes,
                                          temperature, ignore_index);
  Tensor ws =
      workspace(logits, mcmi_cuda_class_sums_workspace(&call.in.problem));
  Tensor bad_row = torch::stable::new_empty(logits, {1}, ScalarType::Long);
  void *stream = current_stream(logits);
  const mcmi_status st = mcmi_cuda_class_sums(
      &call.in.problem, log_probs ? 1 : 0, call.sums.mutable_data_ptr(),
      call.in.problem.cols,
      static_cast<int64_t *>(call.counts.mutable_data_ptr()),
      static_cast<int64_t *>(bad_row.mutable_data_ptr()), ws.mutable_data_ptr(),
      stream);
  check_cuda_status(st, "mcmi::class_sums", num_classes, ignore_index);
  check_bad_row(bad_row, stream, num_classes, ignore_index);
  return std::make_tuple(call.sums, call.counts);
}

void ema_update_cuda(Tensor centroids, Tensor seen, Tensor logits,
                     Tensor target, double temperature, double momentum,
                     int64_t ignore_index) {
  check_cuda(logits, "logits");
  DeviceGuard guard(logits.get_device_index());
  Inputs in = ema_inputs(centroids, seen, logits, target, temperature, momentum,
                         ignore_index);
  const mcmi_problem &p = in.problem;
  Tensor ws = workspace(logits, mcmi_cuda_class_sums_workspace(&p));
  Tensor bad_row = torch::stable::new_empty(logits, {1}, ScalarType::Long);
  void *stream = current_stream(logits);
  const mcmi_status st = mcmi_cuda_ema_update(
      &p, momentum, centroids.mutable_data_ptr(), centroids.stride(0),
      static_cast<uint8_t *>(seen.mutable_data_ptr()),
      static_cast<int64_t *>(bad_row.mutable_data_ptr()), ws.mutable_data_ptr(),
      stream);
  check_cuda_status(st, "mcmi::ema_update_", p.classes, ignore_index);
  check_bad_row(bad_row, stream, p.classes, ignore_index);
}

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CUDA, m) {
  m.impl("loss", TORCH_BOX(&mcmi_shim::loss_cuda));
  m.impl("scale_grad_", TORCH_BOX(&mcmi_shim::scale_grad_cuda));
  m.impl("class_sums", TORCH_BOX(&mcmi_shim::class_sums_cuda));
  m.impl("ema_update_", TORCH_BOX(&mcmi_shim::ema_update_cuda));
}
