"""torch.func transforms and forward-mode AD: jvp, jacfwd and dual numbers
against torch's own forward AD of the float64 reference, in every centroid
mode; grad and vjp of an 'ema' criterion against eager backward."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import (
    COMPILE_BACKEND,
    RTOL,
    SMALL_PROBLEMS,
    assert_close_rel,
    make_criterion,
    random_problem,
)
from hypothesis import given, settings

import mcmi_torch
from mcmi_torch import CENTROID_FLOOR, reference

REDUCTIONS = ["mean", "sum", "none"]


def reference_module(crit, q_before):
    """The float64 reference of ``crit`` with the centroids a step reads."""
    q = None if crit.mode == "batch" else q_before.double()

    def fn(z, target):
        kw = dict(ignore_index=crit.ignore_index, reduction=crit.reduction)
        weight = None if crit.weight is None else crit.weight.double()
        ce = F.cross_entropy(z, target, weight=weight, label_smoothing=crit.label_smoothing, **kw)
        kl = reference.cmi(z, target, q, temperature=crit.temperature, **kw)
        return ce - crit.lam * kl

    return fn


def dual_tangent(fn, z, v):
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(z, v))
        return fwAD.unpack_dual(out).tangent


def forward_modes(fn, z, v, fresh=None):
    """The tangent of fn at z along v by jvp, by dual numbers, and by jacfwd
    (the Jacobian contracted with v); ``fresh()`` restores state that a call
    of ``fn`` changes (an EMA update) before each."""
    tangents = {}
    for name in ("jvp", "dual", "jacfwd"):
        if fresh is not None:
            fresh()
        if name == "jvp":
            tangents[name] = torch.func.jvp(fn, (z,), (v,))[1]
        elif name == "dual":
            tangents[name] = dual_tangent(fn, z, v)
        else:
            jacobian = torch.func.jacfwd(fn)(z)
            tangents[name] = (jacobian * v).flatten(start_dim=jacobian.dim() - 2).sum(-1)
    return tangents


def check_tangents(ours, want, z, v, fresh=None):
    expected = torch.func.jvp(want, (z,), (v,))[1]
    assert expected.abs().max() > 1e-4  # not a vanishing derivative
    for name, got in forward_modes(ours, z, v, fresh).items():
        assert got is not None, name
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_module_forward_mode_matches_the_reference(centroid_mode, reduction, smoothing):
    """jvp, dual numbers and jacfwd of MCMILoss, with and without label
    smoothing and class weights (the CE term then comes from F.cross_entropy),
    equal the reference's forward AD; an 'ema' step uses the centroids from
    before its update."""
    logits, target, q = random_problem(12, 5, dtype=torch.float64, scale=2.0, ignore=0.2)
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if smoothing else None
    kw = dict(temperature=1.5, reduction=reduction, label_smoothing=smoothing, weight=weight)
    crit = make_criterion(centroid_mode, q, **kw)
    crit.guard = None
    if centroid_mode == "ema":
        crit.double()
        crit(torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 5, (30,)))
    state = {key: value.clone() for key, value in crit.state_dict().items()}
    want = reference_module(crit, crit.centroids.clone() if centroid_mode != "batch" else None)
    check_tangents(
        lambda z: crit(z, target),
        lambda z: want(z, target),
        logits,
        torch.randn_like(logits),
        fresh=lambda: crit.load_state_dict(state),
    )


@settings(max_examples=25, deadline=None)
@given(**SMALL_PROBLEMS)
def test_random_forward_mode_of_cmi(rows, cols, temperature, ignore, batch, reduction, seed):
    """Random shapes (one row, one column, every row ignored, classes with
    one member) for cmi and mcmi: with in-batch centroids and 'none', the
    class means couple the rows."""
    logits, target, q = random_problem(rows, cols, dtype=torch.float64, ignore=ignore, seed=seed)
    q = None if batch else q
    v = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    kw = dict(temperature=temperature, reduction=reduction)
    # In-batch KLs are taken against the floored means renormalized
    # (docs/math.md), which moves each gradient entry by at most cols * floor / T.
    atol = 1e-12 + (cols * CENTROID_FLOOR / temperature * v.abs().sum().item() if batch else 0)
    for ours, want in [(mcmi_torch.cmi, reference.cmi), (mcmi_torch.mcmi, reference.mcmi)]:
        expected = torch.func.jvp(lambda z, f=want: f(z, target, q, **kw), (logits,), (v,))[1]
        for name, got in forward_modes(lambda z, f=ours: f(z, target, q, **kw), logits, v).items():
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=atol, msg=name)


def test_forward_mode_in_float32_and_under_no_grad():
    """Dual numbers need no grad mode; a float32 tangent is close to float64's;
    a tangent that also requires grad gives both a tangent and a gradient."""
    logits, target, q = random_problem(20, 7, scale=2.0)
    v = torch.randn_like(logits)
    want = torch.func.jvp(lambda z: reference.cmi(z, target, None), (logits.double(),),
                          (v.double(),))[1]  # fmt: skip
    with torch.no_grad():
        got = dual_tangent(lambda z: mcmi_torch.cmi(z, target), logits, v)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    z = logits.clone().requires_grad_(True)
    with fwAD.dual_level():
        out = mcmi_torch.cmi(fwAD.make_dual(z, v), target, q)
        tangent = fwAD.unpack_dual(out).tangent
    out.backward()
    torch.testing.assert_close(tangent, (z.grad * v).sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_mode_in_16_bits(dtype, reduction):
    """16-bit logits: the tangent, summed in float32, within 1e-2 of float64."""
    logits, target, _ = random_problem(64, 1000, dtype=dtype)
    v = torch.randn_like(logits)
    kw = dict(reduction=reduction)
    got = torch.func.jvp(lambda z: mcmi_torch.cmi(z, target, **kw), (logits,), (v,))[1]
    want = torch.func.jvp(lambda z: reference.cmi(z, target, **kw), (logits.double(),),
                          (v.double(),))[1]  # fmt: skip
    assert got.dtype == dtype
    assert_close_rel(got, want, RTOL[dtype], "tangent")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_ema_under_torch_func_uses_the_centroids_of_its_value(reduction, transform):
    """grad / vjp of an 'ema' criterion differentiate the value they return
    (the centroids before this step's update), as eager backward does."""
    logits, target, _ = random_problem(16, 4, ignore=0.0)
    crit = mcmi_torch.MCMILoss(0.5, "ema", num_classes=4, reduction=reduction)
    crit(3 * torch.randn(16, 4), target)  # centroids away from uniform
    eager = mcmi_torch.MCMILoss(0.5, "ema", num_classes=4, reduction=reduction)
    eager.load_state_dict(crit.state_dict())
    weight = torch.rand(16) if reduction == "none" else torch.tensor(1.0)
    z = logits.clone().requires_grad_(True)
    eager(z, target).backward(weight)
    fn = lambda x: crit(x, target)  # noqa: E731
    if transform == "grad":
        got = torch.func.grad(lambda x: (fn(x) * weight).sum())(logits)
    else:
        got = torch.func.vjp(fn, logits)[1](weight)[0]
    assert z.grad.abs().max() > 1e-2
    torch.testing.assert_close(got, z.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(crit.centroids, eager.centroids)  # both updated once more


@pytest.mark.parametrize("batch", [False, True])
def test_per_sample_gradients_with_vmap(batch):
    """vmap of grad and of jvp over a stack of problems: each problem's
    gradient and tangent."""
    logits, target, q = random_problem(15, 4, dtype=torch.float64, scale=2.0)
    z, y, q = logits.view(3, 5, 4), target.view(3, 5), None if batch else q
    v = torch.randn_like(z)
    got = torch.func.vmap(torch.func.grad(lambda a, b: mcmi_torch.cmi(a, b, q)))(z, y)
    tangents = torch.func.vmap(
        lambda a, b, t: torch.func.jvp(
            lambda x: mcmi_torch.cmi(x, b, q, reduction="none"), (a,), (t,)
        )[1]
    )(z, y, v)
    for i in range(3):
        want = torch.func.grad(lambda a, b=y[i]: reference.cmi(a, b, q))(z[i])
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)
        want = torch.func.jvp(lambda a, b=y[i]: reference.cmi(a, b, q, reduction="none"),
                              (z[i],), (v[i],))[1]  # fmt: skip
        torch.testing.assert_close(tangents[i], want, rtol=1e-10, atol=1e-12)


def test_ema_update_under_forward_mode_is_the_eager_one():
    """A step under jvp, dual numbers or jacfwd updates the 'ema' buffers
    once, exactly as an eager step does."""
    logits, target, _ = random_problem(16, 4, ignore=0.0)
    v = torch.randn_like(logits)
    eager = mcmi_torch.MCMILoss(0.5, "ema", num_classes=4)
    eager(logits.clone().requires_grad_(True), target)
    steps = {
        "jvp": lambda crit: torch.func.jvp(lambda z: crit(z, target), (logits,), (v,)),
        "dual": lambda crit: dual_tangent(lambda z: crit(z, target), logits, v),
        "jacfwd": lambda crit: torch.func.jacfwd(lambda z: crit(z, target))(logits),
    }
    for name, step in steps.items():
        crit = mcmi_torch.MCMILoss(0.5, "ema", num_classes=4)
        step(crit)
        assert torch.equal(crit.centroids, eager.centroids), name
        assert torch.equal(crit.seen, eager.seen), name


def test_ema_update_inside_vmap_is_refused_clearly():
    """One buffer cannot take a batch of updates; without one (no_grad) the
    buffer is only read."""
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4)
    z, y = torch.randn(3, 6, 4), torch.randint(0, 4, (3, 6))
    with pytest.raises(RuntimeError, match=r"centroids='ema'\) cannot update its buffer inside"):
        torch.func.vmap(crit)(z, y)
    with torch.no_grad():
        got = torch.func.vmap(crit)(z, y)
    want = [reference.mcmi_loss(z[i], y[i], 0.3, crit.centroids) for i in range(3)]
    torch.testing.assert_close(got, torch.stack(want))
    assert not crit.seen.any()


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
def test_forward_mode_under_torch_compile():
    """jvp inside torch.compile gives the eager tangent (through a graph
    break); with fullgraph=True it is right or raises, never a dropped tangent."""
    logits, target, q = random_problem(8, 5, dtype=torch.float64)
    v = torch.randn_like(logits)

    def tangent(z):
        return torch.func.jvp(lambda x: mcmi_torch.cmi(x, target, q), (z,), (v,))[1]

    want = tangent(logits)
    assert want.abs() > 1e-4
    torch.compiler.reset()
    torch.testing.assert_close(
        torch.compile(tangent, backend=COMPILE_BACKEND)(logits), want, rtol=1e-12, atol=0
    )
    torch.compiler.reset()
    try:
        got = torch.compile(tangent, fullgraph=True, backend=COMPILE_BACKEND)(logits)
    except torch._dynamo.exc.Unsupported:
        return
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", [False, True])
def test_hessian_forward_over_reverse(batch, reduction):
    """torch.func.hessian (jacfwd of jacrev) and jvp of grad: forward mode
    through the differentiable backward."""
    logits, target, q = random_problem(5, 4, dtype=torch.float64, scale=2.0)
    q = None if batch else q
    ours = lambda z: mcmi_torch.cmi(z, target, q, reduction=reduction).sum()  # noqa: E731
    want = lambda z: reference.cmi(z, target, q, reduction=reduction).sum()  # noqa: E731
    hessian = torch.func.hessian(want)(logits)
    assert hessian.abs().max() > 1e-3
    torch.testing.assert_close(torch.func.hessian(ours)(logits), hessian, rtol=1e-9, atol=1e-12)
    v = torch.randn_like(logits)
    hvp = torch.func.jvp(torch.func.grad(ours), (logits,), (v,))[1]
    torch.testing.assert_close(hvp, torch.func.jvp(torch.func.grad(want), (logits,), (v,))[1],
                               rtol=1e-9, atol=1e-12)  # fmt: skip


