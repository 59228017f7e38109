"""The MCMI demo at tiny size, its tasks, the RepDistiller example (checkpoint format,
fine-tuning, student losses) and the torchdistill hook, on a small model and generated data."""

import csv
import json
import math
import os
import pathlib
import queue
import re
import statistics
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mcmi_torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "repdistiller"
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(EXAMPLES.parent))

import finetune_teacher  # noqa: E402
import mcmi_demo  # noqa: E402
import student_losses  # noqa: E402
import tasks  # noqa: E402

TINY = ["--seeds", "2", "--teacher-epochs", "2", "--finetune-epochs", "2", "--student-epochs", "2",
        "--few-epochs", "2", "--lambdas", "0", "0.8", "--early-lambdas", "0", "0.8",
        "--smoothing", "0.1", "--early-smoothing", "0.1", "--memorising-epochs", "2",
        "--workers", "0"]  # fmt: skip
TEACHERS = {"base", "0.0", "0.8", "ls0.1", "ts"}
SOURCES = ["no teacher", "not fine-tuned", "lambda 0.0", "lambda 0.8", "label smoothing 0.1",
           "lambda 0, temperature-scaled"]  # fmt: skip
REGIMES = ("memorising", "early-stopped")
FIT_FIELDS = ("train_accuracy", "train_nll", "train_cmi", "centroid_peak")


