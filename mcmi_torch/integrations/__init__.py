"""Hooks into other distillation frameworks, imported only on demand.

* :mod:`mcmi_torch.integrations.torchdistill`: importing it registers the losses below with
  torchdistill (name it under ``dependencies`` in a torchdistill config).
* :mod:`mcmi_torch.integrations.mdistiller`: an ``MCMI`` distiller and a launcher for
  mdistiller's ``tools/train.py`` (``python -m mcmi_torch.integrations.mdistiller``).
"""

from __future__ import annotations

import torch

from ..loss import MCMILoss


def mcmi_loss_from_file(centroids_path: str, **kwargs) -> MCMILoss:
    """``MCMILoss`` with fixed centroids loaded from a ``torch.save``-d tensor (or a
    checkpoint dict holding one under ``'centroids'``); keyword arguments as in
    ``MCMILoss``. Lets a YAML config name fixed centroids by path."""
    q = torch.load(centroids_path, map_location="cpu", weights_only=True)
    if isinstance(q, dict):
        q = q["centroids"]
    return MCMILoss(centroids=q, **kwargs)


def register_torchdistill() -> None:
    """Registers ``MCMILoss`` and ``MCMILossFromFile`` (:func:`mcmi_loss_from_file`) as
    torchdistill low-level losses, so a YAML config can name them under ``key``.
    Calling it again is harmless. Raises ImportError if torchdistill is not installed."""
    try:
        from torchdistill.losses.registry import register_low_level_loss
    except ImportError as exc:
        raise ImportError(
            "register_torchdistill needs torchdistill: `pip install torchdistill`"
        ) from exc

    register_low_level_loss(key="MCMILoss")(MCMILoss)
    register_low_level_loss(key="MCMILossFromFile")(mcmi_loss_from_file)
