// ops_cpu.cpp: CPU implementations of the mcmi ops over the C kernels.
#include <tuple>
#include <vector>

#include "shim.h"

namespace mcmi_shim {
namespace {

int torch_threads() {
  return static_cast<int>(torch::stable::get_num_threads());
}

Tensor workspace(const Tensor &like, size_t bytes) {
  return torch::stable::new_empty(
      like, {static_cast<int64_t>(bytes > 0 ? bytes : 1)}, ScalarType::Byte);
}

std::tuple<Tensor, Tensor>
loss_cpu(Tensor logits, Tensor target, std::optional<Tensor> centroids,
         bool log_centroids, int64_t num_classes, double temperature,
         double ce_weight, double cmi_weight, double floor,
         int64_t ignore_index, int64_t reduction, bool with_grad) {
  Inputs in = make_inputs(logits, target, centroids, num_classes, temperature,
                          ignore_index);
  MCMI_CHECK(logits.is_cpu(), "mcmi: this build has no kernel for the "
                              "device of logits");
  mcmi_problem &p = in.problem;
  check_weights(p, ce_weight, cmi_weight, floor);
  p.reduction = check_reduction(reduction);
  MCMI_CHECK(!log_centroids || centroids.has_value(),
             "mcmi: log_centroids needs centroids");
  p.log_centroids = log_centroids ? 1 : 0;
  p.ce_weight = ce_weight;
  p.cmi_weight = cmi_weight;
  p.floor = floor;
  bind_pointers(in);

  const int64_t rows = p.rows, cols = p.cols;
  int64_t bad = -1;
  mcmi_status st = mcmi_check_targets(p.target, p.target_stride, rows,
                                      p.classes, ignore_index, nullptr, &bad);
  check_status(st, bad, p.classes, ignore_index);

  Tensor loss = p.reduction == MCMI_REDUCTION_NONE
                    ? torch::stable::new_empty(logits, {rows})
                    : torch::stable::new_empty(logits, std::vector<int64_t>{});
  Tensor grad = with_grad ? torch::stable::new_empty(logits, {rows, cols})
                          : torch::stable::new_empty(logits, {0});
  const int threads = torch_threads();
  Tensor ws = workspace(
      logits, mcmi_cpu_loss_workspace(&p, threads, with_grad ? 1 : 0));
  const int64_t loss_stride =
      p.reduction == MCMI_REDUCTION_NONE ? loss.stride(0) : 0;
  st = mcmi_cpu_loss(&p, loss.mutable_data_ptr(), loss_stride,
                     with_grad ? grad.mutable_data_ptr() : nullptr, cols,
                     ws.mutable_data_ptr(), threads, &bad);
  check_status(st, bad, p.classes, ignore_index);
  return std::make_tuple(loss, grad);
}

void scale_grad_cpu(Tensor grad, Tensor scale) {
  MCMI_CHECK(grad.dim() == 2, "mcmi: grad must be 2-D");
  MCMI_CHECK(grad.is_cpu(), "mcmi: this build has no kernel for the "
                            "device of grad");
  MCMI_CHECK(grad.size(1) <= 1 || grad.stride(1) == 1,
             "mcmi: grad must have unit column stride");
  MCMI_CHECK(scale.scalar_type() == grad.scalar_type(),
             "mcmi: scale must have the dtype of grad");
  check_same_device(grad, scale, "scale");
  MCMI_CHECK(scale.dim() == 0 ||
                 (scale.dim() == 1 && scale.size(0) == grad.size(0)),
             "mcmi: scale must be 0-D or hold one value per row of grad");
  const int64_t scale_stride = scale.dim() == 0 ? 0 : scale.stride(0);
  const mcmi_status st = mcmi_cpu_scale_rows(
      logits_dtype(grad), grad.mutable_data_ptr(), grad.size(0), grad.size(1),
      grad.stride(0), scale.const_data_ptr(), scale_stride, torch_threads());
  MCMI_CHECK(st == MCMI_OK, "mcmi: invalid arguments to scale_grad_");
}

std::tuple<Tensor, Tensor>
class_sums_cpu(Tensor logits, Tensor target, int64_t num_classes,
               double temperature, int64_t ignore_index, bool log_probs) {
  Inputs in = make_inputs(logits, target, std::nullopt, num_classes,
                          temperature, ignore_index);
  MCMI_CHECK(logits.is_cpu(), "mcmi: this build has no kernel for the "
                              "device of logits");
  mcmi_problem &p = in.problem;
  bind_pointers(in);
  Tensor sums = torch::stable::new_empty(logits, {num_classes, p.cols},
                                         accumulate_type(logits));
  Tensor counts =
      torch::stable::new_empty(logits, {num_classes}, ScalarType::Long);
  Tensor ws = workspace(logits, mcmi_cpu_class_sums_workspace(&p));
  int64_t bad = -1;
  const mcmi_status st = mcmi_cpu_class_sums(
      &p, log_probs ? 1 : 0, sums.mutable_data_ptr(), p.cols,
      static_cast<int64_t *>(counts.mutable_data_ptr()), ws.mutable_data_ptr(),
      torch_threads(), &bad);
  check_status(st, bad, num_classes, ignore_index);
  return std::make_tuple(sums, counts);
}

void ema_update_cpu(Tensor centroids, Tensor seen, Tensor logits, Tensor target,
                    double temperature, double momentum, int64_t ignore_index) {
  MCMI_CHECK(centroids.dim() == 2, "mcmi: centroids must be 2-D");
  Inputs in = make_inputs(logits, target, centroids, centroids.size(0),
                          temperature, ignore_index);
  MCMI_CHECK(logits.is_cpu(), "mcmi: this build has no kernel for the "
                              "device of logits");
  MCMI_CHECK(centroids.size(1) <= 1 || centroids.stride(1) == 1,
             "mcmi: EMA centroids must have unit column stride");
  MCMI_CHECK(seen.dim() == 1 && seen.size(0) == centroids.size(0) &&
                 seen.scalar_type() == ScalarType::Bool,
             "mcmi: seen must be a bool tensor with one entry per class");
  check_same_device(logits, seen, "seen");
  MCMI_CHECK(momentum > 0.0 && momentum <= 1.0,
             "mcmi: momentum must be in (0, 1], got ", momentum);
  mcmi_problem &p = in.problem;
  bind_pointers(in);
  Tensor seen_c = torch::stable::contiguous(seen);
  Tensor ws = workspace(logits, mcmi_cpu_ema_workspace(&p));
  int64_t bad = -1;
  const mcmi_status st = mcmi_cpu_ema_update(
      &p, momentum, centroids.mutable_data_ptr(), centroids.stride(0),
      static_cast<uint8_t *>(seen_c.mutable_data_ptr()), ws.mutable_data_ptr(),
      torch_threads(), &bad);
  check_status(st, bad, p.classes, ignore_index);
  if (seen_c.data_ptr() != seen.data_ptr()) {
    torch::stable::copy_(seen, seen_c);
  }
}

} // namespace
} // namespace mcmi_shim

STABLE_TORCH_LIBRARY_IMPL(mcmi, CPU, m) {
  m.impl("loss", TORCH_BOX(&mcmi_shim::loss_cpu));
  m.impl("scale_grad_", TORCH_BOX(&mcmi_shim::scale_grad_cpu));
  m.impl("class_sums", TORCH_BOX(&mcmi_shim::class_sums_cpu));
  m.impl("ema_update_", TORCH_BOX(&mcmi_shim::ema_update_cpu));
}