def test_demo_runs_at_tiny_size(tmp_path, capsys):
    out = mcmi_demo.main(["--task", "digits", *TINY, "--out", str(tmp_path)])["digits"]
    assert set(out) == set(REGIMES)
    for regime, results in out.items():
        assert [r["seed"] for r in results] == [0, 1]
        for r in results:
            assert r["regime"] == regime and r["task"] == "digits"
            assert set(r["teachers"]) == TEACHERS
            assert set(r["students"]) == {"none", *TEACHERS}
            for student in r["students"].values():
                assert len(student["zero-shot"]) == 10
                accs = [student["full"], student["few-shot"], *student["zero-shot"]]
                assert all(0.0 <= a <= 1.0 for a in accs)
            for t in r["teachers"].values():
                assert 0.0 <= t["train_accuracy"] <= 1.0 and t["train_nll"] > 0.0
                assert t["train_cmi"] >= 0.0 and 0.1 <= t["centroid_peak"] <= 1.0
            assert r["teachers"]["0.8"]["cmi"] >= 0.0
            assert r["teachers"]["0.8"]["kl"] is None and r["bayes_accuracy"] is None
            assert 0.05 <= r["teachers"]["ts"]["temperature"] <= 20.0
            train_labels = tasks.digits().y[tasks.split(tasks.digits().y, r["seed"])[0]]
            per_class = torch.bincount(train_labels).tolist()
            assert r["fewshot_samples"] == sum(round(0.05 * n) for n in per_class)  # 5% per class
        with open(tmp_path / f"mcmi_demo_digits_{regime}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [row["source"] for row in rows] == SOURCES
        control = rows[2]
        assert float(control["full_diff"]) == 0.0 and float(control["zero-shot_diff"]) == 0.0
        for field in FIT_FIELDS:
            means = [statistics.fmean(r["teachers"]["0.8"][field] for r in results)]
            assert float(rows[3][f"teacher_{field}"]) == pytest.approx(means[0])
        for suffix in ("md", "json", "png"):
            assert (tmp_path / f"mcmi_demo_digits_{regime}.{suffix}").stat().st_size > 0
        saved = json.loads((tmp_path / f"mcmi_demo_digits_{regime}.json").read_text())
        assert saved["regime"]["name"] == regime
        assert all(f in saved["results"][0]["teachers"]["base"] for f in FIT_FIELDS)
    out = capsys.readouterr().out
    assert "(control)" in out and "collapsed at last epoch" in out and "train acc (%)" in out
    assert "stages done" in out and "wall time" in out


def test_memorising_teachers_fit_their_training_set(tmp_path):
    """The memorising regime at reduced size (120 training points, 60 epochs):
    every teacher not fine-tuned reaches the promised training accuracy, is
    kept at its last epoch, and the reports hold its fit to the training set."""
    args = [*TINY, "--task", "gmm", "--gmm-samples", "400", "--regimes", "memorising",
            "--memorising-epochs", "60", "--out", str(tmp_path)]  # fmt: skip
    results = mcmi_demo.main(args)["gmm"]["memorising"]
    task = tasks.gaussian_mixture(400)
    for r in results:
        base = r["teachers"]["base"]
        assert base["train_accuracy"] >= mcmi_demo.MEMORISING_TRAIN_ACCURACY
        train = tasks.split(task.y, r["seed"], task.memorising_split)[0]
        assert r["train_samples"] == len(train) == 120
        bayes_train = (task.posterior(task.x[train]).argmax(1) == task.y[train]).double().mean()
        assert base["train_accuracy"] > bayes_train + 0.1  # beyond what p* explains
        assert base["centroid_peak"] > 0.9 and base["train_cmi"] < 0.2
    page = (tmp_path / "results.md").read_text()
    for item in ("- machine: ", "- versions: python", "torch ", "- command: `python examples/",
                 "- time: ", "memorising teachers (2 seeds)", "| λ 0 (control) |",
                 "| train acc (%) | centroid peak | KL(p* ‖ teacher) vs λ 0 (nats) |"):  # fmt: skip
        assert item in page
    assert "fell short" not in page  # no teacher short of the promised fit
    report = (tmp_path / "mcmi_demo_gmm_memorising.md").read_text()
    assert "taken at its last epoch" in report and "train CMI" in report


def test_demo_reports_the_distance_to_the_known_posterior(tmp_path):
    results = mcmi_demo.main(
        ["--task", "gmm", "--gmm-samples", "400", "--regimes", "early-stopped", *TINY,
         "--out", str(tmp_path)]
    )["gmm"]["early-stopped"]  # fmt: skip
    task = tasks.gaussian_mixture(400)
    for r in results:
        test = tasks.split(task.y, r["seed"])[2]
        p = task.posterior(task.x[test])
        assert r["bayes_accuracy"] == pytest.approx((p.argmax(1) == task.y[test]).double().mean())
        for t in r["teachers"].values():
            assert t["kl"] > 0.0 and 0.0 <= t["bayes_agreement"] <= 1.0
    with open(tmp_path / "mcmi_demo_gmm_early-stopped.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["source"] for row in rows] == SOURCES
    assert float(rows[2]["kl_diff"]) == 0.0  # the control against itself
    kl_diff = [t["kl"] - r["teachers"]["0.0"]["kl"] for r in results for t in [r["teachers"]["ts"]]]
    assert float(rows[-1]["kl_diff"]) == pytest.approx(sum(kl_diff) / 2)


def test_every_option_has_help_and_a_default(capsys):
    parser = mcmi_demo.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: ") == len(parser._actions) - 1  # all but --help
    assert "(default: [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])" in text


def test_full_grids_the_early_stopped_regime_unless_given():
    args = mcmi_demo.parse_args(["--full"])
    assert args.seeds == 10 and args.early_lambdas == args.lambdas
    assert args.early_smoothing == args.smoothing
    args = mcmi_demo.parse_args(["--full", "--early-lambdas", "0.2", "0"])
    assert args.early_lambdas == [0.0, 0.2]
    args = mcmi_demo.parse_args([])
    assert args.early_lambdas == list(mcmi_demo.EARLY_LAMBDAS)
    assert len(args.lambdas) > len(args.early_lambdas)
    with pytest.raises(SystemExit):
        mcmi_demo.parse_args(["--early-lambdas", "0.1"])  # no control


def test_progress_prints_stages_and_time_left(capsys):
    events = queue.SimpleQueue()
    jobs = [("gmm", "memorising", 0), ("gmm", "memorising", 1)]
    with mcmi_demo.Progress(jobs, 2, events, every=0.05):
        time.sleep(0.2)  # nothing done: the ticker still prints
        events.put(("gmm", "memorising", 0, 0, 4.0))
        events.put(("gmm", "memorising", 0, 1, 10.0))
        time.sleep(1.2)
    lines = capsys.readouterr().out.splitlines()
    assert "0/8 stages done, estimating" in lines[0]
    stage = [line for line in lines if "seed 0: fine-tunes" in line]
    # seed 0: 2 stages left at the mean stage time (5 s); seed 1: teacher 4 s, fine-tunes 6 s,
    # then 2 stages at 5 s; 30 s over 2 workers.
    assert (
        len(stage) == 1 and "(6 s); " in stage[0] and "2/8 stages done, about 15 s left" in stage[0]
    )
    assert sum("stages done" in line for line in lines) >= 4
    assert int(re.search(r"about (\d+) s left", lines[-1]).group(1)) < 15  # counts down


@pytest.mark.parametrize("shift, shape", [(0, (30, 5)), (2, (30, 12)), (1, (30, 6, 6))])
def test_teacher_table_holds_every_translation(shift, shape):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(*shape, generator=g), torch.arange(shape[0]) % 3
    torch.manual_seed(0)
    teachers = [mcmi_demo.MLP(x[0].numel(), (16,), 3).eval() for _ in range(2)]
    table = mcmi_demo.teacher_table(teachers, x, shift)
    assert table.shape == (2, (2 * shift + 1) ** (len(shape) - 1), shape[0], 3)
    seen = set()
    for _ in range(5):
        for xb, yb, idx, code in tasks.batches(x, y, shift, g, batch_size=8, with_index=True):
            torch.testing.assert_close(yb, y[idx])
            for i, t in enumerate(teachers):
                expected = F.log_softmax(t(xb) / mcmi_demo.KD_T, 1)
                torch.testing.assert_close(table[i, code, idx], expected)
            seen.update(code.tolist())
    assert seen == set(range(table.shape[1]))


def test_batches_draw_the_translations_augment_draws():
    x, y = torch.rand(20, 7, 7), torch.arange(20)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = list(tasks.batches(x, y, 1, a, batch_size=6))
    indexed = list(tasks.batches(x, y, 1, b, batch_size=6, with_index=True))
    for (xa, ya), (xb, yb, _, _) in zip(plain, indexed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MCMI_TORCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tasks.cache_dir() == tmp_path / "xdg" / "mcmi_torch"
    monkeypatch.setenv("MCMI_TORCH_CACHE", str(tmp_path / "own"))
    assert tasks.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MCMI_TORCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tasks.cache_dir() == pathlib.Path.home() / ".cache" / "mcmi_torch"


def test_gaussian_mixture_posterior_is_bayes_rule():
    task = tasks.gaussian_mixture(500, classes=3, components=2, dim=2, seed=1)
    assert task.x.dtype == torch.float32 and torch.bincount(task.y).tolist() == [167, 167, 166]
    means, sigma = task.posterior.means, task.posterior.sigma
    x = task.x[:7].double()
    density = torch.zeros(7, 3, dtype=torch.float64)  # p(x | c) with equal weights and priors
    for c in range(3):
        for m in range(2):
            sq = ((x - means[c, m]) ** 2).sum(1)
            density[:, c] += 0.5 * torch.exp(-sq / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    expected = density / density.sum(1, keepdim=True)
    torch.testing.assert_close(task.posterior(task.x[:7]), expected, rtol=1e-12, atol=1e-15)
    again = tasks.gaussian_mixture(500, classes=3, components=2, dim=2, seed=1)
    assert torch.equal(again.x, task.x)


def test_temperature_fit_minimizes_the_validation_nll():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] + 0.8 * torch.randn(300, generator=g) > 0).long()
    model = torch.nn.Linear(5, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-4.0, 0, 0, 0, 0], [4.0, 0, 0, 0, 0]]))  # overconfident
        model.bias.zero_()
    t = mcmi_demo.fit_temperature(model, x, y)
    logits = model(x).detach().double()
    grid = torch.linspace(0.5, 20, 4000, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(logits / s, y) for s in grid])
    assert t > 1.0 and t == pytest.approx(grid[nll.argmin()].item(), abs=0.01)
    scaled = mcmi_demo.TemperatureScaled(model, t)
    torch.testing.assert_close(scaled(x), model(x) / t)


