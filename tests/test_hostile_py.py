"""Hostile and careless input at the Python layer: double backward, centroid
state (load_state_dict, in-place writes, casts, inference mode), non-finite
batches, argument types, and torch.compile with dynamic shapes."""

import math

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import COMPILE_BACKEND, SMALL_PROBLEMS, make_criterion, random_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import mcmi_torch
from mcmi_torch import reference

REDUCTIONS = ["mean", "sum", "none"]


def reference_loss(crit, q_before, z, target):
    q = None if crit.mode == "batch" else q_before.double()
    kw = dict(temperature=crit.temperature, reduction=crit.reduction)
    return reference.mcmi_loss(z, target, crit.lam, q, **kw)


# ---------------------------------------------------------------- double backward
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_gradgradcheck(mode, reduction):
    logits, target, q = random_problem(6, 4, dtype=torch.float64, scale=1.5)
    crit = make_criterion(mode, q, temperature=2.0, reduction=reduction)
    z = logits.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda z: crit(z, target), (z,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hessian_vector_product_matches_reference(centroid_mode, reduction):
    """create_graph=True gives a gradient whose own gradient (a Hessian-vector
    product, with a random upstream weight per row) matches the reference's;
    'ema' through the functional form on a copy of its buffer."""
    logits, target, q = random_problem(11, 6, dtype=torch.float64, scale=2.0)
    crit = make_criterion(centroid_mode, q, temperature=1.5, reduction=reduction)
    z = logits.requires_grad_(True)
    v = torch.randn_like(z)
    w = torch.randn(11, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7).double()
    if centroid_mode == "ema":
        buffer = crit.centroids.clone()
        ours = mcmi_torch.cmi(z, target, buffer, temperature=1.5, reduction=reduction)
        want = reference.cmi(z, target, buffer.double(), temperature=1.5, reduction=reduction)
    else:
        before = crit.centroids.clone() if centroid_mode == "fixed" else None
        ours = crit(z, target)
        want = reference_loss(crit, before, z, target)
    g = torch.autograd.grad(ours, z, w, create_graph=True)[0]
    g_ref = torch.autograd.grad(want, z, w, create_graph=True)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    hv = torch.autograd.grad(g, z, v)[0]
    hv_ref = torch.autograd.grad(g_ref, z, v)[0]
    assert hv.abs().max() > 1e-3  # not a vanishing second derivative
    torch.testing.assert_close(hv, hv_ref, rtol=1e-9, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(**SMALL_PROBLEMS)
def test_random_hessian_vector_products(rows, cols, temperature, ignore, batch, reduction, seed):
    """Random shapes, including one column, one row and batches with every
    row ignored, against autograd through the reference."""
    logits, target, q = random_problem(rows, cols, dtype=torch.float64, ignore=ignore, seed=seed)
    q = None if batch else q
    kw = dict(temperature=temperature, reduction=reduction)
    z = logits.requires_grad_(True)
    w = torch.randn(rows, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)
    v = torch.randn_like(z)
    hvps = []
    for fn in (mcmi_torch.cmi, reference.cmi):
        g = torch.autograd.grad(fn(z, target, q, **kw), z, w.double(), create_graph=True)[0]
        hvps.append(torch.autograd.grad(g, z, v, allow_unused=True)[0])
    if hvps[1] is None:  # no valid row: the reference's gradient has no graph
        assert hvps[0] is None or not hvps[0].any()
    else:
        torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_torch_func_grad_and_its_jacobian(mode):
    """torch.func.grad works, and jacrev of it (vmap over the differentiable
    backward) gives the Hessian of the reference."""
    logits, target, q = random_problem(6, 4, dtype=torch.float64)
    q = q if mode == "fixed" else None
    ours = torch.func.grad(lambda z: mcmi_torch.cmi(z, target, q, temperature=2.0))
    want = torch.func.grad(lambda z: reference.cmi(z, target, q, temperature=2.0))
    torch.testing.assert_close(ours(logits), want(logits), rtol=1e-10, atol=1e-12)
    hessian = torch.func.jacrev(ours)(logits)
    assert hessian.shape == (6, 4, 6, 4) and hessian.abs().max() > 1e-3
    torch.testing.assert_close(hessian, torch.func.jacrev(want)(logits), rtol=1e-9, atol=1e-11)


def test_gradient_penalty_through_a_model_in_float32():
    """A gradient penalty on the parameters (the usual double-backward use)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7)
    x, y = torch.randn(16, 5), torch.randint(0, 7, (16,))
    _, _, q = random_problem(1, 7)

    def penalty_grad(loss):
        g = torch.autograd.grad(loss, model.weight, create_graph=True)[0]
        return torch.autograd.grad(g.square().sum(), model.weight)[0]

    for centroids, q_ref in [(q, q.float()), ("batch", None)]:
        ours = penalty_grad(mcmi_torch.MCMILoss(0.4, centroids)(model(x), y))
        want = penalty_grad(reference.mcmi_loss(model(x), y, 0.4, q_ref))
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)


def test_double_backward_through_ema_raises_clearly():
    logits, target, _ = random_problem(10, 5)
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=5)
    z = logits.requires_grad_(True)
    g = torch.autograd.grad(crit(z, target), z)[0]  # a plain backward still works
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*'ema'"):
        torch.autograd.grad(crit(z, target), z, create_graph=True)


def test_create_graph_gradient_equals_the_kernel_gradient():
    logits, target, q = random_problem(20, 9)
    for centroids in (q, None):
        z = logits.clone().requires_grad_(True)
        first = torch.autograd.grad(mcmi_torch.mcmi(z, target, centroids), z)[0]
        graph = torch.autograd.grad(mcmi_torch.mcmi(z, target, centroids), z, create_graph=True)[0]
        assert graph.requires_grad and graph.dtype == torch.float32
        torch.testing.assert_close(graph, first, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- centroid state
def _bad_centroids(k):
    good = torch.softmax(torch.randn(k, k, dtype=torch.float64), 1)
    nan, neg, zero, off = good.clone(), good.clone(), good.clone(), good.clone()
    nan[1, 2] = math.nan
    neg[0, 0], neg[0, 1] = -0.1, neg[0, 1] + neg[0, 0] + 0.1  # still sums to 1
    zero[2] = 0.0
    off[3] *= 1.5
    return {"NaN or infinite": nan, "negative": neg, "sum to 1": zero, "sum to 1 ": off}


@pytest.mark.parametrize("mode", ["fixed", "ema"])
def test_load_state_dict_validates_centroids(mode):
    _, _, q = random_problem(1, 5)
    crit = make_criterion(mode, q)
    before = crit.centroids.clone()
    for problem, bad in _bad_centroids(5).items():
        with pytest.raises(RuntimeError, match=rf"invalid 'centroids'.*{problem.strip()}"):
            crit.load_state_dict({**crit.state_dict(), "centroids": bad})
        assert torch.equal(crit.centroids, before)
    with pytest.raises(RuntimeError, match="size mismatch for centroids"):
        crit.load_state_dict({**crit.state_dict(), "centroids": torch.full((4, 5), 0.2)})


def test_loaded_centroids_are_renormalized_and_keep_their_dtype():
    _, _, q = random_problem(1, 6)
    crit = mcmi_torch.MCMILoss(0.3, q)
    crit.load_state_dict({"centroids": q * (1 + 5e-4)})
    torch.testing.assert_close(crit.centroids, q.float())
    tiny = q.clone()
    tiny[0, :2] = 1e-9  # below float16's range
    tiny = tiny / tiny.sum(1, keepdim=True)
    crit.load_state_dict({"centroids": tiny}, assign=True)
    assert crit.centroids.dtype == torch.float32 and crit.centroids[0, 0] > 0


def test_16_bit_centroids_are_renormalized_in_float64():
    _, _, q = random_problem(1, 7)
    half = q.half()
    crit = mcmi_torch.MCMILoss(0.3, half)
    want = half.double() / half.double().sum(1, keepdim=True)
    assert crit.centroids.dtype == torch.float32
    torch.testing.assert_close(crit.centroids, want.float(), rtol=0, atol=0)


def test_in_place_writes_are_validated_and_never_served_stale():
    logits, target, q = random_problem(40, 6)
    crit = mcmi_torch.MCMILoss(0.5, q)

    def check():
        want = reference.mcmi_loss(logits.double(), target, 0.5, crit.centroids.double())
        torch.testing.assert_close(crit(logits, target).double(), want, rtol=1e-5, atol=1e-6)

    check()
    crit.centroids.data = torch.softmax(torch.randn(6, 6), 1)  # same object, new storage
    check()
    for problem, bad in _bad_centroids(6).items():
        with torch.no_grad():
            crit.centroids.copy_(bad)
        with pytest.raises(ValueError, match=rf"centroids buffer was changed.*{problem.strip()}"):
            crit(logits, target)
    with torch.no_grad():
        crit.centroids.copy_(torch.softmax(torch.randn(6, 6), 1))
    check()


@pytest.mark.parametrize("mode", ["fixed", "ema"])
@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16", "double_then_half"])
def test_casts_keep_centroids_in_float32(mode, cast):
    logits, target, q = random_problem(16, 5)
    q[0, :2] = 1e-9  # would underflow in float16 / lose digits in bfloat16
    q = q / q.sum(1, keepdim=True)
    crit = make_criterion(mode, q)
    if mode == "ema":
        crit.load_state_dict({**crit.state_dict(), "centroids": q})
    want = crit.centroids.clone()
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), crit)
    if cast == "half":
        model.half()
    elif cast == "bfloat16":
        model.bfloat16()
    elif cast == "to_float16":
        model.to(torch.float16)
    else:
        model.double()
        assert crit.centroids.dtype == torch.float64  # float64 is honoured
        model.half()
    assert model[0].weight.dtype in (torch.float16, torch.bfloat16)
    assert crit.centroids.dtype == torch.float32
    assert torch.equal(crit.centroids, want)
    half = logits.to(model[0].weight.dtype)
    expected = reference.mcmi_loss(half.double(), target, 0.6, want.double())
    torch.testing.assert_close(crit(half, target).double(), expected, rtol=1e-2, atol=1e-2)


def test_device_moves_still_apply_to_the_centroids():
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4).to("meta").half()
    assert crit.centroids.device.type == "meta" and crit.centroids.dtype == torch.float32
    assert crit.seen.device.type == "meta"


# ---------------------------------------------------------------- non-finite batches
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_batch_does_not_poison_the_ema(reduction, bad):
    logits, target, _ = random_problem(30, 5, ignore=0.0)
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=5, reduction=reduction)
    crit(logits, target)
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    poisoned = logits.clone()
    poisoned[4, 1] = bad
    value = crit(poisoned.requires_grad_(True), target)
    assert not torch.isfinite(value).all()  # the loss says so, as cross-entropy does
    assert all(torch.equal(state[k], v) for k, v in crit.state_dict().items())
    clean, target2, _ = random_problem(30, 5, seed=7)
    value = crit(clean, target2)  # the next clean batch is accepted
    torch.testing.assert_close(value, reference.mcmi_loss(clean, target2, 0.3, state["centroids"],
                               reduction=reduction))  # fmt: skip
    assert torch.isfinite(crit.centroids).all()


def test_temperatures_too_small_for_the_compute_dtype():
    logits, target, q = random_problem(8, 5)
    tiny = 1e-39  # 1 / tiny overflows float32
    with pytest.raises(ValueError, match=r"temperature=1e-39 is too small for torch\.float32"):
        mcmi_torch.cmi(logits, target, q, temperature=tiny)
    with pytest.raises(ValueError, match=r"temperature=1e-39 is too small for torch\.bfloat16"):
        mcmi_torch.MCMILoss(0.2, q, temperature=tiny)(logits.bfloat16(), target)
    with pytest.raises(ValueError, match="temperature=1e-39 is too small"):
        mcmi_torch.class_sums(logits, target, 5, temperature=tiny)
    wide = mcmi_torch.cmi(logits.double(), target, q, temperature=tiny)
    assert torch.isfinite(wide)
    near = mcmi_torch.cmi(logits * 1e-30, target, q, temperature=1e-37)
    torch.testing.assert_close(near.double(), wide, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"too small for torch\.float64"):
        mcmi_torch.cmi(logits.double(), target, q, temperature=1e-310)


# ---------------------------------------------------------------- argument types
NOT_INTS = st.one_of(
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=3),
    st.just(None),
    st.just(torch.tensor(1.5)),
    st.just([1]),
)


@settings(max_examples=40, deadline=None)
@given(value=NOT_INTS)
def test_non_integers_are_refused_not_truncated(value):
    logits, target, q = random_problem(6, 5)
    if value is not None:  # None means "infer" for num_classes
        with pytest.raises(TypeError, match="num_classes must be an int"):
            mcmi_torch.MCMILoss(0.2, "batch", num_classes=value)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        mcmi_torch.class_sums(logits, target, value)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        mcmi_torch.MCMILoss(0.2, q, ignore_index=value)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        mcmi_torch.cmi(logits, target, q, ignore_index=value)


@settings(max_examples=20, deadline=None)
@given(value=st.one_of(st.integers(min_value=1 << 63), st.integers(max_value=-(1 << 63) - 1)))
def test_ints_beyond_int64_are_refused(value):
    logits, target, q = random_problem(6, 5)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        mcmi_torch.cmi(logits, target, q, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        mcmi_torch.MCMILoss(0.2, ignore_index=value)
    with pytest.raises(ValueError, match="num_classes must fit in int64"):
        mcmi_torch.class_sums(logits, target, value)


def test_integer_scalars_are_accepted():
    logits, target, q = random_problem(6, 5, ignore=0.5)
    want = mcmi_torch.cmi(logits, target, q)
    for ignore_index in (np.int64(-100), torch.tensor(-100)):
        assert torch.equal(mcmi_torch.cmi(logits, target, q, ignore_index=ignore_index), want)
    assert mcmi_torch.MCMILoss(0.2, "ema", num_classes=np.int32(5)).num_classes == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(lam="0.5"), TypeError, "lam must be a real number, got str"),
        (dict(lam=True), TypeError, "lam must be a real number, got bool"),
        (dict(lam=torch.tensor(0.5)), TypeError, r"lam must be a real number, got Tensor \(use"),
        (dict(temperature="2"), TypeError, "temperature must be a real number"),
        (dict(temperature=None), TypeError, "temperature must be a real number"),
        (dict(momentum=None), TypeError, "momentum must be a real number"),
        (dict(momentum=math.nan), ValueError, r"momentum must be in \(0, 1\]"),
        (dict(reduction=None), ValueError, "reduction must be one of"),
        (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
        (dict(centroids=[[1.0]]), TypeError, "centroids must be a tensor, 'batch' or 'ema'"),
        (dict(centroids="ema", num_classes=0), ValueError, "num_classes must be >= 1"),
    ],
)
def test_module_arguments_name_the_culprit(kwargs, error, message):
    with pytest.raises(error, match=message):
        mcmi_torch.MCMILoss(**kwargs)


def test_lam_is_checked_when_changed():
    crit = mcmi_torch.MCMILoss(0.3)
    crit.lam = 0.5  # a schedule
    assert crit.lam == 0.5
    with pytest.raises(ValueError, match="lam must be finite"):
        crit.lam = math.nan
    with pytest.raises(TypeError, match="lam must be a real number"):
        crit.lam = "0.1"
    assert crit.lam == 0.5


def test_functional_arguments_name_the_culprit():
    logits, target, q = random_problem(6, 5)
    with pytest.raises(TypeError, match="target must be a Tensor, got list"):
        mcmi_torch.cmi(logits, target.tolist(), q)
    with pytest.raises(TypeError, match="temperature must be a real number, got str"):
        mcmi_torch.mcmi(logits, target, q, temperature="1")
    with pytest.raises(TypeError, match=r"target is torch\.float32: class-probability targets"):
        mcmi_torch.cmi(logits, target.float(), q)


# ---------------------------------------------------------------- module state errors
def test_ema_num_classes_disagreeing_with_logits_names_num_classes():
    logits, target, _ = random_problem(6, 7, 5)
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=5)
    with pytest.raises(ValueError, match=r"num_classes=5\) got logits with 7 classes"):
        crit(logits, target)


def test_centroids_on_another_device_name_the_buffer():
    logits, target, q = random_problem(6, 5)
    for crit in (mcmi_torch.MCMILoss(0.3, q), mcmi_torch.MCMILoss(0.3, "ema", num_classes=5)):
        crit.to("meta")
        with pytest.raises(RuntimeError, match=r"centroids buffer is on meta.*\.to\('cpu'\)"):
            crit(logits, target)


def test_inference_mode_buffers():
    logits, target, q = random_problem(12, 4)
    with torch.inference_mode():
        ema = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4)
        fixed = mcmi_torch.MCMILoss(0.3, q)
        in_mode = fixed(logits, target)  # usable inside inference mode
    z = logits.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"'ema' buffers are inference tensors"):
        ema(z, target)
    with torch.no_grad():
        ema(z, target)  # validation needs no update
    value = fixed(z, target)  # fixed centroids are only read
    value.backward()
    torch.testing.assert_close(value.detach(), in_mode)
    torch.testing.assert_close(value, reference.mcmi_loss(z, target, 0.3, q.float()))


# ---------------------------------------------------------------- torch.compile, dynamic shapes
@pytest.mark.parametrize("mode", ["fixed", "batch", "ema", "functional"])
def test_compile_dynamic_shapes_without_recompiles(mode):
    torch.compiler.reset()
    counters.clear()
    _, _, q = random_problem(1, 6)
    if mode == "functional":
        eager = compiled_crit = lambda z, y: mcmi_torch.mcmi(z, y, None, temperature=2.0)
    else:
        eager, compiled_crit = (make_criterion(mode, q, temperature=2.0) for _ in range(2))
    compiled = torch.compile(
        lambda z, y: compiled_crit(z, y), fullgraph=True, dynamic=True, backend=COMPILE_BACKEND
    )
    for rows in (5, 9, 14):
        logits, target, _ = random_problem(rows, 6, seed=rows)
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        want, got = eager(a, target), compiled(b, target)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
        if mode == "ema":
            assert torch.equal(eager.centroids, compiled_crit.centroids)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- TorchScript and torch.export
class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 5)
        self.crit = mcmi_torch.MCMILoss(0.3)

    def forward(self, x, y):
        return self.crit(self.lin(x), y)


def _calls_cmi(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mcmi_torch.cmi(z, y) + 1


def _calls_mcmi(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return mcmi_torch.mcmi(z, y, reduction="sum")


class _SumsModel(torch.nn.Module):
    def forward(self, z: torch.Tensor, y: torch.Tensor):
        return mcmi_torch.class_sums(z, y, 5)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_is_refused_clearly_and_export_works():
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    attempts = {
        "script a criterion": lambda: torch.jit.script(mcmi_torch.MCMILoss()),
        "script a model": lambda: torch.jit.script(_Model()),
        "trace a model": lambda: torch.jit.trace(_Model(), (x, y)),
        "trace cmi": lambda: torch.jit.trace(lambda z: mcmi_torch.cmi(z, y), (torch.randn(8, 5),)),
        "script cmi": lambda: torch.jit.script(mcmi_torch.cmi),
        "script a function calling cmi": lambda: torch.jit.script(_calls_cmi),
        "script a function calling mcmi": lambda: torch.jit.script(_calls_mcmi),
        "script a model calling class_sums": lambda: torch.jit.script(_SumsModel()),
    }
    for what, attempt in attempts.items():
        with pytest.raises(RuntimeError, match=r"does not support TorchScript.*torch\.compile"):
            attempt()
            pytest.fail(what)
    model = _Model()
    exported = torch.export.export(model, (x, y)).module()
    torch.testing.assert_close(exported(x, y), model(x, y))


@pytest.mark.parametrize("strict", [False, True])
def test_exporting_an_ema_criterion_is_refused_clearly(strict):
    """An exported graph would fix the grad mode of export time (whether the
    EMA updates, which centroids the gradient sees): torch.export of an 'ema'
    criterion raises, with or without grad, and says what to export instead;
    the fixed centroids it suggests export and match eager."""
    x, y = torch.randn(8, 4), torch.randint(0, 5, (8,))
    model = _Model()
    model.crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=5)
    message = (
        r"centroids='ema'\) cannot be exported with torch\.export.*criterion\.centroids\.clone"
    )
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=message):
            torch.export.export(model, (x, y), strict=strict)
    assert not model.crit.seen.any()
    model.crit = mcmi_torch.MCMILoss(0.3, model.crit.centroids.clone())
    exported = torch.export.export(model, (x, y), strict=strict).module()
    torch.testing.assert_close(exported(x, y), model(x, y))


@pytest.mark.parametrize(
    ("mode", "reduction"),
    [("fixed", "none"), ("batch", "none"), ("fixed", "mean"), ("batch", "sum")],
)
def test_an_exported_module_has_the_eager_derivatives(mode, reduction):
    """A module from torch.export calls torch.ops.mcmi.loss itself: forward
    mode (jvp, dual numbers), torch.func (grad, hessian, vmap of grad and
    vmap) and create_graph give what the eager module gives, padding in
    ignored rows and -inf logits included."""
    logits, target, q = random_problem(6, 4, dtype=torch.float64, ignore=0.0)
    target[2] = -100
    crit = make_criterion(mode, q, reduction=reduction).double()
    exported = torch.export.export(crit, (logits, target)).module()
    z = logits.clone()
    z[2], z[0, 3] = math.nan, -math.inf
    v = torch.randn_like(z)
    outputs = {}
    for name, fn in (("eager", crit), ("exported", exported)):
        f = lambda x, fn=fn: fn(x, target).sum()  # noqa: E731
        x = z.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(x), x, create_graph=True)[0]
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(f(fwAD.make_dual(z, v))).tangent
        outputs[name] = [
            torch.func.jvp(lambda x, fn=fn: fn(x, target), (z,), (v,))[1],
            dual,
            torch.func.grad(f)(z),
            torch.func.hessian(f)(z),
            torch.autograd.grad((grad * v).sum(), x)[0],
            torch.func.vmap(torch.func.grad(f))(torch.stack([z, logits])),
            torch.func.vmap(lambda x, fn=fn: fn(x, target))(torch.stack([z, logits])),
        ]
    for got, want in zip(outputs["exported"], outputs["eager"]):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
