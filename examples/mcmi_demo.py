"""Does an MCMI teacher give better students? A lambda sweep with baselines and paired statistics.

For each task and seed (a stratified 60/15/25 train/validation/test split):
  1. train a teacher MLP (hidden 128, 128, batch norm) with cross-entropy on augmented
     data (random shifts; none on the Gaussian mixture), keeping the epoch best on
     validation;
  2. estimate the class centroids Q at T = 1 over the augmented training loader with the
     teacher in train mode, and freeze them;
  3. fine-tune one copy per lambda on CE - lambda * CMI (MCMILoss, T = 1) for 20 epochs
     (SGD lr 0.05, momentum 0.9, wd 5e-4, cosine, batch 64), keeping the epoch best on
     validation; lambda = 0 is the CE-fine-tuned control. Baselines: one copy per label
     smoothing (--smoothing, default 0.05, 0.1, 0.2) fine-tuned on the same schedule, and
     the control temperature-scaled post hoc (one temperature, fitted by NLL on the
     validation split);
  4. distil the same small student (one hidden layer, same initialisation and data order
     for every teacher) with Hinton KD (T = 4, alpha 0.9) from every teacher, from the
     teacher that was not fine-tuned, and without a teacher (CE), in three regimes: full
     data; few-shot (a stratified 5% of the training set, 240 epochs on it); zero-shot
     (one class removed from the student's training set, once for every class; accuracy
     on that class's test samples).
Reports, per teacher, on the test split: accuracy, NLL, expected calibration error, CMI
and NCMI (metrics.teacher_report) and, on the Gaussian mixture, whose Bayes posterior p*
is known, the mean KL(p* || teacher) (also as a paired difference to lambda 0) and the
agreement with the Bayes decision; the last fine-tune epoch's validation accuracy and
whether the fine-tune collapsed there (below the midpoint of chance and the
not-fine-tuned teacher's best validation accuracy); whether MCMILoss's collapse guard
warned; and the students' accuracy as paired differences against the lambda = 0 control
(per seed; zero-shot paired per omitted class and seed, averaged over classes), mean and
95% t-interval over seeds.
Writes per task a markdown report, a CSV, raw JSON and a plot to --out.

Results are meant to be the same on any x86-64 machine: the Gaussian mixture is drawn in
float64 by torch and rounded to float32 once, every seed trains on one thread, and the
worker processes run ATen's and MKL's AVX2 code paths (PORTABLE_ENV) instead of those
chosen for the CPU at hand (AVX-512 here), which round differently. What remains
machine-dependent: MKL keeps its AVX2 path only on Intel CPUs; the mcmi_torch kernels
pick an AVX-512, AVX2 or baseline build by CPU, and these round differently; MNIST-1D
comes from numpy and scipy; and another torch release may compute differently.

Departures from the MCMI authors' recipe (ResNets on CIFAR-100 in RepDistiller), all but
the validation split for a run of a few minutes on 2 CPU cores:
  - tasks: a Gaussian mixture (4000 points in 8 dimensions, 10 classes of 3 components
    each, Bayes accuracy about 71%), MNIST-1D (6000 generated signals) or 8x8 digits
    instead of CIFAR-100; MLP teachers (hidden 128, 128) and students (one hidden layer
    of 32, 16 on digits, no batch norm) instead of ResNets/WRNs; augmentation is a random
    shift of up to 2 samples (MNIST-1D) or 1 pixel (digits) instead of crop and flip;
  - the teacher trains for 40 epochs at lr 0.1 with a cosine schedule (RepDistiller: 240
    epochs, lr 0.05, step decay); full-data and zero-shot students for 60 epochs with a
    cosine schedule (theirs: 240, step decay); few-shot students for 240 epochs on their
    subset, as theirs, on a stratified 5% (theirs: a random 5%); --full trains every
    student for 240 epochs and runs 10 seeds;
  - the best epoch (teacher and fine-tune) is chosen on a held-out validation split
    (theirs: on the test set);
  - zero-shot omits every class in turn and reports the mean accuracy on the omitted
    class (theirs: chosen classes);
  - only Hinton KD students (theirs: also CRD, DKD and others); students of a regime
    train as one batched network, so they share mini-batches (a zero-shot student sees
    each batch minus its omitted class);
  - the centroid pass runs on a copy of the teacher, so it leaves the batch-norm
    statistics of the teacher being fine-tuned as they were (theirs updates them);
  - 5 seeds (--full: 10), each on its own split of the data.

    python examples/mcmi_demo.py                 # Gaussian mixture and MNIST-1D, 5 seeds each
    python examples/mcmi_demo.py --task digits   # 8x8 digits
    python examples/mcmi_demo.py --full          # 10 seeds, 240 student epochs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import mcmi_torch
from mcmi_torch.metrics import teacher_report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks

REGIMES = ("full", "few-shot", "zero-shot")
#: Set for the worker processes before they import torch: ATen's AVX2 kernels and
#: MKL's AVX2 code path, instead of those picked for the CPU at hand (AVX-512 on
#: this one), whose floating-point results differ. The same on every CPU with AVX2
#: (MKL promises it for Intel CPUs); the portable alternatives ("default",
#: "COMPATIBLE") made training many times slower (a student epoch 5.3 s, not 0.26 s).
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
KD_T, KD_ALPHA = 4.0, 0.9


class MLP(nn.Module):
    """Flatten, hidden layers (Linear, BatchNorm, ReLU), a linear head."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], classes: int):
        super().__init__()
        layers, width = [nn.Flatten()], in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


