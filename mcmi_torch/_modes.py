"""Where the centroids of ``MCMILoss`` come from: one small class per mode
(docs/math.md, "Where the centroids come from"). A mode registers the
criterion's centroid state, says which centroids each step passes to the op
(checking that state first), and what happens after the step (the EMA
update). The criterion's buffers stay on the criterion, so state_dict keys
and module casts are the module's own; a mode holds no tensor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._args import class_means, compute_dtype
from ._C import CENTROID_SUM_TOLERANCE
from ._ops import physical, unwrapped
from .distributed import all_reduce_sum, is_distributed
from .functional import class_sums


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
    if centroids.numel() == 0:
        raise ValueError(
            f"centroids must have at least one row and one column, got {list(centroids.shape)}"
        )
    given = centroids.detach()
    if not torch.isfinite(given).all():
        raise ValueError("centroids hold NaN or infinite entries")
    if (given < 0).any():
        raise ValueError("centroids hold negative entries; rows must be probability vectors")
    row_sums = given.sum(dim=1, dtype=torch.float64)
    worst = (row_sums - 1).abs().max().item()
    if worst > CENTROID_SUM_TOLERANCE:
        raise ValueError(
            f"centroids rows must sum to 1 (worst row is off by {worst:.3g}); "
            "pass probability vectors, e.g. from mcmi_torch.estimate_centroids"
        )
    dtype = torch.promote_types(given.dtype, torch.float32)
    return (given.double() / row_sums.unsqueeze(1)).to(dtype)


def _check_buffer_device(buffer: Tensor, logits: Tensor) -> None:
    if buffer.device != logits.device:
        raise RuntimeError(
            f"MCMILoss: the centroids buffer is on {buffer.device} but logits are on "
            f"{logits.device}; move the criterion with .to({str(logits.device)!r})"
        )


@torch.no_grad()
def batch_centroids(criterion: nn.Module, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean softmax per class over the batch of all ranks (``torch.distributed``
    sums the per-class sums and counts), and the class counts."""
    num_classes = criterion.num_classes if criterion.num_classes is not None else logits.shape[1]
    sums, counts = class_sums(
        logits,
        target,
        num_classes,
        temperature=criterion.temperature,
        ignore_index=criterion.ignore_index,
    )
    sums, counts = all_reduce_sum(sums, counts)
    return class_means(sums, counts), counts


class CentroidMode:
    """What every mode does; subclasses override the steps they take part in."""

    #: The mode's name: ``criterion.mode`` and its repr.
    name: str

    def before_step(self, criterion: nn.Module, logits: Tensor, target: Tensor) -> Tensor | None:
        """The centroids this step passes to the op (``None``: in-batch)."""
        raise NotImplementedError

    def after_step(
        self, criterion: nn.Module, logits: Tensor, target: Tensor, value: Tensor
    ) -> None:
        """Runs after the loss of the step is computed."""

    def loaded_centroids(self, given: Tensor) -> Tensor:
        """Centroids from a state dict, validated as at construction."""
        check_centroids(given)
        return given.detach()

    def repr_parts(self, criterion: nn.Module) -> list[str]:
        parts = [f"centroids={self.name!r}"]
        if criterion.num_classes is not None:
            parts.append(f"num_classes={criterion.num_classes}")
        return parts


