"""mcmi-torch: MCMI losses for training knowledge-distillation teachers.

    loss = F.cross_entropy(logits, y) + lam * mcmi_torch.mcmi(logits, y, centroids=Q)
    criterion = mcmi_torch.MCMILoss(lam=0.25, centroids=Q)

The kernels are C (CPU, OpenMP) and CUDA behind stable-ABI custom ops in the
``mcmi`` namespace (``torch.ops.mcmi.loss``, ``.scale_grad_``, ``.class_sums``,
``.ema_update_``). Submodules: ``metrics`` (teacher CMI, NCMI), ``mimkd`` (a
student loss), and, imported on first access (``mcmi_torch.pid``), ``pid``
(needs the ``[pid]`` extra) and ``integrations`` (torchdistill).
"""

import importlib

import torch  # noqa: F401  (torch's libraries and OpenMP runtime load first)

from ._imports import check_extension_built, check_requirements

try:
    check_requirements()  # before the extension, whose own error would be a symbol's
    from . import _C  # noqa: F401  (the kernels and the torch.ops.mcmi schemas)
except ImportError as error:
    check_extension_built(error)
    raise

from . import _isa, metrics, mimkd, reference
from ._args import CENTROID_FLOOR
from ._isa import cpu_isa
from .centroids import estimate_centroids
from .functional import class_sums, cmi, mcmi
from .guard import CollapseWarning, suggest_lambda
from .loss import MCMILoss

# MCMI_TORCH_CPU_ISA, read once: the CPU kernels' instruction set.
_isa.apply_env()

__version__ = "0.1.0"

__all__ = [
    "CENTROID_FLOOR",
    "CollapseWarning",
    "MCMILoss",
    "class_sums",
    "cmi",
    "cpu_isa",
    "estimate_centroids",
    "mcmi",
    "metrics",
    "mimkd",
    "reference",
    "suggest_lambda",
]

_LAZY_SUBMODULES = ("integrations", "pid")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
