"""The CPU kernels' instruction sets (AVX-512, AVX2, baseline) give bitwise the same
results: each one this CPU runs is forced with MCMI_TORCH_CPU_ISA in a fresh process,
which computes every CPU op through the public API, and all their outputs must match
byte for byte (NaN included). Also: the variable's errors and mcmi_torch.cpu_isa()."""

import os
import subprocess
import sys

import pytest
import torch

import mcmi_torch
from mcmi_torch import _C

# Writes, to argv[1], every output of the public API's CPU ops (values and gradients)
# on fixed random inputs: four dtypes, temperatures 1 and 2.5, tiny, odd and multi-block
# widths (C below a vector, a multiple of no lane count, several 512-element blocks),
# non-contiguous rows, ignored rows, and -inf, +inf and NaN logits; two threads.
SCRIPT = r"""
import sys

import torch
import torch.nn.functional as F

import mcmi_torch

torch.set_num_threads(2)
out = {"isa": mcmi_torch.cpu_isa()}
gen = torch.Generator().manual_seed(7)
shapes = [(3, 1, 1), (7, 5, 5), (33, 37, 10), (19, 1031, 7)]
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for b, c, k in shapes:
        wide = 3.0 * torch.randn(b, c + 3, generator=gen, dtype=torch.float64)
        target = torch.randint(0, k, (b,), generator=gen)
        target[torch.rand(b, generator=gen) < 0.15] = -100
        q = torch.softmax(torch.randn(k, c, generator=gen, dtype=torch.float64), 1)
        upstream = torch.rand(b, generator=gen, dtype=torch.float64).to(dtype)
        for special in (False, True):
            z0 = wide.clone()
            if special and b >= 4:
                z0[0, c // 2] = -float("inf")
                z0[1, c - 1] = float("nan")
                z0[2, :] = -float("inf")
                z0[3, 0] = float("inf")
            z0 = z0.to(dtype)[:, :c]  # rows c + 3 elements apart
            cq = q.to(dtype if dtype == torch.float64 else torch.float32)
            for t in (1.0, 2.5):
                key = f"{dtype} {b}x{c} T={t} special={special}"
                for mode, centroids in (("fixed", cq), ("batch", None)):
                    z = z0.detach().requires_grad_(True)
                    value = mcmi_torch.cmi(z, target, centroids, temperature=t, reduction="none")
                    value.backward(upstream)
                    out[f"{key} cmi {mode}"] = (value.detach(), z.grad)
                for mode in ("fixed", "batch"):
                    z = z0.detach().requires_grad_(True)
                    crit = mcmi_torch.MCMILoss(0.3, cq if mode == "fixed" else mode, temperature=t)
                    value = crit(z, target)
                    (0.5 * value).backward()
                    out[f"{key} MCMILoss {mode}"] = (value.detach(), z.grad)
                crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=c, temperature=t)
                for _ in range(2):
                    crit(z0, target)
                out[f"{key} ema"] = tuple(crit.state_dict().values())
                for log_probs in (False, True):
                    out[f"{key} class_sums {log_probs}"] = mcmi_torch.class_sums(
                        z0, target, k, temperature=t, log_probs=log_probs
                    )
torch.save(out, sys.argv[1])
"""


def run_forced(value, *args):
    """Runs SCRIPT with args (or just imports mcmi_torch) under MCMI_TORCH_CPU_ISA=value."""
    env = dict(os.environ, MCMI_TORCH_CPU_ISA=value)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT if args else "import mcmi_torch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def as_bytes(value):
    if isinstance(value, torch.Tensor):
        return [value.detach().reshape(-1).contiguous().view(torch.uint8)]
    return [b for v in value for b in as_bytes(v)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """outputs(isa): SCRIPT's results with that instruction set forced (run once)."""
    done_runs = {}

    def run(isa):
        if isa not in done_runs:
            path = tmp_path_factory.mktemp("isa") / f"{isa}.pt"
            done = run_forced(isa, str(path))
            assert done.returncode == 0, done.stderr
            done_runs[isa] = torch.load(path)
            assert done_runs[isa].pop("isa") == isa
        return done_runs[isa]

    return run


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_instruction_set_gives_bitwise_the_baseline_results(outputs, isa):
    if not _C.cpu_isas()[isa]:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    base, mine = outputs("baseline"), outputs(isa)
    assert mine.keys() == base.keys()
    for key, value in base.items():
        for a, b in zip(as_bytes(value), as_bytes(mine[key]), strict=True):
            assert torch.equal(a, b), f"{key}: {isa} differs from baseline"


def test_cpu_isa_is_the_best_supported_by_default():
    best = next(name for name, ok in _C.cpu_isas().items() if ok)
    if os.environ.get("MCMI_TORCH_CPU_ISA"):
        pytest.skip("MCMI_TORCH_CPU_ISA is set for this run")
    assert mcmi_torch.cpu_isa() == best
    assert list(_C.cpu_isas()) == ["avx512", "avx2", "baseline"]


def test_unknown_instruction_set_names_the_variable():
    done = run_forced("sse9")
    assert done.returncode != 0
    assert "ValueError: MCMI_TORCH_CPU_ISA='sse9' is not an instruction set" in done.stderr
    assert "'avx512', 'avx2', 'baseline'" in done.stderr


def test_unsupported_instruction_set_is_refused():
    missing = [name for name, ok in _C.cpu_isas().items() if not ok]
    if not missing:
        pytest.skip("this CPU runs every instruction set of the kernels")
    done = run_forced(missing[0])
    assert done.returncode != 0
    assert f"this CPU cannot run the kernels' {missing[0]} build" in done.stderr


def test_empty_variable_keeps_the_default():
    done = subprocess.run(
        [sys.executable, "-c", "import mcmi_torch; print(mcmi_torch.cpu_isa())"],
        env=dict(os.environ, MCMI_TORCH_CPU_ISA=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == next(name for name, ok in _C.cpu_isas().items() if ok)


def test_set_cpu_isa_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="'sse9' is not an instruction set"):
        _C.set_cpu_isa("sse9")
    assert mcmi_torch.cpu_isa() in _C.cpu_isas()
