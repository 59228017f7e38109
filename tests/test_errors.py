"""Bad input raises a clear exception naming the problem, on every device
(the CUDA loss marks bad labels and centroid rows with NaN instead of a
device sync; CUDA class sums and the EMA update stop with a device-side
assertion)."""

import math
import subprocess
import sys

import pytest
import torch
from conftest import needs_cuda, random_problem

import mcmi_torch
from mcmi_torch._args import CENTROID_FLOOR


def cpu_problem():
    return random_problem(6, 5, 5, ignore=0.0)


@pytest.fixture
def problem(device):
    return tuple(t.to(device) for t in cpu_problem())


def op(logits, target, q, **kw):
    args = dict(log_centroids=False, num_classes=5, temperature=1.0, ce_weight=1.0,
                cmi_weight=-0.25, floor=CENTROID_FLOOR, ignore_index=-100, reduction=1,
                with_grad=False)  # fmt: skip
    args.update(kw)
    return torch.ops.mcmi.loss(logits, target, q, *args.values())


@pytest.mark.parametrize("bad", [5, 6, 1 << 40, -1, -99, -101])
@pytest.mark.parametrize("centroids", ["fixed", "batch"])
def test_label_out_of_range(problem, bad, centroids, device):
    logits, target, q = problem
    target[3] = bad
    q = q if centroids == "fixed" else None
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"target\[3\] is out of range.*\[0, 5\)"):
            mcmi_torch.cmi(logits, target, q)
    else:
        # The CUDA loss does not sync to raise: the row's loss is NaN.
        rows = mcmi_torch.cmi(logits, target, q, reduction="none").cpu()
        assert torch.isnan(rows[3]) and torch.isfinite(rows[[0, 1, 2, 4, 5]]).all()
        return  # class sums: test_cuda_bad_label_stops_the_kernel
    with pytest.raises(RuntimeError, match=r"target\[3\] is out of range"):
        mcmi_torch.class_sums(logits, target, 5)


