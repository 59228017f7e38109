"""The CUDA kernels: a separate extension, ``_C_cuda``, linked against torch's
CUDA libraries. It is imported only when torch has CUDA, so that the core
extension ``_C`` (schemas and CPU kernels) and one install also serve a torch
without CUDA."""

from __future__ import annotations

import importlib

import torch


def load() -> bool:
    """Imports ``_C_cuda``, which registers the CUDA kernels of the ops, when
    torch has CUDA and the extension was built; says whether it did."""
    if torch.version.cuda is None:
        return False
    name = f"{__package__}._C_cuda"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return False
    return True


CUDA_KERNELS = load()
