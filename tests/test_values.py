"""Values and gradients against the float64 plain-PyTorch reference."""

import pytest
import torch
from conftest import (
    RTOL,
    assert_close_rel,
    assert_kl_bound,
    centroids_used,
    make_criterion,
    needs_cuda,
    random_problem,
)

import mcmi_torch
from mcmi_torch import CENTROID_FLOOR, reference

SHAPES = [(0, 5, 5), (1, 1, 1), (1, 7, 7), (7, 3, 3), (33, 10, 4), (64, 100, 100),
          (129, 257, 300), (300, 1000, 1000), (16, 3000, 3000)]  # fmt: skip
REDUCTIONS = ["mean", "sum", "none"]


def both(fn_ours, fn_ref, logits, device="cpu"):
    """Our value and gradient on ``device`` vs the reference's, evaluated in
    float64 on the CPU on the same (rounded) inputs, with a random upstream
    gradient; ours are returned on the CPU."""
    z = logits.detach().clone().to(device).requires_grad_(True)
    z64 = logits.detach().double().requires_grad_(True)
    ours = fn_ours(z)
    ref = fn_ref(z64)
    w = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    ref_grad = torch.autograd.grad((ref * w).sum(), z64)[0] if z64.numel() else z64
    weighted = (ours * w.to(device, ours.dtype)).sum()
    our_grad = torch.autograd.grad(weighted, z)[0] if z.numel() else z
    return ours.detach().cpu(), ref, our_grad.cpu(), ref_grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_cmi_float32(shape, reduction, mode, device):
    rows, cols, classes = shape
    if mode == "batch":
        classes = cols
    logits, target, q = random_problem(rows, cols, classes, seed=rows * 7 + cols)
    q = q if mode == "fixed" else None
    kw = dict(temperature=1.0 if rows % 2 else 2.5, reduction=reduction)
    target_dev, q_dev = target.to(device), q.to(device) if q is not None else None
    ours, ref, g, g_ref = both(
        lambda z: mcmi_torch.cmi(z, target_dev, q_dev, **kw),
        lambda z: reference.cmi(z, target, q, **kw),
        logits,
        device,
    )
    assert ours.dtype == torch.float32
    # In-batch KLs are taken against the renormalized floored means (docs/math.md).
    renorm = cols * CENTROID_FLOOR if mode == "batch" else 0.0
    valid = int((target != -100).sum())
    assert_kl_bound(ours, ref, torch.float32, reduction=reduction, rows=valid, extra=renorm)
    assert_close_rel(g, g_ref, RTOL[torch.float32], "gradient", floor=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 10.0])
@pytest.mark.parametrize("cols", [20, 100, 1000])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_float32_meets_the_kl_bound_on_small_kls(mode, cols, temperature):
    """Rows close to their centroid, KLs from about 1e-3 down to below 1e-7
    (16 classes of 4 rows, each class with its own spread): each row within
    1e-5 |KL| + 1e-9 of float64 (docs/math.md, "Precision")."""
    g = torch.Generator().manual_seed(cols)
    base = 2 * torch.randn(1, cols, generator=g, dtype=torch.float64)
    target = torch.arange(64) // 4
    spread = torch.logspace(-0.5, -4, 16, dtype=torch.float64).unsqueeze(1)
    rows = spread[target] * torch.randn(64, cols, generator=g, dtype=torch.float64)
    logits = (base + rows).float()
    noise = 0.5 * spread * torch.randn(16, cols, generator=g, dtype=torch.float64)
    q = None if mode == "batch" else torch.softmax((base + noise) / temperature, 1).float()
    got = mcmi_torch.cmi(logits, target, q, temperature=temperature, reduction="none")
    want = reference.cmi(logits.double(), target, None if q is None else q.double(),
                         temperature=temperature, reduction="none")  # fmt: skip
    # The range the bound is about (float32 centroids do not sum to 1 exactly,
    # so a KL near 0 may be slightly negative).
    assert want.abs().min() < 1e-7 and want.max() > 1e-4
    renorm = cols * CENTROID_FLOOR if mode == "batch" else 0.0
    assert_kl_bound(got, want, torch.float32, extra=renorm)


