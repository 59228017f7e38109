"""Import behaviour: lazily reachable submodules, optional dependencies named
with their extra, a clear error for a source tree without the extension, and
for a Python or torch older than the extensions' floor."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mcmi_torch

PACKAGE = pathlib.Path(mcmi_torch.__file__).parent


def run_python(code, cwd):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_submodules_are_attributes_on_first_access(tmp_path):
    code = (
        "import sys, mcmi_torch\n"
        "assert 'mcmi_torch.pid' not in sys.modules\n"
        "assert callable(mcmi_torch.pid.decompose)\n"
        "assert callable(mcmi_torch.integrations.register_torchdistill)\n"
        "assert {'pid', 'integrations'} <= set(dir(mcmi_torch))\n"
        "try:\n"
        "    mcmi_torch.no_such_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "module 'mcmi_torch' has no attribute 'no_such_name'" in done.stdout


def test_missing_optional_dependency_names_its_extra(monkeypatch):
    pid = mcmi_torch.pid
    p = np.full((2, 2, 2), 1 / 8)
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with pytest.raises(
        ImportError, match=r'cvxpy is not installed.*pip install "mcmi-torch\[pid\]"'
    ):
        pid.decompose(p)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r'sklearn.cluster .*"mcmi-torch\[pid\]"'):
        pid.discretize(np.random.default_rng(0).normal(size=(20, 3)))


def test_source_tree_without_the_extension_says_what_is_wrong(tmp_path):
    """Python run from the root of a clone whose package is installed
    non-editable imports the clone's mcmi_torch/, which has no _C. The copy
    comes first on sys.path (the working directory); an editable install's
    finder, which would supply the missing _C from its own tree, is dropped."""
    shutil.copytree(
        PACKAGE, tmp_path / "mcmi_torch", ignore=shutil.ignore_patterns("_C*", "__pycache__")
    )
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "import mcmi_torch\n"
    )
    done = run_python(code, tmp_path)
    assert done.returncode != 0
    assert "without the compiled extension" in done.stderr
    assert "pip install --no-build-isolation -e ." in done.stderr
    assert "circular import" not in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("torch.__version__ = '2.9.1+cu128'", "needs torch >= 2.10 (the LibTorch stable ABI"),
        ("torch.__version__ = '1.13.0'", "needs torch >= 2.10 (the LibTorch stable ABI"),
        ("sys.version_info = (3, 9, 18, 'final', 0)", "needs Python >= 3.10"),
    ],
)
def test_an_older_torch_or_python_names_the_requirement(tmp_path, setting, message):
    """Before the extension loads (its own failure would be an undefined
    symbol); the version is set in a fresh process."""
    code = f"import sys, torch\n{setting}\nimport mcmi_torch\n"
    done = run_python(code, tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mcmi-torch") and message in last, done.stderr
    assert "mcmi_torch._C" not in done.stderr


@pytest.mark.parametrize("version", ["2.10.0", "2.10.0+cu128", "2.14.1", "3.0.0"])
def test_torch_at_or_above_the_floor_imports(tmp_path, version):
    code = f"import torch\ntorch.__version__ = {version!r}\nimport mcmi_torch\n"
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
