"""Kernel time of two builds of the CPU kernels, in one process: the csrc/ of a git
revision (--base) against the working tree's, each compiled by gcc with the C flags of
its own setup.py (the -ffp-contract choice included) into a shared library that ctypes
loads. float32 loss + gradient with fixed and in-batch centroids (T = 4, CE weight 1,
CMI weight -0.25, mean) and the EMA update, at the benchmark's main shapes, 1 thread.
The two builds take turns, ten calls at a time (a slow spell of a shared machine falls on
both); the table gives the median over the turns of each build's best call of the ten (a
call now and then takes several times as long, on either build) and new / base. With
--isa the new build runs that instruction set (mcmi_cpu_set_isa; builds that have it):

    python benchmarks/kernel_ab.py --base HEAD~3
    python benchmarks/kernel_ab.py --base HEAD~3 --isa baseline
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import re
import statistics
import subprocess
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(64, 100), (256, 1000), (256, 3162), (4096, 8192)]
ISAS = {"baseline": 0, "avx2": 1, "avx512": 2}


class Problem(ctypes.Structure):
    """mcmi_problem of csrc/mcmi.h."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("classes", ctypes.c_int64),
        ("dtype", ctypes.c_int),
        ("logits", ctypes.c_void_p),
        ("logits_stride", ctypes.c_int64),
        ("target", ctypes.c_void_p),
        ("target_stride", ctypes.c_int64),
        ("centroids", ctypes.c_void_p),
        ("centroids_stride", ctypes.c_int64),
        ("log_centroids", ctypes.c_int),
        ("temperature", ctypes.c_double),
        ("ce_weight", ctypes.c_double),
        ("cmi_weight", ctypes.c_double),
        ("floor", ctypes.c_double),
        ("ignore_index", ctypes.c_int64),
        ("reduction", ctypes.c_int),
    ]


def build(csrc: pathlib.Path, setup_py: str, out: pathlib.Path) -> ctypes.CDLL:
    """The kernels of csrc as a shared library, with setup.py's optimization and
    floating-point flags."""
    contract = re.search(r'"(-ffp-contract=\w+)"', setup_py)
    flags = ["-std=c11", "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    flags += ["-fno-trapping-math", *([contract.group(1)] if contract else [])]
    sources = [str(csrc / "mcmi_cpu.c"), str(csrc / "mcmi_check.c")]
    subprocess.run(["gcc", *flags, f"-I{csrc}", *sources, "-o", str(out), "-lm"], check=True)
    return ctypes.CDLL(str(out))


def case_calls(lib: ctypes.CDLL, rows: int, cols: int, mode: str, keep: list):
    """A no-argument callable running one op of lib on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(rows, cols, generator=g)
    classes = min(cols, 1000)
    y = torch.randint(0, classes, (rows,), generator=g)
    q = torch.softmax(torch.randn(classes, cols, generator=g), 1)
    p = Problem(rows, cols, classes, 0, z.data_ptr(), cols, y.data_ptr(), 1)
    p.centroids = q.data_ptr() if mode == "fixed" else None
    p.centroids_stride, p.temperature, p.ce_weight, p.cmi_weight = cols, 4.0, 1.0, -0.25
    p.floor, p.ignore_index, p.reduction = 1e-12, -100, 1
    grad, loss = torch.empty_like(z), torch.empty(1)
    bad = ctypes.c_int64()
    if mode == "ema":
        cent = torch.zeros(classes, cols)
        seen = torch.zeros(classes, dtype=torch.uint8)
        lib.mcmi_cpu_ema_workspace.restype = ctypes.c_size_t
        ws = torch.empty(lib.mcmi_cpu_ema_workspace(ctypes.byref(p), 1) + 64, dtype=torch.uint8)
        args = (ctypes.byref(p), ctypes.c_double(0.1), ctypes.c_void_p(cent.data_ptr()))
        args += (ctypes.c_int64(cols), ctypes.c_void_p(seen.data_ptr()))
        keep += [z, y, q, cent, seen, ws, p]
        return lambda: lib.mcmi_cpu_ema_update(
            *args, ctypes.c_void_p(ws.data_ptr()), 1, ctypes.byref(bad)
        )
    lib.mcmi_cpu_loss_workspace.restype = ctypes.c_size_t
    ws = torch.empty(lib.mcmi_cpu_loss_workspace(ctypes.byref(p), 1, 1) + 64, dtype=torch.uint8)
    keep += [z, y, q, grad, loss, ws, p]
    return lambda: lib.mcmi_cpu_loss(
        ctypes.byref(p),
        ctypes.c_void_p(loss.data_ptr()),
        ctypes.c_int64(1),
        ctypes.c_void_p(grad.data_ptr()),
        ctypes.c_int64(cols),
        ctypes.c_void_p(ws.data_ptr()),
        1,
        ctypes.byref(bad),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the base build")
    parser.add_argument("--isa", choices=list(ISAS), help="the new build's instruction set")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.base, "csrc", "setup.py"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
        base = build(work / "csrc", (work / "setup.py").read_text(), work / "base.so")
        new = build(ROOT / "csrc", (ROOT / "setup.py").read_text(), work / "new.so")
        if args.isa and new.mcmi_cpu_set_isa(ISAS[args.isa]) != 0:
            raise SystemExit(f"the new build cannot run {args.isa} on this CPU")
        print(f"base {args.base}, new: the working tree ({args.isa or 'default'} kernels)")
        print("| B x C | op | base (ms) | new (ms) | new / base |")
        print("|---|---|---|---|---|")
        for rows, cols in SHAPES:
            for mode in ("fixed", "batch", "ema"):
                keep: list = []
                calls = {"base": case_calls(base, rows, cols, mode, keep)}
                calls["new"] = case_calls(new, rows, cols, mode, keep)
                times: dict = {"base": [], "new": []}
                end = time.perf_counter() + args.budget
                while time.perf_counter() < end or len(times["new"]) < 5:
                    for name, call in calls.items():
                        best = float("inf")
                        for _ in range(10):
                            t0 = time.perf_counter()
                            call()
                            best = min(best, time.perf_counter() - t0)
                        times[name].append(best)
                b, n = (1e3 * statistics.median(times[k]) for k in ("base", "new"))
                op = "EMA update" if mode == "ema" else f"{mode} (loss + gradient)"
                print(f"| {rows} x {cols} | {op} | {b:.4g} | {n:.4g} | {n / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
