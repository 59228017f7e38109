"""MIMKD: a student loss that maximizes the mutual information between student and
teacher features (Shrivastava, Qi, Ordonez, "Estimating and Maximizing Mutual Information
for Knowledge Distillation", CVPRW 2023).

For each pair (student feature, teacher feature) a critic T(s, t) scores how well a student
feature matches a teacher feature; the MI is estimated by a variational bound on samples of
the joint (matching pairs of the batch) against samples of the product of marginals
(mismatched pairs):

* ``'jsd'`` (default, Deep InfoMax): ``E_joint[-softplus(-T)] - E_marginal[softplus(T)]``,
  with a single negative per sample (its teacher feature shuffled within the batch). It
  bounds the Jensen-Shannon MI, which rises with the MI, and trains stably with small
  batches.
* ``'infonce'``: ``log B + mean_i log softmax_j T(s_i, t_j)[i]``, every other sample of the
  batch a negative: a true lower bound on the MI in nats (at most ``log B``), as in CRD.

The critic is separable: ``T(s, t) = <f(s), g(t)> / sqrt(d)`` with two-layer MLP heads f
and g (feature maps ``[B, C, H, W]`` are global-average-pooled first). The loss is
``-sum_k weight_k * estimate_k`` over the pairs; teacher features are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._args import check_int, check_real


def _pool(x: Tensor) -> Tensor:
    """[B, C, ...] -> [B, C] by global average pooling; [B, C] unchanged."""
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def _head(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))


class SeparableCritic(nn.Module):
    """``T(s, t) = <f(s), g(t)> / sqrt(proj_dim)``."""

    def __init__(self, student_dim: int, teacher_dim: int, proj_dim: int = 128, hidden: int = 256):
        super().__init__()
        self.f = _head(student_dim, hidden, proj_dim)
        self.g = _head(teacher_dim, hidden, proj_dim)
        self.scale = 1.0 / math.sqrt(proj_dim)

    def embed(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.f(_pool(s)), self.g(_pool(t))


def jsd_estimate(fs: Tensor, gt: Tensor, scale: float, generator=None) -> Tensor:
    """Deep InfoMax Jensen-Shannon estimator, one shuffled negative per sample."""
    # Each sample's negative is the next one along a random cycle through
    # the batch: never itself (for a batch of 2 or more).
    perm = torch.randperm(fs.shape[0], generator=generator).to(fs.device)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-1)
    positive = (fs * gt).sum(dim=1) * scale
    negative = (fs * gt[partner]).sum(dim=1) * scale
    return (-F.softplus(-positive)).mean() - F.softplus(negative).mean()


def infonce_estimate(fs: Tensor, gt: Tensor, scale: float) -> Tensor:
    """InfoNCE: a lower bound on the MI in nats, at most log(batch size)."""
    scores = fs @ gt.T * scale
    return math.log(fs.shape[0]) + torch.diagonal(F.log_softmax(scores, dim=1)).mean()


def _dims(name: str, dims: Sequence[int]) -> list[int]:
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
        raise ValueError(f"{name} must be a non-empty sequence of channel counts, got {dims!r}")
    return [check_int(f"{name}[{k}]", d, minimum=1) for k, d in enumerate(dims)]


def _check_pair(k: int, s: Tensor, t: Tensor, dims: tuple[int, int]) -> None:
    """Feature pair ``k``: floating-point ``[B, C, ...]`` tensors on one device
    with the channel counts of their critic and the same batch of at least
    2 samples (the negatives of a sample are other samples)."""
    for name, x, channels in (("student_feats", s, dims[0]), ("teacher_feats", t, dims[1])):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name}[{k}] must be a floating-point tensor, got {got}")
        if x.dim() < 2 or x.shape[1] != channels:
            raise ValueError(
                f"{name}[{k}] must be [B, {channels}] or [B, {channels}, ...], got shape "
                f"{list(x.shape)}"
            )
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_feats[{k}] and teacher_feats[{k}] must hold the same samples, got batches "
            f"of {s.shape[0]} and {t.shape[0]}"
        )
    if s.shape[0] < 2:
        raise ValueError(
            f"feature pair {k} has a batch of {s.shape[0]}: the MI estimates need at least 2 "
            "samples (each sample's negatives are the others)"
        )
    if s.device != t.device:
        raise ValueError(
            f"student_feats[{k}] is on {s.device} but teacher_feats[{k}] on {t.device}"
        )


class MIMKDLoss(nn.Module):
    """``-sum_k w_k * MI_estimate(student_k, teacher_k)`` over feature pairs.

    Args:
        student_dims, teacher_dims: channel counts of each feature pair, e.g. the
            penultimate (global) features and a few intermediate stages.
        weights: one weight per pair (default 1 each).
        estimator: ``'jsd'`` (Deep InfoMax, single negative) or ``'infonce'``.
        proj_dim, hidden: sizes of the critic heads.

    ``forward(student_feats, teacher_feats)`` takes two sequences of tensors
    (``[B, C]`` or ``[B, C, H, W]``, the channels of their pair; student and
    teacher features of a pair hold the same ``B >= 2`` samples, checked with
    an error that names the pair) and returns the loss to add to the
    student's objective (e.g. ``CE + beta * mimkd`` or with KD); the critics'
    parameters belong to this module and train with the student.
    ``estimates(...)`` returns the per-pair MI estimates without the sign.
    """

    def __init__(
        self,
        student_dims: Sequence[int],
        teacher_dims: Sequence[int],
        *,
        weights: Sequence[float] | None = None,
        estimator: str = "jsd",
        proj_dim: int = 128,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        student_dims = _dims("student_dims", student_dims)
        teacher_dims = _dims("teacher_dims", teacher_dims)
        if len(student_dims) != len(teacher_dims):
            raise ValueError(
                f"student_dims and teacher_dims must name the same pairs, got {len(student_dims)} "
                f"and {len(teacher_dims)} entries"
            )
        if estimator not in ("jsd", "infonce"):
            raise ValueError(f"estimator must be 'jsd' or 'infonce', got {estimator!r}")
        weights = [1.0] * len(student_dims) if weights is None else list(weights)
        if len(weights) != len(student_dims):
            raise ValueError(
                f"weights must have one entry per feature pair ({len(student_dims)}), "
                f"got {len(weights)}"
            )
        weights = [check_real(f"weights[{k}]", w) for k, w in enumerate(weights)]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        self.estimator = estimator
        self.weights = weights
        self.dims = list(zip(student_dims, teacher_dims))
        proj_dim = check_int("proj_dim", proj_dim, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        self.critics = nn.ModuleList(
            SeparableCritic(ds, dt, proj_dim, hidden) for ds, dt in self.dims
        )

    def estimates(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]):
        """The MI estimate of each feature pair (nats for ``'infonce'``)."""
        pairs = len(self.critics)
        for name, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
            if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
                raise TypeError(
                    f"{name} must be a sequence of tensors, one per feature pair, got "
                    f"{type(feats).__name__}"
                )
        if len(student_feats) != pairs or len(teacher_feats) != pairs:
            raise ValueError(
                f"expected {pairs} student and teacher features, got {len(student_feats)} and "
                f"{len(teacher_feats)}"
            )
        out = []
        for k, (critic, s, t) in enumerate(zip(self.critics, student_feats, teacher_feats)):
            _check_pair(k, s, t, self.dims[k])
            fs, gt = critic.embed(s, t.detach())
            if self.estimator == "jsd":
                out.append(jsd_estimate(fs, gt, critic.scale))
            else:
                out.append(infonce_estimate(fs, gt, critic.scale))
        return out

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        est = self.estimates(student_feats, teacher_feats)
        return -sum(w * e for w, e in zip(self.weights, est))
