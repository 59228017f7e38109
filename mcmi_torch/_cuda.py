"""The CUDA kernels: a separate extension, ``_C_cuda``, linked against torch's
CUDA libraries. It is imported only when torch has CUDA, so that the core
extension ``_C`` (schemas and CPU kernels) and one install also serve a torch
without CUDA. Where the CUDA kernels are not loaded, the ops' CUDA kernels are
stand-ins that raise an error saying why and how to rebuild, instead of the
dispatcher's "Could not run ... with arguments from the 'CUDA' backend"."""

from __future__ import annotations

import importlib
import warnings

import torch

#: The ops of the ``mcmi`` namespace (csrc/library.cpp).
OPS = ("loss", "scale_grad_", "class_sums", "ema_update_")


def load() -> str | None:
    """Imports ``_C_cuda``, which registers the CUDA kernels of the ops, when
    torch has CUDA; returns None when it did, else why not."""
    if torch.version.cuda is None:
        return "torch has no CUDA"
    name = f"{__package__}._C_cuda"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        return "it was built without them (torch was not a CUDA build, or nvcc was not found)"
    except ImportError as error:
        warnings.warn(f"mcmi_torch: the CUDA kernels failed to load: {error}", stacklevel=2)
        return f"they failed to load ({error})"
    return None


def _refusal(op: str, reason: str):
    message = (
        f"mcmi::{op} got a CUDA tensor, but this mcmi_torch has no CUDA kernels: {reason}. "
        f"Rebuild it against this torch ({torch.__version__}) with nvcc found (on PATH, or "
        "CUDA_HOME set to the CUDA toolkit's root): FORCE_CUDA=1 pip install "
        "--no-build-isolation --no-deps --force-reinstall <mcmi-torch source>"
    )

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    return refuse


def _register_refusals(reason: str) -> torch.library.Library:
    library = torch.library.Library("mcmi", "IMPL")
    for op in OPS:
        library.impl(op, _refusal(op, reason), "CUDA")
    return library


_MISSING = load()
#: Whether the CUDA kernels are loaded.
CUDA_KERNELS = _MISSING is None
# Kept alive: the registrations last as long as the Library object.
_STAND_INS = None if CUDA_KERNELS else _register_refusals(_MISSING)
