// ops.cpp: the mcmi ops (schemas in library.cpp), each written once over a
// backend and registered per device: CPU over the kernels of mcmi.h and, in
// CUDA builds (-DUSE_CUDA), CUDA over those of cuda/mcmi_cuda.h. shim.h
// checks every argument before a kernel runs. A backend is made once per
// call from its first tensor and gives the device's name and test, the C
// entry points (with their workspace, threads or stream), and check(), which
// throws the message of a kernel status, the same on every device.
#include <optional>
#include <tuple>

#include "shim.h"

#ifdef USE_CUDA
#include <torch/csrc/stable/accelerator.h>

#include "cuda/mcmi_cuda.h"
#endif

namespace mcmi_shim {
namespace {

// Raises on MCMI_ERROR_LAUNCH, which only CUDA kernels return.
void check_launch(mcmi_status status, const char *op) {
  MCMI_CHECK(status != MCMI_ERROR_LAUNCH,
             "mcmi: launching the CUDA kernels of ", op,
             " failed (a CUDA error was pending or the launch was refused)");
}

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

#ifdef USE_CUDA
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
    STABLE_TORCH_ERROR_CODE_CHECK(
        aoti_torch_get_current_cuda_stream(first.get_device_index(), &stream));
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
#endif

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

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CPU, m) {
  mcmi_shim::impl_ops<mcmi_shim::CpuBackend>(m);
}

#ifdef USE_CUDA
STABLE_TORCH_LIBRARY_IMPL(mcmi, CUDA, m) {
  mcmi_shim::impl_ops<mcmi_shim::CudaBackend>(m);
}
#endif
