// shim.h: the checks of every op argument (all but labels and centroid row
// sums, which the kernels check as they read them) and the translation of
// stable-ABI tensors into the kernels' mcmi_problem, for ops.cpp. All of it
// runs before a kernel and throws (RuntimeError in Python) on bad input.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <iomanip>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mcmi.h"

namespace mcmi_shim {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Throws std::runtime_error (RuntimeError in Python) with the parts joined.
template <typename... Parts> [[noreturn]] void fail(const Parts &...parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

#define MCMI_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ::mcmi_shim::fail(__VA_ARGS__);                                          \
    }                                                                          \
  } while (0)

inline const char *dtype_name(ScalarType t) {
  switch (t) {
  case ScalarType::Float:
    return "float32";
  case ScalarType::Double:
    return "float64";
  case ScalarType::BFloat16:
    return "bfloat16";
  case ScalarType::Half:
    return "float16";
  case ScalarType::Long:
    return "int64";
  case ScalarType::Int:
    return "int32";
  case ScalarType::Byte:
    return "uint8";
  default:
    return "an unsupported dtype";
  }
}

// torch::stable::new_empty, failing with what could not be allocated, how
// large and where: the stable ABI reports only that the dispatcher call
// failed, and the usual cause is that the device is out of memory.
inline Tensor allocate(const Tensor &like, const std::vector<int64_t> &sizes,
                       const char *what,
                       std::optional<ScalarType> dtype = std::nullopt) {
  try {
    return torch::stable::new_empty(like, sizes, dtype);
  } catch (const std::exception &) {
    const ScalarType type = dtype.value_or(like.scalar_type());
    // An empty tensor of the type gives its element size.
    double bytes = static_cast<double>(
        torch::stable::new_empty(like, {0}, type).element_size());
    std::ostringstream shape;
    for (size_t i = 0; i < sizes.size(); ++i) {
      shape << (i ? ", " : "") << sizes[i];
      bytes *= static_cast<double>(sizes[i]);
    }
    std::ostringstream size;
    size << std::setprecision(3) << bytes / (1024.0 * 1024.0 * 1024.0);
    fail("mcmi: could not allocate ", what, " ([", shape.str(), "] ",
         dtype_name(type), ", ", size.str(), " GiB) on ",
         like.is_cuda() ? "cuda:" : "cpu",
         like.is_cuda() ? std::to_string(like.get_device_index()) : "",
         ": out of memory? Use a smaller batch or fewer classes");
  }
}

inline mcmi_dtype logits_dtype(const Tensor &logits) {
  switch (logits.scalar_type()) {
  case ScalarType::Float:
    return MCMI_FLOAT32;
  case ScalarType::Double:
    return MCMI_FLOAT64;
  case ScalarType::BFloat16:
    return MCMI_BFLOAT16;
  case ScalarType::Half:
    return MCMI_FLOAT16;
  default:
    MCMI_CHECK(false,
               "mcmi: logits must be float32, float64, bfloat16 "
               "or float16, got ",
               dtype_name(logits.scalar_type()));
  }
  return MCMI_FLOAT32;
}

// float64 logits work in float64; every other dtype in float32.
inline ScalarType accumulate_type(const Tensor &logits) {
  return logits.scalar_type() == ScalarType::Double ? ScalarType::Double
                                                    : ScalarType::Float;
}

inline Tensor unit_column_stride(const Tensor &t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : torch::stable::contiguous(t);
}

inline void check_same_device(const Tensor &a, const Tensor &b,
                              const char *name, const char *a_name = "logits") {
  MCMI_CHECK(a.get_device_index() == b.get_device_index() &&
                 a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda(),
             "mcmi: ", name, " must be on the same device as ", a_name);
}

// Largest num_classes the ops take: far above any real label set, and
// small enough that every [num_classes, columns] buffer size is formed
// without overflow.
constexpr int64_t kMaxClasses = (int64_t{1} << 31) - 1;

inline void check_num_classes(int64_t num_classes) {
  MCMI_CHECK(num_classes >= 1 && num_classes <= kMaxClasses,
             "mcmi: num_classes must be >= 1 and <= ", kMaxClasses, ", got ",
             num_classes);
}

