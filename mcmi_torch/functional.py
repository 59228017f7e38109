"""Functional form of the CMI estimate and of the MCMI regularizer, the
per-class sums, and ``loss``: the one entry point into ``mcmi::loss`` that the
public API goes through."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _args, _ops


@_args.unscriptable
def flatten_classes(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, torch.Size | None]:
    """Logits and targets as the fused op takes them, as ``nn.CrossEntropyLoss``
    reads them: ``[N, C, d1, ...]`` logits with ``[N, d1, ...]`` targets become
    ``[N * d1 * ..., C]`` rows (class dim moved last) and ``[N * d1 * ...]``
    labels; ``[C]`` logits with a 0-D target become one row. Also returns the
    shape of a per-element result (``None`` for ``[B, C]`` input).

    Raises on class-probability (floating-point) targets, which these losses
    do not take: the CMI term conditions on each sample's class."""
    _args.check_tensors(logits=logits, target=target)
    if target.is_floating_point():
        raise TypeError(
            f"target is {target.dtype}: class-probability targets, which nn.CrossEntropyLoss "
            "accepts, are not supported (the CMI term conditions on each sample's class); "
            "pass int64 class indices"
        )
    if logits.dim() == 2:
        return logits, target, None
    if logits.dim() == 1:
        if target.dim() != 0:
            raise ValueError(
                f"for 1-D logits [C] target must be 0-D, got shape {list(target.shape)}"
            )
        return logits.unsqueeze(0), target.unsqueeze(0), target.shape
    if logits.dim() == 0:
        raise ValueError("logits must be [N, C], [C] or [N, C, d1, ...], got a 0-D tensor")
    expected = [logits.shape[0], *logits.shape[2:]]
    if list(target.shape) != expected:
        raise ValueError(
            f"for logits of shape {list(logits.shape)} ([N, C, d1, ...]) target must have "
            f"shape {expected} ([N, d1, ...]), got {list(target.shape)}"
        )
    rows = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    return rows, target.reshape(-1), target.shape


def unflatten(value: Tensor, shape: torch.Size | None) -> Tensor:
    """A per-row result back in the shape of the targets (see flatten_classes);
    reduced (0-D) results unchanged."""
    return value if shape is None or value.dim() == 0 else value.reshape(shape)


def _cmi_term(logits, target, centroids, cmi_weight, temperature, ignore_index, reduction):
    rows, labels, shape = flatten_classes(logits, target)
    value = loss(
        rows,
        labels,
        centroids,
        ce_weight=0.0,
        cmi_weight=cmi_weight,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return unflatten(value, shape)


@_args.unscriptable
def cmi(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Conditional mutual information estimate :math:`I(X; \hat Y \mid Y)`.

    For each sample ``i`` whose label is not ``ignore_index``,
    ``KL_i = KL(softmax(logits_i / T) || Q[target_i])``; the result is their
    mean (``reduction='mean'``), sum (``'sum'``) or the vector of them with 0
    at ignored rows (``'none'``). With no valid row the mean is 0.

    Args:
        logits: ``[B, C]`` float32, float64, bfloat16 or float16; also
            ``[N, C, d1, ...]`` (or ``[C]``) as ``nn.CrossEntropyLoss`` takes
            them: every position is a sample, the class dim is dim 1.
        target: ``[B]`` int64 labels in ``[0, K)`` or ``ignore_index``
            (``[N, d1, ...]`` for ``[N, C, d1, ...]`` logits, 0-D for ``[C]``).
        centroids: ``[K, C]`` class centroids whose rows are probability
            vectors (e.g. from :func:`mcmi_torch.estimate_centroids`), used as
            constants (centroids that require grad or carry a forward-mode
            tangent raise ``ValueError``); or ``None`` for in-batch centroids (the mean softmax of
            each class present in the batch, ``K = C``). Entries are clamped
            from below by :data:`mcmi_torch.CENTROID_FLOOR` before the log.
            Rows that do not sum to 1 (within 1e-3) raise an error.
        temperature: softmax temperature ``T > 0``, at least ``1 / finfo.max``
            of the compute dtype (about 2.9e-39 for float32, bfloat16 and
            float16 logits; 5.6e-309 for float64), below which ``1 / T``
            overflows: smaller values raise ``ValueError``.
        ignore_index: label value of rows to skip (an int within int64).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A 0-D tensor (or the shape of ``target`` for ``'none'``) in the dtype
        of ``logits``; float32 under ``torch.autocast`` for 16-bit logits, as
        ``F.cross_entropy``. Differentiable with respect to ``logits``, twice
        as well: ``backward(create_graph=True)`` gives a gradient autograd can
        differentiate again (a gradient penalty, a Hessian-vector product);
        forward mode (``torch.func.jvp``, ``jacfwd``, dual numbers) too.
    """
    return _cmi_term(logits, target, centroids, 1.0, temperature, ignore_index, reduction)


@_args.unscriptable
def mcmi(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The MCMI regularizer, ``-cmi(...)``: a term to *minimize*, so that

    ``loss = F.cross_entropy(logits, y) + lam * mcmi(logits, y, centroids=Q)``

    trains a teacher that maximizes its conditional mutual information.
    Arguments and return value as in :func:`cmi`.
    """
    return _cmi_term(logits, target, centroids, -1.0, temperature, ignore_index, reduction)


@_args.unscriptable
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
    logits and ``[B]`` targets as :func:`flatten_classes` returns them (float32
    under autocast). With ``log_centroids``, ``centroids`` holds
    ``log max(Q, CENTROID_FLOOR)``."""
    _args.refuse_torchscript()
    logits = _args.autocast_float32(logits)
    code = _args.check_reduction(reduction)
    temperature = _args.check_temperature(temperature, logits)
    ignore_index = _args.check_int("ignore_index", ignore_index)
    centroids = _args.prepare_centroids(centroids, logits)
    if num_classes is None:
        has_rows = centroids is not None and centroids.dim() == 2
        num_classes = centroids.shape[0] if has_rows else logits.shape[-1]
    functorch = torch._C._are_functorch_transforms_active()
    # Forward mode (whatever the grad mode) goes through the autograd.Function,
    # whose jvp carries the tangent.
    tangent = _ops.needs_tangent(logits, functorch)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    args = _ops._LossArgs(
        bool(log_centroids),
        _args.check_int("num_classes", num_classes),
        temperature,
        _args.check_real("ce_weight", ce_weight),
        _args.check_real("cmi_weight", cmi_weight),
        _args.CENTROID_FLOOR,
        ignore_index,
        code,
        with_grad,
    )
    compiling = torch.compiler.is_compiling()
    if tangent or ((with_grad or functorch) and not compiling):
        # Under torch.func transforms, also without a gradient: vmap then
        # takes the _FuncLoss rule, one kernel call per problem.
        function = _ops._FuncLoss if functorch else _ops._EagerLoss
        return function.apply(logits, target, centroids, args)[0]
    return torch.ops.mcmi.loss.default(logits, target, centroids, *args)[0]


@_args.unscriptable
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
    _args.check_tensors(logits=logits, target=target)
    return torch.ops.mcmi.class_sums(
        logits.detach(),
        target,
        _args.check_int("num_classes", num_classes),
        _args.check_temperature(temperature, logits),
        _args.check_int("ignore_index", ignore_index),
        bool(log_probs),
    )
