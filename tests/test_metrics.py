"""teacher_report against the definitions, computed the slow way (all pairs, one
sample and one bin at a time)."""

import collections
import math

import pytest
import torch

from mcmi_torch import estimate_centroids, reference
from mcmi_torch.centroids import to_device
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
    for name in ("accuracy", "cmi", "separation", "ncmi", "nll", "ece"):
        assert getattr(report, name) == pytest.approx(getattr(want, name), rel=1e-12), name
    assert report.cmi > 0
    with pytest.warns(UserWarning, match=r"no sample of classes \[3\]"):
        q = estimate_centroids(model, [(x, y)], 4, **kw)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(q, estimate_centroids(model, [(x[keep], y[keep])], 4,
                                                         progress=False))  # fmt: skip


def direct_calibration(z, y, temperature, bins):
    """NLL and ECE by their definitions, one sample and one bin at a time."""
    p = torch.softmax(z.double() / temperature, 1)
    nll = sum(-math.log(p[i, y[i]].item()) for i in range(len(y))) / len(y)
    gap = [0.0] * bins
    for i in range(len(y)):
        conf, pred = p[i].max(0)
        b = next(b for b in range(bins) if conf.item() <= (b + 1) / bins)  # ((b-1)/M, b/M]
        gap[b] += float(pred.item() == y[i].item()) - conf.item()
    return nll, sum(abs(g) for g in gap) / len(y)


@pytest.mark.parametrize("temperature,bins", [(1.0, 15), (0.7, 4)])
def test_calibration_and_reference_fields_match_their_definitions(temperature, bins):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(83, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (83,), generator=g)
    y[[5, 40]] = -100  # left out of every field
    reference = torch.softmax(3 * torch.randn(83, 4, generator=g, dtype=torch.float64), 1)
    reference[::7, 2] = 0.0  # zero entries: 0 log 0 = 0
    reference /= reference.sum(1, keepdim=True)
    rows = {tuple(r.tolist()): p for r, p in zip(x, reference)}
    model = torch.nn.Linear(3, 4).double()
    with torch.no_grad():
        model.weight.mul_(4)  # confident enough to fill several bins
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 83, 16)]
    report = teacher_report(
        model, loader, 4, temperature=temperature, progress=False, ece_bins=bins,
        posterior=lambda inputs: torch.stack([rows[tuple(r.tolist())] for r in inputs]),
    )  # fmt: skip

    keep = y != -100
    with torch.no_grad():
        z = model(x)[keep]
    nll, ece = direct_calibration(z, y[keep], temperature, bins)
    p = torch.softmax(z / temperature, 1)
    kl = [
        sum(a * math.log(a / b) for a, b in zip(ref.tolist(), row.tolist()) if a > 0)
        for ref, row in zip(reference[keep], p)
    ]
    agree = (p.argmax(1) == reference[keep].argmax(1)).double().mean().item()
    assert report.samples == 81
    assert report.nll == pytest.approx(nll, rel=1e-12)
    assert report.ece == pytest.approx(ece, rel=1e-12, abs=1e-15)
    assert report.ece > 0.0
    assert report.kl_to_reference == pytest.approx(sum(kl) / 81, rel=1e-12)
    assert report.reference_agreement == pytest.approx(agree, abs=1e-15)


def test_without_a_posterior_the_reference_fields_are_none():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    report = teacher_report(torch.nn.Linear(3, 2), [(x, y)], 2, progress=False)
    assert report.kl_to_reference is None and report.reference_agreement is None


def test_a_perfectly_calibrated_model_has_zero_ece_and_the_reference_kl_is_zero_at_itself():
    # Four samples at confidence 0.75, three of them right: accuracy equals confidence.
    z = torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64)).expand(4, 2)
    y = torch.tensor([0, 0, 0, 1])
    report = teacher_report(
        torch.nn.Identity(), [(z, y)], 2, progress=False,
        posterior=lambda logits: torch.softmax(logits, 1),
    )  # fmt: skip
    assert report.ece == pytest.approx(0.0, abs=1e-15)
    assert report.kl_to_reference == pytest.approx(0.0, abs=1e-15)
    assert report.nll == pytest.approx(-(3 * math.log(0.75) + math.log(0.25)) / 4)


@pytest.mark.parametrize(
    "posterior,message",
    [
        (lambda x: torch.full((len(x), 3), 1 / 3), "shape"),
        (lambda x: torch.full((len(x), 2), 0.6), "sum to 1"),
        (lambda x: torch.tensor([[1.5, -0.5]]).expand(len(x), 2), "negative"),
    ],
)
def test_a_bad_posterior_is_an_error(posterior, message):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=message):
        teacher_report(torch.nn.Linear(3, 2), [(x, y)], 2, progress=False, posterior=posterior)


