"""torch.func transforms and forward-mode AD: jvp, jacfwd and dual numbers
against torch's own forward AD of the float64 reference, in every centroid
mode; grad and vjp of an 'ema' criterion against eager backward."""

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
