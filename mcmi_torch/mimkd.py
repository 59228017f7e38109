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


class MIMKDLoss(nn.Module):
    """``-sum_k w_k * MI_estimate(student_k, teacher_k)`` over feature pairs.

    Args:
        student_dims, teacher_dims: channel counts of each feature pair, e.g. the
            penultimate (global) features and a few intermediate stages.
        weights: one weight per pair (default 1 each).
        estimator: ``'jsd'`` (Deep InfoMax, single negative) or ``'infonce'``.
        proj_dim, hidden: sizes of the critic heads.

    ``forward(student_feats, teacher_feats)`` takes two sequences of tensors
    (``[B, C]`` or ``[B, C, H, W]``) and returns the loss to add to the
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
        if len(student_dims) != len(teacher_dims) or not student_dims:
            raise ValueError("student_dims and teacher_dims must name the same pairs (>= 1)")
        if estimator not in ("jsd", "infonce"):
            raise ValueError(f"estimator must be 'jsd' or 'infonce', got {estimator!r}")
        weights = [1.0] * len(student_dims) if weights is None else list(weights)
        if len(weights) != len(student_dims):
            raise ValueError("one weight per feature pair")
        self.estimator = estimator
        self.weights = weights
        self.critics = nn.ModuleList(
            SeparableCritic(ds, dt, proj_dim, hidden) for ds, dt in zip(student_dims, teacher_dims)
        )

    def estimates(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]):
        if len(student_feats) != len(self.critics) or len(teacher_feats) != len(self.critics):
            raise ValueError(f"expected {len(self.critics)} student and teacher features")
        out = []
        for critic, s, t in zip(self.critics, student_feats, teacher_feats):
            fs, gt = critic.embed(s, t.detach())
            if self.estimator == "jsd":
                out.append(jsd_estimate(fs, gt, critic.scale))
            else:
                out.append(infonce_estimate(fs, gt, critic.scale))
        return out

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        est = self.estimates(student_feats, teacher_feats)
        return -sum(w * e for w, e in zip(self.weights, est))
