"""nn.CrossEntropyLoss conventions: weight, label_smoothing, [N, C, d1, ...]
inputs, and the repr; against F.cross_entropy + reference.cmi in float64."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_problem

import mcmi_torch
from mcmi_torch import reference

LAM = 0.3


def expected_loss(logits, target, lam, centroids, *, weight, smoothing, reduction, temperature):
    """F.cross_entropy with the same options, minus lam times the unweighted CMI
    of the rows (class dim moved last), per element for 'none'."""
    ce = F.cross_entropy(
        logits,
        target,
        weight=weight,
        ignore_index=-100,
        reduction=reduction,
        label_smoothing=smoothing,
    )
    rows = logits.movedim(1, -1).reshape(-1, logits.shape[1]) if logits.dim() > 2 else logits
    kl = reference.cmi(
        rows, target.reshape(-1), centroids, temperature=temperature, reduction=reduction
    )
    return ce - lam * (kl.reshape(target.shape) if reduction == "none" else kl)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
@pytest.mark.parametrize(("use_weight", "smoothing"), [(True, 0.0), (False, 0.2), (True, 0.1)])
def test_weight_and_label_smoothing_match_cross_entropy(reduction, mode, use_weight, smoothing):
    logits, target, q = random_problem(40, 7, dtype=torch.float64, ignore=0.2, seed=3)
    weight = torch.rand(7, dtype=torch.float64) + 0.2 if use_weight else None
    crit = mcmi_torch.MCMILoss(
        LAM,
        q if mode == "fixed" else "batch",
        temperature=2.0,
        reduction=reduction,
        weight=weight,
        label_smoothing=smoothing,
    ).double()
    # The module holds fixed centroids as a float32 buffer: the reference reads it.
    centroids = crit.centroids.double() if mode == "fixed" else None
    z = logits.clone().requires_grad_()
    zr = logits.clone().requires_grad_()
    got = crit(z, target)
    want = expected_loss(
        zr,
        target,
        LAM,
        centroids,
        weight=weight,
        smoothing=smoothing,
        reduction=reduction,
        temperature=2.0,
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    upstream = torch.rand_like(want) + 0.5
    got.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "batch", "ema"])
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": True}, {"label_smoothing": 0.1}, {"weight": True, "label_smoothing": 0.1}],
)
def test_a_mean_over_no_row_is_zero_with_every_option(mode, options):
    """No valid row (every label ignored, or an empty batch) gives 0 and a
    zero gradient with or without weight and label smoothing (where
    F.cross_entropy gives NaN); so does the CE of a weighted mean whose
    targets all have weight 0."""
    _, _, q = random_problem(1, 5)
    weight = torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0]) if options.get("weight") else None
    smoothing = options.get("label_smoothing", 0.0)
    crit = mcmi_torch.MCMILoss(LAM, q if mode == "fixed" else mode, num_classes=5, weight=weight,
                               label_smoothing=smoothing)  # fmt: skip
    batches = [torch.full((6,), -100), torch.zeros(0, dtype=torch.int64)]
    if weight is not None:
        batches.append(torch.tensor([0, 0, -100]))
    for target in batches:
        if target.numel() and target[0] == 0:
            crit.lam = 0.0  # the rows are valid: only the CE term is empty
        z = torch.randn(len(target), 5, requires_grad=True)
        value = crit(z, target)
        value.backward()
        assert value.item() == 0.0 and not z.grad.any(), target
    if weight is not None:  # weights of either sign summing to a non-zero total
        crit.weight = torch.tensor([-1.0, 0.5, 0.25, 1.0, 1.0])
        z, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
        want = F.cross_entropy(z, target, weight=crit.weight, label_smoothing=smoothing)
        torch.testing.assert_close(crit(z, target), want)


def test_weighted_mean_divides_by_the_weights_and_cmi_stays_unweighted():
    logits, target, q = random_problem(30, 5, dtype=torch.float64, ignore=0.2, seed=4)
    weight = torch.rand(5, dtype=torch.float64) + 0.1
    crit = mcmi_torch.MCMILoss(LAM, q, weight=weight).double()
    valid = target != -100
    ce = F.cross_entropy(logits, target, reduction="none")
    w = weight[target[valid]]
    kl = reference.cmi(logits, target, crit.centroids.double(), reduction="none")[valid]
    want = (w * ce[valid]).sum() / w.sum() - LAM * kl.mean()
    torch.testing.assert_close(crit(logits, target), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_with_weight_and_label_smoothing(reduction):
    logits, target, q = random_problem(9, 4, dtype=torch.float64, ignore=0.2, seed=5)
    weight = torch.rand(4, dtype=torch.float64) + 0.3
    for centroids in (q, "batch"):
        crit = mcmi_torch.MCMILoss(
            LAM, centroids, reduction=reduction, weight=weight, label_smoothing=0.15
        ).double()
        z = logits.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, c=crit: c(x, target), (z,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": True, "label_smoothing": 0.1}])
def test_spatial_inputs_as_cross_entropy_takes_them(reduction, options):
    g = torch.Generator().manual_seed(6)
    logits = 2 * torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 4, 2), generator=g)
    target[0, 1, 1] = -100
    q = torch.softmax(torch.randn(5, 5, generator=g, dtype=torch.float64), 1)
    weight = torch.rand(5, dtype=torch.float64) + 0.2 if options.get("weight") else None
    smoothing = options.get("label_smoothing", 0.0)
    for mode in ("fixed", "batch"):
        crit = mcmi_torch.MCMILoss(
            LAM,
            q if mode == "fixed" else "batch",
            reduction=reduction,
            weight=weight,
            label_smoothing=smoothing,
        ).double()
        centroids = crit.centroids.double() if mode == "fixed" else None
        z = logits.clone().requires_grad_()
        zr = logits.clone().requires_grad_()
        got = crit(z, target)
        want = expected_loss(
            zr,
            target,
            LAM,
            centroids,
            weight=weight,
            smoothing=smoothing,
            reduction=reduction,
            temperature=1.0,
        )
        assert got.shape == (target.shape if reduction == "none" else ())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(z.grad, zr.grad, rtol=1e-10, atol=1e-12)
        got_cmi = mcmi_torch.cmi(logits, target, centroids, reduction=reduction)
        rows = logits.movedim(1, -1).reshape(-1, 5)
        want_cmi = reference.cmi(rows, target.reshape(-1), centroids, reduction=reduction)
        torch.testing.assert_close(got_cmi, want_cmi.reshape(got_cmi.shape), rtol=1e-10, atol=0)


def test_unbatched_input():
    logits, target, q = random_problem(1, 6, dtype=torch.float64, ignore=0.0, seed=7)
    for reduction in ("mean", "none"):
        crit = mcmi_torch.MCMILoss(LAM, q, reduction=reduction).double()
        got = crit(logits[0], target[0])
        kl = reference.cmi(logits, target, crit.centroids.double(), reduction="none")[0]
        want = F.cross_entropy(logits[0], target[0]) - LAM * kl
        assert got.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_default_options_use_the_fused_op_alone(monkeypatch):
    """No extra pass: F.cross_entropy is not called without weight or smoothing."""
    logits, target, q = random_problem(16, 5, seed=8)

    def fail(*args, **kwargs):
        raise AssertionError("F.cross_entropy called on the default path")

    monkeypatch.setattr(mcmi_torch.loss.F, "cross_entropy", fail)
    z = logits.requires_grad_()
    mcmi_torch.MCMILoss(LAM, q)(z, target).backward()
    mcmi_torch.MCMILoss(LAM, q, weight=torch.ones(5))
    with pytest.raises(AssertionError, match="default path"):
        mcmi_torch.MCMILoss(LAM, q, label_smoothing=0.1)(z, target)


def test_conventions_that_do_not_carry_over():
    logits, target, q = random_problem(8, 5, seed=9)
    crit = mcmi_torch.MCMILoss(LAM, q)
    soft = torch.softmax(torch.randn(8, 5), 1)
    with pytest.raises(TypeError, match=r"class-probability targets.*not supported"):
        crit(logits, soft)
    with pytest.raises(TypeError, match=r"class-probability targets.*not supported"):
        mcmi_torch.mcmi(logits, soft)
    with pytest.raises(ValueError, match=r"target must have shape \[8, 3\]"):
        crit(logits.unsqueeze(2).expand(8, 5, 3), target)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        mcmi_torch.MCMILoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        mcmi_torch.MCMILoss(weight=torch.ones(2, 5))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        mcmi_torch.MCMILoss(weight=torch.ones(5, dtype=torch.long))


def test_weight_is_a_buffer():
    weight = torch.rand(5) + 0.5
    crit = mcmi_torch.MCMILoss(weight=weight)
    assert torch.equal(crit.state_dict()["weight"], weight)
    assert crit.double().weight.dtype == torch.float64
    assert "weight" not in mcmi_torch.MCMILoss().state_dict()
    logits, target, _ = random_problem(12, 5, seed=10)
    want = F.cross_entropy(logits, target, weight=weight) - 0.25 * reference.cmi(logits, target)
    torch.testing.assert_close(mcmi_torch.MCMILoss(weight=weight)(logits, target), want)


def test_repr_shows_what_the_constructor_takes():
    q = torch.softmax(torch.randn(4, 6), 1)
    fixed = repr(mcmi_torch.MCMILoss(0.5, q))
    assert "centroids=<fixed [4, 6] buffer>" in fixed and "'fixed'" not in fixed
    ema = repr(mcmi_torch.MCMILoss(0.5, "ema", num_classes=4, momentum=0.05))
    assert "centroids='ema', num_classes=4, momentum=0.05" in ema
    batch = repr(mcmi_torch.MCMILoss(label_smoothing=0.1, weight=torch.ones(6)))
    assert "centroids='batch'," in batch and "momentum" not in batch
    assert "weight=<[6] buffer>" in batch and "label_smoothing=0.1" in batch


class TupleModel(torch.nn.Module):
    """A classifier that returns its features with the logits, in either order
    (RepDistiller's ``is_feat=True``: ``(feats, logits)``; mdistiller: ``(logits,
    feats)``)."""

    def __init__(self, logits_first):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 4)
        self.logits_first = logits_first

    def forward(self, x):
        feats = torch.relu(self.body(x))
        logits = self.head(feats)
        return (logits, {"feats": [feats]}) if self.logits_first else ([feats], logits)


def test_tuple_models_with_an_output_selector():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(15)
    loader = DataLoader(
        TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)),
        batch_size=16,
    )
    for logits_first, index in ((True, 0), (False, 1)):
        model = TupleModel(logits_first)
        plain = torch.nn.Sequential(model.body, torch.nn.ReLU(), model.head)
        want_q = mcmi_torch.estimate_centroids(plain, loader, 4, progress=False)
        want_report = mcmi_torch.metrics.teacher_report(plain, loader, 4, progress=False)
        for output in (index, lambda out, i=index: out[i]):
            q = mcmi_torch.estimate_centroids(model, loader, 4, progress=False, output=output)
            torch.testing.assert_close(q, want_q, rtol=0, atol=0)
            report = mcmi_torch.metrics.teacher_report(
                model, loader, 4, progress=False, output=output
            )
            assert report == want_report
        with pytest.raises(TypeError, match=r"returned a tuple, not a logits tensor: pass output="):
            mcmi_torch.estimate_centroids(model, loader, 4, progress=False)
        with pytest.raises(TypeError, match=r"returned a tuple, not a logits tensor: pass output="):
            mcmi_torch.metrics.teacher_report(model, loader, 4, progress=False)
        wrong = 1 - index
        kind = "dict" if logits_first else "list"
        with pytest.raises(TypeError, match=f"output={wrong} picked a {kind} from the model's"):
            mcmi_torch.estimate_centroids(model, loader, 4, progress=False, output=wrong)
        for bad in (5, "logits", 1.5):
            for fn in (mcmi_torch.estimate_centroids, mcmi_torch.metrics.teacher_report):
                with pytest.raises(ValueError, match=rf"output={bad!r} cannot pick the logits "
                                   r"from the model's tuple \((Index|Type)Error"):  # fmt: skip
                    fn(model, loader, 4, progress=False, output=bad)


@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(weight=torch.ones(4))])
@pytest.mark.parametrize("mode", ["fixed", "batch"])
def test_more_classes_than_logit_columns_names_num_classes_with_every_option(mode, options):
    """The CE term needs labels that index the logits: with num_classes > C
    the criterion says so, whichever computes the CE term (the fused op, or
    F.cross_entropy with weight or label smoothing)."""
    logits, target, q = random_problem(6, 4, classes=6)
    target[0] = 5
    crit = mcmi_torch.MCMILoss(LAM, q if mode == "fixed" else mode, num_classes=6, **options)
    with pytest.raises(RuntimeError, match=r"num_classes \(6\) > logits columns \(4\)"):
        crit(logits, target)