class StudentBank(nn.Module):
    """``n`` independent one-hidden-layer MLPs (no batch norm) evaluated as one
    batched network: ``forward(x)`` gives ``[n, classes, B]`` (classes before
    the batch: softmax over a middle dimension of this size is many times faster
    than over a last dimension of 10). Student ``i`` is initialised like
    ``nn.Linear`` from seed ``seeds[i]``."""

    def __init__(self, seeds: list[int], in_dim: int, hidden: int, classes: int):
        super().__init__()
        w1, b1, w2, b2 = [], [], [], []
        for s in seeds:
            torch.manual_seed(s)
            a, b = nn.Linear(in_dim, hidden), nn.Linear(hidden, classes)
            w1.append(a.weight.T)
            b1.append(a.bias)
            w2.append(b.weight)
            b2.append(b.bias)
        self.w1 = nn.Parameter(torch.stack(w1).detach())
        self.b1 = nn.Parameter(torch.stack(b1).detach().unsqueeze(1))
        self.w2 = nn.Parameter(torch.stack(w2).detach())
        self.b2 = nn.Parameter(torch.stack(b2).detach().unsqueeze(2))

    def forward(self, x):
        h = torch.relu(torch.matmul(x.flatten(1), self.w1) + self.b1)
        return torch.matmul(self.w2, h.transpose(1, 2)) + self.b2


