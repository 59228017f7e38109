"""Plain-PyTorch reference of the same math, written the way a user would.

Used by the tests (in float64) and the benchmarks (as the baseline). Autograd
differentiates it end to end, through in-batch centroids too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._args import CENTROID_FLOOR


def _reduce(values: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """``values`` of the valid rows reduced; for ``'none'``, scattered back
    to every row with 0 at the ignored ones."""
    if reduction == "none":
        return values.new_zeros(valid.shape).index_put((valid,), values)
    total = values.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(values.dtype)


def class_sums(
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    log_probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-class sums of softmax (or log-softmax) rows and per-class counts."""
    valid = target != ignore_index
    logp = F.log_softmax(logits[valid] / temperature, dim=1)
    rows = logp if log_probs else logp.exp()
    y = target[valid]
    sums = rows.new_zeros(num_classes, logits.shape[1]).index_add(0, y, rows)
    counts = torch.bincount(y, minlength=num_classes)
    return sums, counts


def cmi(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Reference of :func:`mcmi_torch.cmi`, computed on the valid rows alone
    (selected, never masked): an ignored row, whatever it holds, reaches no
    value or derivative of any order."""
    valid = target != ignore_index
    z, y = logits[valid], target[valid]
    logp = F.log_softmax(z / temperature, dim=1)
    prob = logp.exp()
    if centroids is None:
        sums, counts = class_sums(
            logits, target, logits.shape[1], temperature=temperature, ignore_index=ignore_index
        )
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    logq = centroids.to(logp.dtype).clamp_min(CENTROID_FLOOR).log()
    # 0 log 0 = 0: a class of probability 0 (a -inf logit) adds nothing, and
    # gets a zero derivative of every order (the log is replaced, not
    # multiplied by 0); a NaN row stays NaN through `prob`.
    logp = torch.where(prob > 0, logp, torch.zeros_like(logp))
    kl = (prob * (logp - logq[y])).sum(dim=1)
    return _reduce(kl, valid, reduction)


def mcmi(logits: Tensor, target: Tensor, centroids: Tensor | None = None, **kwargs) -> Tensor:
    """Reference of :func:`mcmi_torch.mcmi`."""
    return -cmi(logits, target, centroids, **kwargs)


def mcmi_loss(
    logits: Tensor,
    target: Tensor,
    lam: float,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Reference of ``MCMILoss``: ``CE - lam * CMI``, CE as ``F.cross_entropy``
    with ``weight`` and ``label_smoothing`` on the valid rows alone (a mean
    over no weight is 0)."""
    valid = target != ignore_index
    z, y = logits[valid], target[valid]
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    if reduction == "none":
        ce = _reduce(F.cross_entropy(z, y, reduction="none", **kw), valid, reduction)
    else:
        ce = F.cross_entropy(z, y, reduction="sum", **kw)
        if reduction == "mean":
            total = y.new_tensor(y.numel()) if weight is None else weight[y].sum()
            total = total.to(ce.dtype)
            empty = total == 0
            ce = torch.where(empty, 0, ce / torch.where(empty, 1, total))
    kl = cmi(
        logits,
        target,
        centroids,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return ce - lam * kl


def authors_loss(logits: Tensor, target: Tensor, lam: float, centroids: Tensor) -> Tensor:
    """The MCMI authors' own formulation with fixed centroids (batch mean):
    ``CE - lam * KL(softmax(z) || Q[y])``, the baseline users write today."""
    kl = F.kl_div(
        centroids[target].log(), F.log_softmax(logits, 1), log_target=True, reduction="batchmean"
    )
    return F.cross_entropy(logits, target) - lam * kl
