"""Dataset-level teacher metrics: accuracy, CMI, separation and NCMI."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _ops
from .centroids import OutputSelector, model_device, model_outputs
from .distributed import all_reduce_sum


@dataclass(frozen=True)
class TeacherReport:
    """Metrics of a model over a dataset (SPEC section 4).

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
    s, lsum, n_c = prob_sums.double(), log_sums.double(), counts.double()
    n = n_c.sum().item()
    if n == 0:
        raise ValueError("no sample to report on")
    present = n_c > 0
    q = s[present] / n_c[present].unsqueeze(1)
    cross = (s[present] * q.clamp_min(_ops.CENTROID_FLOOR).log()).sum().item()
    cmi = (neg_entropy - cross) / n
    pairs = n * n - (n_c * n_c).sum().item()
    if pairs > 0:
        between = (s.sum(0) * lsum.sum(0)).sum() - (s * lsum).sum()
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
    progress: bool = True,
    output: OutputSelector = None,
) -> TeacherReport:
    """Accuracy, CMI, separation and NCMI of ``model`` over ``loader``.

    One pass in eval mode (the mode is restored afterwards), linear in the
    number of samples: per-class sums of softmax and log-softmax rows through
    the class-sum kernel. With ``torch.distributed`` initialized, sums from
    all ranks are added, so every rank reports on the whole data.

    ``output`` picks the logits from a model that returns more (a tuple, a
    dict): an index, a key or a callable, as in
    :func:`mcmi_torch.estimate_centroids`.
    """
    device = torch.device(device) if device is not None else model_device(model)
    k = num_classes
    totals = None
    outputs = model_outputs(
        model, loader, device, desc="teacher report", progress=progress, output=output
    )
    for logits, targets in outputs:
        s, c = _ops.class_sums(logits, targets, k, temperature=temperature)
        lsum, _ = _ops.class_sums(logits, targets, k, temperature=temperature, log_probs=True)
        logp = torch.log_softmax(logits.double() / temperature, dim=1)
        extra = torch.stack(
            [(logp.exp() * logp).sum(), (logits.argmax(1) == targets).sum().double()]
        )
        step = (s.double(), lsum.double(), c, extra)
        totals = step if totals is None else tuple(a + b for a, b in zip(totals, step))
    if totals is None:
        raise ValueError("the loader yielded no batch")
    s, lsum, counts, extra = all_reduce_sum(*totals)
    return report_from_sums(s, lsum, counts, extra[0].item(), int(extra[1].item()))
