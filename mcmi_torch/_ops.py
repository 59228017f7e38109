"""Registration of the ``torch.ops.mcmi`` ops with autograd and torch.compile,
and the one internal entry point the public API goes through.

The forward op computes the loss and, when a gradient will be needed, the
gradient for a unit upstream gradient in the same pass over the logits. The
first backward scales that saved gradient in place (or not at all when the
upstream gradient is exactly 1 on the CPU) and hands it on, so forward +
backward hold a single logits-sized buffer. A later backward through the same
graph (``retain_graph=True``) recomputes the gradient from the saved inputs,
so every backward gives the same result.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the kernels and registers the ops)

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

#: Centroid entries are clamped from below to this value before the log, so
#: that ``log Q`` stays finite (see docs/math.md).
CENTROID_FLOOR = 1e-12


#: Largest ``num_classes`` the ops take (the C++ shim holds the same bound).
MAX_CLASSES = (1 << 31) - 1


def _check_devices(first_name: str, first: Tensor, **others: Tensor | None) -> None:
    """All tensor arguments of an op on one device, checked here as the shim
    checks it: a tensor on another device (``meta`` included) would otherwise
    send the call to this fake kernel, which returns uninitialized memory."""
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise RuntimeError(f"mcmi: {name} must be on the same device as {first_name}")


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise RuntimeError(
            f"mcmi: num_classes must be >= 1 and <= {MAX_CLASSES}, got {num_classes}"
        )


@torch.library.register_fake("mcmi::loss")
def _loss_fake(
    logits,
    target,
    centroids,
    log_centroids,
    num_classes,
    temperature,
    ce_weight,
    cmi_weight,
    floor,
    ignore_index,
    reduction,
    with_grad,
):
    _check_devices("logits", logits, target=target, centroids=centroids)
    _check_num_classes(num_classes)
    rows, cols = logits.shape
    loss = logits.new_empty((rows,) if reduction == REDUCTIONS["none"] else ())
    grad = logits.new_empty((rows, cols) if with_grad else (0,))
    return loss, grad


@torch.library.register_fake("mcmi::scale_grad_")
def _scale_grad_fake(grad, scale):
    _check_devices("grad", grad, scale=scale)
    return None


@torch.library.register_fake("mcmi::ema_update_")
def _ema_update_fake(centroids, seen, logits, target, temperature, momentum, ignore_index):
    _check_devices("logits", logits, centroids=centroids, seen=seen, target=target)
    return None


@torch.library.register_fake("mcmi::class_sums")
def _class_sums_fake(logits, target, num_classes, temperature, ignore_index, log_probs):
    _check_devices("logits", logits, target=target)
    _check_num_classes(num_classes)
    sums = logits.new_empty((num_classes, logits.shape[1]), dtype=compute_dtype(logits))
    counts = logits.new_empty((num_classes,), dtype=torch.int64)
    return sums, counts


class _LossArgs(NamedTuple):
    """The non-tensor arguments of mcmi::loss, in schema order."""

    log_centroids: bool
    num_classes: int
    temperature: float
    ce_weight: float
    cmi_weight: float
    floor: float
    ignore_index: int
    reduction: int
    with_grad: bool


def _loss_setup_context(ctx, inputs, output):
    logits, target, centroids, *args = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The kept gradient is an output no one differentiates: without this,
    # autograd would hand backward a zero-filled [B, C] tensor for it.
    ctx.set_materialize_grads(False)
    ctx.args = _LossArgs(*args)
    ctx.unit_grad_used = False
    # Centroids are only read again if a second backward recomputes the
    # gradient; held without autograd's version check because 'ema' updates
    # them in place within the step (checked in _recompute instead).
    ctx.centroids = centroids
    ctx.centroids_version = centroids._version if centroids is not None else 0
    ctx.save_for_backward(grad, logits, target)


def _batch_centroid_path(logits, target, weight, args):
    """Gradient that flows through in-batch centroids when the per-row
    upstream weights differ within a class (zero when they are equal)."""
    num_classes, temperature, floor = args.num_classes, args.temperature, args.floor
    dtype = compute_dtype(logits)
    p = torch.softmax(logits.to(dtype) / temperature, dim=1)
    valid = target != args.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    w = torch.where(valid, weight.to(dtype), torch.zeros_like(p[:, 0]))
    sums = p.new_zeros(num_classes, p.shape[1]).index_add(0, y[valid], p[valid])
    counts = torch.bincount(y[valid], minlength=num_classes).clamp_min(1).unsqueeze(1)
    q = sums / counts
    live = (q >= floor).to(dtype)
    a = p.new_zeros(q.shape).index_add(0, y, w.unsqueeze(1) * p / q.clamp_min(floor)[y])
    v = (-args.cmi_weight * live * a / counts)[y] * valid.unsqueeze(1).to(dtype)
    return p * (v - (p * v).sum(dim=1, keepdim=True)) / temperature


def _is_eager_unit(grad_loss: Tensor) -> bool:
    """True for a plain CPU upstream gradient that is exactly 1 (checking
    costs no device sync there; traced and CUDA gradients are never read)."""
    return (
        type(grad_loss) is Tensor
        and grad_loss.device.type == "cpu"
        and grad_loss.numel() == 1
        and grad_loss.item() == 1.0
    )


def _recompute(ctx, logits, target):
    centroids = ctx.centroids
    if centroids is not None and centroids._version != ctx.centroids_version:
        raise RuntimeError(
            "mcmi: the centroids were modified in place after the forward pass (an 'ema' "
            "update), so this graph cannot be backpropagated a second time"
        )
    return torch.ops.mcmi.loss(logits, target, centroids, *ctx.args[:-1], True)[1]


def _loss_backward(ctx, grad_loss, _unused):
    if grad_loss is None:
        return (None,) * 12
    grad, logits, target = ctx.saved_tensors
    tracing = type(grad_loss) is not Tensor
    if not ctx.args.with_grad or (ctx.unit_grad_used and not tracing):
        # No gradient was kept, or a previous backward consumed it.
        grad = _recompute(ctx, logits, target)
    ctx.unit_grad_used = True
    scale = grad_loss.to(grad.dtype)
    if tracing:
        grad = grad * (scale.unsqueeze(1) if scale.dim() == 1 else scale)
    elif not _is_eager_unit(grad_loss):
        torch.ops.mcmi.scale_grad_(grad, scale)
    args = ctx.args
    if ctx.centroids is None and args.reduction == REDUCTIONS["none"] and args.cmi_weight != 0:
        # In-batch centroids with per-row outputs: the path through the
        # centroids no longer cancels (see docs/math.md).
        grad = grad + _batch_centroid_path(logits, target, grad_loss, ctx.args).to(grad.dtype)
    return (grad,) + (None,) * 11


torch.library.register_autograd("mcmi::loss", _loss_backward, setup_context=_loss_setup_context)


# torch.library's own autograd wrapper uses this guard; without it (a future
# torch), dispatch still works, only through the Python autograd kernel.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class _EagerLoss(torch.autograd.Function):
    """The registered autograd formula of mcmi::loss (same setup_context and
    backward) as a plain autograd.Function: in eager mode it costs a fraction
    of torch.library's per-call autograd wrapper. Traced calls use the op.

    The op is dispatched below the autograd key (as torch.library does inside
    its own wrapper), straight to the kernel rather than through its Python
    autograd registration."""

    @staticmethod
    def forward(ctx, *args):
        with _below_autograd():
            output = torch.ops.mcmi.loss.default(*args)
        _loss_setup_context(ctx, args, output)
        return output

    backward = staticmethod(_loss_backward)


def compute_dtype(logits: Tensor) -> torch.dtype:
    """Dtype the kernels work in (and centroids must have) for these logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def prepare_centroids(centroids: Tensor | None, logits: Tensor) -> Tensor | None:
    """Centroids as the kernels take them, in the compute dtype (constants:
    the ops give them no gradient)."""
    if centroids is None:
        return None
    if not isinstance(centroids, Tensor):
        raise TypeError(f"centroids must be a Tensor or None, got {type(centroids).__name__}")
    if not centroids.is_floating_point():
        raise TypeError(f"centroids must be a floating-point tensor, got {centroids.dtype}")
    return centroids.to(compute_dtype(logits))


