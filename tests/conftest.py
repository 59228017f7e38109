"""Shared helpers: fresh random problems (never zeros), tolerances, the
device and centroid-mode fixtures."""

import os
import shutil
import warnings

import pytest
import torch
from hypothesis import strategies as st

import mcmi_torch

# The first dual tensor of a process makes torch load its forward-AD
# decompositions, which it compiles with torch.jit.script: a DeprecationWarning
# of torch's own in torch 2.13, whichever test comes first. Loaded here, quietly.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))

#: A test marked with it runs on a CUDA GPU only (skipped without one).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: The torch.compile backend of the CPU tests: inductor, which compiles C++, or
#: where no C++ compiler is found (the wheel installed without one) aot_eager,
#: which still traces the ops' fake kernels and autograd into one graph.
COMPILE_BACKEND = "inductor" if shutil.which(os.environ.get("CXX", "g++")) else "aot_eager"

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

CENTROID_MODES = ["fixed", "batch", "ema"]

#: Hypothesis strategies of a small float64 problem for random_problem:
#: one row, one column, every row ignored, either centroid source.
SMALL_PROBLEMS = dict(
    rows=st.integers(1, 9),
    cols=st.integers(1, 6),
    temperature=st.sampled_from([0.3, 1.0, 4.0]),
    ignore=st.sampled_from([0.0, 0.5, 1.0]),
    batch=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)

# Relative error bounds against a float64 reference, measured against the
# largest entry (assert_close_rel): losses with their CE term, gradients, sums.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}

#: The promise of docs/math.md ("Precision") for the KL of a row against the
#: float64 reference: |error| <= rtol * |KL| + atol.
KL_BOUND = {torch.float32: (1e-5, 1e-9), torch.float64: (1e-10, 1e-15)}


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
    """max |a - e| <= rtol * max(max |e|, floor): the relative error of
    docs/math.md ("Precision"), measured against the largest entry so that
    entries near 0 do not dominate, and absolute below `floor`. A KL near 0
    (one sample per class with in-batch centroids) has no meaningful relative
    error: its float32 error is unit roundoff times the size of the log terms
    it cancels (log C + |z/T|)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(floor)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def assert_kl_bound(got, want, dtype, *, reduction="none", rows=1, extra=0.0):
    """The per-row KL bound of docs/math.md (``KL_BOUND[dtype]``, plus an
    absolute ``extra``) on per-row values; on a mean it bounds the mean of
    the rows' errors, on a sum of ``rows`` rows their sum."""
    rtol, atol = KL_BOUND[dtype]
    atol += extra
    if reduction == "sum":
        atol *= max(rows, 1)
    err = (got.detach().double() - want.detach().double()).abs()
    bound = rtol * want.detach().double().abs() + atol
    if err.numel() == 0:
        return
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (
        f"error {err.flatten()[worst].item():.3g} at {want.flatten()[worst].item():.3g} "
        f"exceeds {rtol:g} * |value| + {atol:g}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the kernels run on: the CPU, and CUDA where a GPU is."""
    return request.param


@pytest.fixture(params=CENTROID_MODES)
def centroid_mode(request):
    """Each way ``MCMILoss`` gets its centroids (see make_criterion)."""
    return request.param


def make_criterion(mode, q, lam=0.6, **kw):
    """``MCMILoss`` in centroid ``mode``: the given centroids ``q [K, C]`` for
    'fixed', in-batch ones for 'batch', a uniform ``[K, K]`` buffer for 'ema'."""
    return mcmi_torch.MCMILoss(lam, q if mode == "fixed" else mode, num_classes=q.shape[0], **kw)


def centroids_used(crit):
    """The centroids a step of ``crit`` reads (a copy, taken before the step
    updates an 'ema' buffer); ``None`` for in-batch ones."""
    return None if crit.mode == "batch" else crit.centroids.clone()