def test_paired_difference_is_a_t_interval_over_seeds():
    results = [
        {"students": {"0.0": {"full": a, "zero-shot": [a, 0.0]},
                      "x": {"full": b, "zero-shot": [b, 1.0]}}}
        for a, b in ((0.5, 0.6), (0.5, 0.7), (0.6, 0.9))
    ]  # fmt: skip
    mean, lo, hi = mcmi_demo.paired(results, "x", "full")
    assert mean == pytest.approx(0.2)
    half = 4.302653 * 0.1 / 3**0.5  # t(0.975, 2) * sd / sqrt(n)
    assert (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    zero, _, _ = mcmi_demo.paired(results, "x", "zero-shot")  # class means of the paired diffs
    assert zero == pytest.approx((0.2 + 1.0) / 2)


def test_augment_translates_each_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 6, 6) + 1  # no zeros inside
    shifted = tasks.augment(x, 1, g)
    for a, b in zip(x, shifted):
        found = [
            (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if torch.equal(b[max(dy, 0) : 6 + min(dy, 0), max(dx, 0) : 6 + min(dx, 0)],
                           a[max(-dy, 0) : 6 + min(-dy, 0), max(-dx, 0) : 6 + min(-dx, 0)])
        ]  # fmt: skip
        assert found and (b == 0).sum() == 6 * 6 - (6 - abs(found[0][0])) * (6 - abs(found[0][1]))
    train, val, test = tasks.split(torch.arange(100) % 4, seed=0)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(100))
    assert (len(train), len(val), len(test)) == (60, 16, 24)


