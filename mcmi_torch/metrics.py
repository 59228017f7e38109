"""Dataset-level teacher metrics: accuracy, CMI, separation and NCMI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._args import CENTROID_FLOOR, check_int, class_means
from .centroids import OutputSelector, model_device, model_outputs
from .distributed import all_reduce_sum
from .functional import class_sums


@dataclass(frozen=True)
class TeacherReport:
    """Metrics of a model over a dataset (docs/math.md, "Dataset-level teacher metrics").

    Attributes:
        accuracy: fraction of samples whose arg-max class is the label.
        cmi: ``I(X; Y_hat | Y)`` estimate: mean KL between each sample's
            softmax and its class centroid (centroids from the same data).
        separation: Gamma, the mean cross-entropy ``-sum_k P_ik log P_jk``
            over ordered pairs of samples from different classes.
        ncmi: ``cmi / separation``.
        samples: number of samples seen.
    """

    accuracy: float
    cmi: float
    separation: float
    ncmi: float
    samples: int


def report_from_sums(
    prob_sums: Tensor, log_sums: Tensor, counts: Tensor, neg_entropy: float, correct: int
) -> TeacherReport:
    """The metrics from per-class sums S_c (softmax rows), L_c (log-softmax
    rows), counts n_c, the total sum of P log P and the number correct; all in
    O(K C), with no pass over pairs of samples."""
    prob_sums, log_sums, counts = prob_sums.double(), log_sums.double(), counts.double()
    n = counts.sum().item()
    if n == 0:
        raise ValueError("no sample to report on")
    present = counts > 0
    centroids = class_means(prob_sums, counts)[present]
    cross = (prob_sums[present] * centroids.clamp_min(CENTROID_FLOOR).log()).sum().item()
    cmi = (neg_entropy - cross) / n
    pairs = n * n - (counts * counts).sum().item()
    if pairs > 0:
        between = (prob_sums.sum(0) * log_sums.sum(0)).sum() - (prob_sums * log_sums).sum()
        separation = -between.item() / pairs
    else:
        separation = float("nan")
    return TeacherReport(
        accuracy=correct / n,
        cmi=cmi,
        separation=separation,
        ncmi=cmi / separation if pairs > 0 else float("nan"),
        samples=int(n),
    )


@torch.no_grad()
def teacher_report(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    progress: bool = True,
    output: OutputSelector = None,
) -> TeacherReport:
    """Accuracy, CMI, separation and NCMI of ``model`` over ``loader``.

    One pass in eval mode (the mode is restored afterwards), linear in the
    number of samples: per-class sums of softmax and log-softmax rows through
    the class-sum kernel. With ``torch.distributed`` initialized, sums from
    all ranks are added, so every rank reports on the whole data.

    Samples labelled ``ignore_index`` are left out of every metric (the
    class sums, the entropy term, the accuracy and ``samples``), as the
    losses leave them out. ``output`` picks the logits from a model that
    returns more (a tuple, a dict): an index, a key or a callable, as in
    :func:`mcmi_torch.estimate_centroids`.
    """
    device = torch.device(device) if device is not None else model_device(model)
    ignore_index = check_int("ignore_index", ignore_index)
    k = num_classes
    totals = None
    outputs = model_outputs(
        model, loader, device, desc="teacher report", progress=progress, output=output
    )
    for logits, targets in outputs:
        kw = dict(temperature=temperature, ignore_index=ignore_index)
        s, c = class_sums(logits, targets, k, **kw)
        lsum, _ = class_sums(logits, targets, k, log_probs=True, **kw)
        valid = targets != ignore_index
        logp = torch.log_softmax(logits.double() / temperature, dim=1)
        neg_entropy = (logp.exp() * logp).sum(dim=1)
        correct = (logits.argmax(1) == targets) & valid
        extra = torch.stack([neg_entropy[valid].sum(), correct.sum().double()])
        step = (s.double(), lsum.double(), c, extra)
        totals = step if totals is None else tuple(a + b for a, b in zip(totals, step))
    if totals is None:
        raise ValueError("the loader yielded no batch")
    s, lsum, counts, extra = all_reduce_sum(*totals)
    return report_from_sums(s, lsum, counts, extra[0].item(), int(extra[1].item()))
