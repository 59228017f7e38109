"""Values and gradients against the float64 plain-PyTorch reference."""

import pytest
import torch
from conftest import RTOL, assert_close_rel, random_problem

import mcmi_torch
from mcmi_torch import reference

SHAPES = [(0, 5, 5), (1, 1, 1), (1, 7, 7), (7, 3, 3), (33, 10, 4), (64, 100, 100),
          (129, 257, 300), (300, 1000, 1000), (16, 3000, 3000)]  # fmt: skip
REDUCTIONS = ["mean", "sum", "none"]


def both(fn_ours, fn_ref, logits, **kw):
    """Our value and gradient vs the reference's, evaluated in float64 on the
    same (rounded) inputs, with a random upstream gradient."""
    z = logits.detach().clone().requires_grad_(True)
    z64 = logits.detach().double().requires_grad_(True)
    ours = fn_ours(z)
    ref = fn_ref(z64)
    w = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    ref_grad = torch.autograd.grad((ref * w).sum(), z64)[0] if z64.numel() else z64
    our_grad = torch.autograd.grad((ours * w.to(ours.dtype)).sum(), z)[0] if z.numel() else z
    return ours, ref, our_grad, ref_grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_cmi_float32(shape, reduction, mode):
    rows, cols, classes = shape
    if mode == "batch":
        classes = cols
    logits, target, q = random_problem(rows, cols, classes, seed=rows * 7 + cols)
    q = q if mode == "fixed" else None
    kw = dict(temperature=1.0 if rows % 2 else 2.5, reduction=reduction)
    ours, ref, g, g_ref = both(
        lambda z: mcmi_torch.cmi(z, target, q, **kw),
        lambda z: reference.cmi(z, target, q, **kw),
        logits,
    )
    assert ours.dtype == torch.float32
    assert_close_rel(ours, ref, RTOL[torch.float32], "value")
    assert_close_rel(g, g_ref, RTOL[torch.float32], "gradient", floor=1e-2)


@pytest.mark.parametrize("shape", SHAPES[1:7], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("centroids", ["fixed", "batch", "ema"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mcmi_loss_module(shape, reduction, centroids, temperature):
    rows, cols, classes = shape
    classes = min(classes, cols)
    logits, target, q = random_problem(rows, cols, classes, seed=rows + cols)
    if centroids == "fixed":
        crit = mcmi_torch.MCMILoss(0.3, q, temperature=temperature, reduction=reduction)
        q_ref = q
    elif centroids == "batch":
        crit = mcmi_torch.MCMILoss(0.3, "batch", temperature=temperature, reduction=reduction)
        q_ref = None
    else:
        crit = mcmi_torch.MCMILoss(
            0.3, "ema", num_classes=cols, temperature=temperature, reduction=reduction
        )
        crit.centroids.copy_(torch.softmax(torch.randn(cols, cols), 1))
        q_ref = crit.centroids.clone()
    ours, ref, g, g_ref = both(
        lambda z: crit(z, target),
        lambda z: reference.mcmi_loss(
            z, target, 0.3, q_ref, temperature=temperature, reduction=reduction
        ),
        logits,
    )
    assert_close_rel(ours, ref, RTOL[torch.float32], "value")
    assert_close_rel(g, g_ref, RTOL[torch.float32], "gradient", floor=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize("shape", [(64, 100), (256, 1000), (5, 2)])
def test_dtypes(dtype, mode, shape):
    logits, target, q = random_problem(*shape, dtype=dtype, scale=2.0)
    q = q if mode == "fixed" else None
    crit = mcmi_torch.MCMILoss(0.5, q if q is not None else "batch")
    q_used = crit.centroids if q is not None else None  # the stored float32 buffer
    ours, ref, g, g_ref = both(
        lambda z: crit(z, target),
        lambda z: reference.mcmi_loss(z, target, 0.5, q_used),
        logits,
    )
    assert ours.dtype == dtype and g.dtype == dtype
    assert_close_rel(ours, ref, RTOL[dtype], "value")
    assert_close_rel(g, g_ref, RTOL[dtype], "gradient", floor=1e-2)


def test_mcmi_is_minus_cmi():
    logits, target, q = random_problem(50, 20)
    assert torch.equal(mcmi_torch.mcmi(logits, target, q), -mcmi_torch.cmi(logits, target, q))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_not_nan(reduction):
    logits, _, q = random_problem(6, 5)
    target = torch.full((6,), -100)
    for centroids in (q, None):
        z = logits.clone().requires_grad_(True)
        value = mcmi_torch.MCMILoss(0.4, centroids if centroids is not None else "batch",
                                    reduction=reduction)(z, target)  # fmt: skip
        assert torch.equal(value, torch.zeros_like(value))
        value.sum().backward()
        assert torch.equal(z.grad, torch.zeros_like(z))


def test_custom_ignore_index_and_strided_inputs():
    logits, target, q = random_problem(40, 30, 30)
    target[target == -100] = 7
    wide = torch.randn(40, 64)
    wide[:, 5:35] = logits
    strided = wide[:, 5:35]  # row stride 64
    tgt = torch.stack([target, target], 1)[:, 0]  # stride 2
    qt = q.t().contiguous().t()  # column-major centroids
    ours = mcmi_torch.cmi(strided, tgt, qt, ignore_index=7)
    ref = reference.cmi(logits.double(), target, q, ignore_index=7)
    assert_close_rel(ours, ref, RTOL[torch.float32])


def test_tiny_centroid_entries_are_floored():
    logits, target, q = random_problem(20, 6)
    q = q.clone()
    q[:, 2] = 0.0
    q = q / q.sum(1, keepdim=True)
    ours = mcmi_torch.cmi(logits, target, q)
    assert torch.isfinite(ours)
    assert_close_rel(ours, reference.cmi(logits.double(), target, q), RTOL[torch.float32])


def test_nan_and_inf_logits_propagate():
    logits, target, q = random_problem(4, 5)
    target[:] = 1
    logits[2, 3] = float("nan")
    logits[3, 0] = float("inf")
    rows = mcmi_torch.cmi(logits, target, q, reduction="none")
    assert torch.isnan(rows[2]) and torch.isnan(rows[3])
    assert torch.isfinite(rows[:2]).all()
    assert torch.isnan(mcmi_torch.cmi(logits, target, q))


@pytest.mark.parametrize("log_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_class_sums(log_probs, dtype):
    logits, target, _ = random_problem(200, 37, 11, dtype=dtype)
    sums, counts = mcmi_torch.class_sums(logits, target, 11, temperature=1.7, log_probs=log_probs)
    ref_sums, ref_counts = reference.class_sums(
        logits.double(), target, 11, temperature=1.7, log_probs=log_probs
    )
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts, ref_counts)
    assert_close_rel(sums, ref_sums, 1e-5 if dtype != torch.float64 else 1e-12)