// An output written in place: a 2-D tensor whose rows neither overlap nor
// repeat (no stride-0 / expanded rows), with unit column stride.
inline void check_inplace_rows(const Tensor &t, const char *name) {
  MCMI_CHECK(t.dim() == 2, "mcmi: ", name, " must be 2-D, got ", t.dim(),
             " dimensions");
  MCMI_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "mcmi: ", name,
             " must have unit column stride");
  MCMI_CHECK(t.size(0) <= 1 || t.size(1) == 0 || t.stride(0) >= t.size(1),
             "mcmi: ", name,
             " is written in place, so its rows must not overlap (got row "
             "stride ",
             t.stride(0), " for ", t.size(1),
             " columns: an expanded or overlapping view)");
}

// [first byte, one past the last byte] that t's elements span (torch
// strides are never negative); {0, 0} when t is empty.
inline std::pair<uintptr_t, uintptr_t> byte_span(const Tensor &t) {
  if (t.numel() == 0) {
    return {0, 0};
  }
  uintptr_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += static_cast<uintptr_t>(t.size(d) - 1) *
            static_cast<uintptr_t>(t.stride(d));
  }
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + (last + 1) * t.element_size()};
}

// An output written in place must not share memory with another argument.
inline void check_disjoint(const Tensor &out, const char *out_name,
                           const Tensor &other, const char *other_name) {
  const auto a = byte_span(out), b = byte_span(other);
  MCMI_CHECK(a.first == a.second || b.first == b.second ||
                 a.second <= b.first || b.second <= a.first,
             "mcmi: ", out_name, " is written in place and must not overlap ",
             other_name, " in memory");
}

// Validates logits [B, C], target [B] and optional centroids [K, C] and
// fills the parts of mcmi_problem that describe them. Returns the logits
// and centroids with unit column stride (copies only when needed).
struct Inputs {
  Tensor logits;
  Tensor target;
  std::optional<Tensor> centroids;
  mcmi_problem problem;
};

inline Inputs make_inputs(const Tensor &logits, const Tensor &target,
                          const std::optional<Tensor> &centroids,
                          int64_t num_classes, double temperature,
                          int64_t ignore_index) {
  MCMI_CHECK(logits.dim() == 2,
             "mcmi: logits must be 2-D [batch, classes], got ", logits.dim(),
             " dimensions");
  const mcmi_dtype dtype = logits_dtype(logits);
  MCMI_CHECK(logits.size(1) >= 1, "mcmi: logits must have at least one column");
  MCMI_CHECK(target.dim() == 1, "mcmi: target must be 1-D [batch], got ",
             target.dim(), " dimensions");
  MCMI_CHECK(target.scalar_type() == ScalarType::Long,
             "mcmi: target must be int64, got ",
             dtype_name(target.scalar_type()));
  MCMI_CHECK(target.size(0) == logits.size(0), "mcmi: target has ",
             target.size(0), " entries but logits have ", logits.size(0),
             " rows");
  check_same_device(logits, target, "target");
  MCMI_CHECK(std::isfinite(temperature) && temperature > 0.0,
             "mcmi: temperature must be a finite number > 0, got ",
             temperature);
  check_num_classes(num_classes);

  Inputs inputs{unit_column_stride(logits), target, std::nullopt,
                mcmi_problem{}};
  mcmi_problem &problem = inputs.problem;
  problem.rows = logits.size(0);
  problem.cols = logits.size(1);
  problem.classes = num_classes;
  problem.dtype = dtype;
  problem.logits_stride = inputs.logits.stride(0);
  problem.target_stride = target.stride(0);
  problem.temperature = temperature;
  problem.ignore_index = ignore_index;
  problem.reduction = MCMI_REDUCTION_MEAN;
  problem.floor = 0.0;

  if (centroids.has_value()) {
    const Tensor &given = *centroids;
    MCMI_CHECK(given.dim() == 2,
               "mcmi: centroids must be 2-D [num_classes, classes], got ",
               given.dim(), " dimensions");
    MCMI_CHECK(given.size(1) == logits.size(1), "mcmi: centroids have ",
               given.size(1), " columns but logits have ", logits.size(1));
    MCMI_CHECK(given.size(0) == num_classes, "mcmi: centroids have ",
               given.size(0), " rows but num_classes is ", num_classes);
    MCMI_CHECK(given.scalar_type() == accumulate_type(logits),
               "mcmi: centroids must be ", dtype_name(accumulate_type(logits)),
               " for ", dtype_name(logits.scalar_type()), " logits, got ",
               dtype_name(given.scalar_type()));
    check_same_device(logits, given, "centroids");
    inputs.centroids = unit_column_stride(given);
    problem.centroids_stride = inputs.centroids->stride(0);
  }
  return inputs;
}

