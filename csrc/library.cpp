// library.cpp: the schemas of the mcmi ops (ops.cpp registers their
// implementations for CPU and, in CUDA builds, for CUDA).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(mcmi, m) {
  // CE/CMI loss and, when with_grad, d(loss)/d(logits) for a unit upstream
  // gradient. centroids None selects in-batch centroids; log_centroids says
  // that centroids hold log max(Q, floor) rather than Q.
  m.def("loss(Tensor logits, Tensor target, Tensor? centroids, "
        "bool log_centroids, int num_classes, float temperature, "
        "float ce_weight, "
        "float cmi_weight, float floor, int ignore_index, int reduction, "
        "bool with_grad) -> (Tensor, Tensor)");
  // Backward of loss: grad *= scale, row by row (scale is 0-D or [B]).
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  // EMA centroids in place: rows of the classes present in the batch move
  // towards their batch mean softmax (the first sighting sets them).
  m.def("ema_update_(Tensor(a!) centroids, Tensor(b!) seen, Tensor logits, "
        "Tensor target, float temperature, float momentum, int ignore_index) "
        "-> ()");
  // Per-class sums of softmax (or log-softmax) rows and per-class counts.
  m.def("class_sums(Tensor logits, Tensor target, int num_classes, "
        "float temperature, int ignore_index, bool log_probs) "
        "-> (Tensor, Tensor)");
}