def test_differentiating_with_respect_to_given_centroids_raises():
    """Given centroids are constants: a gradient, Jacobian or tangent with
    respect to them is refused, not returned as zero."""
    logits, target, q = random_problem(6, 4, dtype=torch.float64)
    f = lambda c: mcmi_torch.cmi(logits, target, c)  # noqa: E731
    attempts = {
        "grad": lambda: torch.func.grad(f)(q),
        "jacrev": lambda: torch.func.jacrev(f)(q),
        "jvp": lambda: torch.func.jvp(f, (q,), (q,)),
        "jacfwd": lambda: torch.func.jacfwd(f)(q),
        "dual": lambda: dual_tangent(f, q, q),
        "eager": lambda: f(q.clone().requires_grad_(True)),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ValueError, match=r"centroids are used as constants.*detach"):
            attempt()
            pytest.fail(name)
    with torch.no_grad():  # no gradient asked for
        f(q.clone().requires_grad_(True))


@pytest.mark.parametrize("batch", [False, True])
def test_second_order_through_forward_mode(batch):
    """jacrev of jacfwd and the gradient of a dual tangent (a Hessian-vector
    product) differentiate the tangent, computed with torch ops; forward over forward, whose
    outer derivative torch drops for an autograd.Function, raises."""
    logits, target, q = random_problem(5, 4, dtype=torch.float64, scale=2.0)
    q = None if batch else q
    ours = lambda z: mcmi_torch.cmi(z, target, q, reduction="none")  # noqa: E731
    want = lambda z: reference.cmi(z, target, q, reduction="none")  # noqa: E731
    expected = torch.func.jacrev(torch.func.jacfwd(want))(logits)
    assert expected.abs().max() > 1e-3
    got = torch.func.jacrev(torch.func.jacfwd(ours))(logits)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    z, v = logits.clone().requires_grad_(True), torch.randn_like(logits)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ours(fwAD.make_dual(z, v)).sum()).tangent
        hvp = torch.autograd.grad(tangent, z)[0]
    g = torch.autograd.grad(want(z).sum(), z, create_graph=True)[0]
    torch.testing.assert_close(hvp, torch.autograd.grad((g * v).sum(), z)[0], rtol=1e-9,
                               atol=1e-12)  # fmt: skip
    with pytest.raises(
        RuntimeError, match=r"forward mode over forward mode .* torch\.func\.hessian"
    ):
        torch.func.jacfwd(torch.func.jacfwd(ours))(logits)


