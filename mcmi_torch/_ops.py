"""Registration of the ``torch.ops.mcmi`` ops: fake kernels (torch.compile),
the autograd formula, autocast rules and the eager fast path. The entry point
the public API goes through is ``functional.loss``; argument conversion lives
in ``_args``.

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
from typing import NamedTuple

import torch
from torch import Tensor
from torch._functorch import utils as functorch_utils
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

from . import _C, _cuda  # noqa: F401  (register the ops, the CPU and CUDA kernels)
from ._args import REDUCTIONS, class_means, compute_dtype, has_tangent

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
    """The shim's bound on ``num_classes``, raised at trace time as well."""
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


def unwrapped(tensor: Tensor) -> Tensor | None:
    """The plain tensor under the wrappers of ``torch.func`` transforms
    (``grad``, ``jvp``), or ``None`` for one batched by ``vmap`` at any
    level (a ``jacfwd`` batches the tangents only, not the logits)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return None
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def physical(tensor: Tensor) -> Tensor:
    """The values of a tensor under the wrappers of ``torch.func`` transforms:
    the plain tensor, with the problems of each ``vmap`` level stacked in
    front (``[..., *tensor.shape]``)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            dim = functorch.maybe_get_bdim(tensor)
            tensor = functorch.get_unwrapped(tensor).movedim(dim, 0)
        else:
            tensor = functorch.get_unwrapped(tensor)
    return tensor


def needs_tangent(logits: Tensor, functorch: bool) -> bool:
    """True when a loss of ``logits`` must carry a forward-mode tangent: they
    are a dual tensor (``torch.autograd.forward_ad``) or a ``torch.func.jvp``
    (``jacfwd``) transform is active (``functorch``: any transform is).
    Raises for forward mode over forward mode, whose outer derivative torch
    drops for an autograd.Function."""
    if functorch:
        levels = [level.key() for level in retrieve_all_functorch_interpreters()]
        if levels.count(TransformType.Jvp) > 1:
            raise RuntimeError(
                "mcmi: forward mode over forward mode (jacfwd of jacfwd, a jvp inside a jvp) is "
                "not supported: torch drops the outer derivative of a custom autograd.Function's "
                "tangent; use torch.func.hessian (jacfwd of jacrev) or jacrev of jacfwd"
            )
        if TransformType.Jvp in levels:
            return True
    return has_tangent(logits)


def _setup(ctx, logits, target, centroids, args: _LossArgs, grad) -> None:
    """What the backward and the jvp keep of a forward call."""
    ctx.mark_non_differentiable(grad)
    # The kept gradient is an output no one differentiates: without this,
    # autograd would hand backward a zero-filled [B, C] tensor for it.
    ctx.set_materialize_grads(False)
    ctx.args = args
    ctx.unit_grad_used = False
    # Centroids are only read again if a second backward recomputes the
    # gradient; held without autograd's version check because 'ema' updates
    # them in place within the step (checked in _recompute instead).
    ctx.centroids = centroids
    ctx.centroids_version = _version(centroids)
    ctx.save_for_backward(grad, logits, target)
    ctx.save_for_forward(logits, target)


def _valid_rows(logits, target, args):
    """What the differentiable formulas read of a call: the mask of valid rows,
    the labels (ignored rows relabelled 0) and the logits in the compute dtype
    with every ignored row replaced by zeros before any arithmetic. So an
    ignored row is selected out: whatever it holds (NaN, -inf padding)
    reaches no value or derivative of any order, of any row (``torch.where``
    sends its own row exact zeros). No data-dependent shapes, so ``vmap``
    can batch it."""
    valid = target != args.ignore_index
    labels = torch.where(valid, target, torch.zeros_like(target))
    return valid, labels, _select_rows(logits.to(compute_dtype(logits)), valid)


def _select_rows(rows, valid):
    """``rows`` ``[B, C]`` with the rows outside ``valid`` set to zeros."""
    return torch.where(valid.unsqueeze(1), rows, 0.0)


def _log_softmax(rows, temperature):
    """``log softmax(rows / T)`` and its exponential, the probabilities. The
    rows are shifted by their maximum (a constant, to which the result is
    invariant) before the division, so that ``z / T`` cannot overflow where
    the loss is finite (float32 logits near 1e38 at ``T < 1``)."""
    shift = rows.detach().amax(dim=1, keepdim=True)
    log_probs = torch.log_softmax((rows - shift) / temperature, dim=1)
    return log_probs, log_probs.exp()


