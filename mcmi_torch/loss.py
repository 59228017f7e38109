"""``MCMILoss``: cross-entropy minus ``lam`` times the CMI, as one module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _ops
from .distributed import all_reduce_sum, is_distributed

_ROW_SUM_TOLERANCE = 1e-3


def check_centroids(centroids: Tensor) -> Tensor:
    """Validates user-given centroids and returns them renormalized, detached."""
    if not isinstance(centroids, Tensor) or not centroids.is_floating_point():
        raise TypeError("centroids must be a floating-point tensor [num_classes, classes]")
    if centroids.dim() != 2:
        raise ValueError(f"centroids must be 2-D [num_classes, classes], got {centroids.dim()}-D")
    q = centroids.detach()
    if not torch.isfinite(q).all():
        raise ValueError("centroids hold NaN or infinite entries")
    if (q < 0).any():
        raise ValueError("centroids hold negative entries; rows must be probability vectors")
    row_sums = q.sum(dim=1, dtype=torch.float64)
    worst = (row_sums - 1).abs().max().item() if q.shape[0] else 0.0
    if worst > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"centroids rows must sum to 1 (worst row is off by {worst:.3g}); "
            "pass probability vectors, e.g. from mcmi_torch.estimate_centroids"
        )
    return q / q.sum(dim=1, keepdim=True)


class MCMILoss(nn.Module):
    r"""Cross-entropy minus ``lam`` times the conditional mutual information.

    ``forward(logits, target)`` returns ``CE(logits, target) - lam * CMI`` in
    one fused op: CE at temperature 1, CMI at ``temperature`` (see
    :func:`mcmi_torch.cmi`), both reduced over the rows whose label is not
    ``ignore_index``. A drop-in for ``nn.CrossEntropyLoss``.

    Args:
        lam: weight of the CMI term (the MCMI paper uses 0.1 to 0.8).
        centroids: where the class centroids come from:

            * a ``[K, C]`` tensor: fixed centroids (the paper's recipe: estimate
              them once with :func:`mcmi_torch.estimate_centroids`), stored as
              the float32 buffer ``centroids`` and renormalized row-wise; rows
              must sum to 1 within 1e-3, entries must be finite and
              non-negative.
            * ``'batch'``: the mean softmax of each class in the current batch.
              With ``torch.distributed`` initialized, the batch of all ranks
              (then used as constants; exact for ``'mean'`` and ``'sum'``).
            * ``'ema'``: a running ``[num_classes, num_classes]`` buffer, used as a
              constant in each step and then updated with the batch centroids
              of the classes present: ``Q_c <- (1 - momentum) Q_c + momentum
              batch_c`` (the first batch that holds class ``c`` sets ``Q_c``).
              Updates happen only while grad is enabled, so calling the
              criterion under ``torch.no_grad()`` to validate leaves it as is.
              With ``torch.distributed`` initialized, batch centroids are
              computed over all ranks.
        num_classes: number of classes ``K``; required for ``'ema'``.
        temperature: softmax temperature of the CMI term.
        momentum: EMA weight of the newest batch (``'ema'`` only), in (0, 1].
        ignore_index: label value of rows to skip.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
    """

    def __init__(
        self,
        lam: float = 0.25,
        centroids: Tensor | str = "batch",
        num_classes: int | None = None,
        temperature: float = 1.0,
        momentum: float = 0.1,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        lam = float(lam)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        momentum = float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        _ops.check_reduction(reduction)
        self.lam = lam
        self.temperature = _ops.check_positive_finite("temperature", temperature)
        self.momentum = momentum
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

        if isinstance(centroids, Tensor):
            self.mode = "fixed"
            q = check_centroids(centroids)
            if num_classes is not None and num_classes != q.shape[0]:
                raise ValueError(
                    f"num_classes={num_classes} disagrees with centroids of {q.shape[0]} rows"
                )
            # float32: what the kernels read for float32/bf16/fp16 logits.
            self.register_buffer("centroids", q.float())
            self.num_classes = q.shape[0]
        elif centroids == "batch":
            self.mode = "batch"
            self.num_classes = num_classes
        elif centroids == "ema":
            if num_classes is None or int(num_classes) < 1:
                raise ValueError("centroids='ema' needs num_classes >= 1")
            self.mode = "ema"
            self.num_classes = int(num_classes)
            k = self.num_classes
            self.register_buffer("centroids", torch.full((k, k), 1.0 / k))
            self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))
        else:
            raise ValueError(f"centroids must be a tensor, 'batch' or 'ema', got {centroids!r}")

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, centroids={self.mode!r}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.mode != "batch":
            centroids = self.centroids
        elif is_distributed():
            # The centroids of the batch of all ranks, as constants: for 'mean'
            # and 'sum' the path through them cancels (docs/math.md), so the
            # gradient equals the single-process one on the concatenated batch.
            centroids = self._batch_centroids(logits, target)[0]
        else:
            centroids = None
        value = _ops.loss(
            logits,
            target,
            centroids,
            ce_weight=1.0,
            cmi_weight=-self.lam,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_classes=self.num_classes,
        )
        if self.mode == "ema" and torch.is_grad_enabled():
            self._update(logits, target)
        return value

    @torch.no_grad()
    def _batch_centroids(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Mean softmax per class over the batch of all ranks, and class counts."""
        num_classes = self.num_classes if self.num_classes is not None else logits.shape[1]
        sums, counts = _ops.class_sums(
            logits,
            target,
            num_classes,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
        )
        sums, counts = all_reduce_sum(sums, counts)
        return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), counts

    @torch.no_grad()
    def _update(self, logits: Tensor, target: Tensor) -> None:
        if not is_distributed() and self.centroids.dtype == _ops.compute_dtype(logits):
            # One fused kernel, touching only the rows of the classes present.
            torch.ops.mcmi.ema_update_(
                self.centroids,
                self.seen,
                logits.detach(),
                target,
                self.temperature,
                self.momentum,
                self.ignore_index,
            )
            return
        batch, counts = self._batch_centroids(logits, target)
        present = counts > 0
        old = self.centroids
        blended = torch.where(
            self.seen.unsqueeze(1), old + self.momentum * (batch.to(old.dtype) - old), batch
        )
        old.copy_(torch.where(present.unsqueeze(1), blended, old))
        self.seen.logical_or_(present)
