"""``MCMILoss``: cross-entropy minus ``lam`` times the CMI, as one module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _ops
from ._C import CENTROID_SUM_TOLERANCE
from .distributed import all_reduce_sum, is_distributed
from .functional import flatten_classes, unflatten
from .guard import CollapseGuard


def check_centroids(centroids: Tensor) -> Tensor:
    """Validates user-given centroids and returns them renormalized (in
    float64, returned in float32 or float64 whichever is wider than the input
    dtype), detached."""
    if not isinstance(centroids, Tensor) or not centroids.is_floating_point():
        got = centroids.dtype if isinstance(centroids, Tensor) else type(centroids).__name__
        raise TypeError(
            f"centroids must be a floating-point tensor [num_classes, classes], got {got}"
        )
    if centroids.dim() != 2:
        raise ValueError(f"centroids must be 2-D [num_classes, classes], got {centroids.dim()}-D")
    q = centroids.detach()
    if not torch.isfinite(q).all():
        raise ValueError("centroids hold NaN or infinite entries")
    if (q < 0).any():
        raise ValueError("centroids hold negative entries; rows must be probability vectors")
    row_sums = q.sum(dim=1, dtype=torch.float64)
    worst = (row_sums - 1).abs().max().item() if q.shape[0] else 0.0
    if worst > CENTROID_SUM_TOLERANCE:
        raise ValueError(
            f"centroids rows must sum to 1 (worst row is off by {worst:.3g}); "
            "pass probability vectors, e.g. from mcmi_torch.estimate_centroids"
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    return (q.double() / row_sums.unsqueeze(1)).to(dtype)


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

    With ``weight`` or ``label_smoothing`` the CE term is ``F.cross_entropy``
    and the CMI term the fused op (two passes over the logits); with neither,
    the single fused op computes both.

    Attributes:
        guard: a :class:`~mcmi_torch.guard.CollapseGuard`, fed the training
            calls made with ``lam > 0``: it warns once if the training-batch
            accuracy falls towards chance, as it does when ``lam`` is too large
            (docs/math.md, "Collapse"); one device sync every 20 such calls.
            Set it to ``None`` to turn it off.

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
        momentum = _ops.check_real("momentum", momentum)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        _ops.check_reduction(reduction)
        if num_classes is not None:
            num_classes = _ops.check_int("num_classes", num_classes, minimum=1)
        self.lam = lam
        self.temperature = _ops.check_positive_finite("temperature", temperature)
        self.momentum = momentum
        self.ignore_index = _ops.check_int("ignore_index", ignore_index)
        self.reduction = reduction
        self.guard = CollapseGuard()
        label_smoothing = _ops.check_real("label_smoothing", label_smoothing)
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

        if isinstance(centroids, Tensor):
            self.mode = "fixed"
            q = check_centroids(centroids)
            if num_classes is not None and num_classes != q.shape[0]:
                raise ValueError(
                    f"num_classes={num_classes} disagrees with centroids of {q.shape[0]} rows"
                )
            # float32: what the kernels read for float32/bf16/fp16 logits.
            self.register_buffer("centroids", q.float())
            self._validated = None
            self.num_classes = q.shape[0]
        elif centroids == "batch":
            self.mode = "batch"
            self.num_classes = num_classes
        elif centroids == "ema":
            if num_classes is None:
                raise ValueError("centroids='ema' needs num_classes >= 1")
            self.mode = "ema"
            self.num_classes = num_classes
            k = self.num_classes
            self.register_buffer("centroids", torch.full((k, k), 1.0 / k))
            self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))
        else:
            error = ValueError if isinstance(centroids, str) else TypeError
            raise error(f"centroids must be a tensor, 'batch' or 'ema', got {centroids!r}")

    @property
    def lam(self) -> float:
        """Weight of the CMI term; may be changed between steps (a schedule)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = _ops.check_real("lam", value)
        if not math.isfinite(value):
            raise ValueError(f"lam must be finite, got {value}")
        self._lam = value

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
                    q = check_centroids(given)
                except (TypeError, ValueError) as error:
                    error_msgs.append(f"invalid {key!r}: {error}")
                    return
                given = q if self.mode == "fixed" else given.detach()
            state_dict[key] = given.to(mine.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        if self.mode == "fixed":
            # The tensor itself is no constructor argument one could type.
            parts = [f"centroids=<fixed {list(self.centroids.shape)} buffer>"]
        else:
            parts = [f"centroids={self.mode!r}"]
            if self.num_classes is not None:
                parts.append(f"num_classes={self.num_classes}")
            if self.mode == "ema":
                parts.append(f"momentum={self.momentum}")
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

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target, shape = flatten_classes(logits, target)
        logits = _ops.autocast_float32(logits)
        if self.mode != "batch":
            self._check_state(logits)
            centroids = self.centroids
        elif is_distributed():
            # The centroids of the batch of all ranks, as constants: for 'mean'
            # and 'sum' the path through them cancels (docs/math.md), so the
            # gradient equals the single-process one on the concatenated batch.
            centroids = self._batch_centroids(logits, target)[0]
        else:
            centroids = None
        fused_ce = self.weight is None and self.label_smoothing == 0.0
        value = _ops.loss(
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
            weight = self.weight.to(logits.dtype) if self.weight is not None else None
            value = value + F.cross_entropy(
                logits,
                target,
                weight=weight,
                ignore_index=self.ignore_index,
                reduction=self.reduction,
                label_smoothing=self.label_smoothing,
            )
        if self.mode == "ema" and torch.is_grad_enabled():
            self._update(logits, target, value)
        guarded = self.guard is not None and self.lam > 0 and torch.is_grad_enabled()
        if guarded and not torch.compiler.is_compiling():
            self.guard.observe(logits, target, self.ignore_index, self.lam)
        return unflatten(value, shape)

    @torch.no_grad()
    def _revalidate(self, q: Tensor) -> None:
        """Validates the fixed centroids again whenever the buffer may have
        changed since the last check: replaced (``.to()``, assignment,
        ``.data =``: its identity or data pointer) or modified in place
        (``load_state_dict``, ``copy_``: its version counter). In-place writes
        through ``.data`` are invisible to the version counter (as they are to
        autograd) and are not supported."""
        key = (q.data_ptr(), q._version)
        if self._validated is not None and self._validated[0] is q and self._validated[1] == key:
            return
        try:
            check_centroids(q)
        except ValueError as error:
            raise ValueError(f"MCMILoss: the centroids buffer was changed: {error}") from None
        self._validated = (q, key)

    def _check_state(self, logits: Tensor) -> None:
        """Errors that name the criterion's own state rather than an op argument."""
        _ops.check_tensors(logits=logits)
        q = self.centroids
        if q.device != logits.device:
            raise RuntimeError(
                f"MCMILoss: the centroids buffer is on {q.device} but logits are on "
                f"{logits.device}; move the criterion with .to({str(logits.device)!r})"
            )
        if self.mode == "fixed" and not torch.compiler.is_compiling() and not q.is_inference():
            self._revalidate(q)
        if (
            self.mode == "ema"
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and (q.is_inference() or self.seen.is_inference())
        ):
            raise RuntimeError(
                "MCMILoss: the 'ema' buffers are inference tensors (the criterion was created "
                "or loaded under torch.inference_mode()), which cannot be updated outside "
                "inference mode; create or load the criterion outside torch.inference_mode()"
            )
        if self.mode == "ema" and logits.dim() >= 2 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"MCMILoss(centroids='ema', num_classes={self.num_classes}) got logits with "
                f"{logits.shape[1]} classes: 'ema' centroids are [num_classes, num_classes], "
                "so num_classes must be the number of logits columns"
            )

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
    def _update(self, logits: Tensor, target: Tensor, value: Tensor) -> None:
        """EMA step from this batch, unless its loss is not finite (NaN or
        infinite logits): such a batch leaves the buffer as it is, so one bad
        batch cannot poison the centroids of every later one."""
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            # Reading a CPU scalar costs no device sync.
            total = value if value.dim() == 0 else value.sum(dtype=torch.float64)
            if not math.isfinite(total.item()):
                return
        else:
            # No device sync: a non-finite batch updates no class.
            target = torch.where(torch.isfinite(value).all(), target, self.ignore_index)
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
            if not torch.compiler.is_compiling():
                # The op writes through the data pointer: record the write, so
                # that a graph holding the old centroids sees it.
                torch.autograd.graph.increment_version(self.centroids)
            return
        batch, counts = self._batch_centroids(logits, target)
        present = counts > 0
        old = self.centroids
        blended = torch.where(
            self.seen.unsqueeze(1), old + self.momentum * (batch.to(old.dtype) - old), batch
        )
        old.copy_(torch.where(present.unsqueeze(1), blended, old))
        self.seen.logical_or_(present)
