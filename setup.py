"""Build of mcmi_torch: C11 kernels + a stable-ABI C++ shim, as abi3 modules: the
core (_C: schemas, CPU kernels) and, when torch is a CUDA build and nvcc is found
(no GPU needed), the CUDA kernels (_C_cuda).

The stable ABI makes the binaries independent of the torch they compile against
(any torch >= 2.10 loads them), so both builds work (docs/install.md):
    pip install .                         # isolated: pip fetches a torch >= 2.10 to build with
    pip install --no-build-isolation .    # against the torch installed here (setuptools >= 77)
The release wheel is built by `bash .ci/build_wheel OUTDIR`.
Environment:
    CUDA_HOME             the CUDA toolkit's root (holding bin/nvcc and include/), where
                          torch does not find it from the nvcc on PATH
    FORCE_CUDA=1          require the CUDA kernels: fail, saying why, when they cannot be
                          built (torch not a CUDA build, no nvcc, or nvcc's CUDA major not
                          torch's); FORCE_CUDA=0 leaves them out
    TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": A100, H100/H200,
                          and PTX for newer GPUs)
    MCMI_DEBUG=1          -O0 -g, and the shared library keeps its debug info and symbol
                          table (a release build strips them: ~1.1 MB, the CPU kernels built
                          for three instruction sets)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
        include_paths,
    )
except ImportError as exc:  # pragma: no cover - build-time guidance only
    raise SystemExit(
        "mcmi-torch builds against torch >= 2.10, which is not installed here: "
        "`pip install .` fetches one (build isolation), or install torch first and run "
        "`pip install --no-build-isolation .`"
    ) from exc
if torch.torch_version.TorchVersion(torch.__version__) < "2.10":
    raise SystemExit(f"mcmi-torch needs torch >= 2.10 to build; this is torch {torch.__version__}")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# The stable-ABI floor: an extension built here loads on every torch >= 2.10,
# and, on the CPython limited API of 3.10, on every Python >= 3.10.
TORCH_TARGET = "0x020a000000000000"
PY_LIMITED = "0x030a0000"
DEBUG = os.environ.get("MCMI_DEBUG", "0") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
# Python's own flags add -g; a release .so drops debug info and the static symbol table
# (the dynamic symbols that load it stay).
STRIP = [] if DEBUG else ["-s"]
WARN = ["-Wall", "-Wextra"]

C_SOURCES = [os.path.join(CSRC, f) for f in ("mcmi_cpu.c", "mcmi_check.c", "module.c")]
C_FLAGS = [
    "-std=c11",
    "-fPIC",
    "-fvisibility=hidden",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    # No multiply-add is fused into an FMA: the kernels' AVX-512, AVX2 and baseline
    # builds (the baseline has no FMA) compute bitwise the same results.
    "-ffp-contract=off",
    *OPT,
    *WARN,
]
# torch's headers are system headers to us: their warnings are not ours.
TORCH_INCLUDES = [f"-isystem{d}" for d in include_paths()]
CXX_FLAGS = [
    "-std=c++17",
    "-fvisibility=hidden",
    f"-DTORCH_TARGET_VERSION={TORCH_TARGET}",
    *TORCH_INCLUDES,
    *OPT,
    *WARN,
]


class BuildExt(BuildExtension):
    """Compiles the .c sources of each extension as C (torch's own build step
    would compile them as C++), then lets torch build and link the rest."""

    def build_extensions(self):
        # torch patches self.compiler inside super().build_extensions(); until
        # then it is the plain C compiler of this Python.
        cc = self.compiler
        for ext in self.extensions:
            c_sources = [s for s in ext.sources if s.endswith(".c")]
            ext.sources = [s for s in ext.sources if not s.endswith(".c")]
            objects = cc.compile(
                c_sources,
                output_dir=self.build_temp,
                include_dirs=[CSRC, sysconfig.get_paths()["include"]],
                macros=[("Py_LIMITED_API", PY_LIMITED)],
                extra_postargs=C_FLAGS,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()


def nvcc_release(cuda_home: str) -> str | None:
    """The CUDA release of the toolkit's nvcc ("13.0"), or None where it does not say."""
    try:
        done = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
        )
    except OSError:
        return None
    found = re.search(r"release (\d+\.\d+)", done.stdout)
    return found.group(1) if found else None


def major(version: str | None) -> str | None:
    """The major of a CUDA version: "13" for "13.0"; None for None."""
    return None if version is None else version.split(".")[0]


def with_cuda() -> bool:
    """Whether to build the CUDA kernels: whenever torch is a CUDA build and
    an nvcc of its CUDA major is found (no GPU needed). FORCE_CUDA=1 requires
    them, FORCE_CUDA=0 leaves them out."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        missing = "nvcc was not found (put it on PATH, or set CUDA_HOME to the CUDA toolkit's root)"
    elif not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        # A toolkit is there, but not where torch looked (say, nvcc on PATH is a
        # wrapper script outside the toolkit): building on would fail later.
        raise SystemExit(
            f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h: set CUDA_HOME to the "
            "CUDA toolkit's root (the directory holding bin/nvcc and include/), or build "
            "without the CUDA kernels with FORCE_CUDA=0"
        )
    elif major(release := nvcc_release(CUDA_HOME)) not in (None, major(torch.version.cuda)):
        # torch's own check would stop the build; a CPU-only build serves instead.
        missing = (
            f"the nvcc at {CUDA_HOME} is CUDA {release} and torch "
            f"{torch.__version__} is a CUDA {torch.version.cuda} build: their majors must agree "
            f"(set CUDA_HOME to a CUDA {major(torch.version.cuda)} toolkit)"
        )
    else:
        return True
    if force == "1":
        raise SystemExit(f"FORCE_CUDA=1, but the CUDA kernels cannot be built: {missing}")
    print(f"mcmi-torch: building without the CUDA kernels: {missing}", file=sys.stderr)
    return False


def extensions():
    # The core module: schemas, CPU kernels and ops. It links torch's CPU
    # libraries only, so it loads on every torch.
    core = CppExtension(
        "mcmi_torch._C",
        [*C_SOURCES, os.path.join(CSRC, "library.cpp"), os.path.join(CSRC, "ops.cpp")],
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp", *STRIP],
        py_limited_api=True,
    )
    if not with_cuda():
        return [core]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # The CUDA kernels and their registration, a library of their own that
    # links torch's CUDA libraries: Python imports it only when torch has CUDA.
    cuda = CUDAExtension(
        "mcmi_torch._C_cuda",
        [
            os.path.join(CSRC, "mcmi_check.c"),
            os.path.join(CSRC, "module_cuda.c"),
            os.path.join(CSRC, "ops_cuda.cpp"),
            os.path.join(CSRC, "cuda", "mcmi_cuda.cu"),
        ],
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={
            "cxx": [*CXX_FLAGS, "-DUSE_CUDA"],
            # Hidden: the launchers are called from ops_cuda.cpp only. A register
            # spill is a warning (CI fails on warnings).
            "nvcc": [
                "-std=c++17",
                "-Xcompiler=-fvisibility=hidden",
                "-Xptxas=--warn-on-spills",
                *OPT,
            ],
        },
        extra_link_args=STRIP,
        py_limited_api=True,
    )
    return [core, cuda]


setup(
    packages=find_packages(include=["mcmi_torch", "mcmi_torch.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=False)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
