"""MCMILoss as a module (buffers, modes, state_dict) and estimate_centroids."""

import io

import pytest
import torch
from conftest import random_problem
from torch.utils.data import DataLoader, TensorDataset

import mcmi_torch
from mcmi_torch import reference


def test_drop_in_for_cross_entropy_with_lam_zero():
    logits, target, q = random_problem(30, 8)
    ce = torch.nn.CrossEntropyLoss()(logits, target)
    ours = mcmi_torch.MCMILoss(0.0, q)(logits, target)
    torch.testing.assert_close(ours, ce, rtol=1e-6, atol=1e-6)


def test_fixed_centroids_are_renormalized_buffers():
    _, _, q = random_problem(1, 6)
    slightly_off = q * (1 + 1e-4)
    crit = mcmi_torch.MCMILoss(0.25, slightly_off)
    assert [name for name, _ in crit.named_buffers()] == ["centroids"]
    torch.testing.assert_close(crit.centroids.sum(1), torch.ones(6))
    assert crit.centroids.dtype == torch.float32
    assert not crit.centroids.requires_grad
    assert "lam=0.25" in repr(crit) and "centroids=<fixed [6, 6] buffer>" in repr(crit)


def test_fixed_centroids_follow_the_buffer():
    """The fixed mode feeds the kernel its buffer: every way the buffer can
    change (in place, load_state_dict, assignment, .to) must be seen."""
    logits, target, q = random_problem(40, 6)
    crit = mcmi_torch.MCMILoss(0.5, q)

    def check():
        want = reference.mcmi_loss(logits.double(), target, 0.5, crit.centroids.double())
        torch.testing.assert_close(crit(logits, target).double(), want, rtol=1e-5, atol=1e-6)

    check()
    other = torch.softmax(torch.randn(6, 6), 1)
    with torch.no_grad():
        crit.centroids.copy_(other)
    check()
    crit.load_state_dict({"centroids": torch.softmax(torch.randn(6, 6), 1)})
    check()
    crit.centroids = torch.softmax(torch.randn(6, 6), 1)
    check()
    crit.to(torch.float64)
    logits = logits.double()
    check()


def test_ema_update_rule_and_no_grad_validation():
    logits, target, _ = random_problem(40, 5, ignore=0.0)
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=5, momentum=0.25)
    assert torch.equal(crit.centroids, torch.full((5, 5), 0.2))
    with torch.no_grad():
        crit(logits, target)  # validation: no update
    assert not crit.seen.any()
    crit(logits, target)  # first batch sets the centroids of the classes present
    sums, counts = reference.class_sums(logits, target, 5)
    first = sums / counts.unsqueeze(1)
    torch.testing.assert_close(crit.centroids, first.float())
    assert crit.seen.all()

    logits2 = torch.randn(40, 5)
    target2 = torch.zeros(40, dtype=torch.long)  # only class 0
    before = crit.centroids.clone()
    value = crit(logits2.requires_grad_(True), target2)
    # The step used the centroids from before the update.
    torch.testing.assert_close(value, reference.mcmi_loss(logits2, target2, 0.3, before))
    batch0 = torch.softmax(logits2.detach(), 1).mean(0)
    torch.testing.assert_close(crit.centroids[0], 0.75 * before[0] + 0.25 * batch0)
    assert torch.equal(crit.centroids[1:], before[1:])


def test_fused_ema_update_matches_the_sums_path(monkeypatch):
    """One process uses the fused ema_update_ kernel; DDP (forced here) the
    class sums + all_reduce path: both follow the same rule."""
    fused = mcmi_torch.MCMILoss(0.3, "ema", num_classes=7, momentum=0.2, temperature=2.0)
    summed = mcmi_torch.MCMILoss(0.3, "ema", num_classes=7, momentum=0.2, temperature=2.0)
    for step in range(4):
        logits, target, _ = random_problem(30, 7, seed=step)
        target[target == 3] = 2  # class 3 never appears
        fused(logits, target)
        with monkeypatch.context() as m:
            m.setattr(mcmi_torch._modes, "is_distributed", lambda: True)
            summed(logits, target)
        torch.testing.assert_close(fused.centroids, summed.centroids, rtol=1e-6, atol=1e-7)
        assert torch.equal(fused.seen, summed.seen)
    assert not fused.seen[3] and torch.equal(fused.centroids[3], torch.full((7,), 1 / 7))


def test_state_dict_round_trip_with_weights_only():
    crit = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4)
    crit(torch.randn(16, 4), torch.randint(0, 4, (16,)))
    buffer = io.BytesIO()
    torch.save(crit.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = mcmi_torch.MCMILoss(0.3, "ema", num_classes=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.centroids, crit.centroids)
    assert torch.equal(fresh.seen, crit.seen)


def test_buffers_move_with_to():
    crit = mcmi_torch.MCMILoss(0.3, torch.softmax(torch.randn(3, 3), 1)).to(torch.float64)
    assert crit.centroids.dtype == torch.float64
    logits, target, _ = random_problem(5, 3, dtype=torch.float64)
    assert crit(logits, target).dtype == torch.float64


def test_train_loop_like_repdistiller():
    """criterion(output, target).item() and .backward() in training, the same
    object under no_grad in validation, as RepDistiller's loops do."""
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    y = (x[:, :4].argmax(1)).long()
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    criterion = mcmi_torch.MCMILoss(0.2, "ema", num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        for xb, yb in zip(x.split(64), y.split(64)):
            loss = criterion(model(xb), yb)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ema = criterion.centroids.clone()
        with torch.no_grad():
            criterion(model(x), y).item()
        assert torch.equal(ema, criterion.centroids)
    assert losses[-1] < losses[0]
    assert (model(x).argmax(1) == y).float().mean() > 0.8


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.net(x)


def test_estimate_centroids_matches_manual_mean_and_restores_mode():
    torch.manual_seed(0)
    x = torch.randn(103, 6)
    y = torch.arange(103) % 4
    index = torch.arange(103)
    model = Tiny().train()
    bn_before = model.net[1].running_mean.clone()
    loader = DataLoader(TensorDataset(x, y, index), batch_size=32)  # (img, target, index)
    q = mcmi_torch.estimate_centroids(model, loader, 4, temperature=2.0, progress=False)
    assert model.training
    assert torch.equal(model.net[1].running_mean, bn_before)
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x) / 2.0, 1)
    want = torch.stack([p[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    mcmi_torch.MCMILoss(0.25, q)  # valid fixed centroids


def test_estimate_centroids_train_mode_and_missing_class():
    x = torch.randn(20, 6)
    y = torch.zeros(20, dtype=torch.long)
    model = Tiny().eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.warns(UserWarning, match=r"no sample of classes \[1, 2, 3\]"):
        q = mcmi_torch.estimate_centroids(model, loader, 4, progress=False, train_mode=True)
    assert not model.training
    torch.testing.assert_close(q[1:], torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="no batch"):
        mcmi_torch.estimate_centroids(model, [], 4, progress=False)
    with pytest.raises(TypeError, match="inputs, targets"):
        mcmi_torch.estimate_centroids(model, [x], 4, progress=False)
