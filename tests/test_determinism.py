"""Bitwise-identical results across thread counts and repeated calls."""

import pytest
import torch
from conftest import random_problem

import mcmi_torch
from mcmi_torch._args import CENTROID_FLOOR


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(logits, target, q, mode, dtype):
    z = logits.to(dtype).requires_grad_(True)
    crit = mcmi_torch.MCMILoss(0.3, q if mode == "fixed" else "batch")
    value = crit(z, target)
    value.backward()
    sums, _ = mcmi_torch.class_sums(z, target, q.shape[0])
    return value.detach(), z.grad, sums


@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_does_not_change_results(threads, mode, dtype):
    # Large enough that the kernels really use several threads.
    logits, target, q = random_problem(513, 700)
    torch.set_num_threads(1)
    one = run(logits, target, q, mode, dtype)
    torch.set_num_threads(2)
    two = run(logits, target, q, mode, dtype)
    again = run(logits, target, q, mode, dtype)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_repeated_calls_are_bitwise_equal(device):
    logits, target, _ = random_problem(300, 3000, scale=3.0)
    z, y = logits.to(device), target.to(device)
    args = (False, 3000, 2.0, 1.0, -0.3, CENTROID_FLOOR, -100, 1, True)
    runs = [torch.ops.mcmi.loss(z, y, None, *args) for _ in range(2)]
    assert all(torch.equal(r0, r1) for r0, r1 in zip(*runs))
