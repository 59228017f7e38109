"""Resources of every CUDA kernel as ptxas reports them (`nvcc -Xptxas -v`):
registers per thread, static shared memory, stack frame and spills, for each
architecture, compiled with the flags torch's build adds. Needs nvcc and
torch, no GPU. Prints a markdown table (one row per kernel,
the dtype instances side by side), lists the kernels with a stack frame (that
of scan_targets holds the arguments of its printf) and exits 1 if any kernel
spills.

    python benchmarks/kernel_resources.py              # sm_80 and sm_90
    python benchmarks/kernel_resources.py --arch 90
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "mcmi_cuda.cu"
DTYPES = {"float": "f32", "double": "f64", "__nv_bfloat16": "bf16", "__half": "f16"}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(archs: list[str]) -> str:
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"  # as the build finds it
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags = [*COMMON_NVCC_FLAGS, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mcmi_cuda.o")
        done = subprocess.run(
            [nvcc, *flags, *gencode, "-c", str(SOURCE), "-o", out],
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stdout + done.stderr


def parse(report: str) -> list[dict]:
    kernels, current = [], None
    for line in report.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m[1], "arch": m[2], "smem": 0}
            kernels.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["stack"], current["spill"] = int(m[1]), int(m[2]) + int(m[3])
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m[1])
            if s := SMEM.search(line):
                current["smem"] = int(s[1])
    names = subprocess.run(
        ["c++filt"], input="\n".join(k["mangled"] for k in kernels), capture_output=True,
        text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for kernel, name in zip(kernels, names):
        # "void (anonymous namespace)::loss_rows<float, 256>(mcmi_problem, ...)"
        name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
        name = name[: name.index("(")]
        dtype = next((d for d in DTYPES if re.search(rf"<{d}\b", name)), None)
        kernel["dtype"] = DTYPES.get(dtype, "")
        kernel["kernel"] = name.replace(f"<{dtype}", "<T", 1) if dtype else name
    return kernels


def table(kernels: list[dict], archs: list[str]) -> str:
    rows: dict[str, dict] = {}
    for k in kernels:
        rows.setdefault(k["kernel"], {}).setdefault(k["arch"], []).append(k)
    head = ["kernel", *(f"registers sm_{a}" for a in archs), "shared memory (bytes)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, by_arch in rows.items():
        cells = [f"`{name}`"]
        for a in archs:
            order = list(DTYPES.values())
            ks = sorted(
                by_arch.get(a, []), key=lambda k: order.index(k["dtype"]) if k["dtype"] else 0
            )
            cells.append(" / ".join(f"{k['registers']} {k['dtype']}".strip() for k in ks))
        smem = sorted({k["smem"] for ks in by_arch.values() for k in ks})
        cells.append(" / ".join(str(s) for s in smem))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability digits, e.g. 90")
    args = parser.parse_args()
    archs = args.arch or ["80", "90"]
    if shutil.which("c++filt") is None:
        sys.exit("c++filt (binutils) is needed to name the kernels")
    kernels = parse(ptxas_report(archs))
    print(table(kernels, archs))
    framed = [k for k in kernels if k["spill"] or k["stack"]]
    for k in framed:
        print(f"sm_{k['arch']} {k['kernel']} {k['dtype']}: {k['stack']} bytes stack frame, "
              f"{k['spill']} bytes spilled", file=sys.stderr)  # fmt: skip
    spills = sum(1 for k in kernels if k["spill"])
    print(f"\n{len(kernels)} kernel instances; {spills} spill, {len(framed)} have a stack frame")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