@needs_cuda
@pytest.mark.parametrize("what", ["class_sums", "ema_update_"])
def test_cuda_bad_label_stops_the_kernel(what):
    """CUDA class sums and the EMA update check labels on the device, with no
    sync: a label out of range stops the kernel with a device-side assertion
    that names the row and the label, as torch's own label checks do. The
    CUDA context is unusable after it, so this runs in a child process."""
    code = f"""
import torch, mcmi_torch
logits = torch.randn(6, 5, device="cuda")
target = torch.tensor([0, 1, 2, 9, 4, 3], device="cuda")
if "{what}" == "class_sums":
    mcmi_torch.class_sums(logits, target, 5)
else:
    q = torch.full((5, 5), 0.2, device="cuda")
    seen = torch.zeros(5, dtype=torch.bool, device="cuda")
    torch.ops.mcmi.ema_update_(q, seen, logits, target, 1.0, 0.1, -100)
torch.cuda.synchronize()
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "mcmi: target[3] = 9 is out of range" in out, out
    assert "device-side assert" in out, out


@needs_cuda
def test_tensors_on_two_devices_are_refused():
    logits, target, q = cpu_problem()
    with pytest.raises(RuntimeError, match="target must be on the same device as logits"):
        mcmi_torch.cmi(logits.cuda(), target, q.cuda())
    with pytest.raises(RuntimeError, match="centroids must be on the same device as logits"):
        mcmi_torch.cmi(logits.cuda(), target.cuda(), q)


def test_label_out_of_range_with_grad():
    logits, target, q = cpu_problem()
    target[0] = 5
    with pytest.raises(RuntimeError, match=r"target\[0\] is out of range"):
        mcmi_torch.MCMILoss(0.2, q)(logits.requires_grad_(True), target)


def test_wrong_dtypes(problem):
    logits, target, q = problem
    with pytest.raises(RuntimeError, match="logits must be float32, float64, bfloat16 or float16"):
        mcmi_torch.cmi(logits.long(), target, q)
    with pytest.raises(RuntimeError, match="target must be int64, got int32"):
        mcmi_torch.cmi(logits, target.int(), q)
    with pytest.raises(TypeError, match=r"class-probability targets.*not supported"):
        mcmi_torch.cmi(logits, target.float(), q)
    with pytest.raises(TypeError, match="centroids must be a floating-point tensor"):
        mcmi_torch.cmi(logits, target, q.long())
    with pytest.raises(RuntimeError, match="centroids must be float32 for float32 logits"):
        op(logits, target, q.double())


def test_wrong_shapes(problem):
    logits, target, q = problem
    with pytest.raises(ValueError, match=r"for 1-D logits \[C\] target must be 0-D"):
        mcmi_torch.cmi(logits[0], target, q)
    with pytest.raises(ValueError, match=r"target must have shape \[6, 1\] \(\[N, d1, ...\]\)"):
        mcmi_torch.cmi(logits.unsqueeze(2), target, q)
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        op(logits.unsqueeze(2), target, q.float())
    with pytest.raises(RuntimeError, match="target must be 1-D"):
        mcmi_torch.cmi(logits, target.unsqueeze(1), q)
    with pytest.raises(RuntimeError, match="target has 5 entries but logits have 6 rows"):
        mcmi_torch.cmi(logits, target[:5], q)
    with pytest.raises(RuntimeError, match="centroids have 4 columns but logits have 5"):
        mcmi_torch.cmi(logits, target, q[:, :4])
    with pytest.raises(RuntimeError, match="centroids must be 2-D"):
        mcmi_torch.cmi(logits, target, q[0])
    with pytest.raises(RuntimeError, match="logits must have at least one column"):
        mcmi_torch.cmi(logits[:, :0], target, None)


def test_classes_disagree_with_centroids(problem):
    logits, target, q = problem
    with pytest.raises(RuntimeError, match="centroids have 5 rows but num_classes is 7"):
        op(logits, target, q.float(), num_classes=7)
    with pytest.raises(ValueError, match="num_classes=7 disagrees with centroids of 5 rows"):
        mcmi_torch.MCMILoss(0.2, q, num_classes=7)
    wide = torch.softmax(torch.randn(9, 5), 1).to(logits.device)
    with pytest.raises(RuntimeError, match=r"num_classes \(9\) > logits columns \(5\)"):
        mcmi_torch.MCMILoss(0.2, wide)(logits, target)


@pytest.mark.parametrize("t", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(problem, t):
    logits, target, q = problem
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        mcmi_torch.cmi(logits, target, q, temperature=t)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        mcmi_torch.MCMILoss(0.2, q, temperature=t)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        op(logits, target, q.float(), temperature=t)


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf])
def test_non_finite_lam(problem, lam):
    logits, target, q = problem
    with pytest.raises(ValueError, match="lam must be finite"):
        mcmi_torch.MCMILoss(lam, q)
    with pytest.raises(RuntimeError, match="loss weights must be finite"):
        op(logits, target, q.float(), cmi_weight=lam)


def test_bad_reduction_and_codes(problem):
    logits, target, q = problem
    with pytest.raises(ValueError, match="reduction must be one of"):
        mcmi_torch.cmi(logits, target, q, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mcmi_torch.MCMILoss(0.2, q, reduction="batchmean")
    with pytest.raises(RuntimeError, match="reduction code must be 0"):
        op(logits, target, q.float(), reduction=3)
    with pytest.raises(RuntimeError, match=r"centroid floor must be in \(0, 1\)"):
        op(logits, target, q.float(), floor=0.0)
    with pytest.raises(RuntimeError, match="num_classes must be >= 1"):
        mcmi_torch.class_sums(logits, target, 0)
    with pytest.raises(RuntimeError, match="log_centroids needs centroids"):
        op(logits, target, None, log_centroids=True)


def test_centroid_rows_must_be_probabilities(problem, device):
    logits, target, q = problem
    bad = q.clone()
    bad[target[2]] *= 1.5
    nan = q.clone()
    nan[target[0], 1] = math.nan
    if device == "cpu":
        with pytest.raises(RuntimeError, match=f"centroids row {target[2].item()} is not a prob"):
            mcmi_torch.cmi(logits, target, bad)
        with pytest.raises(RuntimeError, match="is not a probability vector"):
            mcmi_torch.cmi(logits, target, nan)
    else:
        # Checked on the device without a sync: the rows using it are NaN.
        for centroids, row in ((bad, 2), (nan, 0)):
            users = (target == target[row]).cpu()
            rows = mcmi_torch.cmi(logits, target, centroids, reduction="none").cpu()
            assert torch.isnan(rows[users]).all() and torch.isfinite(rows[~users]).all()
    with pytest.raises(ValueError, match="rows must sum to 1"):
        mcmi_torch.MCMILoss(0.2, bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mcmi_torch.MCMILoss(0.2, nan)
    neg = q.clone()
    neg[0, 0], neg[0, 1] = -0.1, neg[0, 1] + 0.1 + neg[0, 0]
    with pytest.raises(ValueError, match="negative entries"):
        mcmi_torch.MCMILoss(0.2, neg)


def test_module_arguments():
    with pytest.raises(ValueError, match="'ema' needs num_classes"):
        mcmi_torch.MCMILoss(0.2, "ema")
    with pytest.raises(ValueError, match="momentum must be in"):
        mcmi_torch.MCMILoss(0.2, "ema", num_classes=3, momentum=0.0)
    with pytest.raises(ValueError, match="centroids must be a tensor, 'batch' or 'ema'"):
        mcmi_torch.MCMILoss(0.2, "fixed")
    with pytest.raises(TypeError, match="logits must be a Tensor, got list"):
        mcmi_torch.cmi([[0.0]], torch.zeros(1, dtype=torch.long))


def test_ema_update_arguments(problem):
    logits, target, q = problem
    q = q.float()
    seen = torch.zeros(5, dtype=torch.bool, device=logits.device)
    with pytest.raises(RuntimeError, match="seen must be a bool tensor"):
        torch.ops.mcmi.ema_update_(q, seen.long(), logits, target, 1.0, 0.1, -100)
    with pytest.raises(RuntimeError, match="momentum must be in"):
        torch.ops.mcmi.ema_update_(q, seen, logits, target, 1.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="unit column stride"):
        torch.ops.mcmi.ema_update_(q.t(), seen, logits, target, 1.0, 0.1, -100)
    if logits.is_cuda:
        return  # a bad label stops the kernel: test_cuda_bad_label_stops_the_kernel
    target[1] = 9
    before = q.clone()
    with pytest.raises(RuntimeError, match=r"target\[1\] is out of range"):
        torch.ops.mcmi.ema_update_(q, seen, logits, target, 1.0, 0.1, -100)
    assert torch.equal(q, before) and not seen.any()  # nothing changed


def test_out_of_memory_says_what_and_how_large():
    """An allocation the device cannot hold names the buffer, its shape and
    size, instead of the stable ABI's generic 'API call failed'."""
    target = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"could not allocate the class sums \(\[2147483647, "
                       r"1048576\] float32, 8\.39e\+06 GiB\) on cpu: out of memory"):  # fmt: skip
        mcmi_torch.class_sums(torch.randn(4, 1 << 20), target, (1 << 31) - 1)
    rows = 1 << 40
    logits = torch.randn(1, 3).expand(rows, 3)  # no memory of its own
    with pytest.raises(RuntimeError, match=rf"could not allocate the loss \(\[{rows}\] float32"):
        mcmi_torch.cmi(logits, torch.zeros(1, dtype=torch.int64).expand(rows), reduction="none")