// Sets the data pointers of a problem built by make_inputs (CPU or device
// pointers alike).
inline void bind_pointers(Inputs &inputs) {
  inputs.problem.logits = inputs.logits.const_data_ptr();
  inputs.problem.target =
      static_cast<const int64_t *>(inputs.target.const_data_ptr());
  inputs.problem.centroids = inputs.centroids.has_value()
                                 ? inputs.centroids->const_data_ptr()
                                 : nullptr;
}

inline mcmi_reduction check_reduction(int64_t reduction) {
  MCMI_CHECK(reduction >= MCMI_REDUCTION_NONE &&
                 reduction <= MCMI_REDUCTION_SUM,
             "mcmi: reduction code must be 0 (none), 1 (mean) or 2 "
             "(sum), got ",
             reduction);
  return static_cast<mcmi_reduction>(reduction);
}

// The smallest floor the kernels take: the smallest normal number of the
// type they compute in (float32, or float64 for float64 logits), so that
// log max(Q, floor) and P / max(Q, floor) stay finite and exact to rounding
// (docs/math.md, "The floor on Q").
inline double min_floor(const mcmi_problem &problem) {
  return problem.dtype == MCMI_FLOAT64 ? 2.2250738585072014e-308
                                       : 1.1754943508222875e-38;
}

inline void check_weights(const mcmi_problem &problem, double ce_weight,
                          double cmi_weight, double floor) {
  MCMI_CHECK(ce_weight == 0.0 || problem.classes <= problem.cols,
             "mcmi: cross-entropy needs labels that index the logits, "
             "but num_classes (",
             problem.classes, ") > logits columns (", problem.cols, ")");
  MCMI_CHECK(std::isfinite(ce_weight) && std::isfinite(cmi_weight),
             "mcmi: loss weights must be finite, got ce_weight=", ce_weight,
             " cmi_weight=", cmi_weight);
  MCMI_CHECK(floor >= min_floor(problem) && floor < 1.0,
             "mcmi: centroid floor must be in (0, 1) and at least ",
             min_floor(problem), ", the smallest normal number of ",
             problem.dtype == MCMI_FLOAT64 ? "float64" : "float32",
             " (the type these logits are computed in), got ", floor);
}

inline Tensor workspace(const Tensor &like, size_t bytes) {
  return allocate(like, {static_cast<int64_t>(bytes > 0 ? bytes : 1)},
                  "the kernels' workspace", ScalarType::Byte);
}

// Everything of mcmi::loss but the kernel: validated inputs, a bound
// problem, and the outputs (loss: 0-D or [B]; grad: [B, C] or empty).
struct LossCall {
  Inputs inputs;
  Tensor loss;
  Tensor grad;
  int64_t loss_stride;
};

inline LossCall prepare_loss(const Tensor &logits, const Tensor &target,
                             const std::optional<Tensor> &centroids,
                             bool log_centroids, int64_t num_classes,
                             double temperature, double ce_weight,
                             double cmi_weight, double floor,
                             int64_t ignore_index, int64_t reduction,
                             bool with_grad) {
  Inputs inputs = make_inputs(logits, target, centroids, num_classes,
                              temperature, ignore_index);
  mcmi_problem &problem = inputs.problem;
  check_weights(problem, ce_weight, cmi_weight, floor);
  problem.reduction = check_reduction(reduction);
  MCMI_CHECK(!log_centroids || centroids.has_value(),
             "mcmi: log_centroids needs centroids");
  problem.log_centroids = log_centroids ? 1 : 0;
  problem.ce_weight = ce_weight;
  problem.cmi_weight = cmi_weight;
  problem.floor = floor;
  bind_pointers(inputs);
  const bool per_row = problem.reduction == MCMI_REDUCTION_NONE;
  Tensor loss = allocate(logits,
                         per_row ? std::vector<int64_t>{problem.rows}
                                 : std::vector<int64_t>{},
                         "the loss");
  Tensor grad =
      allocate(logits,
               with_grad ? std::vector<int64_t>{problem.rows, problem.cols}
                         : std::vector<int64_t>{0},
               "the gradient");
  const int64_t loss_stride = per_row ? loss.stride(0) : 0;
  return LossCall{inputs, loss, grad, loss_stride};
}

