"""gradcheck in float64, opcheck on every op, torch.compile(fullgraph=True),
and repeated backward through one graph."""

import pytest
import torch
from conftest import COMPILE_BACKEND, make_criterion, needs_cuda, random_problem

import mcmi_torch
from mcmi_torch import reference
from mcmi_torch._args import CENTROID_FLOOR, REDUCTIONS


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradcheck(reduction, mode, temperature, device):
    logits, target, q = random_problem(9, 6, dtype=torch.float64, scale=1.5)
    z, target = logits.to(device).requires_grad_(True), target.to(device)
    q = q.to(device) if mode == "fixed" else None
    kw = dict(temperature=temperature, reduction=reduction)
    assert torch.autograd.gradcheck(lambda z: mcmi_torch.cmi(z, target, q, **kw), (z,))
    crit = mcmi_torch.MCMILoss(0.6, q if q is not None else "batch", **kw)
    assert torch.autograd.gradcheck(lambda z: crit(z, target), (z,))


def _loss_args(mode, reduction, with_grad, dtype=torch.float32, device="cpu"):
    logits, target, q = random_problem(12, 7, dtype=dtype)
    logits = logits.to(device).requires_grad_(True)
    q = q.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    if mode == "log":
        q = q.clamp_min(CENTROID_FLOOR).log()
    return (logits, target.to(device), None if mode == "batch" else q, mode == "log", 7, 1.5, 1.0,
            -0.3, CENTROID_FLOOR, -100, REDUCTIONS[reduction], with_grad)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["fixed", "log", "batch"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck_loss(reduction, mode, with_grad, device):
    args = _loss_args(mode, reduction, with_grad, device=device)
    torch.library.opcheck(torch.ops.mcmi.loss.default, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_loss_dtypes(dtype, device):
    args = _loss_args("fixed", "mean", True, dtype, device)
    torch.library.opcheck(torch.ops.mcmi.loss.default, args)


@pytest.mark.parametrize("log_probs", [False, True])
def test_opcheck_class_sums(log_probs, device):
    logits, target, _ = random_problem(30, 8, 5)
    args = (logits.to(device), target.to(device), 5, 2.0, -100, log_probs)
    torch.library.opcheck(torch.ops.mcmi.class_sums.default, args)


def test_opcheck_ema_update(device):
    logits, target, q = random_problem(30, 8)
    seen = torch.zeros(8, dtype=torch.bool)
    seen[:4] = True
    args = (q.float(), seen, logits, target, 2.0, 0.1, -100)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.mcmi.ema_update_.default, args)


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_scale_grad(per_row, device):
    grad = torch.randn(6, 9, device=device)
    scale = torch.randn(6, device=device) if per_row else torch.tensor(-1.5, device=device)
    torch.library.opcheck(torch.ops.mcmi.scale_grad_.default, (grad, scale))


def test_compile_fullgraph_matches_eager(centroid_mode):
    _, target, q = random_problem(32, 10)
    eager = make_criterion(centroid_mode, q, 0.25)
    compiled_crit = make_criterion(centroid_mode, q, 0.25)
    model = torch.nn.Linear(10, 10).double()
    x = torch.randn(32, 10, dtype=torch.float64)

    def step(crit, m):
        return crit(m(x).float(), target)

    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)
    m2 = torch.nn.Linear(10, 10).double()
    m2.load_state_dict(model.state_dict())
    for _ in range(2):
        a = step(eager, model)
        b = compiled(compiled_crit, m2)
        a.backward()
        b.backward()
        assert torch.equal(a, b)
        assert torch.equal(model.weight.grad, m2.weight.grad)
        if centroid_mode == "ema":
            assert torch.equal(eager.centroids, compiled_crit.centroids)


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_on_cuda_and_cuda_graphs(mode):
    logits, target, q = random_problem(64, 100)
    crit = mcmi_torch.MCMILoss(0.25, q.cuda())
    model = torch.nn.Linear(100, 100).cuda()
    x, y = logits.cuda(), target.cuda()
    step = torch.compile(lambda: crit(model(x), y), fullgraph=True, mode=mode)
    for _ in range(3):  # CUDA graphs record after warm-up runs
        loss = step()
        loss.backward()
    eager = crit(model(x), y)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)


def test_compile_functional_with_temperature():
    logits, target, q = random_problem(16, 12)
    f = torch.compile(
        lambda z: mcmi_torch.mcmi(z, target, q, temperature=4.0, reduction="none"),
        fullgraph=True,
        backend=COMPILE_BACKEND,
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
