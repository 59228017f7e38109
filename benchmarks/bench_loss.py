"""Fused CE + CMI, forward + backward: mcmi-torch against the PyTorch a user writes.

The baseline is the MCMI authors' formulation, timed eagerly and under torch.compile:
    F.cross_entropy(z, y) - lam * F.kl_div(Q[y].log(), F.log_softmax(z, 1),
                                           log_target=True, reduction='batchmean')
with fixed centroids (the paper's recipe), plus in-batch and EMA centroids written the
same way. Two more columns: F.cross_entropy alone (what every user already pays) and the
functional path of the README's first usage line,
    F.cross_entropy(z, y) + lam * mcmi_torch.mcmi(z, y, centroids=Q)
(fixed and in-batch centroids). All run in this process on the same inputs; the table
gives medians (the callables of a case take turns, ten calls at a time, so a slow spell of
the machine falls on all of them), ratios (ours / CE and functional / CE: the cost over
the cross-entropy; baseline time / ours against the eager and compiled formula), the
bandwidth ours reaches on the bytes that must move (read z, read the used rows of Q, write
the gradient) against a copy measured in the same run, the floor at a mid and a large
shape (the fused kernel against torch's exp + log over the logits and against its bytes at
the speed of a logits copy), the fixed cost of one call (at 1 x 2), and the peak extra
memory of one forward + backward (fresh subprocesses).

    python benchmarks/bench_loss.py                    # CPU, torch's thread count
    python benchmarks/bench_loss.py --threads 2 --out benchmarks/results
    python benchmarks/bench_loss.py --device cuda      # where a GPU and CUDA kernels exist
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import mcmi_torch

LAM = 0.25
# Shapes of the floor analysis: a mid shape that stays in cache, a large one that does not.
FLOOR_SHAPES = [(256, 1000), (4096, 8192)]
MAIN_SHAPES = [(64, 100), (256, 1000), (4096, 8192)]
SWEEP_BATCH = 256
SWEEP_CLASSES = [10, 32, 100, 316, 1000, 3162, 10000, 32768]
# Labels (centroid rows) of the widest sweep case: a [32768, 32768] Q would not fit in
# memory, and a row's work does not depend on how many other rows Q has.
MAX_CENTROID_ROWS = 10000


# ---------------------------------------------------------------- baselines
def authors_fixed(z, y, q):
    return mcmi_torch.reference.authors_loss(z, y, LAM, q)


def authors_batch(z, y, num_classes):
    """The same formulation with in-batch centroids (index_add class means)."""
    logp = F.log_softmax(z, 1)
    p = logp.exp()
    sums = p.new_zeros(num_classes, z.shape[1]).index_add(0, y, p)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).unsqueeze(1)
    q = sums / counts
    kl = F.kl_div(q[y].log(), logp, log_target=True, reduction="batchmean")
    return F.cross_entropy(z, y) - LAM * kl


def authors_ema(z, y, buffer, momentum=0.1):
    """Fixed-formula loss on an EMA buffer, then the buffer's update."""
    loss = authors_fixed(z, y, buffer)
    with torch.no_grad():
        p = F.softmax(z, 1)
        sums = p.new_zeros(buffer.shape).index_add(0, y, p)
        counts = torch.bincount(y, minlength=buffer.shape[0])
        present = (counts > 0).unsqueeze(1)
        batch = sums / counts.clamp_min(1).unsqueeze(1)
        buffer.copy_(torch.where(present, buffer + momentum * (batch - buffer), buffer))
    return loss


def cross_entropy(z, y):
    return F.cross_entropy(z, y)