def _kl_terms(log_probs, probs, log_centroids):
    """``log P - log Q`` where ``P > 0``, else 0: 0 log 0 = 0 for a class of
    probability 0 (a -inf logit), with derivatives of every order that are 0
    there too (the log is replaced, never multiplied by 0)."""
    return torch.where(probs > 0, log_probs - log_centroids, 0.0)


def _batch_class_means(probs, labels, valid, num_classes):
    """In-batch centroids ``[K, C]`` (differentiable: the mean of the rows
    ``probs`` of each class) and the class counts ``[K]``, from ``labels``
    in range (ignored rows relabelled) and the mask ``valid``; no boolean
    indexing, so ``vmap`` can batch it."""
    rows = _select_rows(probs, valid)
    sums = probs.new_zeros(num_classes, probs.shape[1]).index_add(0, labels, rows)
    counts = labels.new_zeros(num_classes).index_add(0, labels, valid.to(labels.dtype))
    return class_means(sums, counts), counts


def _batch_centroid_path(logits, target, weight, args):
    """Gradient that flows through in-batch centroids when the per-row
    upstream weights differ within a class (zero when they are equal; see
    docs/math.md, "The gradient"). Differentiable torch ops throughout."""
    num_classes, temperature, floor = args.num_classes, args.temperature, args.floor
    valid, labels, rows = _valid_rows(logits, target, args)
    probs = _log_softmax(rows, temperature)[1]
    row_weight = torch.where(valid, weight.to(probs.dtype), 0.0)
    centroids, counts = _batch_class_means(probs, labels, valid, num_classes)
    live = (centroids >= floor).to(probs.dtype)
    ratio = row_weight.unsqueeze(1) * probs / centroids.clamp_min(floor)[labels]
    ratio_sums = probs.new_zeros(centroids.shape).index_add(0, labels, ratio)
    upstream = class_means(-args.cmi_weight * live * ratio_sums, counts)[labels]
    upstream = _select_rows(upstream, valid)
    return probs * (upstream - (probs * upstream).sum(dim=1, keepdim=True)) / temperature


def _batch_centroid_tangent(logits, target, tangent, args):
    """Per-row tangent of ``cmi_weight * KL_i`` through in-batch centroids
    for the logits tangent ``tangent``: ``-sum_j P_ij dQ_cj / Q_cj`` (0 where
    ``Q_cj`` is below the floor), which couples the rows of a class (see
    docs/math.md, "Forward mode"). No data-dependent shapes, so that
    ``jacfwd`` can batch the tangent."""
    num_classes, temperature, floor = args.num_classes, args.temperature, args.floor
    valid, labels, rows = _valid_rows(logits, target, args)
    probs = _log_softmax(rows, temperature)[1]
    centroids, counts = _batch_class_means(probs, labels, valid, num_classes)
    v = _select_rows(tangent.to(probs.dtype), valid)
    dprobs = probs * (v - (probs * v).sum(dim=1, keepdim=True)) / temperature
    dmeans = class_means(torch.zeros_like(centroids).index_add(0, labels, dprobs), counts)
    live = (centroids >= floor).to(probs.dtype)
    ratio = (live * dmeans / centroids.clamp_min(floor))[labels]
    rows_tangent = -args.cmi_weight * (probs * ratio).sum(dim=1)
    return torch.where(valid, rows_tangent, 0.0)


def _loss_jvp(ctx, logits_tangent, *_unused):
    """Forward mode: the tangent of the loss for a tangent ``v`` of the
    logits, ``sum_j G_ij v_ij`` with ``G`` the gradient for a unit upstream
    gradient (per row for ``'none'``), plus, for in-batch centroids and
    ``'none'``, the path through the class means. Differentiable torch ops
    (not the kernel's gradient), so that the tangent can be differentiated
    again (``jacrev`` of ``jacfwd``, the gradient of a dual tangent).
    Centroids are constants, as in the backward."""
    if logits_tangent is None:
        return None, None
    logits, target = ctx.saved_tensors
    args = ctx.args
    dtype = compute_dtype(logits)
    weight = _row_weights(args, target, torch.ones((), dtype=dtype, device=logits.device), dtype)
    grad = _local_grad(args, ctx.centroids, logits, target, weight)
    valid = target != args.ignore_index
    rows = (grad * _select_rows(logits_tangent.to(dtype), valid)).sum(dim=1)
    if args.reduction != REDUCTIONS["none"]:
        return rows.sum().to(logits.dtype), None
    if ctx.centroids is None and args.cmi_weight != 0:
        rows = rows + _batch_centroid_tangent(logits, target, logits_tangent, args)
    return rows.to(logits.dtype), None


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


