"""Hostile input at the op layer: every case gets the right answer or a clear
error naming the problem (sizes, devices, in-place outputs, floor, extreme
temperatures, non-finite values, small KL in float32)."""

import math

import pytest
import torch
from conftest import RTOL, assert_close_rel, assert_kl_bound
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcmi_torch
from mcmi_torch import reference
from mcmi_torch._args import CENTROID_FLOOR
from mcmi_torch._ops import MAX_CLASSES

FLOAT32_MIN_NORMAL = torch.finfo(torch.float32).tiny


def op(logits, target, q, **kw):
    args = dict(log_centroids=False, num_classes=logits.shape[1], temperature=1.0,
                ce_weight=0.0, cmi_weight=1.0, floor=CENTROID_FLOOR, ignore_index=-100,
                reduction=0, with_grad=False)  # fmt: skip
    args.update(kw)
    return torch.ops.mcmi.loss(logits, target, q, *args.values())


def problem(rows=6, cols=5, classes=None, seed=0, dtype=torch.float32):
    classes = cols if classes is None else classes
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.arange(rows) % classes
    q = torch.softmax(torch.randn(classes, cols, generator=g, dtype=torch.float64), 1)
    return logits, target, q.to(torch.float64 if dtype == torch.float64 else torch.float32)


# ----------------------------------------------------------------- sizes
@pytest.mark.parametrize("num_classes", [1 << 61, 1 << 62, MAX_CLASSES + 1, 0, -3])
def test_absurd_num_classes_is_refused_by_name(num_classes):
    logits, target, _q = problem()
    with pytest.raises(RuntimeError, match="num_classes must be >= 1 and <="):
        op(logits, target, None, num_classes=num_classes)
    with pytest.raises(RuntimeError, match="num_classes must be >= 1 and <="):
        mcmi_torch.class_sums(logits, target, num_classes)
    with pytest.raises(RuntimeError, match="num_classes must be >= 1 and <="):
        torch.ops.mcmi.class_sums(
            logits.to("meta"), target.to("meta"), num_classes, 1.0, -100, False
        )


# ----------------------------------------------------------------- devices
def test_meta_tensor_mixed_with_cpu_is_refused():
    logits, target, q = problem()
    meta_t, meta_q = target.to("meta"), q.to("meta")
    with pytest.raises(RuntimeError, match="centroids must be on the same device as logits"):
        op(logits, target, meta_q)
    with pytest.raises(RuntimeError, match="target must be on the same device as logits"):
        op(logits, meta_t, None)
    with pytest.raises(RuntimeError, match="target must be on the same device as logits"):
        torch.ops.mcmi.class_sums(logits, meta_t, 5, 1.0, -100, False)
    with pytest.raises(RuntimeError, match="scale must be on the same device as grad"):
        torch.ops.mcmi.scale_grad_(logits.to("meta"), torch.tensor(2.0))
    with pytest.raises(RuntimeError, match="scale must be on the same device as grad"):
        torch.ops.mcmi.scale_grad_(logits.clone(), torch.tensor(2.0, device="meta"))
    seen = torch.zeros(5, dtype=torch.bool)
    for name, args in {
        "centroids": (meta_q, seen, logits, target),
        "seen": (q, seen.to("meta"), logits, target),
        "target": (q, seen, logits, meta_t),
    }.items():
        with pytest.raises(RuntimeError, match=f"{name} must be on the same device as logits"):
            torch.ops.mcmi.ema_update_(*args, 1.0, 0.1, -100)
    # Unchanged: the CPU buffers of a refused in-place call are left as they were.
    assert not seen.any()


def test_all_meta_still_gives_shapes():
    logits, target, q = problem()
    loss, grad = op(logits.to("meta"), target.to("meta"), q.to("meta"), with_grad=True)
    assert loss.shape == (6,) and grad.shape == (6, 5) and loss.device.type == "meta"


