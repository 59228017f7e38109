"""One install serves CPU and GPU: setup.py builds the CUDA kernels whenever
torch is a CUDA build and an nvcc of its CUDA major is found, says why when
FORCE_CUDA=1 asks for them and they cannot be built, and an install without
them, or with them built for another CUDA major than torch's, turns a CUDA
tensor away with an error that says how to build for this torch."""

import math
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch

import mcmi_torch
from mcmi_torch._cuda import library_cuda_major

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


def fake_toolkit(root, release):
    """A CUDA_HOME whose nvcc says it is CUDA ``release``."""
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").touch()
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


@needs_setup
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_an_nvcc_of_another_cuda_major_builds_without_the_cuda_kernels(tmp_path):
    """torch's own check would stop the build; FORCE_CUDA=1 fails saying why."""
    other = f"{int(torch.version.cuda.split('.')[0]) - 1}.8"
    home = fake_toolkit(tmp_path, other)
    done = setup_py(CUDA_HOME=str(home))
    assert done.returncode == 0, done.stderr
    why = f"the nvcc at {home} is CUDA {other} and torch {torch.__version__} is a CUDA"
    assert f"building without the CUDA kernels: {why}" in done.stderr
    done = setup_py(CUDA_HOME=str(home), FORCE_CUDA="1")
    assert done.returncode != 0
    assert f"FORCE_CUDA=1, but the CUDA kernels cannot be built: {why}" in done.stderr


#: Prints the error of the CUDA kernel of mcmi::class_sums where the CUDA
#: kernels are not loaded, called with CPU tensors (no GPU needed).
CALL_CUDA_KERNEL = """
assert not mcmi_torch._cuda.CUDA_KERNELS
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
try:
    torch.ops.mcmi.class_sums.default.redispatch(cuda, logits, target, 5, 1.0, -100, False)
except RuntimeError as error:
    print(error)
"""

#: Runs with the CUDA library made unimportable, as in an install built without it.
WITHOUT_CUDA_KERNELS = """
import sys, torch
sys.modules["mcmi_torch._C_cuda"] = None
import mcmi_torch
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mcmi::"))
print(ops)
assert ops and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in ops)
"""


def test_a_cuda_tensor_without_cuda_kernels_says_how_to_rebuild():
    """Every op has a CUDA kernel; without the CUDA library it is a stand-in
    whose error names the op and the rebuild (called here by dispatching the
    op's CUDA kernel with CPU tensors: no GPU needed)."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_CUDA_KERNELS + CALL_CUDA_KERNEL],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ops, message = done.stdout.splitlines()[-2:]
    assert ops == str(
        sorted(f"mcmi::{op}" for op in ("class_sums", "ema_update_", "loss", "scale_grad_"))
    )
    assert message.startswith("mcmi::class_sums got a CUDA tensor, but this mcmi_torch has no CUDA")
    assert "pip install --no-build-isolation" in message
    assert "CUDA_HOME" in message


def test_the_cuda_major_of_a_library_is_read_from_its_file(tmp_path):
    """From the name of the CUDA runtime it links, as the dynamic string table
    holds it (a name auditwheel grafted has a hash); none for the core."""
    for needed, major in [
        (b"libcudart.so.13", "13"),
        (b"libcudart.so.12", "12"),
        (b"libcudart-3f1a2b4c.so.14", "14"),
        (b"libcudart.so", None),
        (b"libcudart.so.13.0.96", None),
    ]:
        library = tmp_path / "lib.so"
        library.write_bytes(b"\x7fELF\x00libc10.so\x00" + needed + b"\x00libc.so.6\x00")
        assert library_cuda_major(str(library)) == major, needed
    core = pathlib.Path(mcmi_torch._C.__file__)
    assert library_cuda_major(str(core)) is None


CUDA_LIBRARY = pathlib.Path(mcmi_torch.__file__).parent / "_C_cuda.abi3.so"


@pytest.mark.skipif(not CUDA_LIBRARY.exists(), reason="needs the CUDA library (a CUDA build)")
def test_the_cuda_library_names_the_cuda_major_it_was_built_for():
    major = library_cuda_major(str(CUDA_LIBRARY))
    assert major is not None and int(major) >= 12


#: Imports mcmi_torch in a fresh process, warnings as errors, where torch says
#: it is CUDA argv[1] and, with argv[2], the CUDA library is that file; prints
#: a loss and its gradient's sum on the CPU.
OTHER_CUDA_MAJOR = """
import importlib.machinery, importlib.util, sys, warnings
import torch
warnings.simplefilter("error")
torch.version.cuda = sys.argv[1]
if len(sys.argv) > 2:
    find_spec = importlib.util.find_spec
    def find(name, package=None):
        if name == "mcmi_torch._C_cuda":
            return importlib.machinery.ModuleSpec(name, None, origin=sys.argv[2])
        return find_spec(name, package)
    importlib.util.find_spec = find
import mcmi_torch
assert "mcmi_torch._C_cuda" not in sys.modules
logits = torch.randn(6, 3, requires_grad=True)
target = torch.tensor([0, 1, 2, 0, 1, 2])
loss = mcmi_torch.MCMILoss(lam=0.5, num_classes=3)(logits, target)
loss.backward()
print(loss.item(), logits.grad.abs().sum().item())
"""


def other_cuda_major(*args):
    """Runs OTHER_CUDA_MAJOR; returns the CUDA tensor's error."""
    args = [sys.executable, "-c", OTHER_CUDA_MAJOR + CALL_CUDA_KERNEL, *map(str, args)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    numbers, message = done.stdout.splitlines()[-2:]
    loss, grad = map(float, numbers.split())
    assert math.isfinite(loss) and math.isfinite(grad) and grad > 0  # the CPU kernels serve
    return message


@pytest.mark.parametrize(("built", "torch_cuda"), [("13", "12.8"), ("13", "14.0"), ("12", "13.0")])
def test_a_library_for_another_cuda_major_is_not_loaded_and_says_so(tmp_path, built, torch_cuda):
    """Never a loader error at import: the library's CUDA runtime is not
    torch's. The CPU kernels serve; a CUDA tensor gets an error naming both
    CUDA majors and the build for this torch (the library here is a file
    naming its CUDA runtime, so that no CUDA build is needed)."""
    library = tmp_path / "_C_cuda.abi3.so"
    library.write_bytes(b"\x7fELF\x00libcudart.so." + built.encode() + b"\x00")
    message = other_cuda_major(torch_cuda, library)
    assert message.startswith("mcmi::class_sums got a CUDA tensor, but this mcmi_torch has no CUDA")
    assert f"they are built for CUDA {built} and torch" in message
    assert f"is a CUDA {torch_cuda} build" in message
    assert f"an nvcc of CUDA {torch_cuda.split('.')[0]}, torch's CUDA major" in message
    assert "FORCE_CUDA=1 pip install --no-build-isolation" in message


@pytest.mark.skipif(not CUDA_LIBRARY.exists(), reason="needs the CUDA library (a CUDA build)")
@pytest.mark.parametrize("offset", [-1, 1])
def test_the_real_cuda_library_under_another_cuda_major(offset):
    built = library_cuda_major(str(CUDA_LIBRARY))
    torch_cuda = f"{int(built) + offset}.0"
    message = other_cuda_major(torch_cuda)
    assert f"they are built for CUDA {built} and torch" in message
    assert f"is a CUDA {torch_cuda} build" in message
