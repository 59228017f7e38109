"""``MCMILoss``: cross-entropy minus ``lam`` times the CMI, as one module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _args
from ._modes import CentroidMode, centroid_mode
from .functional import flatten_classes, loss, unflatten
from .guard import CollapseGuard


class MCMILoss(nn.Module):
    r"""Cross-entropy minus ``lam`` times the conditional mutual information.

    ``forward(logits, target)`` returns ``CE(logits, target) - lam * CMI`` in
    one fused op: CE at temperature 1, CMI at ``temperature`` (see
    :func:`mcmi_torch.cmi`), both reduced over the rows whose label is not
    ``ignore_index``. A drop-in for ``nn.CrossEntropyLoss``: ``[N, C]``,
    ``[C]`` and ``[N, C, d1, ...]`` logits with class-index targets, and
    under ``torch.autocast`` a float32 loss, as there.

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
              A batch whose loss is not finite (NaN or infinite logits) gives
              that loss, as ``nn.CrossEntropyLoss`` does, and leaves the
              buffer unchanged. With ``torch.distributed`` initialized, batch
              centroids are computed over all ranks.
        num_classes: number of classes ``K`` (an int); required for ``'ema'``,
            where it must equal the number of logits columns.
        temperature: softmax temperature of the CMI term.
        momentum: EMA weight of the newest batch (``'ema'`` only), in (0, 1].
        ignore_index: label value of rows to skip (an int within int64).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        weight: per-class weights ``[C]`` of the CE term, exactly as in
            ``F.cross_entropy`` (``'mean'`` divides the weighted sum by the sum
            of the weights of the non-ignored targets). The CMI term stays
            unweighted: the mean (or sum) of the per-sample KL over the
            non-ignored rows. Stored as the buffer ``weight``.
        label_smoothing: in [0, 1], smoothing of the CE term exactly as in
            ``F.cross_entropy``; the CMI term is unchanged.

    A ``'mean'`` over no row (every label ignored, an empty batch) is 0 with
    a zero gradient, with every option; so is the weighted CE mean of
    targets whose weights sum to 0 (``F.cross_entropy`` gives NaN for both).

    With ``weight`` or ``label_smoothing`` the CE term is ``F.cross_entropy``
    and the CMI term the fused op (two passes over the logits); with neither,
    the single fused op computes both.

    Attributes:
        guard: a :class:`~mcmi_torch.guard.CollapseGuard`, fed the training
            calls made with ``lam > 0``: it warns once if the training-batch
            accuracy falls towards chance, as it does when ``lam`` is too large
            (docs/math.md, "Collapse"), without a device sync. Set it to
            ``None`` to turn it off, or to another ``CollapseGuard`` (anything
            else raises ``TypeError``). Its state is not in ``state_dict``: a
            criterion loaded from a checkpoint starts with an unarmed guard.

    Centroid state: ``load_state_dict`` validates loaded centroids as the
    constructor does (fixed ones are renormalized); fixed centroids modified
    in place are validated again before their next use. Module casts
    (``.half()``, ``.bfloat16()``, ``.to(dtype)``) keep the buffer in float32
    (``.double()`` makes it float64); device moves apply as usual.

    Second derivatives: ``backward(create_graph=True)`` works with fixed and
    in-batch centroids; with ``'ema'`` the buffer has been updated in place by
    then, so it raises (differentiate ``cmi`` on a copy of the buffer instead).
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
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        momentum = _args.check_real("momentum", momentum)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        _args.check_reduction(reduction)
        if num_classes is not None:
            num_classes = _args.check_int("num_classes", num_classes, minimum=1)
        self.lam = lam
        self.temperature = _args.check_positive_finite("temperature", temperature)
        self.momentum = momentum
        self.ignore_index = _args.check_int("ignore_index", ignore_index)
        self.reduction = reduction
        self.guard = CollapseGuard()
        label_smoothing = _args.check_real("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = label_smoothing
        if weight is not None:
            if not isinstance(weight, Tensor) or not weight.is_floating_point():
                raise TypeError("weight must be a floating-point tensor [classes] or None")
            if weight.dim() != 1:
                raise ValueError(f"weight must be 1-D [classes], got {weight.dim()}-D")
            weight = weight.detach()
        self.register_buffer("weight", weight)

        self.centroid_mode: CentroidMode = centroid_mode(self, centroids, num_classes)

    @property
    def mode(self) -> str:
        """Where the centroids come from: ``'fixed'``, ``'batch'`` or ``'ema'``."""
        return self.centroid_mode.name

    @property
    def lam(self) -> float:
        """Weight of the CMI term; may be changed between steps (a schedule)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = _args.check_real("lam", value)
        if not math.isfinite(value):
            raise ValueError(f"lam must be finite, got {value}")
        self._lam = value

    @property
    def guard(self) -> CollapseGuard | None:
        """The collapse guard fed the training calls (``None``: off)."""
        return self._guard

    @guard.setter
    def guard(self, value: CollapseGuard | None) -> None:
        if value is not None and not isinstance(value, CollapseGuard):
            raise TypeError(
                f"guard must be a mcmi_torch.guard.CollapseGuard or None (off), got "
                f"{type(value).__name__}"
            )
        self._guard = value

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: TorchScript is not supported."""
        raise RuntimeError(_args.TORCHSCRIPT_UNSUPPORTED)

    def _apply(self, fn, recurse=True):
        """Module casts keep the centroid state in float32 or float64: a cast to
        16 bits (``.half()``, ``.bfloat16()``, ``.to(torch.float16)``) leaves it
        in float32, cast from the original values (small entries would
        underflow in 16 bits); ``.double()`` and device moves apply as usual."""
        centroids = self._buffers.get("centroids")

        def keep_precision(t):
            out = fn(t)
            if t is centroids and out.dtype not in (torch.float32, torch.float64):
                out = t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_precision, recurse)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Loaded centroids are validated as at construction (finite,
        non-negative, rows summing to 1 within 1e-3; fixed ones renormalized)
        and kept in the buffer's dtype."""
        key = prefix + "centroids"
        given = state_dict.get(key)
        mine = self._buffers.get("centroids")
        if isinstance(given, Tensor) and mine is not None and given.shape == mine.shape:
            if not given.is_meta:
                try:
                    given = self.centroid_mode.loaded_centroids(given)
                except (TypeError, ValueError) as error:
                    error_msgs.append(f"invalid {key!r}: {error}")
                    return
            state_dict[key] = given.to(mine.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        parts = self.centroid_mode.repr_parts(self)
        parts += [
            f"temperature={self.temperature}",
            f"ignore_index={self.ignore_index}",
            f"reduction={self.reduction!r}",
        ]
        if self.weight is not None:
            parts.append(f"weight=<{list(self.weight.shape)} buffer>")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        return ", ".join([f"lam={self.lam}", *parts])

    def _cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """``F.cross_entropy`` with the weight and label smoothing, except that
        a mean over no weight (every row ignored, or only targets of weight
        0) is 0 with a zero gradient, as the fused op's mean over no row is,
        where ``F.cross_entropy`` gives NaN."""
        weight = self.weight.to(logits.dtype) if self.weight is not None else None
        mean = self.reduction == "mean"
        valid = target != self.ignore_index
        # Ignored rows selected out: whatever they hold (NaN, -inf padding)
        # reaches no derivative, of their own row either.
        ce = F.cross_entropy(
            torch.where(valid.unsqueeze(1), logits, 0.0),
            target,
            weight=weight,
            ignore_index=self.ignore_index,
            reduction="sum" if mean else self.reduction,
            label_smoothing=self.label_smoothing,
        )
        if not mean:
            return ce
        if weight is None:
            total = valid.sum().to(ce.dtype)
        else:
            total = (weight[torch.where(valid, target, 0)] * valid).sum()
        empty = total == 0
        return torch.where(empty, 0, ce / torch.where(empty, 1, total))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, shape = flatten_classes(logits, target)
        logits = _args.autocast_float32(logits)
        centroids = self.centroid_mode.before_step(self, logits, target)
        fused_ce = self.weight is None and self.label_smoothing == 0.0
        if not fused_ce and self.num_classes is not None and self.num_classes > logits.shape[1]:
            # What the fused op says when it computes the CE term itself.
            raise RuntimeError(
                f"mcmi: cross-entropy needs labels that index the logits, but num_classes "
                f"({self.num_classes}) > logits columns ({logits.shape[1]})"
            )
        value = loss(
            logits,
            target,
            centroids,
            ce_weight=1.0 if fused_ce else 0.0,
            cmi_weight=-self.lam,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_classes=self.num_classes,
        )
        if not fused_ce:
            value = value + self._cross_entropy(logits, target)
        self.centroid_mode.after_step(self, logits, target, value)
        guarded = self.guard is not None and self.lam > 0 and torch.is_grad_enabled()
        if guarded and not torch.compiler.is_compiling():
            self.guard.observe(logits, target, self.ignore_index, self.lam)
        return unflatten(value, shape)
