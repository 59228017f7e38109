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
    if reduction == "none":
        return values
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
    logp = F.log_softmax(logits / temperature, dim=1)
    rows = logp if log_probs else logp.exp()
    y = target[valid]
    sums = rows.new_zeros(num_classes, logits.shape[1]).index_add(0, y, rows[valid])
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
    """Reference of :func:`mcmi_torch.cmi`."""
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits / temperature, dim=1)
    if centroids is None:
        sums, counts = class_sums(
            logits, target, logits.shape[1], temperature=temperature, ignore_index=ignore_index
        )
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    logq = centroids.to(logp.dtype).clamp_min(CENTROID_FLOOR).log()
    prob = logp.exp()
    # 0 log 0 = 0: a class of probability 0 (a -inf logit) adds nothing, and
    # gets a zero gradient; a NaN row stays NaN through `prob`.
    logp = torch.where(prob > 0, logp, torch.zeros_like(logp))
    kl = (prob * (logp - logq[y])).sum(dim=1)
    kl = torch.where(valid, kl, torch.zeros_like(kl))
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
) -> Tensor:
    """Reference of ``MCMILoss``: ``CE - lam * CMI``."""
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    ce = _reduce(torch.where(valid, ce, torch.zeros_like(ce)), valid, reduction)
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
