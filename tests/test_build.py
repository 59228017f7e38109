"""One install serves CPU and GPU: setup.py builds the CUDA kernels whenever
torch is a CUDA build and nvcc is found, says why when FORCE_CUDA=1 asks for
them and they cannot be built, and an install without them turns a CUDA
tensor away with an error that says how to rebuild."""

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


#: Runs with the CUDA library made unimportable, as in an install built without it.
WITHOUT_CUDA_KERNELS = """
import sys, torch
sys.modules["mcmi_torch._C_cuda"] = None
import mcmi_torch
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mcmi::"))
print(ops)
assert ops and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in ops)
assert not mcmi_torch._cuda.CUDA_KERNELS
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
try:
    torch.ops.mcmi.class_sums.default.redispatch(cuda, logits, target, 5, 1.0, -100, False)
except RuntimeError as error:
    print(error)
"""


def test_a_cuda_tensor_without_cuda_kernels_says_how_to_rebuild():
    """Every op has a CUDA kernel; without the CUDA library it is a stand-in
    whose error names the op and the rebuild (called here by dispatching the
    op's CUDA kernel with CPU tensors: no GPU needed)."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_CUDA_KERNELS], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    ops, message = done.stdout.splitlines()[-2:]
    assert ops == str(
        sorted(f"mcmi::{op}" for op in ("class_sums", "ema_update_", "loss", "scale_grad_"))
    )
    assert message.startswith("mcmi::class_sums got a CUDA tensor, but this mcmi_torch has no CUDA")
    assert "pip install --no-build-isolation" in message
    assert "CUDA_HOME" in message
