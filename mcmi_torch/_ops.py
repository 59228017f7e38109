"""Registration of the ``torch.ops.mcmi`` ops with autograd and torch.compile,
and the one internal entry point the public API goes through.

The forward op computes the loss and, when a gradient will be needed, the
gradient for a unit upstream gradient in the same pass over the logits. The
first backward scales that saved gradient in place (or not at all when the
upstream gradient is exactly 1 on the CPU) and hands it on, so forward +
backward hold a single logits-sized buffer. A later backward through the same
graph (``retain_graph=True``) recomputes the gradient from the saved inputs,
so every backward gives the same result. A backward with ``create_graph=True``
computes the gradient with differentiable torch ops instead, so that second
derivatives (a gradient penalty, a Hessian-vector product) are exact.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
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


def _version(tensor: Tensor | None) -> int:
    """Version counter of a tensor; 0 for None and for inference tensors,
    which have none (and cannot be modified outside inference mode)."""
    return 0 if tensor is None or tensor.is_inference() else tensor._version


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
    ctx.centroids_version = _version(centroids)
    ctx.save_for_backward(grad, logits, target)


def _class_means(p, y, valid, num_classes):
    """In-batch centroids ``[K, C]`` (mean of the rows ``p`` of each class,
    differentiable) and the class counts clamped to >= 1, as a ``[K, 1]``
    column."""
    sums = p.new_zeros(num_classes, p.shape[1]).index_add(0, y[valid], p[valid])
    counts = torch.bincount(y[valid], minlength=num_classes).clamp_min(1).unsqueeze(1)
    return sums / counts, counts


def _batch_centroid_path(logits, target, weight, args):
    """Gradient that flows through in-batch centroids when the per-row
    upstream weights differ within a class (zero when they are equal).
    Differentiable torch ops throughout."""
    num_classes, temperature, floor = args.num_classes, args.temperature, args.floor
    dtype = compute_dtype(logits)
    p = torch.softmax(logits.to(dtype) / temperature, dim=1)
    valid = target != args.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    w = torch.where(valid, weight.to(dtype), torch.zeros_like(p[:, 0]))
    q, counts = _class_means(p, y, valid, num_classes)
    live = (q >= floor).to(dtype)
    a = p.new_zeros(q.shape).index_add(0, y, w.unsqueeze(1) * p / q.clamp_min(floor)[y])
    v = (-args.cmi_weight * live * a / counts)[y] * valid.unsqueeze(1).to(dtype)
    return p * (v - (p * v).sum(dim=1, keepdim=True)) / temperature


def _saved_centroids(ctx, create_graph):
    """The centroids the forward used, unless an 'ema' update has overwritten
    them since (their version counter records it)."""
    centroids = ctx.centroids
    if _version(centroids) != ctx.centroids_version:
        if create_graph:
            raise RuntimeError(
                "mcmi: double backward (create_graph=True) needs the centroids of the forward "
                "pass, but they were updated in place since (an 'ema' update); for a "
                "differentiable gradient pass a copy of them as constants, e.g. "
                "mcmi_torch.cmi(logits, target, criterion.centroids.clone())"
            )
        raise RuntimeError(
            "mcmi: the centroids were modified in place after the forward pass (an 'ema' "
            "update), so this graph cannot be backpropagated a second time"
        )
    return centroids


def _graph_grad(ctx, logits, target, grad_loss):
    """The gradient for ``grad_loss`` as differentiable torch ops, for a
    backward with ``create_graph=True``: the formula of docs/math.md with the
    path through in-batch centroids, so that autograd can differentiate it
    with respect to the logits (through the centroids too) and ``grad_loss``."""
    args = ctx.args
    centroids = _saved_centroids(ctx, create_graph=True)
    dtype = compute_dtype(logits)
    z = logits.to(dtype)
    valid = target != args.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    weight = grad_loss.to(dtype).expand(z.shape[0]) * valid.to(dtype)
    if args.reduction == REDUCTIONS["mean"]:
        weight = weight / valid.sum().clamp_min(1).to(dtype)
    log_p = torch.log_softmax(z / args.temperature, dim=1)
    p = log_p.exp()
    if centroids is None:
        log_q = _class_means(p, y, valid, args.num_classes)[0].clamp_min(args.floor).log()
    elif args.log_centroids:
        log_q = centroids
    else:
        log_q = centroids.clamp_min(args.floor).log()
    d = log_p - log_q[y]
    grad = args.cmi_weight / args.temperature * p * (d - (p * d).sum(dim=1, keepdim=True))
    if args.ce_weight != 0:
        one_hot = torch.nn.functional.one_hot(y, z.shape[1]).to(dtype)
        grad = grad + args.ce_weight * (torch.softmax(z, dim=1) - one_hot)
    grad = grad * weight.unsqueeze(1)
    if centroids is None and args.cmi_weight != 0:
        grad = grad + _batch_centroid_path(logits, target, weight, args)
    return grad.to(logits.dtype)


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
    centroids = _saved_centroids(ctx, create_graph=False)
    return torch.ops.mcmi.loss(logits, target, centroids, *ctx.args[:-1], True)[1]


def _loss_backward(ctx, grad_loss, _unused):
    if grad_loss is None:
        return (None,) * 12
    grad, logits, target = ctx.saved_tensors
    tracing = type(grad_loss) is not Tensor
    if torch.is_grad_enabled() and not tracing:
        # create_graph=True: a gradient autograd can differentiate again.
        return (_graph_grad(ctx, logits, target, grad_loss),) + (None,) * 11
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


# Under autocast, mcmi::loss runs in float32 as F.cross_entropy does (autocast's
# fp32 list): 16-bit floating inputs are cast to float32, so the loss comes back
# in float32 and the cast's backward returns the gradient in the logits' dtype.
# The Python entry point casts before the op (so eager calls and torch.compile
# trace the same cast); these rules cover direct calls of the op.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("mcmi::loss", _device_type, torch.float32)

_AUTOCAST_CAST = (torch.float16, torch.bfloat16)


def autocast_float32(logits: Tensor) -> Tensor:
    """``logits`` cast to float32 when they are 16-bit and autocast is enabled
    for their device (what autocast does to the inputs of F.cross_entropy);
    otherwise ``logits`` themselves."""
    if logits.dtype in _AUTOCAST_CAST and torch.is_autocast_enabled(logits.device.type):
        return logits.float()
    return logits


class _FuncLoss(torch.autograd.Function):
    """``_EagerLoss`` with a separate ``setup_context``, the form that
    ``torch.func`` transforms (``grad``, ``vjp``) require; slower per call,
    so used only under them."""

    @staticmethod
    def forward(*args):
        with _below_autograd():
            return torch.ops.mcmi.loss.default(*args)

    setup_context = staticmethod(_loss_setup_context)
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


def check_tensors(**tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def check_reduction(reduction: str) -> int:
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}"
        ) from None


_INT64 = (-(1 << 63), (1 << 63) - 1)


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int: an int or integer scalar (numpy, 0-D integer
    tensor), never a bool or a float (nothing is truncated), within int64 and
    at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not _INT64[0] <= number <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_real(name: str, value) -> float:
    """``value`` as a Python float: a real number (int, float, numpy scalar),
    never a bool, a string or a tensor."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (use .item())" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    return float(value)


