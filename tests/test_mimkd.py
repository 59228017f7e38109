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