class _DictModel(torch.nn.Module):
    """A model whose inputs are a dict, with a batch-norm kept in eval."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)

    def forward(self, inputs):
        return self.norm(self.lin(inputs["x"]))


def _modes(model):
    return [module.training for module in model.modules()]


def test_each_submodule_keeps_its_own_mode_also_when_the_pass_raises():
    """Both passes restore every submodule's own flag (not the model's flag
    everywhere), before an error (a bad label, a bad posterior) leaves."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    bad = y.clone()
    bad[2] = 9
    passes = {
        "centroids": lambda m, b: estimate_centroids(m, b, 4, progress=False),
        "report": lambda m, b: teacher_report(m, b, 4, progress=False),
    }
    for name, run in passes.items():
        for training in (True, False):
            model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
            model.train(training)[1].eval()
            before = _modes(model)
            run(model, [(x, y)])
            assert _modes(model) == before, name
            with pytest.raises(RuntimeError, match="out of range"):
                run(model, [(x, bad)])
            assert _modes(model) == before, name
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    model[0].eval()
    with pytest.raises(ValueError, match="sum to 1"):
        teacher_report(model, [(x, y)], 4, progress=False,
                       posterior=lambda inputs: torch.ones(8, 4))  # fmt: skip
    assert _modes(model) == [True, False, True]


def test_loaders_in_every_valid_form_and_errors_that_name_the_argument():
    """A generator with a posterior, dict inputs, list targets, a posterior
    returning numpy or a list: the same report as tensors give. A posterior
    of the wrong shape or kind, float targets and labels without a logit
    column name the argument."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g), torch.randint(0, 4, (12,), generator=g)
    model = _DictModel().eval()
    posterior = lambda inputs: torch.softmax(torch.cat([inputs["x"], inputs["x"][:, :1]], 1), 1)  # noqa: E731
    want = teacher_report(model, [({"x": x}, y)], 4, progress=False, posterior=posterior)
    forms = {
        "generator": ((b for b in [({"x": x}, y)]), posterior),
        "list targets": ([({"x": x}, y.tolist())], posterior),
        "int32 targets": ([({"x": x}, y.int())], posterior),
        "numpy posterior": ([({"x": x}, y)], lambda inputs: posterior(inputs).numpy()),
        "list posterior": ([({"x": x}, y)], lambda inputs: posterior(inputs).tolist()),
    }
    for name, (loader, post) in forms.items():
        got = teacher_report(model, loader, 4, progress=False, posterior=post)
        assert got == want, name
    centroids = estimate_centroids(model, [({"x": x}, y)], 4, progress=False)
    torch.testing.assert_close(
        estimate_centroids(model, [({"x": x}, y.numpy())], 4, progress=False), centroids
    )
    errors = {
        "posterior must return .* B = 12 samples, got shape \\(3, 4\\)": dict(
            posterior=lambda inputs: torch.full((3, 4), 0.25)
        ),
        "posterior must return .* got str": dict(posterior=lambda inputs: "probabilities"),
    }
    for message, kw in errors.items():
        with pytest.raises((ValueError, TypeError), match=message):
            teacher_report(model, [({"x": x}, y)], 4, progress=False, **kw)
    with pytest.raises(TypeError, match="targets must be a tensor of class indices"):
        estimate_centroids(model, [({"x": x}, [0.5] * 12)], 4, progress=False)
    with pytest.raises(
        ValueError, match=r"targets must be 1-D \[B\] class indices, got shape \[12, 1\]"
    ):
        teacher_report(model, [({"x": x}, y.unsqueeze(1))], 4, progress=False)
    with pytest.raises(ValueError, match=r"targets hold label 5 .* 4 logit columns"):
        teacher_report(model, [({"x": x}, torch.full((12,), 5))], 6, progress=False)


def test_inputs_in_a_dict_subclass_or_a_named_tuple_are_moved_whole():
    """A defaultdict of inputs (whose constructor takes a factory, not pairs)
    and a named tuple (whose constructor takes fields, not an iterable) keep
    their type and have every tensor moved to the model's device."""
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 1, 2])
    batch = collections.defaultdict(list, x=x)
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is collections.defaultdict and moved.default_factory is list
    assert moved["x"].is_meta and not batch["x"].is_meta
    pair = collections.namedtuple("Pair", "x extra")(x, [x])
    moved = to_device(pair, torch.device("meta"))
    assert type(moved) is type(pair) and moved.x.is_meta and moved.extra[0].is_meta
    model = _DictModel().eval()
    want = estimate_centroids(model, [({"x": x}, y)], 4, progress=False)
    got = estimate_centroids(model, [(collections.defaultdict(list, x=x), y)], 4, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