def test_mnist1d_is_generated_once_and_cached(tmp_path):
    pytest.importorskip("mnist1d")
    task = tasks.mnist1d(tmp_path, num_samples=200)
    assert task.x.shape == (200, 40) and task.x.dtype == torch.float32
    assert sorted(task.y.unique().tolist()) == list(range(10))
    assert (tmp_path / "mnist1d_200.npz").exists()
    again = tasks.mnist1d(tmp_path, num_samples=200)
    assert torch.equal(again.x, task.x)


class TinyNet(torch.nn.Module):
    """A small CIFAR-shaped classifier standing in for RepDistiller's models."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        )  # fmt: skip
        self.fc = torch.nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def make_loaders(n=160, classes=5):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0, 0, 0] += y.float()  # a learnable signal
    data = TensorDataset(x, y, torch.arange(n))  # RepDistiller-style (img, target, index)
    return DataLoader(data, batch_size=32, shuffle=True, generator=g), DataLoader(
        data, batch_size=64
    )


def pretrained_teacher(train_loader):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for x, y, _ in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_40_2", "MobileNetV2"])
def test_folder_names_parse_as_train_student_expects(name):
    folder = finetune_teacher.save_folder("save/models", name, "cifar100", 0.25, 3)
    assert finetune_teacher.teacher_name(os.path.join(folder, f"{name}_best.pth")) == name
    opt = finetune_teacher.parse_args(["--path_t", os.path.join(folder, f"{name}_best.pth")])
    assert opt.model == name
    assert opt.learning_rate == (0.005 if name == "MobileNetV2" else 0.05)


def test_finetune_writes_loadable_checkpoints_and_students_train(tmp_path):
    train_loader, val_loader = make_loaders()
    teacher = pretrained_teacher(train_loader)
    src = tmp_path / "resnet8_cifar100_lr_0.05_decay_0.0005_trial_0"
    src.mkdir()
    torch.save(
        {"epoch": 5, "model": teacher.state_dict(), "best_acc": 0.0}, src / "resnet8_best.pth"
    )

    loaded = finetune_teacher.load_teacher(str(src / "resnet8_best.pth"), TinyNet)
    folder = finetune_teacher.save_folder(str(tmp_path), "resnet8", "cifar100", 0.25, 0)
    result = finetune_teacher.finetune(
        loaded, train_loader, val_loader, 5, lam=0.25, epochs=3, folder=folder,
        model_name="resnet8", extra={"lam": 0.25, "model": "resnet8"}, log=lambda _: None,
    )  # fmt: skip
    assert 0.0 <= result["best_acc"] <= 100.0
    torch.testing.assert_close(result["centroids"].sum(1), torch.ones(5))

    for which in ("best", "last"):
        path = os.path.join(folder, f"resnet8_{which}.pth")
        assert finetune_teacher.teacher_name(path) == "resnet8"
        state = torch.load(path, weights_only=True)  # no pickled Namespace
        assert {"epoch", "model", "best_acc", "optimizer", "lam", "centroids", "opt"} <= set(state)
        fresh = TinyNet()
        fresh.load_state_dict(state["model"])  # as train_student.py's load_teacher does

    # A few steps of each student loss from the fine-tuned teacher.
    teacher = TinyNet()
    teacher.load_state_dict(torch.load(os.path.join(folder, "resnet8_last.pth"))["model"])
    teacher.eval()
    for loss_name in ("kd", "dkd"):
        torch.manual_seed(1)
        student = TinyNet()
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step, (x, y, _) in enumerate(train_loader):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            if loss_name == "kd":
                distill = student_losses.kd_loss(s, t)
            else:
                distill = min(1.0, (step + 1) / 3) * student_losses.dkd_loss(s, t, y)
            loss = F.cross_entropy(s, y) + distill
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert len(losses) == 5


def test_kd_and_dkd_match_their_definitions():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    y = torch.randint(0, 7, (6,), generator=g)
    ps, pt = F.softmax(s / 4, 1), F.softmax(t / 4, 1)
    kd = 16 * (pt * (pt.log() - ps.log())).sum(1).mean()
    torch.testing.assert_close(student_losses.kd_loss(s, t), kd)
    # DKD identity (Zhao et al., eq. 4): KD = TCKD + (1 - p_t^target) NCKD per sample.
    gt = F.one_hot(y, 7).bool()
    b_t = pt[gt]
    tckd = [student_losses.dkd_loss(s[i : i + 1], t[i : i + 1], y[i : i + 1], beta=0.0)
            for i in range(6)]  # fmt: skip
    nckd = [student_losses.dkd_loss(s[i : i + 1], t[i : i + 1], y[i : i + 1], alpha=0.0, beta=1.0)
            for i in range(6)]  # fmt: skip
    rebuilt = torch.stack([a + (1 - b) * n for a, b, n in zip(tckd, b_t, nckd)]).mean()
    torch.testing.assert_close(rebuilt, kd)


def test_register_torchdistill_and_load_centroids_from_file(tmp_path, monkeypatch):
    registered = {}

    def register_low_level_loss(arg=None, **kwargs):
        def add(obj):
            registered[kwargs["key"]] = obj
            return obj

        return add

    registry = types.ModuleType("torchdistill.losses.registry")
    registry.register_low_level_loss = register_low_level_loss
    monkeypatch.setitem(sys.modules, "torchdistill", types.ModuleType("torchdistill"))
    monkeypatch.setitem(sys.modules, "torchdistill.losses", types.ModuleType("torchdistill.losses"))
    monkeypatch.setitem(sys.modules, "torchdistill.losses.registry", registry)

    from mcmi_torch.integrations import register_torchdistill

    register_torchdistill()
    assert registered["MCMILoss"] is mcmi_torch.MCMILoss
    q = torch.softmax(torch.randn(4, 4), 1)
    torch.save({"centroids": q}, tmp_path / "q.pt")
    crit = registered["MCMILossFromFile"](centroids_path=str(tmp_path / "q.pt"), lam=0.3)
    assert isinstance(crit, mcmi_torch.MCMILoss)
    torch.testing.assert_close(crit.centroids, q)