# ----------------------------------------------------------------- in-place outputs
def test_scale_grad_rejects_overlapping_or_aliased_rows():
    row = torch.randn(1, 5)
    with pytest.raises(
        RuntimeError, match="grad is written in place, so its rows must not overlap"
    ):
        torch.ops.mcmi.scale_grad_(row.expand(4, 5), torch.tensor(2.0))
    base = torch.randn(20)
    overlapping = base.as_strided((4, 5), (2, 1))
    with pytest.raises(RuntimeError, match="rows must not overlap"):
        torch.ops.mcmi.scale_grad_(overlapping, torch.tensor(2.0))
    before = base.clone()
    grad = base[:15].view(3, 5)
    with pytest.raises(RuntimeError, match="grad is written in place and must not overlap scale"):
        torch.ops.mcmi.scale_grad_(grad, base[12:15])
    with pytest.raises(RuntimeError, match="must not overlap scale"):
        torch.ops.mcmi.scale_grad_(grad, base[0])
    assert torch.equal(base, before)
    torch.ops.mcmi.scale_grad_(grad, base[15:18])  # adjacent, not overlapping
    ok = torch.randn(3, 5)
    want = ok * torch.tensor([1.0, 2.0, 3.0]).unsqueeze(1)
    torch.ops.mcmi.scale_grad_(ok, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(ok, want)


def test_ema_update_rejects_expanded_or_aliased_buffers():
    logits, target, _q = problem()
    seen = torch.zeros(5, dtype=torch.bool)
    expanded = torch.full((1, 5), 0.2).expand(5, 5)
    with pytest.raises(RuntimeError, match="centroids is written in place, so its rows"):
        torch.ops.mcmi.ema_update_(expanded, seen, logits, target, 1.0, 0.1, -100)
    storage = torch.rand(100)
    centroids, logits_view = storage[:25].view(5, 5), storage[20:50].view(6, 5)
    with pytest.raises(
        RuntimeError, match="centroids is written in place and must not overlap logits"
    ):
        torch.ops.mcmi.ema_update_(centroids, seen, logits_view, target, 1.0, 0.1, -100)
    assert not seen.any()


# ----------------------------------------------------------------- floor
def test_floor_must_be_a_normal_number_of_the_compute_type():
    logits, target, q = problem()
    for floor in (1e-39, 1e-300, 0.0, -1.0, 1.0, math.nan):
        with pytest.raises(RuntimeError, match=r"centroid floor must be in .* got"):
            op(logits, target, q, floor=floor)
    op(logits, target, q, floor=FLOAT32_MIN_NORMAL)
    d_logits, d_target, d_q = problem(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="smallest normal number of float64"):
        op(d_logits, d_target, d_q, floor=1e-310)
    # Below float32's range is fine for float64 logits, and exact there.
    q0 = d_q.clone()
    q0[0, 0] = 0.0
    q0[0] /= q0[0].sum()
    got = op(d_logits, d_target, q0, floor=1e-300)[0]
    p = torch.softmax(d_logits, 1)
    logq = q0.clamp_min(1e-300).log()[d_target]
    torch.testing.assert_close(got, (p * (p.log() - logq)).sum(1), rtol=1e-10, atol=0)


# ----------------------------------------------------------------- temperature
@pytest.mark.parametrize("temperature", [3e-39, 1e-30, 1e-6, 1e6, 1e30, 1e300])
@pytest.mark.parametrize("centroids", ["fixed", "batch"])
def test_extreme_temperatures_match_float64(temperature, centroids):
    logits, target, q = problem(rows=8, cols=7, classes=3, seed=3)
    q = q if centroids == "fixed" else None
    want = reference.cmi(logits.double(), target, None if q is None else q.double(),
                         temperature=temperature, reduction="none")  # fmt: skip
    assert torch.isfinite(want).all()
    for dtype in (torch.float32, torch.float64):
        qd = None if q is None else q.to(dtype)
        loss, grad = op(logits.to(dtype), target, qd, num_classes=3, temperature=temperature,
                        ce_weight=1.0, reduction=0, with_grad=True)  # fmt: skip
        ce = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
        torch.testing.assert_close(loss.double(), want + ce, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(grad).all()
        sums, _ = mcmi_torch.class_sums(logits.to(dtype), target, 3, temperature=temperature)
        want_sums, _ = reference.class_sums(logits.double(), target, 3, temperature=temperature)
        torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_finite_logits_propagate_nan(bad, dtype):
    logits, target, q = problem(rows=6, cols=5, classes=2, dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1, 1, 1])
    logits[1, 2] = bad
    logits = logits.to(dtype)
    for mode in ("fixed", "batch"):
        qd = q.to(torch.float64 if dtype == torch.float64 else torch.float32)
        loss = op(logits, target, qd if mode == "fixed" else None, num_classes=2)[0]
        want = reference.cmi(logits.double(), target, qd.double() if mode == "fixed" else None,
                             reduction="none")  # fmt: skip
        # Where the float64 reference is NaN the kernel is NaN, and finite
        # where it is finite: a NaN or +inf row poisons its class mean (its
        # classmates).
        assert torch.equal(loss.isnan(), want.isnan()), (mode, loss, want)
        assert want[1].isnan()
        assert torch.isfinite(loss[3:]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 16),
    cols=st.integers(2, 1100),
    masked=st.sampled_from([0.1, 0.5, 0.9]),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    mode=st.sampled_from(["fixed", "log", "batch"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_neg_inf_logits_are_classes_of_probability_zero(rows, cols, masked, temperature, mode,
                                                        dtype, seed):  # fmt: skip
    """A -inf logit (a masked class) adds nothing to the KL (0 log 0 = 0) and
    gets a zero gradient, as in F.cross_entropy: per-row KLs against the
    float64 reference within the bound of docs/math.md, and CE + KL (values
    where CE is infinite, gradients) against the reference and
    F.cross_entropy; a row with no finite logit is NaN (and, with in-batch
    centroids, its classmates)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, cols, generator=g) < masked
    mask[:, 0] = False  # a finite logit in every row but the last
    if rows > 1:
        mask[-1] = True
    logits = logits.masked_fill(mask, -math.inf).to(dtype)
    target = torch.randint(0, cols, (rows,), generator=g)
    q = torch.softmax(torch.randn(cols, cols, generator=g, dtype=torch.float64), 1)
    given_q = None if mode == "batch" else q.to(dtype)
    kernel_q = given_q.log() if mode == "log" else given_q
    kw = dict(log_centroids=mode == "log", temperature=temperature, with_grad=True)
    got_kl = op(logits, target, kernel_q, **kw)[0]
    got, grad = op(logits, target, kernel_q, ce_weight=1.0, **kw)
    x = logits.double().requires_grad_()
    # The centroids the kernel sees: with log centroids, those the rounded logs give.
    seen_q = kernel_q.double().exp() if mode == "log" else given_q
    kl = reference.cmi(x, target, None if seen_q is None else seen_q.double(),
                       temperature=temperature, reduction="none")  # fmt: skip
    ce = torch.nn.functional.cross_entropy(x, target, reduction="none")
    want = ce + kl
    nan_rows = want.isnan()
    if rows > 1:
        assert nan_rows[-1]
    assert torch.equal(got.isnan(), nan_rows), (got, want)
    finite = want.isfinite()  # CE is +inf where the label's logit is -inf
    assert torch.equal(got[~finite & ~nan_rows], want[~finite & ~nan_rows].to(dtype))
    assert torch.equal(got_kl.isnan(), nan_rows)
    if mode == "log":
        # float32 log centroids go through the kernel's exp (2 ulp): an error of
        # the centroids, which the KL bound does not cover; relative to the largest.
        assert_close_rel(got_kl[~nan_rows], kl[~nan_rows], RTOL[dtype], "KL")
    else:
        # In-batch KLs are taken against the floored means renormalized (docs/math.md).
        renorm = cols * CENTROID_FLOOR if mode == "batch" else 0.0
        assert_kl_bound(got_kl[~nan_rows], kl[~nan_rows], dtype, extra=renorm)
    # Zero gradient at every -inf logit but the label's, whose CE gradient
    # is -1 (p_y - 1), as F.cross_entropy's.
    at_label = torch.nn.functional.one_hot(target, cols).bool()
    assert (grad[mask & ~at_label & ~nan_rows[:, None]] == 0).all()
    if mode != "batch" and not nan_rows.all():  # in-batch coupling is Python's
        (want_grad,) = torch.autograd.grad(want[~nan_rows].sum(), x)
        # The relative error of docs/math.md, against the largest entry.
        assert_close_rel(grad[~nan_rows], want_grad[~nan_rows], RTOL[dtype], "gradient")


def test_nan_in_batch_centroids_reaches_every_classmate():
    logits, _, _ = problem(rows=8, cols=6)
    target = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    logits[2, 4] = math.nan
    loss = mcmi_torch.cmi(logits, target, reduction="none")
    assert loss[[0, 2, 4]].isnan().all()
    assert torch.isfinite(loss[[1, 3, 5, 6, 7]]).all()


# ----------------------------------------------------------------- randomized values
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 1100),
    classes=st.integers(1, 4),
    temperature=st.sampled_from([0.05, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0]),
    spread=st.sampled_from([0.0, 0.01, 0.1, 1.0, 5.0]),
    concentration=st.sampled_from([0.0, 0.01, 0.3, 3.0]),
    batch=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_values_match_float64(rows, cols, classes, temperature, spread, concentration,
                                     batch, dtype, seed):  # fmt: skip
    """Per-row KL against the float64 reference, over shapes, temperatures,
    rows that differ little (small in-batch KL) and centroids from
    near-uniform to concentrated: the per-row bound of docs/math.md."""
    g = torch.Generator().manual_seed(seed)
    base = 2 * torch.randn(1, cols, generator=g, dtype=torch.float64)
    logits = (base + spread * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    classes = min(classes, cols) if batch else classes  # the reference's in-batch K is C
    target = torch.randint(0, classes, (rows,), generator=g)
    raw = concentration * torch.randn(classes, cols, generator=g, dtype=torch.float64)
    q = None if batch else torch.softmax(raw, 1).to(logits.dtype)
    got = op(logits, target, q, num_classes=classes, temperature=temperature)[0]
    want = reference.cmi(logits.double(), target, None if q is None else q.double(),
                         temperature=temperature, reduction="none")  # fmt: skip
    # In-batch KLs are taken against the floored means renormalized (docs/math.md),
    # which moves them by at most cols * floor from the reference's.
    renorm = cols * CENTROID_FLOOR if batch else 0.0
    assert_kl_bound(got, want, dtype, extra=renorm)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    bad_row=st.integers(0, 11),
    bad_label=st.one_of(
        st.integers(-(2**63), -101), st.integers(-99, -1), st.integers(12, 2**63 - 1)
    ),
    num_classes=st.one_of(st.integers(-(2**63), 0), st.integers(MAX_CLASSES + 1, 2**63 - 1)),
)
def test_random_bad_arguments_name_the_problem(rows, cols, bad_row, bad_label, num_classes):
    logits = torch.randn(rows, cols)
    target = torch.randint(0, cols, (rows,))
    target[bad_row % rows] = bad_label
    with pytest.raises(RuntimeError, match=rf"target\[{bad_row % rows}\] is out of range"):
        op(logits, target, None, num_classes=cols)
    with pytest.raises(RuntimeError, match="num_classes must be"):
        op(logits, target, None, num_classes=num_classes)
    with pytest.raises(RuntimeError, match="num_classes must be"):
        mcmi_torch.class_sums(logits, target, num_classes)