# ------------------------------------------- ignored rows and -inf logits, every order
def padded_problem(seed, rows=7, cols=5, classes=None):
    """A float64 problem whose ignored rows hold padding (NaN, -inf, huge or a
    mix, per row), whose valid rows hold -inf at some positions (never a
    whole row), with a random ignore_index; the mask of ignored rows is
    random, none or all of them. Also random tangent (NaN at ignored rows),
    upstream weights and a second direction."""
    g = torch.Generator().manual_seed(seed)
    classes = cols if classes is None else classes
    logits = 2 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=g)
    ignore_index = [-100, -1, classes + 3][seed % 3]
    kind = seed % 4
    ignored = torch.rand(rows, generator=g) < 0.4
    ignored = ignored if kind > 1 else torch.full((rows,), bool(kind))
    holes = torch.rand(rows, cols, generator=g) < 0.25
    holes[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] = False
    logits[holes & ~ignored.unsqueeze(1)] = -math.inf
    padding = [math.nan, -math.inf, 1e300, -1e300]
    for i in ignored.nonzero().flatten().tolist():
        fill = torch.tensor(padding, dtype=torch.float64)[torch.randint(0, 4, (cols,), generator=g)]
        logits[i] = fill if i % 2 else padding[i % 4]
    target[ignored] = ignore_index
    v = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    v[ignored] = math.nan
    w = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    u = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(classes, cols, generator=g, dtype=torch.float64), 1)
    return logits, target, ignore_index, v, w, u, q


