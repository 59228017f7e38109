"""The loss on a GPU: ours against the PyTorch a user writes, eager and compiled.

Forward + backward medians (the helpers of bench_loss.py), the share of the device's copy
bandwidth ours reaches on the bytes that must move, for 4096 x 8192 in float32 and bfloat16
and a sweep of C from 10 to 100k (K = min(C, 1000) fixed centroids; B = 256, and B = 4 for
long rows with a small batch), plus ours under torch.compile(mode="reduce-overhead") (CUDA
graphs) checked against eager. Writes gpu_bench.json and gpu_bench.md to --out.

    python benchmarks/gpu_bench.py --out "$OUT"           # on a machine with a GPU
    python benchmarks/gpu_bench.py --device cpu --dry     # tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_loss as b

import mcmi_torch

MAIN = [(4096, 8192, torch.float32), (4096, 8192, torch.bfloat16)]
SWEEP = [(256, c) for c in (10, 100, 1000, 10_000, 100_000)] + [(4, 100_000)]
DRY_MAIN = [(64, 100, torch.float32), (64, 100, torch.bfloat16)]
DRY_SWEEP = [(16, 10), (4, 300)]


def measure(rows, cols, dtype, device, budget, bandwidth, compiled):
    z, y, q = b.inputs(rows, cols, device, classes=min(cols, 1000), dtype=dtype)
    impls = b.make_impls("fixed", q, q.shape[0], compiled)
    t = b.median_times(impls, z, y, device, budget)
    elem = z.element_size()
    must_move = rows * cols * (2 * elem + q.element_size())
    row = {
        "rows": rows,
        "cols": cols,
        "dtype": str(dtype).removeprefix("torch."),
        **{f"{k}_ms": 1e3 * v for k, v in t.items()},
        "ours_vs_ce": t["ours"] / t["ce"],
        "functional_vs_ce": t["functional"] / t["ce"],
        "vs_eager": t["eager"] / t["ours"],
        "vs_compiled": t["compiled"] / t["ours"],
        "of_copy_bandwidth": must_move / t["ours"] / bandwidth,
    }
    print(
        f"{rows:5d} x {cols:6d} {row['dtype']:8s} ours {row['ours_ms']:8.3f} ms "
        f"({row['ours_vs_ce']:4.2f}x CE, functional {row['functional_vs_ce']:4.2f}x CE)  "
        f"eager {row['eager_ms']:8.3f} ms ({row['vs_eager']:5.2f}x)  "
        f"compiled {row['compiled_ms']:8.3f} ms ({row['vs_compiled']:5.2f}x)  "
        f"{100 * row['of_copy_bandwidth']:5.1f}% of copy bandwidth",
        flush=True,
    )
    return row


def graphs_check(device, rows, cols) -> dict:
    """Ours under torch.compile(mode='reduce-overhead') against eager."""
    z, y, q = b.inputs(rows, cols, device, classes=cols)
    crit = mcmi_torch.MCMILoss(b.LAM, q)
    step = torch.compile(lambda z, y: crit(z, y), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # CUDA graphs record after warm-up runs
        loss = step(z, y)
        (grad,) = torch.autograd.grad(loss, z)
    eager = crit(z, y)
    (eager_grad,) = torch.autograd.grad(eager, z)
    ok = torch.allclose(loss, eager, rtol=1e-5, atol=1e-6) and torch.allclose(
        grad, eager_grad, rtol=1e-5, atol=1e-7
    )
    print(f"reduce-overhead vs eager, {rows} x {cols}: {'agree' if ok else 'DIFFER'}")
    return {"rows": rows, "cols": cols, "agree": bool(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--dry", action="store_true", help="tiny shapes, to check the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    bandwidth = b.copy_bandwidth(device, (16 << 20) if args.dry else (1 << 30))
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
    }
    print(f"# {machine}", flush=True)
    compiled: dict = {}
    main_cases = DRY_MAIN if args.dry else MAIN
    sweep = DRY_SWEEP if args.dry else SWEEP
    results = [measure(r, c, t, device, args.budget, bandwidth, compiled) for r, c, t in main_cases]
    results += [
        measure(r, c, torch.float32, device, args.budget, bandwidth, compiled) for r, c in sweep
    ]
    graphs = graphs_check(device, *((16, 10) if args.dry else (1024, 1000)))
    result = {"machine": machine, "results": results, "reduce_overhead": graphs,
              "seconds": time.perf_counter() - started}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"{machine['device']}, torch {machine['torch']}, copy "
        f"{machine['copy_bandwidth_GBps']:.0f} GB/s (read + write)",
        "",
        "| B x C | dtype | ours ms | eager ms | compiled ms | vs eager | vs compiled | % of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rows']} x {r['cols']} | {r['dtype']} | {r['ours_ms']:.3f} | {r['eager_ms']:.3f} "
        f"| {r['compiled_ms']:.3f} | {r['vs_eager']:.2f}x | {r['vs_compiled']:.2f}x "
        f"| {100 * r['of_copy_bandwidth']:.1f} |"
        for r in results
    ]
    lines.append(f"\nreduce-overhead (CUDA graphs) agrees with eager: {graphs['agree']}")
    (args.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/gpu_bench.{{json,md}}")
    if not graphs["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
