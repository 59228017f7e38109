"""setup.py builds the CUDA kernels whenever torch is a CUDA build and nvcc is
found, and says why when FORCE_CUDA=1 asks for them and they cannot be built."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
needs_setup = pytest.mark.skipif(not SETUP.exists(), reason="needs the source tree")


def setup_py(**env):
    """`python setup.py --name` (which decides the extensions, builds nothing)."""
    return subprocess.run(
        [sys.executable, str(SETUP), "--name"],
        cwd=SETUP.parent,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


@needs_setup
@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a torch without CUDA")
def test_force_cuda_without_a_cuda_torch_fails_saying_why():
    done = setup_py(FORCE_CUDA="1")
    assert done.returncode != 0
    assert "FORCE_CUDA=1, but the CUDA kernels cannot be built" in done.stderr
    assert "is not a CUDA build" in done.stderr


@needs_setup
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
@pytest.mark.parametrize("force", [None, "1"])
def test_a_cuda_home_without_the_toolkit_fails_saying_what_to_set(tmp_path, force):
    """As when the nvcc on PATH is a wrapper script outside the toolkit."""
    env = {"CUDA_HOME": str(tmp_path)}
    if force is not None:
        env["FORCE_CUDA"] = force
    done = setup_py(**env)
    assert done.returncode != 0
    assert f"CUDA_HOME={tmp_path} has no include/cuda_runtime_api.h" in done.stderr