// Validated inputs and the outputs of mcmi::class_sums (sums [K, C] in the
// accumulation dtype, counts [K]).
struct ClassSumsCall {
  Inputs inputs;
  Tensor sums;
  Tensor counts;
};

inline ClassSumsCall prepare_class_sums(const Tensor &logits,
                                        const Tensor &target,
                                        int64_t num_classes, double temperature,
                                        int64_t ignore_index) {
  Inputs inputs = make_inputs(logits, target, std::nullopt, num_classes,
                              temperature, ignore_index);
  bind_pointers(inputs);
  Tensor sums = allocate(logits, {num_classes, inputs.problem.cols},
                         "the class sums", accumulate_type(logits));
  Tensor counts =
      allocate(logits, {num_classes}, "the class counts", ScalarType::Long);
  return ClassSumsCall{inputs, sums, counts};
}

// Checks of mcmi::scale_grad_.
inline void check_scale_args(const Tensor &grad, const Tensor &scale) {
  check_same_device(grad, scale, "scale", "grad");
  check_inplace_rows(grad, "grad");
  logits_dtype(grad);
  MCMI_CHECK(scale.scalar_type() == grad.scalar_type(),
             "mcmi: scale must have the dtype of grad");
  MCMI_CHECK(scale.dim() == 0 ||
                 (scale.dim() == 1 && scale.size(0) == grad.size(0)),
             "mcmi: scale must be 0-D or hold one value per row of grad");
  check_disjoint(grad, "grad", scale, "scale");
}

// Validated inputs of mcmi::ema_update_, bound; centroids and seen are
// written in place.
inline Inputs ema_inputs(const Tensor &centroids, const Tensor &seen,
                         const Tensor &logits, const Tensor &target,
                         double temperature, double momentum,
                         int64_t ignore_index) {
  check_same_device(logits, centroids, "centroids");
  check_same_device(logits, seen, "seen");
  check_inplace_rows(centroids, "centroids");
  Inputs inputs = make_inputs(logits, target, centroids, centroids.size(0),
                              temperature, ignore_index);
  MCMI_CHECK(seen.dim() == 1 && seen.size(0) == centroids.size(0) &&
                 seen.scalar_type() == ScalarType::Bool,
             "mcmi: seen must be a bool tensor with one entry per class");
  MCMI_CHECK(seen.size(0) <= 1 || seen.stride(0) == 1,
             "mcmi: seen must be contiguous");
  check_disjoint(centroids, "centroids", seen, "seen");
  check_disjoint(centroids, "centroids", logits, "logits");
  check_disjoint(centroids, "centroids", target, "target");
  check_disjoint(seen, "seen", logits, "logits");
  check_disjoint(seen, "seen", target, "target");
  MCMI_CHECK(momentum > 0.0 && momentum <= 1.0,
             "mcmi: momentum must be in (0, 1], got ", momentum);
  bind_pointers(inputs);
  return inputs;
}

// Throws the message that belongs to a kernel status; bad_index is the
// kernel's row of a bad label or class of a bad centroid row.
inline void check_status(mcmi_status status, int64_t bad_index, int64_t classes,
                         int64_t ignore_index) {
  switch (status) {
  case MCMI_OK:
    return;
  case MCMI_ERROR_TARGET:
    fail("mcmi: target[", bad_index,
         "] is out of range: labels must be in [0, ", classes,
         ") or equal ignore_index (", ignore_index, ")");
  case MCMI_ERROR_CENTROIDS:
    fail("mcmi: centroids row ", bad_index,
         " is not a probability vector (its entries must sum to 1 within ",
         MCMI_CENTROID_SUM_TOLERANCE, ")");
  default:
    fail("mcmi: invalid kernel arguments (a size, stride or byte count is "
         "beyond what the kernels can address)");
  }
}

} // namespace mcmi_shim