class FixedCentroids(CentroidMode):
    """Given centroids, a float32 buffer validated again whenever it changed."""

    name = "fixed"

    def __init__(self, criterion: nn.Module, centroids: Tensor, num_classes: int | None) -> None:
        normalized = check_centroids(centroids)
        if num_classes is not None and num_classes != normalized.shape[0]:
            raise ValueError(
                f"num_classes={num_classes} disagrees with centroids of {normalized.shape[0]} rows"
            )
        # float32: what the kernels read for float32/bf16/fp16 logits.
        criterion.register_buffer("centroids", normalized.float())
        criterion.num_classes = normalized.shape[0]
        self.validated = None

    def before_step(self, criterion, logits, target):
        centroids = criterion.centroids
        _check_buffer_device(centroids, logits)
        # Meta tensors hold no values to validate (a model traced on meta).
        if not (torch.compiler.is_compiling() or centroids.is_inference() or centroids.is_meta):
            self._revalidate(centroids)
        return centroids

    def _revalidate(self, centroids: Tensor) -> None:
        """Validates the fixed centroids again whenever the buffer may have
        changed since the last check: replaced (``.to()``, assignment,
        ``.data =``: its identity or data pointer) or modified in place
        (``load_state_dict``, ``copy_``: its version counter). In-place writes
        through ``.data`` are invisible to the version counter (as they are to
        autograd) and are not supported."""
        if torch._C._functorch.is_functorch_wrapped_tensor(centroids):
            # A buffer given through a torch.func transform (functional_call,
            # built inside grad / jvp / vmap) has no storage of its own: its
            # values are checked at every call (every problem's under vmap).
            self._check(physical(centroids))
            return
        key = (centroids.data_ptr(), centroids._version)
        if self.validated is not None and self.validated[0] is centroids:
            if self.validated[1] == key:
                return
        self._check(centroids)
        self.validated = (centroids, key)

    @staticmethod
    def _check(centroids: Tensor) -> None:
        """``check_centroids`` of the rows of ``centroids`` (``[..., K, C]``)."""
        try:
            with torch.no_grad():
                check_centroids(centroids.reshape(-1, centroids.shape[-1]))
        except ValueError as error:
            raise ValueError(f"MCMILoss: the centroids buffer was changed: {error}") from None

    def loaded_centroids(self, given):
        return check_centroids(given)

    def repr_parts(self, criterion):
        # The tensor itself is no constructor argument one could type.
        return [f"centroids=<fixed {list(criterion.centroids.shape)} buffer>"]


class BatchCentroids(CentroidMode):
    """The mean softmax of each class in the current batch."""

    name = "batch"

    def __init__(self, criterion: nn.Module, num_classes: int | None) -> None:
        criterion.num_classes = num_classes

    def before_step(self, criterion, logits, target):
        if not is_distributed():
            return None
        # The centroids of the batch of all ranks, as constants: for 'mean'
        # and 'sum' the path through them cancels (docs/math.md, "The
        # gradient"), so the gradient equals the single-process one on the
        # concatenated batch.
        return batch_centroids(criterion, logits, target)[0]


#: Why an 'ema' criterion is not exported, and what to export instead.
EMA_EXPORT_UNSUPPORTED = (
    "MCMILoss(centroids='ema') cannot be exported with torch.export: an exported graph fixes "
    "at export time whether the step updates the buffer (the grad mode then) and which "
    "centroids its gradient sees, where the eager criterion decides at each call. Export the "
    "model without the criterion, or a criterion with the current centroids as fixed ones: "
    "MCMILoss(lam, centroids=criterion.centroids.clone())"
)


