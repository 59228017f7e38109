"""teacher_report against the definitions, computed the slow way (all pairs)."""

import pytest
import torch

from mcmi_torch import estimate_centroids, reference
from mcmi_torch.metrics import teacher_report


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_teacher_report_matches_brute_force(temperature):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(97, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (97,), generator=g)
    model = torch.nn.Linear(5, 4).double()
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 97, 20)]
    report = teacher_report(model, loader, 4, temperature=temperature, progress=False)

    with torch.no_grad():
        z = model(x)
        p = torch.softmax(z / temperature, 1)
        sums, counts = reference.class_sums(z, y, 4, temperature=temperature)
        cmi = reference.cmi(z, y, sums / counts.unsqueeze(1), temperature=temperature).item()
        cross = -(p @ p.log().T)  # [i, j] = -sum_k P_ik log P_jk
        separation = cross[y.unsqueeze(1) != y.unsqueeze(0)].mean().item()
        accuracy = (z.argmax(1) == y).double().mean().item()
    assert report.samples == 97
    assert report.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert report.cmi == pytest.approx(cmi, rel=1e-9)
    assert report.separation == pytest.approx(separation, rel=1e-9)
    assert report.ncmi == pytest.approx(cmi / separation, rel=1e-9)


def test_teacher_report_needs_data():
    with pytest.raises(ValueError, match="no batch"):
        teacher_report(torch.nn.Linear(2, 2), [], 2, progress=False)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignored_samples_are_left_out_of_every_metric(ignore_index):
    """A report (and centroids) with some samples labelled ignore_index equals
    the one on the other samples alone; with ignore_index = 3, a sample
    predicted 3 and labelled 3 is not counted as correct either."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (90,), generator=g)
    y[torch.rand(90, generator=g) < 0.3] = ignore_index
    model = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        model.bias[3] = 5.0  # most samples predicted 3
    kw = dict(ignore_index=ignore_index, progress=False)
    keep = y != ignore_index
    report = teacher_report(model, [(x, y)], 4, **kw)
    want = teacher_report(model, [(x[keep], y[keep])], 4, progress=False)
    assert report.samples == int(keep.sum()) == want.samples
    for name in ("accuracy", "cmi", "separation", "ncmi"):
        assert getattr(report, name) == pytest.approx(getattr(want, name), rel=1e-12), name
    assert report.cmi > 0
    with pytest.warns(UserWarning, match=r"no sample of classes \[3\]"):
        q = estimate_centroids(model, [(x, y)], 4, **kw)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(q, estimate_centroids(model, [(x[keep], y[keep])], 4,
                                                         progress=False))  # fmt: skip
