"""Argument conversion for the ``torch.ops.mcmi`` ops: Python values (ints,
reals, reduction strings, centroid tensors) turned into what the op schemas
take, with errors that name the argument. The C++ shim validates tensors and
numeric ranges again when an op runs; the checks here are the ones that must
surface before a trace, or name a Python-level argument."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor
from torch.autograd import forward_ad

#: ``reduction`` string -> the integer code the ops take.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

#: Centroid entries are clamped from below to this value before the log, so
#: that ``log Q`` stays finite (docs/math.md, "The floor on `Q`").
CENTROID_FLOOR = 1e-12

_INT64 = (-(1 << 63), (1 << 63) - 1)

# Under autocast, mcmi::loss runs in float32 as F.cross_entropy does.
_AUTOCAST_CAST = (torch.float16, torch.bfloat16)


#: Why TorchScript cannot take the losses, and what to use instead.
TORCHSCRIPT_UNSUPPORTED = (
    "mcmi_torch does not support TorchScript (torch.jit.script, torch.jit.trace): its ops carry "
    "their autograd formula in Python; use torch.compile, or torch.export for a graph"
)


def unscriptable(function):
    """``function``, marked so that ``torch.jit.script`` of it, or of code
    that calls it, raises :data:`TORCHSCRIPT_UNSUPPORTED`: TorchScript
    compiles a function's body before any check in it runs, but first calls
    the function's ``__prepare_scriptable__``."""

    def prepare_scriptable():
        raise RuntimeError(TORCHSCRIPT_UNSUPPORTED)

    function.__prepare_scriptable__ = prepare_scriptable
    return function


def refuse_torchscript() -> None:
    """Raises under ``torch.jit.trace``, which would record the op without
    its Python autograd formula."""
    if torch.jit.is_tracing():
        raise RuntimeError(TORCHSCRIPT_UNSUPPORTED)


def compute_dtype(logits: Tensor) -> torch.dtype:
    """Dtype the kernels work in (and centroids must have) for these logits."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def autocast_float32(logits: Tensor) -> Tensor:
    """``logits`` cast to float32 when they are 16-bit and autocast is enabled
    for their device (what autocast does to the inputs of F.cross_entropy);
    otherwise ``logits`` themselves."""
    if logits.dtype in _AUTOCAST_CAST and torch.is_autocast_enabled(logits.device.type):
        return logits.float()
    return logits


def has_tangent(tensor: Tensor) -> bool:
    """True for a dual tensor of forward-mode AD (``torch.autograd.forward_ad``)."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(tensor).tangent is not None


def prepare_centroids(centroids: Tensor | None, logits: Tensor) -> Tensor | None:
    """Centroids as the kernels take them, in the compute dtype. They are
    constants: centroids that ask for a gradient or carry a tangent are
    refused rather than given a zero one."""
    if centroids is None:
        return None
    if not isinstance(centroids, Tensor):
        raise TypeError(f"centroids must be a Tensor or None, got {type(centroids).__name__}")
    if not centroids.is_floating_point():
        raise TypeError(f"centroids must be a floating-point tensor, got {centroids.dtype}")
    if (torch.is_grad_enabled() and centroids.requires_grad) or has_tangent(centroids):
        raise ValueError(
            "centroids are used as constants, so no gradient or tangent flows to them, but "
            "these require one; pass centroids.detach() (mcmi_torch.reference.cmi "
            "differentiates through them)"
        )
    return centroids.to(compute_dtype(logits))


def check_tensors(**tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def check_reduction(reduction: str) -> int:
    """The op's code for ``reduction``."""
    try:
        return REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}"
        ) from None


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


def class_means(sums: Tensor, counts: Tensor) -> Tensor:
    """Class centroids ``[K, C]`` from per-class sums ``[K, C]`` and counts
    ``[K]``: each class's mean row, a zero row for a class with no sample
    (docs/math.md, "Where the centroids come from")."""
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