def make_impls(mode: str, q: torch.Tensor, num_classes: int, compiled: dict) -> dict:
    """The timed callables of (z, y) for one centroid mode, by column: ours (MCMILoss), ce,
    functional (not for 'ema', which has no functional form), eager and compiled."""
    if mode == "fixed":
        ours = mcmi_torch.MCMILoss(LAM, q)

        def eager(z, y):
            return authors_fixed(z, y, q)

        key, fn, extra = "fixed", authors_fixed, (q,)
    elif mode == "batch":
        ours = mcmi_torch.MCMILoss(LAM, "batch", num_classes=num_classes)

        def eager(z, y):
            return authors_batch(z, y, num_classes)

        key, fn, extra = "batch", authors_batch, (num_classes,)
    else:
        ours = mcmi_torch.MCMILoss(LAM, "ema", num_classes=num_classes).to(q.device)
        buffer = torch.full_like(q, 1.0 / num_classes)

        def eager(z, y):
            return authors_ema(z, y, buffer)

        key, fn, extra = "ema", authors_ema, (buffer.clone(),)
    # Random labels: no fine-tune to guard, and the loss alone is timed.
    ours.guard = None
    if key not in compiled:
        compiled[key] = torch.compile(fn, dynamic=True)
    comp = compiled[key]

    def compiled_call(z, y):
        return comp(z, y, *extra)

    impls = {"ours": ours, "ce": cross_entropy}
    if mode != "ema":
        given = q if mode == "fixed" else None

        def functional(z, y):
            return F.cross_entropy(z, y) + LAM * mcmi_torch.mcmi(z, y, given)

        impls["functional"] = functional
    impls.update(eager=eager, compiled=compiled_call)
    return impls


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(impls: dict, z, y, device, budget: float, burst: int = 10) -> dict:
    """Median seconds of forward + backward of each callable, after warm-up. The
    callables take turns, ``burst`` timed calls each, for about ``budget`` seconds per
    callable (at least 5 and at most 2000 calls each), so that a slow spell of a shared
    machine falls on all of them alike and their ratios hold, while each call still runs
    warm, right after calls of its own."""

    def step(fn):
        loss = fn(z, y)
        loss.backward()
        z.grad = None

    for fn in impls.values():
        for _ in range(3):
            step(fn)
    sync(device)
    times = {name: [] for name in impls}
    start = time.perf_counter()
    calls = 0
    while calls < 5 or (time.perf_counter() - start < budget * len(impls) and calls < 2000):
        for name, fn in impls.items():
            for _ in range(burst):
                t0 = time.perf_counter()
                step(fn)
                sync(device)
                times[name].append(time.perf_counter() - t0)
        calls += burst
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device, nbytes: int = 256 << 20) -> float:
    """Bytes per second (read + write) of a large tensor copy, median of 10."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def inputs(rows, cols, device, seed=0, classes=None, dtype=torch.float32):
    """Logits [rows, cols] in dtype, labels in [0, K) and fixed centroids [K, cols],
    K = classes, by default min(cols, MAX_CENTROID_ROWS)."""
    classes = min(cols, MAX_CENTROID_ROWS) if classes is None else classes
    g = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(rows, cols, generator=g)).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, classes, (rows,), generator=g).to(device)
    q = torch.softmax(torch.randn(classes, cols, generator=g), 1).to(device)
    return z, y, q


# ---------------------------------------------------------------- floor
def kernel_call(z, y, q):
    """The fused op alone (loss and gradient, fixed centroids), below autograd."""
    below = mcmi_torch._ops._below_autograd
    op = torch.ops.mcmi.loss.default
    args = (False, q.shape[0], 1.0, 1.0, -LAM, mcmi_torch.CENTROID_FLOOR, -100, 1, True)

    def call():
        with below():
            op(z, y, q, *args)

    return call


def floor_row(rows, cols, device, budget) -> dict:
    """Where the fused kernel stands against its two floors at one shape: the bytes it
    must move (read z and the used rows of Q, write the gradient) at the speed of a copy
    of the logits of this very shape (so from the cache level they live in), and the
    transcendental arithmetic it must do (an exp and a log per element), timed as
    torch's own vectorized exp and log over a logits-sized tensor into a preallocated
    output. Medians of single calls, in this process."""
    z, y, q = inputs(rows, cols, device)
    z = z.detach()
    out = torch.empty_like(z)
    positive = z.exp()

    def timed(fn):
        for _ in range(3):
            fn()
        sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 2000):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    kernel = timed(kernel_call(z, y, q))
    exp = timed(lambda: torch.exp(z, out=out))
    log = timed(lambda: torch.log(positive, out=out))
    copy = timed(lambda: out.copy_(z))
    elem = z.element_size()
    must_move = rows * cols * (elem + q.element_size() + elem)
    memory = copy * must_move / (2 * rows * cols * elem)
    return {
        "rows": rows,
        "cols": cols,
        "kernel_ms": 1e3 * kernel,
        "exp_ms": 1e3 * exp,
        "log_ms": 1e3 * log,
        "copy_ms": 1e3 * copy,
        "memory_floor_ms": 1e3 * memory,
        "exp_log_share": (exp + log) / kernel,
        "memory_share": memory / kernel,
    }


# ---------------------------------------------------------------- per-call cost
class _Nothing(torch.autograd.Function):
    """A Python autograd.Function that does no work: the floor of any loss written as one."""

    @staticmethod
    def forward(ctx, z):
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return None


def per_call_costs(device, budget) -> dict:
    """Fixed costs of one call, at 1 x 2 (no work to speak of), in microseconds: forward +
    backward of F.cross_entropy, of MCMILoss (fixed centroids) without and with its
    collapse guard, and of an autograd.Function that does nothing; and one call of the
    fused op alone (below autograd) against one call of a torch op (add)."""
    z, y, q = inputs(1, 2, device)
    ours = mcmi_torch.MCMILoss(LAM, q)
    guarded = mcmi_torch.MCMILoss(LAM, q)
    ours.guard = None
    fwd_bwd = median_times(
        {
            "ce": cross_entropy,
            "ours": ours,
            "ours_with_guard": guarded,
            "nothing_function": lambda z, y: _Nothing.apply(z),
        },
        z,
        y,
        device,
        budget,
    )
    zd = z.detach()
    op = kernel_call(zd, y, q)

    def single(fn):
        for _ in range(100):
            fn()
        times = []
        for _ in range(2000):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    calls = {"op_alone": single(op), "torch_add": single(lambda: torch.add(zd, zd))}
    return {f"{k}_us": 1e6 * v for k, v in {**fwd_bwd, **calls}.items()}


# ---------------------------------------------------------------- memory
PEAK_SNIPPET = r"""
import gc, json, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_loss as b
torch.set_num_threads({threads})
rows, cols, impl, mode = {rows}, {cols}, {impl!r}, {mode!r}
device = torch.device({device!r})
z, y, q = b.inputs(rows, cols, device)
fn = b.make_impls(mode, q, q.shape[0], {{}})[impl]
fn(z, y).backward()  # warm-up on this very shape: compilation, caches
z.grad = None
gc.collect()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM)
    base = status("VmRSS:")