def sgd(params, lr, epochs):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train_teacher(model, task, data, val, criterion, *, epochs, lr, seed):
    """Trains on augmented batches; returns the model at its best validation epoch
    (the first best) and the validation accuracy of every epoch."""
    opt, sched = sgd(model.parameters(), lr, epochs)
    g = torch.Generator().manual_seed(seed)
    best, best_state, history = -1.0, None, []
    for _ in range(epochs):
        model.train()
        for xb, yb in tasks.batches(*data, task.shift, g):
            loss = criterion(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        history.append(accuracy(model, *val))
        if history[-1] > best:
            best, best_state = history[-1], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def train_students(bank, teachers, sources, masks, task, data, *, epochs, seed):
    """Hinton KD (or CE where ``sources[i]`` is None) for every student of ``bank``;
    student ``i`` learns from ``teachers[sources[i]]`` and only from the samples
    of classes where ``masks[i]`` is True."""
    opt, sched = sgd(bank.parameters(), 0.05, epochs)
    g = torch.Generator().manual_seed(seed)
    src = torch.tensor([0 if s is None else s for s in sources])
    kd_w = torch.tensor([0.0 if s is None else KD_ALPHA * KD_T**2 for s in sources]).view(-1, 1)
    ce_w = torch.tensor([1.0 if s is None else 1 - KD_ALPHA for s in sources]).view(-1, 1)
    for _ in range(epochs):
        for xb, yb in tasks.batches(*data, task.shift, g):
            with torch.no_grad():
                t_log = torch.stack([t(xb).T for t in teachers])
                t_log = F.log_softmax(t_log / KD_T, 1)[src]
            s_logits = bank(xb)
            s_log = F.log_softmax(s_logits / KD_T, 1)
            kd = (t_log.exp() * (t_log - s_log)).sum(1)
            ce = F.cross_entropy(s_logits, yb.expand(len(src), -1), reduction="none")
            w = masks[:, yb].float()
            per_student = ((kd_w * kd + ce_w * ce) * w).sum(1) / w.sum(1).clamp_min(1)
            opt.zero_grad()
            per_student.sum().backward()
            opt.step()
        sched.step()
    return bank


class TemperatureScaled(nn.Module):
    """``model``'s logits divided by a temperature fitted after training."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x):
        return self.model(x) / self.temperature


@torch.no_grad()
def fit_temperature(model, x, y) -> float:
    """The temperature minimizing the NLL of ``model`` on ``(x, y)``: a
    golden-section search over log T in [log 0.05, log 20], in float64."""
    model.eval()
    logits = model(x).double()

    def nll(log_t):
        return F.cross_entropy(logits / math.exp(log_t), y).item()

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) <= nll(b):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def teacher_names(args) -> list[str]:
    """Result keys of the teachers: the one not fine-tuned, the MCMI fine-tunes
    (by lambda), the label-smoothing fine-tunes and the temperature-scaled control."""
    return ["base", *map(str, args.lambdas), *(f"ls{e:g}" for e in args.smoothing), "ts"]


def label(name: str) -> str:
    """How the reports name a student source (a result key, or "none")."""
    if name == "none":
        return "no teacher"
    if name == "base":
        return "not fine-tuned"
    if name == "ts":
        return "lambda 0, temperature-scaled"
    if name.startswith("ls"):
        return f"label smoothing {name[2:]}"
    return f"lambda {name}"


def run_seed(seed: int, task: tasks.Task, args) -> dict:
    torch.set_num_threads(1)  # these models are tiny: one thread per seed is fastest
    start = time.perf_counter()

    def log(message):
        seconds = time.perf_counter() - start
        print(f"  {task.name} seed {seed}: {message} ({seconds:.0f} s)", flush=True)

    k = task.num_classes
    tr, va, te = tasks.split(task.y, seed)
    train, val, test = ((task.x[i], task.y[i]) for i in (tr, va, te))
    in_dim = task.x[0].numel()
    chance = 1.0 / k

    torch.manual_seed(seed)
    base, base_history = train_teacher(
        MLP(in_dim, task.teacher_hidden, k), task, train, val, F.cross_entropy,
        epochs=args.teacher_epochs, lr=0.1, seed=seed,
    )  # fmt: skip
    log("teacher trained")
    g = torch.Generator().manual_seed(seed + 1)
    q = mcmi_torch.estimate_centroids(
        copy.deepcopy(base), list(tasks.batches(*train, task.shift, g)), k,
        progress=False, train_mode=True,
    )  # fmt: skip

    criteria = {str(lam): mcmi_torch.MCMILoss(lam=lam, centroids=q) for lam in args.lambdas}
    for eps in args.smoothing:
        criteria[f"ls{eps:g}"] = nn.CrossEntropyLoss(label_smoothing=eps)
    teachers, rows = {"base": base}, {"base": {}}
    for name, criterion in criteria.items():
        torch.manual_seed(seed + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mcmi_torch.CollapseWarning)  # counted below
            teachers[name], history = train_teacher(
                copy.deepcopy(base), task, train, val, criterion,
                epochs=args.finetune_epochs, lr=0.05, seed=seed + 2,
            )  # fmt: skip
        rows[name] = {
            "collapsed": history[-1] < 0.5 * (chance + max(base_history)),
            "last_val_accuracy": history[-1],
            "best_epoch": history.index(max(history)) + 1,
        }
        if isinstance(criterion, mcmi_torch.MCMILoss):
            rows[name]["guard"] = criterion.guard.fired
    log(f"{len(criteria)} fine-tunes done")
    temperature = fit_temperature(teachers["0.0"], *val)
    teachers["ts"] = TemperatureScaled(teachers["0.0"], temperature)
    rows["ts"] = {"temperature": temperature}
    for name, t in teachers.items():
        rep = teacher_report(t, [test], k, progress=False, posterior=task.posterior)
        rows[name].update(
            accuracy=rep.accuracy, cmi=rep.cmi, ncmi=rep.ncmi, nll=rep.nll, ece=rep.ece,
            kl=rep.kl_to_reference, bayes_agreement=rep.reference_agreement,
        )  # fmt: skip

    # Sources: no teacher (None), then every teacher in teacher_names order.
    names = teacher_names(args)
    ordered = [teachers[name] for name in names]
    n_src = len(ordered) + 1
    sources = [None, *range(len(ordered))]
    keep = torch.ones(k + 1, k, dtype=torch.bool)  # row 0: full data; row 1 + c: omit c
    keep[1:].fill_diagonal_(False)
    init = [1000 * seed + j for j in range(k + 1)]  # one initialisation per regime slot
    bank = StudentBank(init * n_src, in_dim, task.student_hidden, k)
    train_students(
        bank, ordered, [s for s in sources for _ in range(k + 1)], keep.repeat(n_src, 1),
        task, train, epochs=args.student_epochs, seed=seed + 3,
    )  # fmt: skip
    log("full-data and zero-shot students trained")
    g = torch.Generator().manual_seed(seed + 4)
    few = []
    for c in range(k):
        idx = (train[1] == c).nonzero().flatten()
        few.append(idx[torch.randperm(len(idx), generator=g)[: max(1, round(args.few * len(idx)))]])
    few = torch.cat(few)
    few_bank = StudentBank([init[0]] * n_src, in_dim, task.student_hidden, k)
    train_students(
        few_bank, ordered, sources, torch.ones(n_src, k, dtype=torch.bool), task,
        (train[0][few], train[1][few]), epochs=args.few_epochs, seed=seed + 5,
    )  # fmt: skip

    with torch.no_grad():
        pred = bank(test[0]).argmax(1).view(n_src, k + 1, -1)
        few_pred = few_bank(test[0]).argmax(1)
    hit, few_hit = pred == test[1], few_pred == test[1]
    students = {}
    for i, name in enumerate(["none", *names]):
        students[name] = {
            "full": hit[i, 0].float().mean().item(),
            "few-shot": few_hit[i].float().mean().item(),
            "zero-shot": [hit[i, 1 + c, test[1] == c].float().mean().item() for c in range(k)],
        }
    bayes = None
    if task.posterior is not None:
        bayes = (task.posterior(test[0]).argmax(1) == test[1]).double().mean().item()
    return {
        "seed": seed,
        "teachers": rows,
        "students": students,
        "fewshot_samples": len(few),
        "bayes_accuracy": bayes,
        "suggested_lambda": mcmi_torch.suggest_lambda(q),
        "largest_cmi_reward": -q.clamp_min(mcmi_torch.CENTROID_FLOOR).min().log().item(),
    }


def interval_of(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-seed paired differences."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def paired(results, name, regime, ref="0.0"):
    """Per-seed differences of ``name``'s students against ``ref``'s (zero-shot:
    paired per class, then averaged over classes); mean and 95% t-interval."""
    diffs = []
    for r in results:
        a, b = r["students"][name][regime], r["students"][ref][regime]
        if regime == "zero-shot":
            diffs.append(statistics.fmean(x - y for x, y in zip(a, b)))
        else:
            diffs.append(a - b)
    return interval_of(diffs)


def student_mean(results, name, regime):
    values = [r["students"][name][regime] for r in results]
    return statistics.fmean(statistics.fmean(v) if regime == "zero-shot" else v for v in values)


TEACHER_METRICS = ("accuracy", "nll", "ece", "cmi", "ncmi", "kl", "bayes_agreement")


def summarize(results, args):
    """One row per student source: teacher metrics (means over seeds; the KL to
    p* also as a paired difference to lambda 0) and paired student differences."""
    rows = []
    for name in ["none", *teacher_names(args)]:
        row = {"source": label(name)}
        if name != "none":
            ts = [r["teachers"][name] for r in results]
            for metric in TEACHER_METRICS:
                if ts[0][metric] is not None:
                    row[f"teacher_{metric}"] = statistics.fmean(t[metric] for t in ts)
            if ts[0]["kl"] is not None:
                diffs = [t["kl"] - r["teachers"]["0.0"]["kl"] for t, r in zip(ts, results)]
                row.update(zip(("kl_diff", "kl_lo", "kl_hi"), interval_of(diffs)))
            if "collapsed" in ts[0]:
                row["last_val_accuracy"] = statistics.fmean(t["last_val_accuracy"] for t in ts)
                row["collapsed_seeds"] = sum(t["collapsed"] for t in ts)
            if "guard" in ts[0]:
                row["guard_seeds"] = sum(t["guard"] for t in ts)
            if name == "ts":
                row["temperature"] = statistics.fmean(t["temperature"] for t in ts)
        for regime in REGIMES:
            row[f"{regime}_acc"] = student_mean(results, name, regime)
            d, lo, hi = paired(results, name, regime)
            row.update({f"{regime}_diff": d, f"{regime}_lo": lo, f"{regime}_hi": hi})
        for regime in REGIMES if name not in ("none", "base") else ():
            values = paired(results, name, regime, ref="base")
            row.update({f"{regime}_vs_base_{k}": v for k, v in zip(("diff", "lo", "hi"), values)})
        rows.append(row)
    return rows


def interval(row, prefix, scale=100.0, digits=1) -> str:
    d, lo, hi = (scale * row[f"{prefix}_{s}"] for s in ("diff", "lo", "hi"))
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def teacher_markdown(rows, n_seeds) -> str:
    """Teachers: metrics on the test split of the epoch best on validation;
    collapse judged at the last fine-tune epoch."""
    known = "teacher_kl" in rows[1]
    header = ["teacher", "acc (%)", "NLL", "ECE (%)", "CMI", "NCMI"]
    if known:
        header += ["KL to p*", "KL vs lambda 0", "Bayes agreement (%)"]
    header += ["last-epoch val acc (%)", "collapsed at last epoch", "guard warned"]
    lines = []
    for row in rows[1:]:
        cells = [
            row["source"], f"{100 * row['teacher_accuracy']:.1f}", f"{row['teacher_nll']:.3f}",
            f"{100 * row['teacher_ece']:.1f}", f"{row['teacher_cmi']:.3f}",
            f"{row['teacher_ncmi']:.4f}",
        ]  # fmt: skip
        if known:
            control = row["source"] == "lambda 0.0"
            cells += [
                f"{row['teacher_kl']:.4f}",
                "(control)" if control else interval(row, "kl", scale=1.0, digits=4),
                f"{100 * row['teacher_bayes_agreement']:.1f}",
            ]
        cells += [
            f"{100 * row['last_val_accuracy']:.1f}" if "last_val_accuracy" in row else "-",
            f"{row['collapsed_seeds']}/{n_seeds}" if "collapsed_seeds" in row else "-",
            f"{row['guard_seeds']}/{n_seeds}" if "guard_seeds" in row else "-",
        ]
        lines.append(cells)
    return table(header, lines)


def student_markdown(rows) -> str:
    header = ["teacher"] + [f"{r} {what}" for r in REGIMES for what in ("acc (%)", "vs lambda 0")]
    lines = []
    for row in rows:
        cells = [row["source"]]
        for regime in REGIMES:
            control = row["source"] == "lambda 0.0"
            cells += [f"{100 * row[f'{regime}_acc']:.1f}",
                      "(control)" if control else interval(row, regime)]  # fmt: skip
        lines.append(cells)
    return table(header, lines)


def markdown_vs_base(rows) -> str:
    """The fine-tuned teachers' students against those of the teacher that was
    not fine-tuned (the MCMI authors' baseline)."""
    header = ["teacher"] + [f"{r} vs not fine-tuned" for r in REGIMES]
    lines = [[row["source"], *(interval(row, f"{r}_vs_base") for r in REGIMES)] for row in rows[2:]]
    return table(header, lines)


def per_class_markdown(results, args, k) -> str:
    """Zero-shot accuracy on each omitted class, mean over seeds."""
    lines = []
    for name in ["none", *teacher_names(args)]:
        per = [
            statistics.fmean(r["students"][name]["zero-shot"][c] for r in results) for c in range(k)
        ]
        lines.append([label(name), *(f"{100 * v:.0f}" for v in per),
                      f"{100 * statistics.fmean(per):.1f}"])  # fmt: skip
    return table(["teacher", *map(str, range(k)), "mean"], lines)


def tick(row) -> str:
    """A short x-axis label for a teacher's row."""
    source = row["source"]
    if source == label("ts"):
        return "λ 0 + TS"
    if source.startswith("lambda"):
        return f"λ {source.split()[1]}\nCMI {row['teacher_cmi']:.2f}"
    return source.replace("label smoothing", "LS")


def plot(rows, path: pathlib.Path, title: str) -> None:
    """Teacher and student accuracy (and, with a known posterior, the KL to it)
    for every teacher, one column each: the lambdas joined by a line, then the
    baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = rows[2:]
    known = "teacher_kl" in teachers[0]
    sweep = sum(r["source"].startswith("lambda ") and r["source"] != label("ts") for r in teachers)
    fig, axes = plt.subplots(1, 3 if known else 2, figsize=(15 if known else 11, 4.6))
    xs = list(range(len(teachers)))
    panels = [("teacher", "teacher_accuracy", axes[0])] + [
        (f"student, {g}", f"{g}_acc", axes[1]) for g in REGIMES
    ]
    if known:
        panels.append(("teacher KL to p*", "teacher_kl", axes[2]))
    for name, key, ax in panels:
        scale = 1.0 if key == "teacher_kl" else 100.0
        ys = [scale * r[key] for r in teachers]
        (line,) = ax.plot(xs[:sweep], ys[:sweep], "o-", alpha=0.7, label=name)
        ax.plot(xs[sweep:], ys[sweep:], "s", color=line.get_color(), alpha=0.7)
        for x, y, r in zip(xs, ys, teachers):
            if r.get("collapsed_seeds"):
                ax.plot(x, y, "x", color="black", ms=9)
        ax.axhline(scale * rows[1][key], color=line.get_color(), ls=":", lw=1)
    axes[0].set_ylabel("teacher test accuracy (%)")
    axes[1].set_ylabel("student test accuracy (%)")
    if known:
        axes[2].set_ylabel("mean KL(p* || teacher) on test (nats)")
    for ax in axes:
        ax.set_xticks(xs, [tick(r) for r in teachers], fontsize=7, rotation=45, ha="right")
        ax.axvline(sweep - 0.5, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.suptitle(
        title + "  (circles: MCMI lambdas; squares: baselines; dotted: the teacher that was "
        "not fine-tuned; black x: collapsed in a seed)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=("gmm", "mnist1d", "digits"),
                        default=["gmm", "mnist1d"])  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="label smoothing of the baseline fine-tunes")  # fmt: skip
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--few", type=float, default=0.05, help="few-shot fraction")
    parser.add_argument("--few-epochs", type=int, default=240)
    parser.add_argument("--samples", type=int, default=6000, help="MNIST-1D samples")
    parser.add_argument("--gmm-samples", type=int, default=4000, help="Gaussian-mixture samples")
    parser.add_argument("--full", action="store_true", help="10 seeds, 240 student epochs")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes (seeds run in parallel); 0: all in this process, "
                        "without the fixed kernel choice")  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args(argv)
    if args.full:
        args.seeds, args.student_epochs = 10, 240
    if 0.0 not in args.lambdas:
        parser.error("--lambdas must include 0 (the control)")
    args.lambdas = sorted(set(args.lambdas))
    args.smoothing = sorted(set(args.smoothing))
    return args


def make_task(name: str, args) -> tasks.Task:
    if name == "digits":
        return tasks.digits()
    if name == "gmm":
        return tasks.gaussian_mixture(args.gmm_samples)
    return tasks.mnist1d(args.out, args.samples)


@contextlib.contextmanager
def portable_environment():
    """Sets PORTABLE_ENV for the worker processes started inside, then restores
    the environment."""
    saved = {key: os.environ.get(key) for key in PORTABLE_ENV}
    os.environ.update(PORTABLE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def report(task, args, results, elapsed) -> str:
    rows = summarize(results, args)
    title = f"{task.name}, {args.seeds} seeds, {elapsed:.0f} s"
    bayes = [r["bayes_accuracy"] for r in results if r["bayes_accuracy"] is not None]
    teacher_note = (
        "Teachers (means over seeds): acc, NLL, ECE (15 bins), CMI, NCMI"
        + (", KL(p* || teacher) and agreement with the Bayes decision" if bayes else "")
        + " on the test split, at the epoch best on validation; 'last-epoch val acc' and "
        "'collapsed' (below the midpoint of chance and the not-fine-tuned teacher's best) "
        "at the last fine-tune epoch; guard warned: MCMILoss's CollapseWarning. "
        + (f"Bayes accuracy on the test split: {100 * statistics.fmean(bayes):.1f}%. " if bayes
           else "")
        + "Fine-tunes: 20 epochs of the same schedule; temperature fitted on validation by NLL "
        f"(mean T {statistics.fmean(r['teachers']['ts']['temperature'] for r in results):.2f}). "
        "Centroids: largest -log min_j Q_yj "
        f"{min(r['largest_cmi_reward'] for r in results):.1f} to "
        f"{max(r['largest_cmi_reward'] for r in results):.1f} nats, suggest_lambda(Q) "
        f"{min(r['suggested_lambda'] for r in results):.3f} to "
        f"{max(r['suggested_lambda'] for r in results):.3f} over seeds."
    )  # fmt: skip
    student_note = (
        "Students: mean test accuracy, and the paired difference to lambda 0's students "
        "(mean [95% CI] over seeds, points):"
    )
    text = (
        f"## {title}\n\n{teacher_markdown(rows, args.seeds)}\n\n{teacher_note}\n\n"
        f"{student_note}\n\n{student_markdown(rows)}\n\n"
        f"Paired differences against the teacher that was not fine-tuned (points):\n\n"
        f"{markdown_vs_base(rows)}\n\n"
        f"Zero-shot accuracy per omitted class (%), mean over seeds:\n\n"
        f"{per_class_markdown(results, args, task.num_classes)}\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mcmi_demo_{task.name}"
    with open(f"{stem}.md", "w") as f:
        f.write(text)
    with open(f"{stem}.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        json.dump({"args": {**vars(args), "out": str(args.out)}, "results": results}, f, indent=1)
    plot(rows, pathlib.Path(f"{stem}.png"), title)
    return text + f"\nwritten: {stem}.md .csv .json .png\n"


def main(argv=None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    task_list = [make_task(name, args) for name in args.task]
    start = time.perf_counter()
    jobs = [(task, seed) for task in task_list for seed in range(args.seeds)]
    done = {task.name: {} for task in task_list}
    with contextlib.ExitStack() as stack:
        if args.workers:
            stack.enter_context(portable_environment())
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, mp_context=context))
            futures = {pool.submit(run_seed, seed, task, args): task for task, seed in jobs}
            finished = ((futures[f], f.result()) for f in as_completed(futures))
        else:
            finished = ((task, run_seed(seed, task, args)) for task, seed in jobs)
        for task, result in finished:
            done[task.name][result["seed"]] = result
            count = sum(map(len, done.values()))
            seconds = time.perf_counter() - start
            print(
                f"{task.name} seed {result['seed']} done ({count}/{len(jobs)}, {seconds:.0f} s)",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    print(f"\nall {len(jobs)} seeds in {elapsed:.0f} s ({args.workers or 1} worker(s))\n")
    out = {}
    for task in task_list:
        out[task.name] = [done[task.name][seed] for seed in range(args.seeds)]
        print(report(task, args, out[task.name], elapsed))
    return out


if __name__ == "__main__":
    main()
