"""mcmi-torch: MCMI losses for training knowledge-distillation teachers.

    loss = F.cross_entropy(logits, y) + lam * mcmi_torch.mcmi(logits, y, centroids=Q)
    criterion = mcmi_torch.MCMILoss(lam=0.25, centroids=Q)

The kernels are C (CPU, OpenMP) and CUDA behind stable-ABI custom ops in the
``mcmi`` namespace (``torch.ops.mcmi.loss``, ``.scale_grad_``, ``.class_sums``,
``.ema_update_``). Submodules: ``metrics`` (teacher CMI, NCMI), ``mimkd`` (a
student loss), and, imported on demand, ``pid`` (needs the ``[pid]`` extra)
and ``integrations`` (torchdistill).
"""

import torch  # noqa: F401  (torch's libraries and OpenMP runtime load first)

from . import metrics, mimkd, reference
from ._ops import CENTROID_FLOOR, class_sums
from .centroids import estimate_centroids
from .functional import cmi, mcmi
from .guard import CollapseWarning, suggest_lambda
from .loss import MCMILoss

__version__ = "0.1.0"

__all__ = [
    "CENTROID_FLOOR",
    "CollapseWarning",
    "MCMILoss",
    "class_sums",
    "cmi",
    "estimate_centroids",
    "mcmi",
    "metrics",
    "mimkd",
    "reference",
    "suggest_lambda",
]
