"""The collapse guard of MCMILoss and suggest_lambda."""

import copy
import math
import pickle
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import mcmi_torch
from mcmi_torch.guard import CollapseGuard


def blobs(n=512, classes=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    means = 3 * torch.randn(classes, dim, generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def fine_tune(lam, steps=200):
    """A linear classifier trained with CE, then fine-tuned on CE - lam * CMI
    with fixed centroids from its own predictions; returns the criterion and
    the final accuracy."""
    torch.manual_seed(0)
    x, y = blobs()
    model = torch.nn.Linear(x.shape[1], 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = mcmi_torch.estimate_centroids(model, [(x, y)], 5, progress=False)
    criterion = mcmi_torch.MCMILoss(lam=lam, centroids=q)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = criterion(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return criterion, acc


def test_guard_fires_once_on_a_collapsing_fine_tune():
    with pytest.warns(mcmi_torch.CollapseWarning, match="lam=3") as record:
        criterion, acc = fine_tune(lam=3.0)
    assert acc < 0.5  # the setup really collapses
    assert criterion.guard.fired
    assert len([w for w in record if w.category is mcmi_torch.CollapseWarning]) == 1


def test_guard_is_silent_on_a_sane_fine_tune():
    with warnings.catch_warnings():
        warnings.simplefilter("error", mcmi_torch.CollapseWarning)
        criterion, acc = fine_tune(lam=0.05)
    assert acc > 0.9
    assert not criterion.guard.fired
    assert criterion.guard.calls == 200


def test_guard_checks_only_every_nth_batch_and_skips_ignored_rows():
    right = torch.eye(4)[torch.tensor([0, 1, 2, 3])]
    wrong = right.roll(1, dims=1)
    target = torch.tensor([0, 1, 2, 3])
    guard = CollapseGuard(every=3)
    for _ in range(4):  # checks on calls 1 and 4
        guard.observe(right, target, -100, 1.0)
    assert guard.best == 1.0 and guard.armed and not guard.fired
    guard.observe(wrong, target, -100, 1.0)  # calls 5 and 6: not checks
    guard.observe(wrong, target, -100, 1.0)
    assert not guard.fired
    with pytest.warns(mcmi_torch.CollapseWarning):
        guard.observe(wrong, torch.tensor([0, 1, 2, -100]), -100, 1.0)  # accuracy 0 on 3 rows
    assert guard.fired and guard.calls == 7
    guard.observe(wrong, target, -100, 1.0)  # warns once
    with pytest.raises(ValueError, match="every"):
        CollapseGuard(every=0)


@pytest.mark.parametrize(
    ("every", "error"), [(1.7, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError)]
)
def test_guard_every_must_be_a_positive_int(every, error):
    with pytest.raises(error, match="every must be"):
        CollapseGuard(every=every)


class LateCounts:
    """A device's counts: on the host from the second poll on."""

    def __init__(self, counts):
        self.host, self.polls = counts, 0

    def ready(self):
        self.polls += 1
        return self.polls > 1


def test_guard_reads_device_counts_when_they_arrive(monkeypatch):
    """On a device the counts of a check are read by a later call, once their
    copy has arrived; the warning quotes the lam of the batch it is about."""
    monkeypatch.setattr(mcmi_torch.guard, "_HostCounts", LateCounts)
    right, target = torch.eye(4).repeat(8, 1), torch.arange(4).repeat(8)
    wrong = right.roll(1, dims=1)
    guard = CollapseGuard(every=1)
    guard.observe(right, target, -100, 1.0)
    assert guard.last is None  # not on the host yet
    guard.observe(right, target, -100, 1.0)
    guard.observe(right, target, -100, 1.0)
    assert guard.best == 1.0 and guard.armed
    guard.observe(wrong, target, -100, 2.0)
    assert not guard.fired  # its counts are still on their way
    with pytest.warns(mcmi_torch.CollapseWarning, match="lam=2"):
        guard.observe(wrong, target, -100, 3.0)
    assert guard.fired and not guard._pending


def test_guard_copies_without_the_checks_in_flight(monkeypatch):
    """deepcopy and pickle of a criterion whose guard waits for device counts
    (an event cannot be copied) keep its state and drop what is in flight."""
    monkeypatch.setattr(mcmi_torch.guard, "_HostCounts", LateCounts)
    crit = mcmi_torch.MCMILoss(0.3, "batch")
    crit.guard.observe(torch.eye(4), torch.arange(4), -100, 0.3)
    crit.guard._pending[0][0].event = threading.Lock()  # not copyable, as an event
    for copied in (copy.deepcopy(crit), pickle.loads(pickle.dumps(crit))):
        assert copied.guard.calls == 1 and not copied.guard._pending
    assert len(crit.guard._pending) == 1


@pytest.mark.parametrize("mode", ["fixed", "batch", "ema"])
def test_criterion_on_meta_tensors(mode):
    """Meta batches (no values) are counted by the guard, not checked; fixed
    centroids on meta are not validated (there is nothing to read)."""
    crit = mcmi_torch.MCMILoss(0.3, torch.full((4, 4), 0.25) if mode == "fixed" else mode,
                               num_classes=4).to("meta")  # fmt: skip
    for options in ({}, {"label_smoothing": 0.1}):
        crit.label_smoothing = options.get("label_smoothing", 0.0)
        logits = torch.randn(6, 4, device="meta", requires_grad=True)
        crit(logits, torch.zeros(6, dtype=torch.int64, device="meta")).backward()
        assert logits.grad.shape == (6, 4) and crit.guard.last is None
    assert crit.guard.calls == 2


def test_guard_under_vmap():
    """Calls batched by vmap are counted, not checked, and the criterion
    works with its guard on."""
    crit = mcmi_torch.MCMILoss(0.3, "batch")
    z, y = torch.randn(3, 6, 4, dtype=torch.float64), torch.randint(0, 4, (3, 6))
    got = torch.func.vmap(crit)(z, y)
    want = [mcmi_torch.reference.mcmi_loss(z[i], y[i], 0.3) for i in range(3)]
    torch.testing.assert_close(got, torch.stack(want))
    assert crit.guard.calls == 1 and crit.guard.last is None


def test_guard_checks_under_torch_func_grad_and_jvp():
    """A functional training step (torch.func.grad, jvp) is checked with the
    values of its batch."""
    target = torch.arange(4).repeat(8)
    right = torch.eye(4).repeat(8, 1)
    crit = mcmi_torch.MCMILoss(0.5, "batch")
    crit.guard = CollapseGuard(every=1)
    torch.func.grad(lambda z: crit(z, target))(right)
    torch.func.jvp(lambda z: crit(z, target), (right,), (torch.ones_like(right),))
    assert crit.guard.calls == 2 and crit.guard.last == 1.0 and crit.guard.armed
    with pytest.warns(mcmi_torch.CollapseWarning):
        torch.func.grad(lambda z: crit(z, target))(right.roll(1, dims=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guard_does_not_sync_on_cuda():
    """A fine-tune step on CUDA with the guard checking every batch: no device
    sync (torch raises on one in sync debug mode 'error'), and the warning
    comes once the counts have arrived."""
    crit = mcmi_torch.MCMILoss(2.0, torch.full((4, 4), 0.25)).cuda()
    crit.guard = CollapseGuard(every=1)
    right, target = torch.eye(4, device="cuda"), torch.arange(4, device="cuda")
    crit(right, target)  # the first call validates the fixed centroids (one sync)
    torch.cuda.synchronize()
    wrong = right.roll(1, dims=1).requires_grad_(True)
    right.requires_grad_(True)
    with pytest.warns(mcmi_torch.CollapseWarning):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for z in (right, right, right, wrong, wrong, wrong):
                crit(z, target).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        crit(wrong, target)  # reads what has arrived
    assert crit.guard.fired


def test_guard_stays_silent_for_a_model_that_never_left_chance():
    """Random labels: the batch accuracy wanders around chance and its best is
    chance plus noise; no drop from there is a collapse."""
    g = torch.Generator().manual_seed(0)
    for classes, batch in [(10, 64), (2, 32), (100, 128)]:
        guard = CollapseGuard(every=1)
        for _ in range(3000):
            logits = torch.randn(batch, classes, generator=g)
            guard.observe(logits, torch.randint(0, classes, (batch,), generator=g), -100, 1.0)
        assert not guard.armed and not guard.fired, (classes, batch, guard.best)


def test_guard_sees_only_training_calls_with_positive_lam():
    criterion = mcmi_torch.MCMILoss(lam=0.0, centroids="batch")
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    criterion(logits, target)
    assert criterion.guard.calls == 0
    criterion.lam = 1.0  # a schedule
    with torch.no_grad():
        criterion(logits, target)
    assert criterion.guard.calls == 0
    criterion(logits, target)
    assert criterion.guard.calls == 1
    criterion.guard = None  # switched off
    criterion(logits, target)


def test_suggest_lambda_is_the_bound_and_leaving_the_label_does_not_pay_below_it():
    g = torch.Generator().manual_seed(0)
    k = 6
    q = torch.softmax(6 * torch.randn(k, k, generator=g) + 8 * torch.eye(k), 1)
    lam = mcmi_torch.suggest_lambda(q)
    log_q = q.double().log()
    expected = math.log(2) / (log_q.diagonal() - log_q.min(1).values).max().item()
    assert lam == pytest.approx(expected)
    # Per-sample objective -log P_y - lam KL(P || Q_y): at 0.99 * lam no
    # prediction with P_y <= 1/2 beats the one-hot label.
    for y in range(k):
        at_label = -0.99 * lam * -log_q[y, y]
        p = torch.softmax(8 * torch.randn(4096, k, generator=g, dtype=torch.float64), 1)
        p = p[p[:, y] <= 0.5]
        kl = (p * (p.clamp_min(1e-300).log() - log_q[y])).sum(1)
        assert (-p[:, y].log() - 0.99 * lam * kl).min() > at_label
    assert mcmi_torch.suggest_lambda(torch.full((3, 3), 1 / 3)) == math.inf
    with pytest.raises(ValueError, match="square"):
        mcmi_torch.suggest_lambda(torch.full((2, 3), 1 / 3))


@pytest.mark.parametrize(
    ("centroids", "error", "message"),
    [
        (torch.tensor([[math.nan, 1.0], [0.5, 0.5]]), ValueError, "NaN or infinite"),
        (torch.tensor([[math.inf, 0.0], [0.5, 0.5]]), ValueError, "NaN or infinite"),
        (torch.zeros(2, 2), ValueError, "rows must sum to 1"),
        (torch.tensor([[0.3, 0.3], [0.5, 0.5]]), ValueError, "rows must sum to 1"),
        (torch.tensor([[-0.1, 1.1], [0.5, 0.5]]), ValueError, "negative entries"),
        (torch.empty(0, 0), ValueError, "at least one row and one column"),
        (torch.ones(1, 1, dtype=torch.int64), TypeError, "floating-point tensor"),
        ([[1.0]], TypeError, "floating-point tensor"),
        (torch.full((3,), 1 / 3), ValueError, "2-D"),
    ],
)
def test_suggest_lambda_validates_centroids_as_the_criterion_does(centroids, error, message):
    with pytest.raises(error, match=message):
        mcmi_torch.suggest_lambda(centroids)
    if isinstance(centroids, torch.Tensor) and centroids.dim() == 2:
        with pytest.raises(error, match=message):
            mcmi_torch.MCMILoss(0.3, centroids)


def test_guard_attributes_are_checked_when_set():
    """every is checked on assignment as in the constructor; the criterion's
    guard is a CollapseGuard or None; a reloaded criterion starts unarmed."""
    crit = mcmi_torch.MCMILoss(0.3)
    for every, error in [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="every must be"):
            crit.guard.every = every
    assert crit.guard.every == 20
    crit.guard.every = 3
    assert crit.guard.every == 3 and copy.deepcopy(crit).guard.every == 3
    for value in (False, "off", object()):
        with pytest.raises(
            TypeError, match=r"guard must be a mcmi_torch\.guard\.CollapseGuard or None"
        ):
            crit.guard = value
    crit.guard = None
    z = torch.randn(6, 5, requires_grad=True)
    crit(z, torch.randint(0, 5, (6,))).backward()
    crit.guard = CollapseGuard(every=1)
    crit.guard.armed, crit.guard.best = True, 0.9
    assert not any("guard" in key for key in crit.state_dict())
    fresh = mcmi_torch.MCMILoss(0.3)
    fresh.load_state_dict(crit.state_dict())
    assert not fresh.guard.armed and fresh.guard.best == 0.0