def _row_weights(args, target, grad_loss, dtype):
    """Per-row weights of the loss for the upstream gradient ``grad_loss``:
    0 at ignored rows (whatever the upstream gradient holds there), divided
    by the valid-row count for ``'mean'``."""
    valid = target != args.ignore_index
    upstream = grad_loss.to(dtype).expand(target.shape[0])
    weight = torch.where(valid, upstream, 0.0)
    if args.reduction == REDUCTIONS["mean"]:
        weight = weight / valid.sum().clamp_min(1).to(dtype)
    return weight


def _local_grad(args, centroids, logits, target, weight):
    """``sum_i weight_i d loss_i / d logits`` with in-batch centroids held
    fixed (their path is _batch_centroid_path), as differentiable torch ops:
    the formula of docs/math.md ("The gradient", "Second derivatives"), so
    that autograd and forward mode can differentiate it again with respect
    to the logits (through in-batch centroids too), with the rules of the
    kernels: ignored rows selected out, 0 log 0 = 0, no overflow of z / T.
    No data-dependent shapes and no ``.item()``, so ``vmap`` can batch it."""
    valid, labels, rows = _valid_rows(logits, target, args)
    log_probs, probs = _log_softmax(rows, args.temperature)
    if centroids is None:
        means = _batch_class_means(probs, labels, valid, args.num_classes)[0]
        log_centroids = means.clamp_min(args.floor).log()
    elif args.log_centroids:
        log_centroids = centroids
    else:
        log_centroids = centroids.clamp_min(args.floor).log()
    diff = _kl_terms(log_probs, probs, log_centroids[labels])
    kl_grad = probs * (diff - (probs * diff).sum(dim=1, keepdim=True))
    grad = args.cmi_weight / args.temperature * kl_grad
    if args.ce_weight != 0:
        classes = torch.arange(rows.shape[1], device=labels.device)
        one_hot = (labels.unsqueeze(1) == classes).to(rows.dtype)
        grad = grad + args.ce_weight * (torch.softmax(rows, dim=1) - one_hot)
    return grad * weight.unsqueeze(1)


def _graph_grad(ctx, logits, target, grad_loss):
    """The gradient for ``grad_loss`` as differentiable torch ops, for a
    backward with ``create_graph=True``, with the path through in-batch
    centroids, so that autograd can differentiate it with respect to the
    logits and ``grad_loss``."""
    args = ctx.args
    centroids = _saved_centroids(ctx, create_graph=True)
    weight = _row_weights(args, target, grad_loss, compute_dtype(logits))
    grad = _local_grad(args, centroids, logits, target, weight)
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


def _logits_grad(ctx, grad_loss):
    """The gradient with respect to the logits for the upstream gradient
    ``grad_loss`` of the loss (``None`` for none)."""
    if grad_loss is None:
        return None
    grad, logits, target = ctx.saved_tensors
    tracing = type(grad_loss) is not Tensor
    if torch.is_grad_enabled() and not tracing:
        # create_graph=True: a gradient autograd can differentiate again.
        return _graph_grad(ctx, logits, target, grad_loss)
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
        # centroids no longer cancels (docs/math.md, "The gradient").
        grad = grad + _batch_centroid_path(logits, target, grad_loss, ctx.args).to(grad.dtype)
    return grad


# torch.library's own autograd wrapper uses this guard; without it (a future
# torch), dispatch still works, only through the Python autograd kernel.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class _EagerLoss(torch.autograd.Function):
    """The autograd formula of mcmi::loss as an autograd.Function. Eager
    calls apply it directly (a fraction of the cost of dispatching through the
    op's Python Autograd kernel); the op's Autograd kernel (_loss_autograd)
    applies it for the calls in graphs (torch.compile, torch.export). Its
    inputs are the op's three tensors and a ``_LossArgs`` of the rest (every
    input costs autograd time per call).

    The op is dispatched below the autograd key (as torch.library does inside
    its own wrapper), straight to the kernel rather than through its Python
    Autograd kernel."""

    @staticmethod
    def forward(ctx, logits, target, centroids, args):
        with _below_autograd():
            output = torch.ops.mcmi.loss.default(logits, target, centroids, *args)
        _setup(ctx, logits, target, centroids, args, output[1])
        return output

    @staticmethod
    def backward(ctx, grad_loss, _unused):
        return _logits_grad(ctx, grad_loss), None, None, None

    jvp = staticmethod(_loss_jvp)