def on_valid_rows(fn, target, ignore_index, reduction):
    """``fn(z_valid, y_valid)`` as a function of all the rows: the reference
    never sees an ignored row; per-row results get 0 there."""
    valid = target != ignore_index

    def full(z):
        out = fn(z[valid], target[valid])
        return out if reduction != "none" else out.new_zeros(valid.shape).index_put((valid,), out)

    return full


def every_order(ours, want, z, v, w, u, fresh=None, second=True):
    """Value, gradient (upstream ``w`` for 'none'), tangent along ``v`` (jvp,
    dual numbers) and, with ``second``, the Hessian-vector product along
    ``u`` (create_graph and jvp of grad) of ``ours`` against ``want``."""
    fresh = fresh or (lambda: None)

    def scalar(f):
        return lambda x: (f(x) * (w if f(x).dim() else 1)).sum()

    fresh()
    expected = want(z)
    torch.testing.assert_close(ours(z), expected, rtol=1e-9, atol=1e-10, msg="value")
    grad_want = torch.func.grad(scalar(want))(z)
    x = z.clone().requires_grad_(True)
    fresh()
    out = ours(x)
    (out * (w if out.dim() else 1)).sum().backward()
    torch.testing.assert_close(x.grad, grad_want, rtol=1e-9, atol=1e-10, msg="gradient")
    tangent = torch.func.jvp(want, (z,), (torch.nan_to_num(v),))[1]
    for name in ("jvp", "dual"):
        fresh()
        got = torch.func.jvp(ours, (z,), (v,))[1] if name == "jvp" else dual_tangent(ours, z, v)
        torch.testing.assert_close(got, tangent, rtol=1e-9, atol=1e-10, msg=name)
    if not second:
        return
    hvp = torch.func.jvp(torch.func.grad(scalar(want)), (z,), (u,))[1]
    x = z.clone().requires_grad_(True)
    out = ours(x)
    g = torch.autograd.grad((out * (w if out.dim() else 1)).sum(), x, create_graph=True)[0]
    got = torch.autograd.grad((g * u).sum(), x)[0]
    torch.testing.assert_close(got, hvp, rtol=1e-9, atol=1e-10, msg="create_graph")
    got = torch.func.jvp(torch.func.grad(scalar(ours)), (z,), (u,))[1]
    torch.testing.assert_close(got, hvp, rtol=1e-9, atol=1e-10, msg="jvp of grad")


