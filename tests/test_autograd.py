"""gradcheck in float64, opcheck on every op, torch.compile(fullgraph=True),
and repeated backward through one graph."""

import pytest
import torch
from conftest import random_problem

import mcmi_torch
from mcmi_torch import reference
from mcmi_torch._args import CENTROID_FLOOR, REDUCTIONS


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradcheck(reduction, mode, temperature):
    logits, target, q = random_problem(9, 6, dtype=torch.float64, scale=1.5)
    z = logits.requires_grad_(True)
    q = q if mode == "fixed" else None
    kw = dict(temperature=temperature, reduction=reduction)
    assert torch.autograd.gradcheck(lambda z: mcmi_torch.cmi(z, target, q, **kw), (z,))
    crit = mcmi_torch.MCMILoss(0.6, q if q is not None else "batch", **kw)
    assert torch.autograd.gradcheck(lambda z: crit(z, target), (z,))


def _loss_args(mode, reduction, with_grad, dtype=torch.float32):
    logits, target, q = random_problem(12, 7, dtype=dtype)
    logits.requires_grad_(True)
    q = q.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if mode == "log":
        q = q.clamp_min(CENTROID_FLOOR).log()
    return (logits, target, None if mode == "batch" else q, mode == "log", 7, 1.5, 1.0, -0.3,
            CENTROID_FLOOR, -100, REDUCTIONS[reduction], with_grad)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["fixed", "log", "batch"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_loss(reduction, mode, with_grad):
    torch.library.opcheck(torch.ops.mcmi.loss.default, _loss_args(mode, reduction, with_grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_loss_dtypes(dtype):
    torch.library.opcheck(torch.ops.mcmi.loss.default, _loss_args("fixed", "mean", True, dtype))


@pytest.mark.parametrize("log_probs", [False, True])
def test_opcheck_class_sums(log_probs):
    logits, target, _ = random_problem(30, 8, 5)
    torch.library.opcheck(
        torch.ops.mcmi.class_sums.default, (logits, target, 5, 2.0, -100, log_probs)
    )


def test_opcheck_ema_update():
    logits, target, q = random_problem(30, 8)
    seen = torch.zeros(8, dtype=torch.bool)
    seen[:4] = True
    torch.library.opcheck(
        torch.ops.mcmi.ema_update_.default, (q.float(), seen, logits, target, 2.0, 0.1, -100)
    )


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_scale_grad(per_row):
    grad = torch.randn(6, 9)
    scale = torch.randn(6) if per_row else torch.tensor(-1.5)
    torch.library.opcheck(torch.ops.mcmi.scale_grad_.default, (grad, scale))


@pytest.mark.parametrize("centroids", ["fixed", "batch", "ema"])
def test_compile_fullgraph_matches_eager(centroids):
    _, target, q = random_problem(32, 10)
    arg = q if centroids == "fixed" else centroids
    eager = mcmi_torch.MCMILoss(0.25, arg, num_classes=10)
    compiled_crit = mcmi_torch.MCMILoss(0.25, arg, num_classes=10)
    model = torch.nn.Linear(10, 10).double()
    x = torch.randn(32, 10, dtype=torch.float64)

    def step(crit, m):
        return crit(m(x).float(), target)

    compiled = torch.compile(step, fullgraph=True)
    m2 = torch.nn.Linear(10, 10).double()
    m2.load_state_dict(model.state_dict())
    for _ in range(2):
        a = step(eager, model)
        b = compiled(compiled_crit, m2)
        a.backward()
        b.backward()
        if centroids == "fixed":
            # Eager feeds the kernel a cached log Q (torch's log), compiled code
            # the probabilities (the kernel's log): equal up to rounding.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(model.weight.grad, m2.weight.grad, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b)
            assert torch.equal(model.weight.grad, m2.weight.grad)
        if centroids == "ema":
            assert torch.equal(eager.centroids, compiled_crit.centroids)


def test_compile_functional_with_temperature():
    logits, target, q = random_problem(16, 12)
    f = torch.compile(
        lambda z: mcmi_torch.mcmi(z, target, q, temperature=4.0, reduction="none"),
        fullgraph=True,
    )
    z = logits.requires_grad_(True)
    out = f(z)
    out.sum().backward()
    ref = reference.mcmi(z.detach(), target, q, temperature=4.0, reduction="none")
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_backward_twice_with_retain_graph(mode):
    logits, target, q = random_problem(20, 9)
    z = logits.requires_grad_(True)
    loss = mcmi_torch.MCMILoss(0.5, q if mode == "fixed" else "batch")(z, target)
    g1 = torch.autograd.grad(loss * 3.0, z, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss * 3.0, z, retain_graph=True)[0]
    g3 = torch.autograd.grad(loss, z)[0]
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g1, 3.0 * g3)


def test_no_gradient_kept_without_requires_grad_or_under_no_grad():
    logits, target, q = random_problem(8, 5)
    args = (False, 5, 1.0, 1.0, -0.2, CENTROID_FLOOR, -100, 1, False)
    _, grad = torch.ops.mcmi.loss(logits, target, q.float(), *args)
    assert grad.numel() == 0
    z = logits.requires_grad_(True)
    with torch.no_grad():
        value = mcmi_torch.MCMILoss(0.2, q)(z, target)
    assert value.grad_fn is None
