"""Import errors that say what to do: a Python or torch older than the
binaries' floor names the requirement, an optional dependency names the extra
that installs it, and a source tree without the compiled extension says how
to build it or where to run from."""

from __future__ import annotations

import importlib
import importlib.machinery
import pathlib
import sys
from types import ModuleType

import torch

#: The oldest Python and torch the binaries load on: the CPython limited API
#: and the LibTorch stable ABI versions they are built for (setup.py).
PYTHON_FLOOR = (3, 10)
TORCH_FLOOR = "2.10"


def check_requirements() -> None:
    """Raises an ImportError naming the requirement when Python or torch is
    older than the floor the extensions are built for (their own failure
    would be an undefined symbol)."""
    if sys.version_info < PYTHON_FLOOR:
        raise ImportError(
            f"mcmi-torch needs Python >= {PYTHON_FLOOR[0]}.{PYTHON_FLOOR[1]}; "
            f"this is Python {sys.version.split()[0]}"
        )
    if torch.torch_version.TorchVersion(torch.__version__) < TORCH_FLOOR:
        raise ImportError(
            f"mcmi-torch needs torch >= {TORCH_FLOOR} (the LibTorch stable ABI version its "
            f"extensions are built for); this is torch {torch.__version__}: "
            f'pip install "torch>={TORCH_FLOOR}"'
        )


def import_extra(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, raising an ImportError that names
    the ``pip install "mcmi-torch[extra]"`` bringing it when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module != missing and not module.startswith(missing + "."):
            raise
        raise ModuleNotFoundError(
            f"{module} is not installed; it comes with the [{extra}] extra: "
            f'pip install "mcmi-torch[{extra}]"',
            name=error.name,
        ) from error


def check_extension_built(error: ImportError) -> None:
    """Called when ``from . import _C`` failed: if the package directory holds
    no compiled extension, raises an ImportError that says why (a source tree
    on ``sys.path``, typically the clone root of a non-editable install, shadows
    the installed package) instead of Python's circular-import message."""
    package = pathlib.Path(__file__).resolve().parent
    built = any(
        (package / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )
    if not built:
        raise ImportError(
            f"mcmi_torch was imported from {package}, a source tree without the compiled "
            "extension (_C): running Python from the root of a clone puts its mcmi_torch/ "
            "ahead of the installed package. Run from another directory, or build the "
            "extension in this tree with `pip install --no-build-isolation -e .`"
        ) from error
