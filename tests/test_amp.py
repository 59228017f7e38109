"""Mixed precision: under torch.autocast the losses come back in float32, as
F.cross_entropy does, with the gradient in the logits' dtype; an AMP training
loop with GradScaler skips no step that nn.CrossEntropyLoss does not skip."""

import pytest
import torch
from conftest import random_problem

import mcmi_torch
from mcmi_torch import reference

HALF = [torch.bfloat16, torch.float16]
LAM = 0.25


def criteria(q):
    return {
        "fixed": lambda: mcmi_torch.MCMILoss(LAM, q),
        "batch": lambda: mcmi_torch.MCMILoss(LAM),
        "ema": lambda: mcmi_torch.MCMILoss(LAM, "ema", num_classes=q.shape[0]),
        "cmi": lambda: lambda z, y: mcmi_torch.cmi(z, y, q),
        "mcmi": lambda: mcmi_torch.mcmi,
        "smoothed": lambda: mcmi_torch.MCMILoss(LAM, q, label_smoothing=0.1),
    }


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(criteria(None)))
def test_float32_loss_and_16_bit_gradient_under_autocast(dtype, name):
    logits, target, q = random_problem(24, 7, dtype=dtype, seed=11)
    make = criteria(q.float())[name]
    z = logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = make()(z, target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert z.grad.dtype == dtype
    # The same as the float32 computation on the cast logits, down to the bit.
    z32 = logits.float().requires_grad_()
    want = make()(z32, target)
    want.backward()
    assert torch.equal(loss, want)
    assert torch.equal(z.grad, z32.grad.to(dtype))


def test_no_cast_outside_autocast_or_for_float64():
    logits, target, q = random_problem(10, 5, dtype=torch.bfloat16, seed=12)
    assert mcmi_torch.MCMILoss(LAM, q)(logits, target).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mcmi_torch.cmi(logits.double(), target, q).dtype == torch.float64


@pytest.mark.parametrize("dtype", HALF)
def test_op_called_directly_under_autocast(dtype):
    logits, target, q = random_problem(10, 5, dtype=dtype, seed=13)
    args = (q.float(), False, 5, 1.0, 1.0, -LAM, mcmi_torch.CENTROID_FLOOR, -100, 1, True)
    with torch.autocast("cpu", dtype=dtype):
        loss, grad = torch.ops.mcmi.loss(logits, target, *args)
    want = torch.ops.mcmi.loss(logits.float(), target, *args)
    assert loss.dtype == grad.dtype == torch.float32
    assert torch.equal(loss, want[0]) and torch.equal(grad, want[1])


def test_torch_compile_under_autocast():
    logits, target, q = random_problem(16, 6, dtype=torch.float32, seed=14)
    lin = torch.nn.Linear(6, 6)
    crit = mcmi_torch.MCMILoss(LAM, q)
    compiled = torch.compile(lambda x, y: crit(lin(x), y), fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(logits, target)
        want = crit(lin(logits), target)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def train(make_criterion, dtype, steps=12):
    """A small model trained under autocast with GradScaler; returns the number
    of skipped steps and the last loss with its 16-bit logits and labels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    criterion = make_criterion()
    g = torch.Generator().manual_seed(1)
    skipped = 0
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
            loss = criterion(logits, y)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        skipped += scaler.get_scale() < scale  # GradScaler backs off after a skipped step
    return skipped, loss, logits.detach(), y


@pytest.mark.parametrize("dtype", HALF)
def test_grad_scaler_loop_skips_no_step_cross_entropy_does_not_skip(dtype):
    ce_skipped, ce_loss, _, _ = train(torch.nn.CrossEntropyLoss, dtype)
    assert ce_skipped == 0 and ce_loss.dtype == torch.float32
    q = torch.softmax(torch.randn(10, 10), 1)
    for make in (
        lambda: mcmi_torch.MCMILoss(LAM),
        lambda: mcmi_torch.MCMILoss(LAM, q),
        lambda: mcmi_torch.MCMILoss(LAM, "ema", num_classes=10),
    ):
        skipped, loss, logits, y = train(make, dtype)
        assert skipped == 0
        assert loss.dtype == torch.float32
        if make().mode == "batch":
            # Logged with float32 precision (a 16-bit loss is 1e-3 to 1e-2 off).
            want = reference.mcmi_loss(logits.double(), y, LAM).item()
            assert abs(loss.item() - want) <= 1e-6 * abs(want)