@pytest.mark.parametrize("seed", range(6))
def test_the_reference_selects_out_ignored_rows(seed):
    """The float64 reference against an independent computation on the
    valid rows alone: the KL as xlogy(P, P) - P log Q and the gradient of
    docs/math.md, (P log P - P log Q - P KL) / (n T) per entry, in each
    mode and reduction; padding in ignored rows reaches nothing, their own
    gradient is 0."""
    z, y, ignore, *_, q = padded_problem(500 + seed)
    valid, temperature = y != ignore, [0.5, 1.0, 2.5][seed % 3]
    p = torch.softmax(z[valid] / temperature, 1)
    labels = y[valid]
    for batch in (False, True):
        if batch:
            q = torch.stack([p[labels == c].sum(0) / max((labels == c).sum(), 1) for c in range(5)])
        log_q = q.clamp_min(CENTROID_FLOOR).log()[labels]
        kl = (torch.special.xlogy(p, p) - p * log_q).sum(1)
        n = max(valid.sum().item(), 1)
        rows = torch.special.xlogy(p, p) - p * log_q - p * kl.unsqueeze(1)
        expected = {"none": kl, "sum": kl.sum(), "mean": kl.sum() / n}
        for reduction, value in expected.items():
            x = z.clone().requires_grad_(True)
            kw = dict(temperature=temperature, ignore_index=ignore, reduction=reduction)
            got = reference.cmi(x, y, None if batch else q, **kw)
            got.sum().backward()
            want = value if reduction != "none" else z.new_zeros(7).index_put((valid,), value)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))
            scale = temperature * (n if reduction == "mean" else 1)
            torch.testing.assert_close(x.grad[valid], rows / scale, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_every_order_of_cmi_selects_out_ignored_rows(seed):
    """cmi and mcmi, fixed (K != C too) and in-batch centroids, every
    reduction and several temperatures: value, gradient, tangents and
    second derivatives equal torch's AD of the float64 reference on the
    valid rows alone, whatever padding the ignored rows hold and with -inf
    logits in valid rows; vmap of grad gives each problem's gradient."""
    for case, (batch, reduction) in enumerate([(b, r) for b in (False, True) for r in REDUCTIONS]):
        temperature = [0.5, 2.5][(seed + case) % 2]
        classes = 5 if batch else 3 + (seed + case) % 4
        z, y, ignore, v, w, u, q = padded_problem(100 * seed + case, classes=classes)
        q = None if batch else q
        kw = dict(temperature=temperature, reduction=reduction)
        sign = 1 if case % 2 else -1
        fn = mcmi_torch.cmi if sign == 1 else mcmi_torch.mcmi
        ours = lambda x, f=fn, y=y, q=q, i=ignore, kw=kw: f(x, y, q, ignore_index=i, **kw)  # noqa: E731
        want = on_valid_rows(
            lambda a, b, s=sign, q=q, kw=kw: s * reference.cmi(a, b, q, **kw), y, ignore, reduction
        )
        every_order(ours, want, z, v, w, u, second=(seed + case) % 3 == 0)
    zs, ys = torch.stack([z, z.flip(0)]), torch.stack([y, y.flip(0)])
    got = torch.func.vmap(
        torch.func.grad(lambda a, b: mcmi_torch.cmi(a, b, q, ignore_index=ignore))
    )
    for i, grad in enumerate(got(zs, ys)):
        want = on_valid_rows(lambda a, b: reference.cmi(a, b, q), ys[i], ignore, "mean")
        torch.testing.assert_close(grad, torch.func.grad(want)(zs[i]), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_every_order_of_the_module_selects_out_ignored_rows(centroid_mode, seed):
    """MCMILoss in each mode, reduction, with and without class weights and
    label smoothing: as above, with vmap of grad (per-sample gradients) in
    'fixed' and 'batch' mode; an 'ema' step is checked at the centroids it
    reads (second derivatives of 'ema' raise, see its own test)."""
    z, y, ignore, v, w, u, q = padded_problem(1000 + seed)
    reduction = REDUCTIONS[seed % 3]
    options = [{}, dict(label_smoothing=0.2), dict(weight=torch.rand(5, dtype=torch.float64))]
    kw = dict(reduction=reduction, temperature=[0.5, 1.0, 3.0][seed % 3], ignore_index=ignore)
    crit = make_criterion(centroid_mode, q, **kw, **options[seed % 3])
    if centroid_mode == "ema":
        crit.double()
        crit(2 * torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 5, (30,)))
    state = {key: value.clone() for key, value in crit.state_dict().items()}
    q_used = None if centroid_mode == "batch" else crit.centroids.clone()

    def want_rows(a, b):
        options = dict(weight=crit.weight, label_smoothing=crit.label_smoothing)
        kw = dict(temperature=crit.temperature, reduction=reduction)
        return reference.mcmi_loss(a, b, crit.lam, q_used, **kw, **options)

    want = on_valid_rows(want_rows, y, ignore, reduction)
    ours = lambda x: crit(x, y)  # noqa: E731
    every_order(ours, want, z, v, w, u, lambda: crit.load_state_dict(state), centroid_mode != "ema")
    if centroid_mode == "ema":
        return
    zs, ys = torch.stack([z, z.roll(1, 0)]), torch.stack([y, y.roll(1, 0)])
    got = torch.func.vmap(torch.func.grad(lambda a, b: crit(a, b).sum()))(zs, ys)
    for i in range(2):
        fn = on_valid_rows(want_rows, ys[i], ignore, reduction)
        want = torch.func.grad(lambda a, fn=fn: fn(a).sum())(zs[i])
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_overflow_of_z_over_t_in_any_derivative(reduction):
    """float32 logits near 1e38 at T < 1: z / T would overflow, the loss does
    not; tangents and second derivatives are those of the float64 reference
    (which does not overflow), not NaN."""
    g = torch.Generator().manual_seed(7)
    z = (torch.rand(6, 4, generator=g) * 2 - 1) * 3e38
    z[0, 1] = -math.inf
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    q = torch.softmax(torch.randn(4, 4, generator=g, dtype=torch.float64), 1)
    v, u = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    for batch in (False, True):
        c = None if batch else q.float()
        kw = dict(temperature=0.3, reduction=reduction)
        ours = lambda x, c=c, kw=kw: mcmi_torch.mcmi(x, y, c, **kw)  # noqa: E731
        qw = None if batch else q
        want = lambda x, qw=qw, kw=kw: reference.mcmi(x, y, qw, **kw)  # noqa: E731
        z64 = z.double()
        torch.testing.assert_close(ours(z).double(), want(z64), rtol=1e-5, atol=1e-6)
        tangent = torch.func.jvp(want, (z64,), (v.double(),))[1]
        torch.testing.assert_close(torch.func.jvp(ours, (z,), (v,))[1].double(), tangent,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(dual_tangent(ours, z, v).double(), tangent, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        hvp = torch.func.jvp(torch.func.grad(lambda x, f=want: f(x).sum()), (z64,), (u.double(),))
        hvp = hvp[1]
        x = z.clone().requires_grad_(True)
        grad = torch.autograd.grad(ours(x).sum(), x, create_graph=True)[0]
        got = torch.autograd.grad((grad * u).sum(), x)[0]
        torch.testing.assert_close(got.double(), hvp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(weight=torch.rand(4))])
def test_per_sample_gradients_of_the_module_with_vmap(centroid_mode, options):
    """vmap of grad over MCMILoss (per-sample gradients), with the fused CE
    term too: each problem's gradient in 'fixed' and 'batch' mode; 'ema'
    names the problem."""
    logits, target, q = random_problem(12, 4, dtype=torch.float64, scale=2.0)
    z, y = logits.view(3, 4, 4), target.view(3, 4)
    crit = make_criterion(centroid_mode, q, **options).double()
    per_sample = torch.func.vmap(torch.func.grad(lambda a, b: crit(a, b)))
    if centroid_mode == "ema":
        with pytest.raises(RuntimeError, match=r"centroids='ema'\) cannot update its buffer"):
            per_sample(z, y)
        return
    got = per_sample(z, y)
    for i in range(3):
        x = z[i].clone().requires_grad_(True)
        crit(x, y[i]).backward()
        torch.testing.assert_close(got[i], x.grad, rtol=1e-10, atol=1e-12)


def test_buffers_through_torch_func_in_every_mode():
    """An 'ema' criterion with float64 logits (a float32 buffer) under grad
    and jvp updates as an eager step does; fixed centroids given through
    functional_call (a vmapped ensemble too) or built inside a transform are
    used, and checked, like the module's own."""
    logits, target, q = random_problem(10, 5, dtype=torch.float64, scale=2.0)
    v = torch.randn_like(logits)
    crit, eager = (mcmi_torch.MCMILoss(0.4, "ema", num_classes=5) for _ in range(2))
    for _ in range(2):
        z = logits.clone().requires_grad_(True)
        eager(z, target).backward()
        got = torch.func.grad(lambda x: crit(x, target))(logits)
        torch.testing.assert_close(got, z.grad, rtol=1e-12, atol=0)
        assert torch.equal(crit.centroids, eager.centroids)
    tangent = torch.func.jvp(lambda x: crit(x, target), (logits,), (v,))[1]
    eager(logits.clone().requires_grad_(True), target)
    assert torch.equal(crit.centroids, eager.centroids) and torch.isfinite(tangent)
    fixed = mcmi_torch.MCMILoss(0.4, q)
    want = lambda x, c: reference.mcmi_loss(x, target, 0.4, c.double())  # noqa: E731
    qs = torch.softmax(torch.randn(3, 5, 5, dtype=torch.float64), 2)
    call = lambda c, x: torch.func.functional_call(fixed, {"centroids": c}, (x, target))  # noqa: E731
    grads = torch.func.vmap(torch.func.grad(call, argnums=1), in_dims=(0, None))(qs, logits)
    for i in range(3):
        torch.testing.assert_close(grads[i], torch.func.grad(want)(logits, qs[i]))
    torch.testing.assert_close(torch.func.grad(lambda x: call(qs[0], x))(logits), grads[0])
    bad = qs.clone()
    bad[1, 2, 0] += 0.5
    with pytest.raises(ValueError, match="centroids buffer was changed: centroids rows must sum"):
        torch.func.vmap(call, in_dims=(0, None))(bad, logits)

    def built_inside(x):
        return mcmi_torch.MCMILoss(0.4, torch.softmax(x.detach()[:5], 1))(x, target)

    inside = torch.softmax(logits[:5], 1)
    torch.testing.assert_close(torch.func.grad(built_inside)(logits),
                               torch.func.grad(want)(logits, inside))  # fmt: skip
    expected = torch.func.jvp(lambda x: want(x, inside), (logits,), (v,))[1]
    torch.testing.assert_close(torch.func.jvp(built_inside, (logits,), (v,))[1], expected)


@pytest.fixture
def no_vmap_fallback():
    """vmap raises where it would fall back to a slow loop over an op."""
    functorch = torch._C._functorch
    enabled = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    yield
    functorch._set_vmap_fallback_enabled(enabled)


def test_vmap_without_a_gradient_uses_the_losses_rule(no_vmap_fallback):
    """vmap of cmi with nothing to differentiate, and of an 'ema' criterion
    under no_grad, take the losses' own vmap rule (one kernel call per
    problem), not torch's fallback with its performance warning."""
    logits, target, q = random_problem(18, 4, ignore=0.2)
    z, y = logits.view(3, 6, 4), target.view(3, 6)
    got = torch.func.vmap(lambda a, b: mcmi_torch.cmi(a, b, q, reduction="none"))(z, y)
    want = [reference.cmi(z[i].double(), y[i], q, reduction="none") for i in range(3)]
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=1e-7)
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4)
    with torch.no_grad():
        torch.func.vmap(crit)(z, y)
