"""The binaries keep their promises: LibTorch stable ABI only, the CPython
limited API only, one exported symbol each, a single OpenMP runtime next to
torch's, and the CUDA library loaded exactly when torch has CUDA of its major."""

import importlib.machinery
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import mcmi_torch
from mcmi_torch._cuda import library_cuda_major

PACKAGE = pathlib.Path(mcmi_torch.__file__).parent


def built(name):
    """The file of the extension mcmi_torch.<name> in the package, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (PACKAGE / f"{name}{suffix}").exists():
            return PACKAGE / f"{name}{suffix}"
    return None


#: The core (schemas, CPU kernels) and, in a CUDA build, the CUDA library.
LIBRARIES = [name for name in ("_C", "_C_cuda") if built(name) is not None]

#: What each library may import from CPython: the limited API only.
LIMITED_API = {
    "_C": [
        "PyArg_ParseTuple",
        "PyBool_FromLong",
        "PyDict_New",
        "PyDict_SetItemString",
        "PyErr_Format",
        "PyExc_ValueError",
        "PyFloat_FromDouble",
        "PyModule_AddObject",
        "PyModule_Create2",
        "PyUnicode_FromString",
        "Py_DecRef",
        "_Py_NoneStruct",
    ],
    "_C_cuda": ["PyModule_Create2"],
}


@pytest.fixture(params=LIBRARIES)
def library(request):
    return request.param


def dynamic_symbols(library, *flags):
    if shutil.which("nm") is None:
        pytest.fail("nm (binutils) is needed to inspect the extension")
    out = subprocess.run(["nm", "-D", *flags, str(built(library))], capture_output=True, text=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


def test_one_abi3_module_for_every_python(library):
    assert built(library).name.endswith(".abi3.so"), built(library).name


def test_only_the_stable_c_shim_of_torch_is_used(library):
    undefined = dynamic_symbols(library, "--undefined-only")
    cxx_torch = sorted(s for s in undefined if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch")))
    assert not cxx_torch, f"C++ symbols of torch (not ABI-stable): {cxx_torch[:5]}"
    assert any(s.startswith("aoti_torch_") for s in undefined)
    python = sorted(s for s in undefined if s.startswith(("Py", "_Py")))
    assert python == LIMITED_API[library], python


def test_exports_only_the_module_init(library):
    exported = {s for s in dynamic_symbols(library, "--defined-only") if not s.startswith("_")}
    assert exported == {f"PyInit_{library}"}, sorted(exported)[:10]


def test_the_cuda_kernels_load_exactly_when_torch_has_cuda_of_their_major():
    """A CUDA build's library links torch's CUDA libraries and a CUDA runtime:
    imported under a torch of that CUDA major, never under a CPU-only one or
    one of another CUDA major, where the core alone serves."""
    library = built("_C_cuda")
    expected = (
        torch.version.cuda is not None
        and library is not None
        and library_cuda_major(str(library)) == torch.version.cuda.split(".")[0]
    )
    assert ("mcmi_torch._C_cuda" in sys.modules) == expected
    assert mcmi_torch._cuda.CUDA_KERNELS == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_single_openmp_runtime_is_loaded():
    """In a fresh process (other packages, e.g. scikit-learn, bring their own)."""
    code = (
        "import json, pathlib, torch, mcmi_torch\n"
        "maps = pathlib.Path('/proc/self/maps').read_text().splitlines()\n"
        "print(json.dumps(sorted({l.split()[-1] for l in maps if 'libgomp' in l})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    gomp = json.loads(out.stdout)
    assert len(gomp) == 1, gomp
