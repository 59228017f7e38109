"""The CUDA kernels: agreement with the CPU kernels, gradcheck, opcheck,
torch.compile (CUDA graphs included) and device errors. Every test here needs
a GPU and a build with the CUDA kernels, and is skipped without them."""

import pytest
import torch
from conftest import RTOL, assert_close_rel, random_problem

import mcmi_torch
from mcmi_torch._args import CENTROID_FLOOR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def both_devices(fn, logits, *tensors):
    """fn's value and logits-gradient on the CPU and on the GPU."""
    out = []
    for device in ("cpu", "cuda"):
        z = logits.detach().to(device).requires_grad_(True)
        value = fn(z, *(t.to(device) if t is not None else None for t in tensors))
        w = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64).reshape(value.shape)
        (value * w.to(device, value.dtype)).sum().backward()
        out.append((value.detach().cpu(), z.grad.cpu()))
    return out


@pytest.mark.parametrize("shape", [(1, 1), (7, 10), (64, 100), (256, 1000), (16, 5000)])
@pytest.mark.parametrize("mode", ["fixed", "batch", "ema"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(shape, mode, reduction, dtype):
    logits, target, q = random_problem(*shape, dtype=dtype, scale=2.0)

    def loss(z, y, q_dev):
        arg = q_dev if mode == "fixed" else mode
        crit = mcmi_torch.MCMILoss(0.4, arg, num_classes=shape[1], temperature=1.5,
                                   reduction=reduction).to(z.device)  # fmt: skip
        return crit(z, y)

    (v_cpu, g_cpu), (v_gpu, g_gpu) = both_devices(loss, logits, target, q)
    assert v_gpu.dtype == dtype and g_gpu.dtype == dtype
    assert_close_rel(v_gpu, v_cpu, RTOL[dtype], "value")
    assert_close_rel(g_gpu, g_cpu, RTOL[dtype], "gradient", floor=1e-2)


@pytest.mark.parametrize("log_probs", [False, True])
def test_cuda_class_sums_and_ema_match_cpu(log_probs):
    logits, target, _ = random_problem(300, 40, 12)
    s_cpu, c_cpu = mcmi_torch.class_sums(logits, target, 12, log_probs=log_probs)
    s_gpu, c_gpu = mcmi_torch.class_sums(logits.cuda(), target.cuda(), 12, log_probs=log_probs)
    assert torch.equal(c_cpu, c_gpu.cpu())
    assert_close_rel(s_gpu, s_cpu, 1e-5)
    q = torch.full((12, 40), 1 / 40)
    seen = torch.zeros(12, dtype=torch.bool)
    q_gpu, seen_gpu = q.cuda(), seen.cuda()
    torch.ops.mcmi.ema_update_(q, seen, logits, target, 1.0, 0.3, -100)
    torch.ops.mcmi.ema_update_(q_gpu, seen_gpu, logits.cuda(), target.cuda(), 1.0, 0.3, -100)
    assert_close_rel(q_gpu, q, 1e-5)
    assert torch.equal(seen, seen_gpu.cpu())


@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_gradcheck(mode, reduction):
    logits, target, q = random_problem(8, 6, dtype=torch.float64, scale=1.5)
    z = logits.cuda().requires_grad_(True)
    q = q.cuda() if mode == "fixed" else None
    y = target.cuda()
    assert torch.autograd.gradcheck(
        lambda z: mcmi_torch.cmi(z, y, q, temperature=2.0, reduction=reduction), (z,)
    )


def test_cuda_opcheck_every_op():
    logits, target, q = random_problem(12, 7)
    z, y, q = logits.cuda().requires_grad_(True), target.cuda(), q.float().cuda()
    for centroids, is_log in ((q, False), (q.log(), True), (None, False)):
        args = (z, y, centroids, is_log, 7, 1.5, 1.0, -0.3, CENTROID_FLOOR, -100, 1, True)
        torch.library.opcheck(torch.ops.mcmi.loss.default, args)
    torch.library.opcheck(torch.ops.mcmi.class_sums.default, (z.detach(), y, 7, 1.0, -100, False))
    torch.library.opcheck(
        torch.ops.mcmi.scale_grad_.default,
        (torch.randn(4, 9, device="cuda"), torch.randn(4, device="cuda")),
    )
    seen = torch.zeros(7, dtype=torch.bool, device="cuda")
    torch.library.opcheck(
        torch.ops.mcmi.ema_update_.default, (q.clone(), seen, z.detach(), y, 1.0, 0.1, -100)
    )


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compile_and_cuda_graphs(mode):
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


def test_cuda_device_errors_and_bad_labels():
    logits, target, q = random_problem(6, 5)
    with pytest.raises(RuntimeError, match="target must be on the same device as logits"):
        mcmi_torch.cmi(logits.cuda(), target, q.cuda())
    with pytest.raises(RuntimeError, match="centroids must be on the same device as logits"):
        mcmi_torch.cmi(logits.cuda(), target.cuda(), q)
    bad = target.clone()
    bad[2] = 7  # out of range: the loss gives a NaN row on CUDA (no sync)
    rows = mcmi_torch.cmi(logits.cuda(), bad.cuda(), q.cuda(), reduction="none").cpu()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    # class sums and the EMA update raise as on the CPU, and change nothing
    for device in ("cpu", "cuda"):
        z, y = logits.to(device), bad.to(device)
        with pytest.raises(RuntimeError, match=r"target\[2\] is out of range"):
            mcmi_torch.class_sums(z, y, 5)
        c = torch.full((5, 5), 0.2, device=device)
        seen = torch.zeros(5, dtype=torch.bool, device=device)
        with pytest.raises(RuntimeError, match=r"target\[2\] is out of range"):
            torch.ops.mcmi.ema_update_(c, seen, z, y, 1.0, 0.5, -100)
        assert torch.equal(c.cpu(), torch.full((5, 5), 0.2)) and not seen.any()


def test_cuda_centroid_rows_checked_on_device():
    logits, target, _ = random_problem(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 1])
    q = torch.full((5, 5), 0.2)
    q[1, 3] = 0.3  # row 1 sums to 1.1
    with pytest.raises(RuntimeError, match="centroids row 1 is not a probability vector"):
        torch.ops.mcmi.loss(logits, target, q, False, 5, 1.0, 1.0, -0.3, CENTROID_FLOOR,
                            -100, 0, False)  # fmt: skip
    rows = torch.ops.mcmi.loss(logits.cuda(), target.cuda(), q.cuda(), False, 5, 1.0, 1.0, -0.3,
                               CENTROID_FLOOR, -100, 0, False)[0].cpu()  # fmt: skip
    assert torch.isnan(rows[[1, 5]]).all() and torch.isfinite(rows[[0, 2, 3, 4]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_nonfinite_logits_propagate(dtype):
    logits, target, q = random_problem(8, 10, dtype=dtype, ignore=0.0)
    logits[1, 3] = float("nan")
    logits[2, :] = float("nan")
    logits[3, 0] = float("inf")
    (v_cpu, g_cpu), (v_gpu, g_gpu) = both_devices(
        lambda z, y, q: mcmi_torch.cmi(z, y, q, reduction="none"), logits, target, q
    )
    assert torch.equal(torch.isnan(v_gpu), torch.isnan(v_cpu))
    assert torch.equal(torch.isnan(g_gpu), torch.isnan(g_cpu))
    assert torch.isnan(g_gpu[[1, 2, 3]]).all()


def test_cuda_two_streams():
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


def test_cuda_bitwise_repeatable():
    logits, target, _ = random_problem(300, 3000, scale=3.0)
    z, y = logits.cuda(), target.cuda()
    runs = [torch.ops.mcmi.loss(z, y, None, False, 3000, 2.0, 1.0, -0.3, CENTROID_FLOOR, -100, 1,
                                True) for _ in range(2)]  # fmt: skip
    assert all(torch.equal(r0, r1) for r0, r1 in zip(*runs))