@pytest.mark.parametrize("shape", SHAPES[1:7], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mcmi_loss_module(shape, reduction, centroid_mode, temperature, device):
    rows, cols, classes = shape
    classes = min(classes, cols) if centroid_mode == "fixed" else cols
    logits, target, q = random_problem(rows, cols, classes, seed=rows + cols)
    crit = make_criterion(centroid_mode, q, 0.3, temperature=temperature, reduction=reduction)
    if centroid_mode == "ema":
        crit.centroids.copy_(torch.softmax(torch.randn(cols, cols), 1))
    q_ref = centroids_used(crit)
    crit, target_dev = crit.to(device), target.to(device)
    ours, ref, g, g_ref = both(
        lambda z: crit(z, target_dev),
        lambda z: reference.mcmi_loss(
            z, target, 0.3, q_ref, temperature=temperature, reduction=reduction
        ),
        logits,
        device,
    )
    assert_close_rel(ours, ref, RTOL[torch.float32], "value")
    assert_close_rel(g, g_ref, RTOL[torch.float32], "gradient", floor=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 2), (7, 10), (64, 100), (256, 1000)])
def test_dtypes(dtype, centroid_mode, reduction, shape, device):
    logits, target, q = random_problem(*shape, dtype=dtype, scale=2.0)
    crit = make_criterion(centroid_mode, q, 0.5, temperature=1.5, reduction=reduction)
    q_used = centroids_used(crit)  # the stored float32 buffer
    crit, target_dev = crit.to(device), target.to(device)
    ours, ref, g, g_ref = both(
        lambda z: crit(z, target_dev),
        lambda z: reference.mcmi_loss(z, target, 0.5, q_used, temperature=1.5, reduction=reduction),
        logits,
        device,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_logits_propagate(dtype, device):
    logits, target, q = random_problem(8, 10, dtype=dtype, ignore=0.0)
    logits[1, 3] = float("nan")
    logits[2, :] = float("nan")
    logits[3, 0] = float("inf")
    z = logits.to(device).requires_grad_(True)
    rows = mcmi_torch.cmi(z, target.to(device), q.to(device), reduction="none")
    rows.sum().backward()
    rows, grad = rows.detach().cpu(), z.grad.cpu()
    assert torch.isnan(rows[[1, 2, 3]]).all() and torch.isfinite(rows[[0, 4, 5, 6, 7]]).all()
    assert torch.isnan(grad[[1, 2, 3]]).all() and torch.isfinite(grad[[0, 4, 5, 6, 7]]).all()
    assert torch.isnan(mcmi_torch.cmi(logits.to(device), target.to(device), q.to(device)))


@pytest.mark.parametrize("log_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_class_sums(log_probs, dtype, device):
    logits, target, _ = random_problem(200, 37, 11, dtype=dtype)
    sums, counts = mcmi_torch.class_sums(
        logits.to(device), target.to(device), 11, temperature=1.7, log_probs=log_probs
    )
    ref_sums, ref_counts = reference.class_sums(
        logits.double(), target, 11, temperature=1.7, log_probs=log_probs
    )
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts.cpu(), ref_counts)
    assert_close_rel(sums.cpu(), ref_sums, 1e-5 if dtype != torch.float64 else 1e-12)


def test_ema_update_op_follows_the_rule(device):
    """``ema_update_`` blends the batch centroids of the classes present into
    the rows already seen and sets the others (docs/math.md)."""
    logits, target, q = random_problem(300, 12, seed=3)
    target[target == 5] = 7  # class 5 absent: its row stays
    seen = torch.arange(12) % 3 == 0
    sums, counts = reference.class_sums(logits.double(), target, 12, temperature=1.3)
    batch = sums / counts.clamp_min(1).unsqueeze(1)
    present = (counts > 0).unsqueeze(1)
    blended = torch.where(seen.unsqueeze(1), q + 0.3 * (batch - q), batch)
    want = torch.where(present, blended, q)
    centroids, seen_dev = q.float().to(device), seen.to(device)
    torch.ops.mcmi.ema_update_(
        centroids, seen_dev, logits.to(device), target.to(device), 1.3, 0.3, -100
    )
    assert_close_rel(centroids.cpu(), want, 1e-5)
    assert torch.equal(seen_dev.cpu(), seen | present.squeeze(1))


@needs_cuda
def test_two_cuda_streams():
    """Two problems on two streams at once give what each gives alone."""
    a = random_problem(512, 1000, seed=1)
    b = random_problem(512, 1000, seed=2)
    alone = [mcmi_torch.cmi(z.cuda(), y.cuda(), q.cuda()) for z, y, q in (a, b)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    out = []
    torch.cuda.synchronize()
    for (z, y, q), stream in zip((a, b), streams):
        with torch.cuda.stream(stream):
            out.append(mcmi_torch.cmi(z.cuda(), y.cuda(), q.cuda()))
    torch.cuda.synchronize()
    for got, want in zip(out, alone):
        assert torch.equal(got, want)
