// ops.h: the mcmi ops (schemas in library.cpp), each written once over a
// backend: ops.cpp instantiates them for the CPU (the kernels of mcmi.h),
// ops_cuda.cpp for CUDA (those of cuda/mcmi_cuda.h, a separate library). A
// backend is made once per call from its first tensor and gives the device's
// name and test, the C entry points (with their workspace, threads or
// stream), and check(), which throws the message of a kernel status, the
// same on every device. shim.h checks every argument before a kernel runs.
#pragma once

#include <optional>
#include <tuple>

#include "shim.h"

namespace mcmi_shim {

// Raises on MCMI_ERROR_LAUNCH, which only CUDA kernels return.
inline void check_launch(mcmi_status status, const char *op) {
  MCMI_CHECK(status != MCMI_ERROR_LAUNCH,
             "mcmi: launching the CUDA kernels of ", op,
             " failed (a CUDA error was pending or the launch was refused)");
}

template <typename Backend>
void check_device(const Tensor &t, const char *name) {
  MCMI_CHECK(Backend::on_device(t), "mcmi: ", name, " must be a ",
             Backend::kDevice, " tensor here");
}

template <typename Backend>
std::tuple<Tensor, Tensor>
loss(Tensor logits, Tensor target, std::optional<Tensor> centroids,
     bool log_centroids, int64_t num_classes, double temperature,
     double ce_weight, double cmi_weight, double floor, int64_t ignore_index,
     int64_t reduction, bool with_grad) {
  check_device<Backend>(logits, "logits");
  Backend backend(logits);
  LossCall call = prepare_loss(logits, target, centroids, log_centroids,
                               num_classes, temperature, ce_weight, cmi_weight,
                               floor, ignore_index, reduction, with_grad);
  const mcmi_problem &problem = call.inputs.problem;
  const mcmi_status status = backend.loss(
      problem, call.loss.mutable_data_ptr(), call.loss_stride,
      with_grad ? call.grad.mutable_data_ptr() : nullptr, problem.cols);
  backend.check(status, "mcmi::loss", problem.classes, ignore_index);
  return std::make_tuple(call.loss, call.grad);
}

template <typename Backend> void scale_grad(Tensor grad, Tensor scale) {
  check_device<Backend>(grad, "grad");
  Backend backend(grad);
  check_scale_args(grad, scale);
  const int64_t scale_stride = scale.dim() == 0 ? 0 : scale.stride(0);
  const mcmi_status status = backend.scale_rows(
      logits_dtype(grad), grad.mutable_data_ptr(), grad.size(0), grad.size(1),
      grad.stride(0), scale.const_data_ptr(), scale_stride);
  check_launch(status, "mcmi::scale_grad_");
  MCMI_CHECK(status == MCMI_OK, "mcmi: invalid arguments to scale_grad_");
}

template <typename Backend>
std::tuple<Tensor, Tensor> class_sums(Tensor logits, Tensor target,
                                      int64_t num_classes, double temperature,
                                      int64_t ignore_index, bool log_probs) {
  check_device<Backend>(logits, "logits");
  Backend backend(logits);
  ClassSumsCall call = prepare_class_sums(logits, target, num_classes,
                                          temperature, ignore_index);
  const mcmi_status status = backend.class_sums(
      call.inputs.problem, log_probs, call.sums.mutable_data_ptr(),
      call.inputs.problem.cols,
      static_cast<int64_t *>(call.counts.mutable_data_ptr()));
  backend.check(status, "mcmi::class_sums", num_classes, ignore_index);
  return std::make_tuple(call.sums, call.counts);
}

template <typename Backend>
void ema_update(Tensor centroids, Tensor seen, Tensor logits, Tensor target,
                double temperature, double momentum, int64_t ignore_index) {
  check_device<Backend>(logits, "logits");
  Backend backend(logits);
  const Inputs inputs = ema_inputs(centroids, seen, logits, target, temperature,
                                   momentum, ignore_index);
  const mcmi_status status = backend.ema_update(
      inputs.problem, momentum, centroids.mutable_data_ptr(),
      centroids.stride(0), static_cast<uint8_t *>(seen.mutable_data_ptr()));
  backend.check(status, "mcmi::ema_update_", inputs.problem.classes,
                ignore_index);
}

// Registers every op of library.cpp for one backend.
template <typename Backend, typename Library> void impl_ops(Library &m) {
  m.impl("loss", TORCH_BOX(&loss<Backend>));
  m.impl("scale_grad_", TORCH_BOX(&scale_grad<Backend>));
  m.impl("class_sums", TORCH_BOX(&class_sums<Backend>));
  m.impl("ema_update_", TORCH_BOX(&ema_update<Backend>));
}

} // namespace mcmi_shim