loss = fn(z, y)
loss.backward()
if device.type == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = status("VmHWM:") - base
print(json.dumps({{"peak_extra_bytes": peak}}))
"""


def peak_extra_memory(rows, cols, impl, mode, device, threads) -> int:
    """Peak bytes above the inputs of one forward + backward, in a fresh
    process after a warm-up on the same shape (CPU: growth of the peak
    resident set, Linux; CUDA: allocator peak). The gradient of z that
    backward leaves behind is included."""
    code = PEAK_SNIPPET.format(
        bench_dir=str(pathlib.Path(__file__).parent),
        threads=threads,
        rows=rows,
        cols=cols,
        impl=impl,
        mode=mode,
        device=str(device),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per measurement")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    machine = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "cpu_model": _cpu_model(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    print(f"# {machine}")

    compiled: dict = {}
    rows_out = []
    cases = [(r, c, m) for (r, c) in MAIN_SHAPES for m in ("fixed", "batch", "ema")]
    cases += [
        (SWEEP_BATCH, c, "fixed") for c in SWEEP_CLASSES if (SWEEP_BATCH, c) not in MAIN_SHAPES
    ]
    for rows, cols, mode in cases:
        z, y, q = inputs(rows, cols, device)
        impls = make_impls(mode, q, q.shape[0], compiled)
        budget = args.budget if rows * cols < 10**7 else args.budget * 2
        t = median_times(impls, z, y, device, budget)
        elem = z.element_size()
        must_move = rows * cols * (elem + q.element_size() + elem)
        row = {
            "rows": rows,
            "cols": cols,
            "mode": mode,
            "ours_ms": 1e3 * t["ours"],
            "ce_ms": 1e3 * t["ce"],
            "functional_ms": 1e3 * t["functional"] if "functional" in t else None,
            "ours_vs_ce": t["ours"] / t["ce"],
            "functional_vs_ce": t["functional"] / t["ce"] if "functional" in t else None,
            "eager_ms": 1e3 * t["eager"],
            "compiled_ms": 1e3 * t["compiled"],
            "vs_eager": t["eager"] / t["ours"],
            "vs_compiled": t["compiled"] / t["ours"],
            "ours_GBps": must_move / t["ours"] / 1e9,
            "of_copy_bandwidth": must_move / t["ours"] / bandwidth,
        }
        rows_out.append(row)
        functional = (
            f"functional {row['functional_ms']:9.3f} ms ({row['functional_vs_ce']:4.2f}x CE)  "
            if row["functional_ms"] is not None
            else ""
        )
        print(
            f"{rows:5d} x {cols:6d} {mode:5s}  ours {row['ours_ms']:9.3f} ms "
            f"({row['ours_vs_ce']:4.2f}x CE)  CE {row['ce_ms']:9.3f} ms  {functional}"
            f"eager {row['eager_ms']:9.3f} ms ({row['vs_eager']:5.2f}x)  "
            f"compiled {row['compiled_ms']:9.3f} ms ({row['vs_compiled']:5.2f}x)  "
            f"{row['ours_GBps']:6.2f} GB/s = {100 * row['of_copy_bandwidth']:5.1f}% of copy",
            flush=True,
        )

    floor = []
    for rows, cols in FLOOR_SHAPES:
        f = floor_row(rows, cols, device, args.budget)
        floor.append(f)
        print(
            f"floor {rows} x {cols}: kernel {f['kernel_ms']:.3f} ms; exp {f['exp_ms']:.3f} + "
            f"log {f['log_ms']:.3f} ms = {100 * f['exp_log_share']:.0f}% of it; its bytes at "
            f"the speed of a logits copy ({f['copy_ms']:.3f} ms) {f['memory_floor_ms']:.3f} ms = "
            f"{100 * f['memory_share']:.0f}%",
            flush=True,
        )

    calls = per_call_costs(device, args.budget)
    print(
        "per call at 1 x 2 (us): "
        + ", ".join(f"{k.removesuffix('_us')} {v:.1f}" for k, v in calls.items()),
        flush=True,
    )

    memory = []
    if not args.no_memory:
        rows, cols = MAIN_SHAPES[-1]
        logits_bytes = rows * cols * 4
        for impl in ("ours", "eager", "compiled"):
            peak = peak_extra_memory(rows, cols, impl, "fixed", device, args.threads)
            buffers = peak / logits_bytes
            memory.append(
                {"impl": impl, "peak_extra_MB": peak / 2**20, "logits_sized_buffers": buffers}
            )
            print(
                f"peak extra memory, {rows} x {cols} fixed, {impl:8s}: "
                f"{peak / 2**20:8.1f} MB = {buffers:4.2f} logits-sized buffers"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "results": rows_out, "floor": floor, "per_call": calls,
              "memory": memory, "seconds": time.perf_counter() - started}  # fmt: skip
    tag = device.type
    (args.out / f"bench_{tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"bench_{tag}.md").write_text(markdown(result))
    plot(rows_out, args.out / f"bench_{tag}.png", machine)
    print(f"\n{time.perf_counter() - started:.0f} s; wrote {args.out}/bench_{tag}.{{json,md,png}}")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m.get('gpu', m['cpu_model'])}, {m['threads']} threads, torch {m['torch']}, "
        f"Python {m['python']}; copy bandwidth {m['copy_bandwidth_GBps']:.1f} GB/s (read + write).",
        "",
        "| B x C | centroids | CE (ms) | ours (ms) | ours / CE | functional (ms) "
        "| functional / CE | eager (ms) | compiled (ms) | vs eager | vs compiled | GB/s "
        "| % of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        functional = (
            f"{r['functional_ms']:.3f} | {r['functional_vs_ce']:.2f}x"
            if r["functional_ms"] is not None
            else "- | -"
        )
        lines.append(
            f"| {r['rows']} x {r['cols']} | {r['mode']} | {r['ce_ms']:.3f} | {r['ours_ms']:.3f} "
            f"| {r['ours_vs_ce']:.2f}x | {functional} | {r['eager_ms']:.3f} "
            f"| {r['compiled_ms']:.3f} | {r['vs_eager']:.2f}x | {r['vs_compiled']:.2f}x "
            f"| {r['ours_GBps']:.1f} | {100 * r['of_copy_bandwidth']:.0f}% |"
        )
    if result["floor"]:
        lines += [
            "",
            "| floor (fixed, loss + gradient) | kernel (ms) | exp + log (ms) | share "
            "| its bytes at the speed of a logits copy (ms) | share |",
            "|---|---|---|---|---|---|",
        ]
        for f in result["floor"]:
            lines.append(
                f"| {f['rows']} x {f['cols']} | {f['kernel_ms']:.3f} "
                f"| {f['exp_ms']:.3f} + {f['log_ms']:.3f} | {100 * f['exp_log_share']:.0f}% "
                f"| {f['memory_floor_ms']:.3f} | {100 * f['memory_share']:.0f}% |"
            )
    if result.get("per_call"):
        c = result["per_call"]
        lines += [
            "",
            "| per call at 1 x 2 (us) | CE fwd + bwd | MCMILoss fwd + bwd | with the guard "
            "| a no-op autograd.Function fwd + bwd | the fused op alone | torch.add |",
            "|---|---|---|---|---|---|---|",
            f"| | {c['ce_us']:.1f} | {c['ours_us']:.1f} | {c['ours_with_guard_us']:.1f} "
            f"| {c['nothing_function_us']:.1f} | {c['op_alone_us']:.1f} "
            f"| {c['torch_add_us']:.1f} |",
        ]
    if result["memory"]:
        lines += ["", "| peak extra memory, 4096 x 8192, fixed | MB | logits-sized buffers |",
                  "|---|---|---|"]  # fmt: skip
        for r in result["memory"]:
            lines.append(
                f"| {r['impl']} | {r['peak_extra_MB']:.0f} | {r['logits_sized_buffers']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows, path, machine) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(
        (r for r in rows if r["rows"] == SWEEP_BATCH and r["mode"] == "fixed"),
        key=lambda r: r["cols"],
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cols = [r["cols"] for r in sweep]
    for key, label in (("ours_ms", "mcmi-torch"), ("eager_ms", "eager PyTorch"),
                       ("compiled_ms", "torch.compile")):  # fmt: skip
        ax.loglog(cols, [r[key] for r in sweep], marker="o", label=label)
    ax.set_xlabel("classes C (B = 256, fixed centroids)")
    ax.set_ylabel("forward + backward, median (ms)")
    where = machine.get("gpu", machine["cpu_model"])
    ax.set_title(f"CE - lam * CMI on {machine['device']}: {where}, {machine['threads']} threads",
                 fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    main()