def check_positive_finite(name: str, value: float) -> float:
    value = check_real(name, value)
    if torch.compiler.is_compiling():
        # Possibly symbolic (dynamic shapes): the op checks it when it runs.
        return value
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_temperature(temperature: float, logits: Tensor) -> float:
    """A finite ``temperature > 0`` whose reciprocal the compute dtype of
    ``logits`` holds (the kernels scale by ``1 / T``): at least
    ``1 / finfo.max``, about 2.9e-39 for float32 and 5.6e-309 for float64."""
    temperature = check_positive_finite("temperature", temperature)
    dtype = compute_dtype(logits)
    if not torch.compiler.is_compiling() and not 1.0 / temperature <= torch.finfo(dtype).max:
        raise ValueError(
            f"temperature={temperature:g} is too small for {logits.dtype} logits: the kernels "
            f"compute in {dtype}, where 1 / temperature overflows; use a temperature >= "
            f"{1.0 / torch.finfo(dtype).max:.3g}"
            + (" or float64 logits" if dtype != torch.float64 else "")
        )
    return temperature


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
    """``ce_weight * CE + cmi_weight * CMI`` through the fused op, for ``[B, C]``
    logits (float32 under autocast). With ``log_centroids``, ``centroids``
    holds ``log max(Q, CENTROID_FLOOR)``."""
    check_tensors(logits=logits, target=target)
    logits = autocast_float32(logits)
    code = check_reduction(reduction)
    temperature = check_temperature(temperature, logits)
    ignore_index = check_int("ignore_index", ignore_index)
    q = prepare_centroids(centroids, logits)
    if num_classes is None:
        num_classes = q.shape[0] if q is not None and q.dim() == 2 else logits.shape[-1]
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (
        logits,
        target,
        q,
        bool(log_centroids),
        check_int("num_classes", num_classes),
        temperature,
        check_real("ce_weight", ce_weight),
        check_real("cmi_weight", cmi_weight),
        CENTROID_FLOOR,
        ignore_index,
        code,
        with_grad,
    )
    if with_grad and not torch.compiler.is_compiling():
        if torch._C._are_functorch_transforms_active():
            return _FuncLoss.apply(*args)[0]
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
    check_tensors(logits=logits, target=target)
    return torch.ops.mcmi.class_sums(
        logits.detach(),
        target,
        check_int("num_classes", num_classes),
        check_temperature(temperature, logits),
        check_int("ignore_index", ignore_index),
        bool(log_probs),
    )
