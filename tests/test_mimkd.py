"""MIMKD estimators on correlated Gaussians with known mutual information."""

import math

import pytest
import torch

from mcmi_torch.mimkd import MIMKDLoss


def gaussian_pair(rho, n, d, generator):
    x = torch.randn(n, d, generator=generator)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=generator)
    return x, y


def true_mi(rho, d):
    return -0.5 * d * math.log(1 - rho**2)


def trained_estimate(estimator, rho, d=2, steps=300, batch=256, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    loss = MIMKDLoss([d], [d], estimator=estimator, proj_dim=32, hidden=64)
    opt = torch.optim.Adam(loss.parameters(), lr=3e-3)
    for _ in range(steps):
        x, y = gaussian_pair(rho, batch, d, g)
        value = loss([x], [y])
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():  # a fresh, larger sample for the estimate
        x, y = gaussian_pair(rho, 4096, d, g)
        return loss.estimates([x], [y])[0].item()


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_estimate_rises_with_correlation(estimator):
    rhos = [0.2, 0.5, 0.8, 0.95]
    values = [trained_estimate(estimator, r) for r in rhos]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_infonce_stays_below_the_true_mi():
    for rho in (0.5, 0.8, 0.95):
        estimate = trained_estimate("infonce", rho)
        assert estimate < true_mi(rho, 2) + 0.02, (rho, estimate, true_mi(rho, 2))
        assert estimate > 0.5 * min(true_mi(rho, 2), math.log(4096))  # and it is not vacuous


def test_loss_pools_feature_maps_detaches_teacher_and_weights_pairs():
    torch.manual_seed(0)
    loss = MIMKDLoss([8, 4], [16, 6], weights=[1.0, 0.5])
    s_map = torch.randn(10, 8, 5, 5, requires_grad=True)
    t_map = torch.randn(10, 16, 3, 3, requires_grad=True)
    s_vec = torch.randn(10, 4, requires_grad=True)
    t_vec = torch.randn(10, 6, requires_grad=True)
    value = loss([s_map, s_vec], [t_map, t_vec])
    value.backward()
    assert s_map.grad is not None and s_vec.grad is not None
    assert t_map.grad is None and t_vec.grad is None
    with pytest.raises(ValueError, match="expected 2 student and teacher features"):
        loss([s_map], [t_map])
    with pytest.raises(ValueError, match="estimator must be"):
        MIMKDLoss([1], [1], estimator="mine")


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_shape_errors_name_the_pair_and_the_argument(estimator):
    loss = MIMKDLoss([8, 4], [16, 6], estimator=estimator)
    s, t = [torch.randn(8, 8), torch.randn(8, 4)], [torch.randn(8, 16), torch.randn(8, 6)]
    assert torch.isfinite(loss(s, t))
    cases = [
        (s, [t[0], torch.randn(4, 6)], ValueError, r"\[1\] must hold the same samples.*8 and 4"),
        (s, [t[0], torch.randn(1, 6)], ValueError, r"batches of 8 and 1"),
        ([s[0][:1], s[1][:1]], [t[0][:1], t[1][:1]], ValueError, "batch of 1: the MI estimates"),
        ([s[0][:0], s[1][:0]], [t[0][:0], t[1][:0]], ValueError, "batch of 0"),
        ([torch.randn(8, 5), s[1]], t, ValueError, r"student_feats\[0\] must be \[B, 8\]"),
        (s, [torch.randn(8), t[1]], ValueError, r"teacher_feats\[0\] must be \[B, 16\]"),
        (s, [t[0], t[1].long()], TypeError, r"teacher_feats\[1\] must be a floating-point"),
        (s[0], t, TypeError, "student_feats must be a sequence of tensors"),
        (s, [t[0]], ValueError, "expected 2 student and teacher features, got 2 and 1"),
    ]
    for student, teacher, error, message in cases:
        with pytest.raises(error, match=message):
            loss(student, teacher)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(student_dims=[4], teacher_dims=[4, 2]), ValueError, "same pairs"),
        (dict(student_dims=[], teacher_dims=[]), ValueError, "non-empty sequence"),
        (dict(student_dims=4, teacher_dims=[4]), ValueError, "non-empty sequence"),
        (dict(student_dims=[4.5], teacher_dims=[4]), TypeError, r"student_dims\[0\] must be"),
        (dict(student_dims=[4], teacher_dims=[0]), ValueError, r"teacher_dims\[0\] must be >= 1"),
        (dict(student_dims=[4], teacher_dims=[4], weights=[1, 2]), ValueError, "one entry per"),
        (dict(student_dims=[4], teacher_dims=[4], weights=[math.nan]), ValueError, "finite"),
        (dict(student_dims=[4], teacher_dims=[4], weights=["1"]), TypeError, r"weights\[0\]"),
        (dict(student_dims=[4], teacher_dims=[4], proj_dim=0), ValueError, "proj_dim must be"),
        (dict(student_dims=[4], teacher_dims=[4], hidden=2.0), TypeError, "hidden must be"),
    ],
)
def test_constructor_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        MIMKDLoss(**kwargs)
