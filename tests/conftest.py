"""Shared helpers: fresh random problems (never zeros) and tolerances."""

import pytest
import torch

# Relative error bounds of SPEC section 5, against a float64 reference.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_problem(rows, cols, classes=None, *, dtype=torch.float32, scale=3.0, ignore=0.1, seed=0):
    """Logits ~ N(0, scale^2), labels uniform in [0, classes) with a fraction
    set to -100, and centroids whose rows are random probability vectors."""
    classes = cols if classes is None else classes
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    target[torch.rand(rows, generator=g) < ignore] = -100
    centroids = torch.softmax(torch.randn(classes, cols, generator=g, dtype=torch.float64), 1)
    return logits, target, centroids


def assert_close_rel(actual, expected, rtol, what="", floor=1.0):
    """max |a - e| <= rtol * max(max |e|, floor): the relative error of SPEC 5,
    measured against the largest entry so that entries near 0 do not dominate,
    and absolute below `floor`. A KL near 0 (one sample per class with
    in-batch centroids) has no meaningful relative error: its float32 error is
    unit roundoff times the size of the log terms it cancels (log C + |z/T|)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(floor)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
