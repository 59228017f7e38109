"""The CPU benchmark's own parts, at tiny size: every timed column computes the loss it is
named for, and the floor and peak-memory measurements run."""

import math
import pathlib
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_loss  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode", ["fixed", "batch", "ema"])
def test_timed_columns_compute_the_same_loss(mode):
    """ours (MCMILoss), the functional path and the eager formula: one objective,
    CE - lam * KL, so a ratio between them compares like with like; 'ce' is the CE alone."""
    z, y, q = bench_loss.inputs(24, 10, CPU, seed=3)
    impls = bench_loss.make_impls(mode, q, q.shape[0], {})
    assert set(impls) == {"ours", "ce", "eager", "compiled"} | (
        set() if mode == "ema" else {"functional"}
    )
    want = impls["eager"](z, y).item()
    for name in ("ours", "functional"):
        if name in impls:
            assert impls[name](z, y).item() == pytest.approx(want, rel=1e-5, abs=1e-6), name
    ce = torch.nn.functional.cross_entropy(z, y).item()
    assert impls["ce"](z, y).item() == ce
    assert abs(want - ce) > 1e-4  # the KL term is there


def test_floor_row_measures_the_kernel_and_its_floors():
    row = bench_loss.floor_row(16, 40, CPU, budget=0.01)
    for key in ("kernel_ms", "exp_ms", "log_ms", "copy_ms", "memory_floor_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["memory_share"] == pytest.approx(row["memory_floor_ms"] / row["kernel_ms"])


@pytest.mark.parametrize("impl", ["ours", "eager"])
def test_peak_extra_memory_runs_in_a_fresh_process(impl):
    peak = bench_loss.peak_extra_memory(64, 100, impl, "fixed", CPU, threads=1)
    assert isinstance(peak, int) and peak >= 0


def test_per_call_costs_are_measured():
    costs = bench_loss.per_call_costs(CPU, budget=0.01)
    assert set(costs) == {
        "ce_us",
        "ours_us",
        "ours_with_guard_us",
        "nothing_function_us",
        "op_alone_us",
        "torch_add_us",
    }
    assert all(math.isfinite(v) and v > 0 for v in costs.values())
