"""The CUDA kernels: a separate extension, ``_C_cuda``, linked against torch's
CUDA libraries. It is imported only when torch has CUDA of the major it was
built for, so that the core extension ``_C`` (schemas and CPU kernels) and one
install also serve a torch without CUDA or with another CUDA major (where the
library's CUDA runtime is missing, or is not torch's). Where the CUDA kernels
are not loaded, the ops' CUDA kernels are stand-ins that raise an error saying
why and how to build for this torch, instead of the dispatcher's "Could not
run ... with arguments from the 'CUDA' backend"."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re
import warnings

import torch

#: The ops of the ``mcmi`` namespace (csrc/library.cpp).
OPS = ("loss", "scale_grad_", "class_sums", "ema_update_")

#: The CUDA runtime a library links (``libcudart.so.13``; a name auditwheel
#: grafted carries a hash), as the dynamic section's string table holds it.
_CUDART = re.compile(rb"libcudart(?:-[0-9a-f]+)?\.so\.(\d+)\x00")


def library_cuda_major(path: str) -> str | None:
    """The CUDA major the library at ``path`` was built for ("13"), read from
    the file without loading it: that of the CUDA runtime it links; None where
    it names none."""
    found = _CUDART.search(pathlib.Path(path).read_bytes())
    return None if found is None else found.group(1).decode()


def load() -> str | None:
    """Imports ``_C_cuda``, which registers the CUDA kernels of the ops, when
    torch has CUDA of the major the library was built for; returns None when
    it did, else why not."""
    if torch.version.cuda is None:
        return "torch has no CUDA"
    name = f"{__package__}._C_cuda"
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "it was built without them (torch was not a CUDA build, or nvcc was not found)"
    built = library_cuda_major(spec.origin)
    if built not in (None, torch.version.cuda.split(".")[0]):
        return (
            f"they are built for CUDA {built} and torch {torch.__version__} is a CUDA "
            f"{torch.version.cuda} build"
        )
    try:
        importlib.import_module(name)
    except ImportError as error:
        warnings.warn(f"mcmi_torch: the CUDA kernels failed to load: {error}", stacklevel=2)
        return f"they failed to load ({error})"
    return None


def _refusal(op: str, reason: str):
    if torch.version.cuda is None:
        toolkit = "a CUDA build of torch and an nvcc of its CUDA major"
    else:
        toolkit = f"an nvcc of CUDA {torch.version.cuda.split('.')[0]}, torch's CUDA major,"
    message = (
        f"mcmi::{op} got a CUDA tensor, but this mcmi_torch has no CUDA kernels: {reason}. "
        f"Build it from source for this torch ({torch.__version__}) with {toolkit} found (on "
        "PATH, or CUDA_HOME set to the CUDA toolkit's root): FORCE_CUDA=1 pip install "
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
