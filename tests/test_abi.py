"""The binary keeps its promises: LibTorch stable ABI only, the CPython limited
API only, one exported symbol, and a single OpenMP runtime next to torch's."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch  # noqa: F401  (torch first, as mcmi_torch itself does)

import mcmi_torch

LIBRARY = pathlib.Path(mcmi_torch._ops._C.__file__)


def dynamic_symbols(*flags):
    if shutil.which("nm") is None:
        pytest.fail("nm (binutils) is needed to inspect the extension")
    out = subprocess.run(["nm", "-D", *flags, str(LIBRARY)], capture_output=True, text=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


def test_one_abi3_module_for_every_python():
    assert LIBRARY.name.endswith(".abi3.so"), LIBRARY.name


def test_only_the_stable_c_shim_of_torch_is_used():
    undefined = dynamic_symbols("--undefined-only")
    cxx_torch = sorted(s for s in undefined if s.startswith(("_ZN3c10", "_ZN2at", "_ZN5torch")))
    assert not cxx_torch, f"C++ symbols of torch (not ABI-stable): {cxx_torch[:5]}"
    assert any(s.startswith("aoti_torch_") for s in undefined)
    python = sorted(s for s in undefined if s.startswith(("Py", "_Py")))
    limited_api = ["PyFloat_FromDouble", "PyModule_AddObject", "PyModule_Create2", "Py_DecRef"]
    assert python == limited_api, python


def test_exports_only_the_module_init():
    exported = {s for s in dynamic_symbols("--defined-only") if not s.startswith("_")}
    assert exported == {"PyInit__C"}, sorted(exported)[:10]


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
