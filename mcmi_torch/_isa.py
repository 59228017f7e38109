"""The instruction set of the CPU kernels: the best this CPU runs, or the one the
``MCMI_TORCH_CPU_ISA`` environment variable names (read once, at import). All of
them compute bitwise the same results; they differ in speed only."""

from __future__ import annotations

import os

from . import _C

#: The environment variable that forces an instruction set.
ENV = "MCMI_TORCH_CPU_ISA"


def apply_env() -> None:
    """Runs the CPU kernels in the instruction set ``MCMI_TORCH_CPU_ISA`` names, if
    set and not empty; raises ValueError, naming the variable and what this CPU
    runs, for a value that is unknown or that this CPU (or this build) cannot run."""
    value = os.environ.get(ENV, "")
    if not value:
        return
    isas = _C.cpu_isas()
    runs = ", ".join(repr(name) for name, ok in isas.items() if ok)
    if value not in isas:
        known = ", ".join(repr(name) for name in isas)
        raise ValueError(
            f"{ENV}={value!r} is not an instruction set of the CPU kernels: use one of "
            f"{known} (this CPU runs {runs}), or leave it unset for the best this CPU runs"
        )
    if not isas[value]:
        raise ValueError(
            f"{ENV}={value!r}: this CPU cannot run the kernels' {value} build (it runs {runs})"
        )
    _C.set_cpu_isa(value)


def cpu_isa() -> str:
    """The instruction set the CPU kernels run: ``'avx512'`` (x86-64-v4),
    ``'avx2'`` (x86-64-v3: AVX2 and FMA) or ``'baseline'`` (x86-64, or any other
    CPU). By default the best this CPU runs; the environment variable
    ``MCMI_TORCH_CPU_ISA`` set to one of these names before ``import mcmi_torch``
    forces it. Every choice gives bitwise the same results."""
    return _C.cpu_isa()