# Under autocast, mcmi::loss runs in float32 as F.cross_entropy does (autocast's
# fp32 list): 16-bit floating inputs are cast to float32, so the loss comes back
# in float32 and the cast's backward returns the gradient in the logits' dtype.
# The Python entry point casts before the op (``_args.autocast_float32``, so
# eager calls and torch.compile trace the same cast); these rules cover direct
# calls of the op.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("mcmi::loss", _device_type, torch.float32)


class _FuncLoss(torch.autograd.Function):
    """``_EagerLoss`` with a separate ``setup_context`` and a ``vmap`` rule,
    the form that ``torch.func`` transforms (``grad``, ``vjp``, ``jvp``,
    ``vmap``) require; slower per call, so used only under them."""

    @staticmethod
    def forward(logits, target, centroids, args):
        with _below_autograd():
            return torch.ops.mcmi.loss.default(logits, target, centroids, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, *inputs, output[1])

    backward = staticmethod(_EagerLoss.backward)
    jvp = staticmethod(_loss_jvp)

    @staticmethod
    def vmap(info, in_dims, *args):
        """Under ``vmap`` (``jacfwd``, per-sample gradients): see _per_problem."""
        return _per_problem(_FuncLoss.apply, info, in_dims, args)


def _per_problem(call, info, in_dims, args):
    """The vmap rule of the loss: one ``call`` per batch entry of the batched
    tensors, results stacked along dim 0. (Only tensors are batched; the
    other arguments get no int dim.)"""
    if not any(isinstance(dim, int) for dim in in_dims):
        return call(*args), (None, None)
    outputs = [
        call(
            *(
                arg.select(dim, index) if isinstance(dim, int) else arg
                for arg, dim in zip(args, in_dims)
            )
        )
        for index in range(info.batch_size)
    ]
    return tuple(torch.stack(parts) for parts in zip(*outputs)), (0, 0)


# What torch.func's own rules wrap around the autograd node they apply at one
# level (a _SingleLevelFunction); without it (a future torch), applying one
# under a transform raises rather than computing anything else.
_single_level = getattr(
    functorch_utils, "enable_single_level_autograd_function", contextlib.nullcontext
)


class _GraphLoss(torch.autograd.function._SingleLevelFunction):
    """``_EagerLoss`` as an autograd node of a single level, the form torch.func
    applies for a level it has unwrapped (a plain ``autograd.Function`` would
    be handed to torch.func again: torch 2.14's ``apply`` does so in C++,
    which refuses a Function without ``setup_context``)."""

    forward = staticmethod(_EagerLoss.forward)
    backward = staticmethod(_EagerLoss.backward)
    jvp = staticmethod(_loss_jvp)


def _loss_autograd(logits, target, centroids, *args):
    """The Autograd kernel of ``mcmi::loss``, the op as graphs call it
    (``torch.compile``, a module from ``torch.export``): the
    autograd.Functions of the eager path, so that a graph's op has the same
    backward, double backward, forward mode and ``torch.func`` rules as an
    eager call (torch.library's own autograd wrapper has no forward mode and
    no ``torch.func`` support)."""
    args = _LossArgs(*args)
    functorch = torch._C._are_functorch_transforms_active()
    if needs_tangent(logits, functorch) or (torch.is_grad_enabled() and logits.requires_grad):
        # Here torch.func has already unwrapped the tensors of its level: an
        # autograd node on them is what that level differentiates, as for a
        # C++ op.
        with _single_level():
            return _GraphLoss.apply(logits, target, centroids, args)
    with _below_autograd():
        return torch.ops.mcmi.loss.default(logits, target, centroids, *args)


def _loss_vmap(info, in_dims, *args):
    """The op's vmap rule (a graph's op under ``vmap``): see _per_problem."""
    return _per_problem(torch.ops.mcmi.loss.default, info, in_dims, args)


# Kept alive: the registrations last as long as the Library object.
_GRAPH_RULES = torch.library.Library("mcmi", "IMPL")
_GRAPH_RULES.impl("loss", _loss_autograd, "Autograd")
torch.library.register_vmap("mcmi::loss", _loss_vmap, lib=_GRAPH_RULES)