def check_reduction(reduction: str) -> int:
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}"
        ) from None


def check_positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def loss(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None,
    *,
    ce_weight: float,
    cmi_weight: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    num_classes: int | None = None,
    log_centroids: bool = False,
) -> Tensor:
    """``ce_weight * CE + cmi_weight * CMI`` through the fused op. With
    ``log_centroids``, ``centroids`` holds ``log max(Q, CENTROID_FLOOR)``."""
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be tensors")
    code = check_reduction(reduction)
    temperature = check_positive_finite("temperature", temperature)
    q = prepare_centroids(centroids, logits)
    if num_classes is None:
        num_classes = q.shape[0] if q is not None and q.dim() == 2 else logits.shape[-1]
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (
        logits,
        target,
        q,
        bool(log_centroids),
        int(num_classes),
        temperature,
        float(ce_weight),
        float(cmi_weight),
        CENTROID_FLOOR,
        int(ignore_index),
        code,
        with_grad,
    )
    if with_grad and not torch.compiler.is_compiling():
        return _EagerLoss.apply(*args)[0]
    return torch.ops.mcmi.loss.default(*args)[0]


def class_sums(
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    log_probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``softmax(logits / T)`` rows (``log_softmax`` rows
    with ``log_probs=True``) and per-class counts, over rows whose label is
    not ``ignore_index``. Returns ``(sums [K, C], counts [K])``; sums are
    float64 for float64 logits and float32 otherwise. No gradient."""
    temperature = check_positive_finite("temperature", temperature)
    return torch.ops.mcmi.class_sums(
        logits.detach(), target, int(num_classes), temperature, int(ignore_index), bool(log_probs)
    )