def _exporting() -> bool:
    """Whether ``torch.export`` traces the call: the flag that
    ``torch.compiler.is_exporting()`` returns, read directly because torch
    2.10's dynamo folds ``is_exporting()`` to True under ``torch.compile``
    as well (later versions read the flag there too)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


class EmaCentroids(CentroidMode):
    """A running ``[K, K]`` buffer, a constant within the step, then updated
    with the batch centroids of the classes present."""

    name = "ema"

    def __init__(self, criterion: nn.Module, num_classes: int | None) -> None:
        if num_classes is None:
            raise ValueError("centroids='ema' needs num_classes >= 1")
        criterion.num_classes = num_classes
        uniform = torch.full((num_classes, num_classes), 1.0 / num_classes)
        criterion.register_buffer("centroids", uniform)
        criterion.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def before_step(self, criterion, logits, target):
        if _exporting():
            raise RuntimeError(EMA_EXPORT_UNSUPPORTED)
        centroids = criterion.centroids
        _check_buffer_device(centroids, logits)
        if (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and (centroids.is_inference() or criterion.seen.is_inference())
        ):
            raise RuntimeError(
                "MCMILoss: the 'ema' buffers are inference tensors (the criterion was created "
                "or loaded under torch.inference_mode()), which cannot be updated outside "
                "inference mode; create or load the criterion outside torch.inference_mode()"
            )
        # A step that updates the buffer inside a torch.func transform.
        transformed = torch.is_grad_enabled() and torch._C._are_functorch_transforms_active()
        if transformed and not torch.compiler.is_compiling() and unwrapped(logits) is None:
            raise RuntimeError(
                "MCMILoss(centroids='ema') cannot update its buffer inside torch.func.vmap "
                "(one buffer, a batch of problems); call it outside vmap, or under "
                "torch.no_grad() to use the buffer without an update"
            )
        if logits.dim() >= 2 and logits.shape[1] != criterion.num_classes:
            raise ValueError(
                f"MCMILoss(centroids='ema', num_classes={criterion.num_classes}) got logits with "
                f"{logits.shape[1]} classes: 'ema' centroids are [num_classes, num_classes], "
                "so num_classes must be the number of logits columns"
            )
        if transformed:
            # The transforms wrap the buffer in a tensor whose version counter
            # does not see this step's in-place update, so the backward could
            # not tell the centroids had changed: give it a copy.
            return centroids.clone()
        return centroids

    def after_step(self, criterion, logits, target, value):
        if not torch.is_grad_enabled():
            return
        if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
            # Under grad / jvp the update reads the plain tensors under the
            # transforms' wrappers and writes the buffer outside them: the
            # buffer takes values, not a graph (and is no captured tensor).
            logits, target, value = unwrapped(logits), unwrapped(target), unwrapped(value)
            with torch._C._DisableFuncTorch():
                self._update(criterion, logits, target, value)
            return
        self._update(criterion, logits, target, value)

    @torch.no_grad()
    def _update(self, criterion: nn.Module, logits: Tensor, target: Tensor, value: Tensor) -> None:
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
            target = torch.where(torch.isfinite(value).all(), target, criterion.ignore_index)
        centroids, seen = criterion.centroids, criterion.seen
        if not is_distributed() and centroids.dtype == compute_dtype(logits):
            # One fused kernel, touching only the rows of the classes present.
            torch.ops.mcmi.ema_update_(
                centroids,
                seen,
                logits.detach(),
                target,
                criterion.temperature,
                criterion.momentum,
                criterion.ignore_index,
            )
            if not torch.compiler.is_compiling():
                # The op writes through the data pointer: record the write, so
                # that a graph holding the old centroids sees it.
                torch.autograd.graph.increment_version(centroids)
            return
        batch, counts = batch_centroids(criterion, logits, target)
        present = counts > 0
        blended = torch.where(
            seen.unsqueeze(1),
            centroids + criterion.momentum * (batch.to(centroids.dtype) - centroids),
            batch,
        )
        centroids.copy_(torch.where(present.unsqueeze(1), blended, centroids))
        seen.logical_or_(present)

    def repr_parts(self, criterion):
        return [*super().repr_parts(criterion), f"momentum={criterion.momentum}"]


def centroid_mode(criterion: nn.Module, centroids, num_classes: int | None) -> CentroidMode:
    """The mode for the ``centroids`` argument of ``MCMILoss``, its state
    registered on ``criterion``."""
    if isinstance(centroids, Tensor):
        return FixedCentroids(criterion, centroids, num_classes)
    if centroids == "batch":
        return BatchCentroids(criterion, num_classes)
    if centroids == "ema":
        return EmaCentroids(criterion, num_classes)
    error = ValueError if isinstance(centroids, str) else TypeError
    raise error(f"centroids must be a tensor, 'batch' or 'ema', got {centroids!r}")
