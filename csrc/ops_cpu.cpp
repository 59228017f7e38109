// ops_cpu.cpp: CPU implementations of the mcmi ops over the C kernels.
#include <tuple>
#include <vector>

#include "shim.h"

namespace mcmi_shim {
namespace {

int torch_threads() {
  return static_cast<int>(torch::stable::get_num_threads());
}

void check_cpu(const Tensor &t, const char *name) {
  MCMI_CHECK(t.is_cpu(), "mcmi: ", name, " must be a CPU tensor here");
}

std::tuple<Tensor, Tensor>
loss_cpu(Tensor logits, Tensor target, std::optional<Tensor> centroids,
         bool log_centroids, int64_t num_classes, double temperature,
         double ce_weight, double cmi_weight, double floor,
         int64_t ignore_index, int64_t reduction, bool with_grad) {
  check_cpu(logits, "logits");
  LossCall call = prepare_loss(logits, target, centroids, log_centroids,
                               num_classes, temperature, ce_weight, cmi_weight,
                               floor, ignore_index, reduction, with_grad);
  const mcmi_problem &p = call.in.problem;
  int64_t bad = -1;
  mcmi_status st = mcmi_check_targets(p.target, p.target_stride, p.rows,
                                      p.classes, ignore_index, nullptr, &bad);
  check_status(st, bad, p.classes, ignore_index);
  const int threads = torch_threads();
  Tensor ws = workspace(
      logits, mcmi_cpu_loss_workspace(&p, threads, with_grad ? 1 : 0));
  st = mcmi_cpu_loss(&p, call.loss.mutable_data_ptr(), call.loss_stride,
                     with_grad ? call.grad.mutable_data_ptr() : nullptr, p.cols,
                     ws.mutable_data_ptr(), threads, &bad);
  check_status(st, bad, p.classes, ignore_index);
  return std::make_tuple(call.loss, call.grad);
}

void scale_grad_cpu(Tensor grad, Tensor scale) {
  check_cpu(grad, "grad");
  check_scale_args(grad, scale);
  const int64_t scale_stride = scale.dim() == 0 ? 0 : scale.stride(0);
  const mcmi_status st = mcmi_cpu_scale_rows(
      logits_dtype(grad), grad.mutable_data_ptr(), grad.size(0), grad.size(1),
      grad.stride(0), scale.const_data_ptr(), scale_stride, torch_threads());
  MCMI_CHECK(st == MCMI_OK, "mcmi: invalid arguments to scale_grad_");
}

std::tuple<Tensor, Tensor>
class_sums_cpu(Tensor logits, Tensor target, int64_t num_classes,
               double temperature, int64_t ignore_index, bool log_probs) {
  check_cpu(logits, "logits");
  ClassSumsCall call = prepare_class_sums(logits, target, num_classes,
                                          temperature, ignore_index);
  Tensor ws =
      workspace(logits, mcmi_cpu_class_sums_workspace(&call.in.problem));
  int64_t bad = -1;
  const mcmi_status st = mcmi_cpu_class_sums(
      &call.in.problem, log_probs ? 1 : 0, call.sums.mutable_data_ptr(),
      call.in.problem.cols,
      static_cast<int64_t *>(call.counts.mutable_data_ptr()),
      ws.mutable_data_ptr(), torch_threads(), &bad);
  check_status(st, bad, num_classes, ignore_index);
  return std::make_tuple(call.sums, call.counts);
}

void ema_update_cpu(Tensor centroids, Tensor seen, Tensor logits, Tensor target,
                    double temperature, double momentum, int64_t ignore_index) {
  check_cpu(logits, "logits");
  Inputs in = ema_inputs(centroids, seen, logits, target, temperature, momentum,
                         ignore_index);
  const mcmi_problem &p = in.problem;
  const int threads = torch_threads();
  Tensor ws = workspace(logits, mcmi_cpu_ema_workspace(&p, threads));
  int64_t bad = -1;
  const mcmi_status st = mcmi_cpu_ema_update(
      &p, momentum, centroids.mutable_data_ptr(), centroids.stride(0),
      static_cast<uint8_t *>(seen.mutable_data_ptr()), ws.mutable_data_ptr(),
      threads, &bad);
  check_status(st, bad, p.classes, ignore_index);
}

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CPU, m) {
  m.impl("loss", TORCH_BOX(&mcmi_shim::loss_cpu));
  m.impl("scale_grad_", TORCH_BOX(&mcmi_shim::scale_grad_cpu));
  m.impl("class_sums", TORCH_BOX(&mcmi_shim::class_sums_cpu));
  m.impl("ema_update_", TORCH_BOX(&mcmi_shim::ema_update_cpu));
}
