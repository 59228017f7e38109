"""Does an MCMI teacher give better students? A lambda sweep with baselines and paired statistics,
in two teacher regimes.

Teacher regimes (each runs the whole recipe below on its own teachers):
  - memorising: a wide teacher MLP (hidden 256, 256, batch norm) trained for 120 epochs
    (on the Gaussian mixture on a 30/15/55 split: 1200 training points, which it fits
    in that time, and a larger test split for the KL to p*) and taken at its last
    epoch, with no selection on validation, as the MCMI paper's
    teachers are (240 epochs on CIFAR-100, about 100% training accuracy): it fits its
    training set (at least 99% training accuracy, reported per seed), so its training-set
    centroids are nearly one-hot; on the Gaussian mixture, whose Bayes classifier scores
    about 71%, such a teacher is overconfident by construction. Every fine-tune is taken
    at its last epoch too;
  - early-stopped: a teacher MLP (hidden 128, 128) trained for 40 epochs and taken at its
    epoch best on validation; every fine-tune is taken at its epoch best on validation.
    By default it runs a thinner grid (lambda 0, 0.1, 0.4, 0.8; label smoothing 0.1);
    --full runs the memorising regime's.

For each task, regime and seed (a stratified 60/15/25 train/validation/test split, but
for the memorising regime on the mixture):
  1. train the regime's teacher with cross-entropy on augmented data (random shifts;
     none on the Gaussian mixture);
  2. estimate the class centroids Q at T = 1 over the augmented training loader with the
     teacher in train mode, and freeze them;
  3. fine-tune one copy per lambda on CE - lambda * CMI (MCMILoss, T = 1) for 20 epochs
     (SGD lr 0.05, momentum 0.9, wd 5e-4, cosine, batch 64), keeping the epoch the regime
     keeps; lambda = 0 is the CE-fine-tuned control. Baselines: one copy per label
     smoothing fine-tuned on the same schedule, and the control temperature-scaled post
     hoc (one temperature, fitted by NLL on the validation split);
  4. distil the same small student (one hidden layer, same initialisation and data order
     for every teacher) with Hinton KD (T = 4, alpha 0.9) from every teacher, from the
     teacher that was not fine-tuned, and without a teacher (CE), in three settings: full
     data; few-shot (a stratified 5% of the training set, 240 epochs on it); zero-shot
     (one class removed from the student's training set, once for every class; accuracy
     on that class's test samples).
Reports, per teacher: where it stands on its training set (accuracy, NLL and CMI on the
un-augmented training split, and how one-hot its training-set centroids are: the mean
over classes of each centroid's largest entry); on the test split, accuracy, NLL,
expected calibration error, CMI and NCMI (metrics.teacher_report) and, on the Gaussian
mixture, whose Bayes posterior p* is known, the mean KL(p* || teacher) (also as a paired
difference to lambda 0) and the agreement with the Bayes decision; the last fine-tune
epoch's validation accuracy and whether the fine-tune collapsed there (below the
midpoint of chance and the not-fine-tuned teacher's best validation accuracy); whether
MCMILoss's collapse guard warned; and the students' accuracy as paired differences
against the lambda = 0 control (per seed; zero-shot paired per omitted class and seed,
averaged over classes), mean and 95% t-interval over seeds.
Writes per task and regime a markdown report, a CSV, raw JSON and a plot to --out, and a
results page (results.md) with one small table per task and regime, the machine, the
command, the versions and the time.

Results are meant to be the same on any x86-64 machine: the Gaussian mixture is drawn in
float64 by torch and rounded to float32 once, every seed trains on one thread, and the
worker processes run ATen's AVX2 kernels and MKL's COMPATIBLE code path (PORTABLE_ENV)
instead of those chosen for the CPU at hand, which round differently; mcmi_torch's own
kernels compute bitwise the same results in their AVX-512, AVX2 and baseline builds
(MCMI_TORCH_CPU_ISA forces one). What remains machine-dependent: MNIST-1D comes from
numpy and scipy, and another torch release may compute differently.

Departures from the MCMI authors' recipe (ResNets on CIFAR-100 in RepDistiller), all but
the validation split for a run of a few minutes on 2 CPU cores:
  - tasks: a Gaussian mixture (4000 points in 8 dimensions, 10 classes of 3 components
    each, Bayes accuracy about 71%), MNIST-1D (6000 generated signals) or 8x8 digits
    instead of CIFAR-100; MLP teachers instead of ResNets/WRNs and students with one
    hidden layer of 32 (16 on digits, no batch norm); augmentation is a random shift of
    up to 2 samples (MNIST-1D) or 1 pixel (digits) instead of crop and flip;
  - teachers train at lr 0.1 with a cosine schedule (RepDistiller: lr 0.05, step decay)
    for 120 epochs (memorising) or 40 (early-stopped) (theirs: 240); full-data and
    zero-shot students for 60 epochs with a cosine schedule (theirs: 240, step decay);
    few-shot students for 240 epochs on their subset, as theirs, on a stratified 5%
    (theirs: a random 5%); --full trains every student for 240 epochs and runs 10 seeds;
  - in the early-stopped regime, the best epoch (teacher and fine-tune) is chosen on a
    held-out validation split (theirs: on the test set);
  - zero-shot omits every class in turn and reports the mean accuracy on the omitted
    class (theirs: chosen classes);
  - only Hinton KD students (theirs: also CRD, DKD and others); students of a setting
    train as one batched network, so they share mini-batches (a zero-shot student sees
    each batch minus its omitted class); the teachers' outputs on every translation of
    every training sample are computed once, before the students train;
  - the centroid pass runs on a copy of the teacher, so it leaves the batch-norm
    statistics of the teacher being fine-tuned as they were (theirs updates them);
  - 5 seeds (--full: 10), each on its own split of the data.

    python examples/mcmi_demo.py                 # Gaussian mixture and MNIST-1D, both regimes
    python examples/mcmi_demo.py --task digits   # 8x8 digits
    python examples/mcmi_demo.py --full          # 10 seeds, 240 student epochs, full grids
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.metadata
import json
import math
import multiprocessing
import os
import pathlib
import platform
import queue
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import mcmi_torch
from mcmi_torch.metrics import teacher_report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks

STUDENT_SETTINGS = ("full", "few-shot", "zero-shot")
#: Set for the worker processes before they import torch: ATen's AVX2 kernels and
#: MKL's COMPATIBLE code path (SSE2), instead of those picked for the CPU at hand,
#: whose floating-point results differ. MKL documents COMPATIBLE as the branch that
#: gives the same results on Intel and non-Intel CPUs; its named branches (AVX2, ...)
#: hold on Intel CPUs only (on an AMD EPYC, MKL_CBWR=AVX2 computes what no setting
#: computes). Its cost to this job is small: its matrices are tiny.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
KD_T, KD_ALPHA = 4.0, 0.9
FULL_LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
FULL_SMOOTHING = (0.05, 0.1, 0.2)
#: The early-stopped regime's grid unless --full (its fine-tunes and students cost
#: as much as the memorising regime's, which keeps the full grid).
EARLY_LAMBDAS = (0.0, 0.1, 0.4, 0.8)
EARLY_SMOOTHING = (0.1,)
#: The stages of one seed, as the progress lines name them.
STAGES = ("teacher", "fine-tunes", "full-data and zero-shot students", "few-shot students")
TASK_TITLES = {"gmm": "Gaussian mixture (exact p*)", "mnist1d": "MNIST-1D", "digits": "8x8 digits"}
#: Training accuracy that a memorising teacher is meant to reach.
MEMORISING_TRAIN_ACCURACY = 0.99


@dataclass(frozen=True)
class TeacherRegime:
    """How a regime's teachers train and which epoch of a teacher or a fine-tune
    it keeps (``"best"``: the first epoch best on validation; ``"last"``), and the
    fine-tunes run on them. ``hidden`` None: the task's teacher widths;
    ``memorising_split``: the task's split for teachers that fit their training
    set, else a 60/15/25 split."""

    name: str
    hidden: tuple[int, ...] | None
    epochs: int
    keep: str
    lambdas: tuple[float, ...]
    smoothing: tuple[float, ...]
    memorising_split: bool

    def fractions(self, task: tasks.Task) -> tuple[float, float]:
        return task.memorising_split if self.memorising_split else (0.6, 0.15)

    def describe(self, task: tasks.Task) -> str:
        widths = ", ".join(map(str, self.hidden or task.teacher_hidden))
        kept = "its last epoch" if self.keep == "last" else "its epoch best on validation"
        train, val = self.fractions(task)
        split = f"{100 * train:.0f}/{100 * val:.0f}/{100 * (1 - train - val):.0f}"
        return (
            f"Teacher MLP (hidden {widths}) trained for {self.epochs} epochs on a {split} "
            f"train/validation/test split and taken at {kept}; every fine-tune "
            f"({len(self.lambdas)} lambdas, {len(self.smoothing)} label smoothings) taken at "
            f"{kept}"
        )


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


def train_teacher(model, task, data, val, criterion, *, epochs, lr, seed, keep):
    """Trains on augmented batches; returns the model at its first epoch best on
    validation (``keep="best"``) or at its last (``keep="last"``), and the
    validation accuracy of every epoch."""
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
        if keep == "best" and history[-1] > best:
            best, best_state = history[-1], copy.deepcopy(model.state_dict())
    if keep == "best":
        model.load_state_dict(best_state)
    model.eval()
    return model, history


@torch.no_grad()
def teacher_table(teachers, x, shift) -> torch.Tensor:
    """Log-probabilities at the KD temperature of every teacher (eval mode) on
    every translation of every sample of ``x`` that ``tasks.augment`` can draw:
    ``[teachers, translations, N, classes]``, translations in ``offset_codes`` order."""
    for t in teachers:
        t.eval()
    return torch.stack(
        [
            torch.stack([F.log_softmax(t(xs) / KD_T, 1) for t in teachers])
            for _, xs in tasks.all_translations(x, shift)
        ],
        1,
    )


def train_students(bank, table, sources, masks, task, data, *, epochs, seed):
    """Hinton KD (or CE where ``sources[i]`` is None) for every student of ``bank``;
    student ``i`` learns from teacher ``sources[i]``, whose log-probabilities at
    the KD temperature on ``data`` are ``table[sources[i]]`` (``teacher_table``),
    and only from the samples of classes where ``masks[i]`` is True."""
    opt, sched = sgd(bank.parameters(), 0.05, epochs)
    g = torch.Generator().manual_seed(seed)
    src = torch.tensor([0 if s is None else s for s in sources])
    kd_w = torch.tensor([0.0 if s is None else KD_ALPHA * KD_T**2 for s in sources]).view(-1, 1)
    ce_w = torch.tensor([1.0 if s is None else 1 - KD_ALPHA for s in sources]).view(-1, 1)
    for _ in range(epochs):
        for xb, yb, idx, code in tasks.batches(*data, task.shift, g, with_index=True):
            t_log = table[:, code, idx].transpose(1, 2)[src]
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


def teacher_names(regime: TeacherRegime) -> list[str]:
    """Result keys of a regime's teachers: the one not fine-tuned, the MCMI
    fine-tunes (by lambda), the label-smoothing fine-tunes and the
    temperature-scaled control."""
    return ["base", *map(str, regime.lambdas), *(f"ls{e:g}" for e in regime.smoothing), "ts"]


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


#: Where a seed reports the end of each stage (set in each worker process, or in
#: this one when the seeds run here): ``(task, regime, seed, stage, seconds)``.
_progress = None


def set_progress_queue(events) -> None:
    global _progress
    _progress = events


@torch.no_grad()
def training_fit(model, train, k) -> dict:
    """Where ``model`` stands on its un-augmented training split (eval mode):
    accuracy, NLL, CMI, and the mean over classes of the largest entry of its
    class centroids there (1: one-hot centroids)."""
    rep = teacher_report(model, [train], k, progress=False)
    q = mcmi_torch.estimate_centroids(model, [train], k, progress=False)
    return {
        "train_accuracy": rep.accuracy, "train_nll": rep.nll, "train_cmi": rep.cmi,
        "centroid_peak": q.max(1).values.mean().item(),
    }  # fmt: skip


def run_seed(seed: int, task: tasks.Task, regime: TeacherRegime, args) -> dict:
    torch.set_num_threads(1)  # these models are tiny: one thread per seed is fastest
    start = time.perf_counter()

    def stage_done(stage):
        _progress.put((task.name, regime.name, seed, stage, time.perf_counter() - start))

    k = task.num_classes
    tr, va, te = tasks.split(task.y, seed, regime.fractions(task))
    train, val, test = ((task.x[i], task.y[i]) for i in (tr, va, te))
    in_dim = task.x[0].numel()
    chance = 1.0 / k

    torch.manual_seed(seed)
    base, base_history = train_teacher(
        MLP(in_dim, regime.hidden or task.teacher_hidden, k), task, train, val,
        F.cross_entropy, epochs=regime.epochs, lr=0.1, seed=seed, keep=regime.keep,
    )  # fmt: skip
    stage_done(0)
    g = torch.Generator().manual_seed(seed + 1)
    q = mcmi_torch.estimate_centroids(
        copy.deepcopy(base), list(tasks.batches(*train, task.shift, g)), k,
        progress=False, train_mode=True,
    )  # fmt: skip

    criteria = {str(lam): mcmi_torch.MCMILoss(lam=lam, centroids=q) for lam in regime.lambdas}
    for eps in regime.smoothing:
        criteria[f"ls{eps:g}"] = nn.CrossEntropyLoss(label_smoothing=eps)
    teachers, rows = {"base": base}, {"base": {}}
    for name, criterion in criteria.items():
        torch.manual_seed(seed + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mcmi_torch.CollapseWarning)  # counted below
            teachers[name], history = train_teacher(
                copy.deepcopy(base), task, train, val, criterion,
                epochs=args.finetune_epochs, lr=0.05, seed=seed + 2, keep=regime.keep,
            )  # fmt: skip
        rows[name] = {
            "collapsed": history[-1] < 0.5 * (chance + max(base_history)),
            "last_val_accuracy": history[-1],
            "best_epoch": history.index(max(history)) + 1,
        }
        if isinstance(criterion, mcmi_torch.MCMILoss):
            rows[name]["guard"] = criterion.guard.fired
    stage_done(1)
    temperature = fit_temperature(teachers["0.0"], *val)
    teachers["ts"] = TemperatureScaled(teachers["0.0"], temperature)
    rows["ts"] = {"temperature": temperature}
    for name, t in teachers.items():
        rep = teacher_report(t, [test], k, progress=False, posterior=task.posterior)
        rows[name].update(
            accuracy=rep.accuracy, cmi=rep.cmi, ncmi=rep.ncmi, nll=rep.nll, ece=rep.ece,
            kl=rep.kl_to_reference, bayes_agreement=rep.reference_agreement,
            **training_fit(t, train, k),
        )  # fmt: skip

    # Sources: no teacher (None), then every teacher in teacher_names order.
    names = teacher_names(regime)
    table = teacher_table([teachers[name] for name in names], train[0], task.shift)
    n_src = len(names) + 1
    sources = [None, *range(len(names))]
    keep = torch.ones(k + 1, k, dtype=torch.bool)  # row 0: full data; row 1 + c: omit c
    keep[1:].fill_diagonal_(False)
    init = [1000 * seed + j for j in range(k + 1)]  # one initialisation per setting slot
    bank = StudentBank(init * n_src, in_dim, task.student_hidden, k)
    train_students(
        bank, table, [s for s in sources for _ in range(k + 1)], keep.repeat(n_src, 1),
        task, train, epochs=args.student_epochs, seed=seed + 3,
    )  # fmt: skip
    stage_done(2)
    g = torch.Generator().manual_seed(seed + 4)
    few = []
    for c in range(k):
        idx = (train[1] == c).nonzero().flatten()
        few.append(idx[torch.randperm(len(idx), generator=g)[: max(1, round(args.few * len(idx)))]])
    few = torch.cat(few)
    few_bank = StudentBank([init[0]] * n_src, in_dim, task.student_hidden, k)
    train_students(
        few_bank, table[:, :, few], sources, torch.ones(n_src, k, dtype=torch.bool), task,
        (train[0][few], train[1][few]), epochs=args.few_epochs, seed=seed + 5,
    )  # fmt: skip
    stage_done(3)

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
        "task": task.name,
        "regime": regime.name,
        "seed": seed,
        "teachers": rows,
        "students": students,
        "train_samples": len(tr),
        "fewshot_samples": len(few),
        "bayes_accuracy": bayes,
        "suggested_lambda": mcmi_torch.suggest_lambda(q),
        "largest_cmi_reward": -q.clamp_min(mcmi_torch.CENTROID_FLOOR).min().log().item(),
        "finetune_centroid_peak": q.max(1).values.mean().item(),
    }


def interval_of(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-seed paired differences."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def paired(results, name, setting, ref="0.0"):
    """Per-seed differences of ``name``'s students against ``ref``'s (zero-shot:
    paired per class, then averaged over classes); mean and 95% t-interval."""
    diffs = []
    for r in results:
        a, b = r["students"][name][setting], r["students"][ref][setting]
        if setting == "zero-shot":
            diffs.append(statistics.fmean(x - y for x, y in zip(a, b)))
        else:
            diffs.append(a - b)
    return interval_of(diffs)


def student_mean(results, name, setting):
    values = [r["students"][name][setting] for r in results]
    return statistics.fmean(statistics.fmean(v) if setting == "zero-shot" else v for v in values)


TEACHER_METRICS = (
    "accuracy", "nll", "ece", "cmi", "ncmi", "kl", "bayes_agreement",
    "train_accuracy", "train_nll", "train_cmi", "centroid_peak",
)  # fmt: skip
#: Teacher metrics also given as paired differences to the control.
PAIRED_METRICS = ("kl", "ece")


def summarize(results, regime):
    """One row per student source: teacher metrics (means over seeds; the
    smallest training accuracy over seeds; the KL to p* and the ECE also as
    paired differences to lambda 0) and paired student differences."""
    rows = []
    for name in ["none", *teacher_names(regime)]:
        row = {"source": label(name)}
        if name != "none":
            ts = [r["teachers"][name] for r in results]
            for metric in TEACHER_METRICS:
                if ts[0][metric] is not None:
                    row[f"teacher_{metric}"] = statistics.fmean(t[metric] for t in ts)
            row["teacher_train_accuracy_min"] = min(t["train_accuracy"] for t in ts)
            for metric in PAIRED_METRICS:
                if ts[0][metric] is not None:
                    diffs = [t[metric] - r["teachers"]["0.0"][metric] for t, r in zip(ts, results)]
                    row.update(zip((f"{metric}_diff", f"{metric}_lo", f"{metric}_hi"),
                                   interval_of(diffs)))  # fmt: skip
            if "collapsed" in ts[0]:
                row["last_val_accuracy"] = statistics.fmean(t["last_val_accuracy"] for t in ts)
                row["collapsed_seeds"] = sum(t["collapsed"] for t in ts)
            if "guard" in ts[0]:
                row["guard_seeds"] = sum(t["guard"] for t in ts)
            if name == "ts":
                row["temperature"] = statistics.fmean(t["temperature"] for t in ts)
        for setting in STUDENT_SETTINGS:
            row[f"{setting}_acc"] = student_mean(results, name, setting)
            d, lo, hi = paired(results, name, setting)
            row.update({f"{setting}_diff": d, f"{setting}_lo": lo, f"{setting}_hi": hi})
        for setting in STUDENT_SETTINGS if name not in ("none", "base") else ():
            values = paired(results, name, setting, ref="base")
            row.update({f"{setting}_vs_base_{k}": v for k, v in zip(("diff", "lo", "hi"), values)})
        rows.append(row)
    return rows


def interval(row, prefix, scale=100.0, digits=1) -> str:
    d, lo, hi = (scale * row[f"{prefix}_{s}"] for s in ("diff", "lo", "hi"))
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def teacher_markdown(rows, n_seeds) -> str:
    """Teachers: training-split fit, metrics on the test split at the epoch the
    regime keeps; collapse judged at the last fine-tune epoch."""
    known = "teacher_kl" in rows[1]
    header = ["teacher", "train acc (%)", "train NLL", "train CMI", "centroid peak", "acc (%)",
              "NLL", "ECE (%)", "CMI", "NCMI"]  # fmt: skip
    if known:
        header += ["KL to p*", "KL vs lambda 0", "Bayes agreement (%)"]
    header += ["last-epoch val acc (%)", "collapsed at last epoch", "guard warned"]
    lines = []
    for row in rows[1:]:
        cells = [
            row["source"], f"{100 * row['teacher_train_accuracy']:.1f}",
            f"{row['teacher_train_nll']:.3f}", f"{row['teacher_train_cmi']:.3f}",
            f"{row['teacher_centroid_peak']:.3f}", f"{100 * row['teacher_accuracy']:.1f}",
            f"{row['teacher_nll']:.3f}", f"{100 * row['teacher_ece']:.1f}",
            f"{row['teacher_cmi']:.3f}", f"{row['teacher_ncmi']:.4f}",
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
    header = ["teacher"] + [
        f"{s} {what}" for s in STUDENT_SETTINGS for what in ("acc (%)", "vs lambda 0")
    ]
    lines = []
    for row in rows:
        cells = [row["source"]]
        for setting in STUDENT_SETTINGS:
            control = row["source"] == "lambda 0.0"
            cells += [f"{100 * row[f'{setting}_acc']:.1f}",
                      "(control)" if control else interval(row, setting)]  # fmt: skip
        lines.append(cells)
    return table(header, lines)


def markdown_vs_base(rows) -> str:
    """The fine-tuned teachers' students against those of the teacher that was
    not fine-tuned (the MCMI authors' baseline)."""
    header = ["teacher"] + [f"{s} vs not fine-tuned" for s in STUDENT_SETTINGS]
    lines = [
        [row["source"], *(interval(row, f"{s}_vs_base") for s in STUDENT_SETTINGS)]
        for row in rows[2:]
    ]
    return table(header, lines)


def per_class_markdown(results, regime, k) -> str:
    """Zero-shot accuracy on each omitted class, mean over seeds."""
    lines = []
    for name in ["none", *teacher_names(regime)]:
        per = [
            statistics.fmean(r["students"][name]["zero-shot"][c] for r in results) for c in range(k)
        ]
        lines.append([label(name), *(f"{100 * v:.0f}" for v in per),
                      f"{100 * statistics.fmean(per):.1f}"])  # fmt: skip
    return table(["teacher", *map(str, range(k)), "mean"], lines)


def summary_markdown(rows) -> str:
    """The regime's answer in one small table: every teacher's fit to its
    training set, its distance to p* (where known) and ECE, and its students'
    paired differences, all against the lambda-0 control (the control's row
    gives its own values)."""
    known = "teacher_kl" in rows[2]
    header = ["teacher", "train acc (%)", "centroid peak"]
    header += ["KL(p* ‖ teacher) vs λ 0 (nats)"] if known else []
    header += ["ECE (%)", *(f"{s} students vs λ 0 (points)" for s in STUDENT_SETTINGS)]
    control = next(row for row in rows if row["source"] == label("0.0"))
    order = [control, *(row for row in rows[2:] if row["source"].startswith("lambda ")
                        and row is not control and row["source"] != label("ts")),
             rows[1], *(row for row in rows if row["source"].startswith("label smoothing")),
             rows[-1]]  # fmt: skip
    lines = []
    for row in order:
        name = "λ 0 (control)" if row is control else tick(row).split("\n")[0]
        cells = [name, f"{100 * row['teacher_train_accuracy']:.1f}",
                 f"{row['teacher_centroid_peak']:.3f}"]  # fmt: skip
        if known:
            cells.append(f"{row['teacher_kl']:.3f}" if row is control
                         else interval(row, "kl", scale=1.0, digits=3))  # fmt: skip
        cells.append(f"{100 * row['teacher_ece']:.1f}")
        for setting in STUDENT_SETTINGS:
            cells.append(f"{100 * row[f'{setting}_acc']:.1f}%" if row is control
                         else interval(row, setting))  # fmt: skip
        lines.append(cells)
    return table(header, lines)


def tick(row) -> str:
    """A short label for a teacher's row."""
    source = row["source"]
    if source == label("ts"):
        return "λ 0 + TS"
    if source.startswith("lambda"):
        return f"λ {float(source.split()[1]):g}\nCMI {row['teacher_cmi']:.2f}"
    return source.replace("label smoothing", "LS")


def plot(rows, path: pathlib.Path, title: str) -> None:
    """Paired differences to the lambda-0 control with their 95% intervals, one
    column per teacher (the lambdas, then the baselines): the teacher's KL to
    p* (where known) and ECE, and its students' accuracy in each setting. The
    axes are scaled to the teachers that did not collapse in any seed; a value
    beyond them is drawn as a triangle at the edge, labelled with its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = rows[1:]
    known = "teacher_kl" in teachers[0]
    # (metric, scale, least span of the axis, label): no sub-point noise drawn big.
    panels = [("kl", 1.0, 0.05, "KL(p* ‖ teacher) vs λ 0 (nats)")] if known else []
    panels += [("ece", 100.0, 2.0, "teacher ECE vs λ 0 (points)"), (None, 100.0, 2.0,
               "student test accuracy vs λ 0 (points)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8))
    xs = list(range(len(teachers)))
    for ax, (metric, scale, least, ylabel) in zip(axes, panels):
        series = [(metric, None, 0.0)] if metric else [
            (s, f"{s} students", offset) for s, offset in zip(STUDENT_SETTINGS, (-0.2, 0, 0.2))
        ]  # fmt: skip
        drawn, span = [], [0.0]
        for prefix, name, offset in series:
            d, lo, hi = (
                [scale * r[f"{prefix}_{w}"] for r in teachers] for w in ("diff", "lo", "hi")
            )
            bars = ax.errorbar(
                [x + offset for x in xs], d, yerr=[[a - b for a, b in zip(d, lo)],
                [b - a for a, b in zip(d, hi)]], fmt="o", capsize=3, ms=4, label=name,
            )  # fmt: skip
            drawn.append((bars, offset, d))
            span += [v for r, a, b in zip(teachers, lo, hi) if not r.get("collapsed_seeds")
                     for v in (a, b) if math.isfinite(v)]  # fmt: skip
        pad = 0.08 * (max(span) - min(span))
        bottom, top = _with_zero((min(span) - pad, max(span) + pad), least)
        ax.set_ylim(bottom, top)
        for bars, offset, d in drawn:
            for x, v in zip(xs, d):
                if not bottom <= v <= top:
                    edge = top if v > top else bottom
                    ax.plot(x + offset, edge, "^" if v > top else "v", color=bars[0].get_color())
                    ax.annotate(
                        f"{v:+.3g}", (x + offset, edge), fontsize=7, ha="center",
                        xytext=(60 * offset, -10 if v > top else 4), textcoords="offset points",
                    )  # fmt: skip
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, [tick(r).split("\n")[0] for r in teachers], rotation=45, ha="right")
        ax.grid(axis="y", lw=0.3)
        if not metric:
            ax.legend(fontsize=8)
    fig.suptitle(title + " (mean and 95% CI over seeds of the paired differences)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_zero(limits, least):
    """Axis limits that hold 0 and span at least ``least`` (no sub-point noise
    drawn as a big effect)."""
    lo, hi = min(limits[0], 0.0), max(limits[1], 0.0)
    pad = max(0.0, least - (hi - lo)) / 2
    return lo - pad, hi + pad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--task", nargs="+", choices=("gmm", "mnist1d", "digits"), default=["gmm", "mnist1d"],
        help="tasks: gmm (Gaussian mixture, exact p*), mnist1d, digits (8x8)")  # fmt: skip
    add("--regimes", nargs="+", choices=("memorising", "early-stopped"),
        default=["memorising", "early-stopped"], help="teacher regimes")  # fmt: skip
    add("--seeds", type=int, default=5, help="seeds per task and regime")
    add("--lambdas", type=float, nargs="+", default=list(FULL_LAMBDAS),
        help="MCMI lambdas of the memorising regime (must include 0, the control)")  # fmt: skip
    add("--early-lambdas", type=float, nargs="+", default=EARLY_LAMBDAS,
        help="MCMI lambdas of the early-stopped regime (with --full, unless given: "
        "--lambdas)")  # fmt: skip
    add("--smoothing", type=float, nargs="+", default=list(FULL_SMOOTHING),
        help="label smoothing of the memorising regime's baseline fine-tunes")  # fmt: skip
    add("--early-smoothing", type=float, nargs="+", default=EARLY_SMOOTHING,
        help="label smoothing of the early-stopped regime's baseline fine-tunes (with --full, "
        "unless given: --smoothing)")  # fmt: skip
    add("--memorising-epochs", type=int, default=120,
        help="epochs of a memorising teacher (taken at its last epoch)")  # fmt: skip
    add("--memorising-hidden", type=int, nargs="+", default=[256, 256],
        help="hidden widths of a memorising teacher")  # fmt: skip
    add("--teacher-epochs", type=int, default=40,
        help="epochs of an early-stopped teacher (taken at its best validation epoch)")  # fmt: skip
    add("--finetune-epochs", type=int, default=20, help="epochs of every fine-tune")
    add("--student-epochs", type=int, default=60, help="epochs of full-data and zero-shot students")
    add("--few", type=float, default=0.05, help="few-shot fraction of the training split")
    add("--few-epochs", type=int, default=240, help="epochs of few-shot students")
    add("--samples", type=int, default=6000, help="MNIST-1D samples")
    add("--gmm-samples", type=int, default=4000, help="Gaussian-mixture samples")
    add(
        "--full", action="store_true",
        help="10 seeds, 240 student epochs, the early-stopped regime on the full grids",
    )  # fmt: skip
    add("--workers", type=int, default=2,
        help="worker processes (seeds run in parallel); 0: all in this process, without "
        "PORTABLE_ENV's ATen and MKL code paths")  # fmt: skip
    add("--out", type=pathlib.Path, default=pathlib.Path("examples/output"),
        help="folder for the reports, CSVs, JSON, plots and results.md")  # fmt: skip
    add("--cache", type=pathlib.Path, default=tasks.cache_dir(),
        help="folder caching generated MNIST-1D (also $MCMI_TORCH_CACHE)")  # fmt: skip
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.full:
        args.seeds, args.student_epochs = 10, 240
        if args.early_lambdas is EARLY_LAMBDAS:  # not given
            args.early_lambdas = args.lambdas
        if args.early_smoothing is EARLY_SMOOTHING:
            args.early_smoothing = args.smoothing
    for option in ("lambdas", "early_lambdas"):
        if 0.0 not in getattr(args, option):
            parser.error(f"--{option.replace('_', '-')} must include 0 (the control)")
    for option in ("lambdas", "early_lambdas", "smoothing", "early_smoothing"):
        setattr(args, option, sorted(set(getattr(args, option))))
    return args


def teacher_regimes(args) -> list[TeacherRegime]:
    regimes = {
        "memorising": TeacherRegime(
            "memorising", tuple(args.memorising_hidden), args.memorising_epochs, "last",
            tuple(args.lambdas), tuple(args.smoothing), memorising_split=True,
        ),
        "early-stopped": TeacherRegime(
            "early-stopped", None, args.teacher_epochs, "best", tuple(args.early_lambdas),
            tuple(args.early_smoothing), memorising_split=False,
        ),
    }  # fmt: skip
    return [regimes[name] for name in args.regimes]


def make_task(name: str, args) -> tasks.Task:
    if name == "digits":
        return tasks.digits()
    if name == "gmm":
        return tasks.gaussian_mixture(args.gmm_samples)
    return tasks.mnist1d(args.cache, args.samples)


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


class Progress:
    """Prints each stage of each seed as it ends and, at least every ``every``
    seconds, the stages done and an estimate of the time left: every stage to
    come at the mean duration of that stage in the same task and regime so far
    (else of that stage anywhere, else of any stage), divided among the workers."""

    def __init__(self, jobs, workers: int, events, every: float = 15.0):
        self.next_stage = dict.fromkeys(jobs, 0)
        self.ended = dict.fromkeys(jobs, 0.0)
        self.durations: dict[tuple, list[float]] = {}
        self.workers, self.events, self.every = max(workers, 1), events, every
        self.start = self.last_line = self.eta_at = time.perf_counter()
        self.eta = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _expected(self, task, regime, stage):
        for key in ((task, regime, stage), stage, None):
            seen = self.durations.get(key)
            if seen:
                return statistics.fmean(seen)
        return None

    def status(self) -> str:
        """The stages done and the time left: the estimate made at the last stage's
        end, less the time since."""
        now = time.perf_counter()
        total = len(self.next_stage) * len(STAGES)
        done = sum(self.next_stage.values())
        if self.eta is None:
            left = "estimating"
        else:
            left = f"about {max(0.0, self.eta - (now - self.eta_at)):.0f} s left"
        return f"[{now - self.start:.0f} s] {done}/{total} stages done, {left}"

    def _estimate(self):
        left = [
            self._expected(task, regime, stage)
            for (task, regime, _), first in self.next_stage.items()
            for stage in range(first, len(STAGES))
        ]
        self.eta = None if None in left else sum(left) / self.workers
        self.eta_at = time.perf_counter()

    def _print(self, text):
        print(text, flush=True)
        self.last_line = time.perf_counter()

    def _handle(self, event):
        task, regime, seed, stage, seconds = event
        job = (task, regime, seed)
        duration, self.ended[job] = seconds - self.ended[job], seconds
        self.next_stage[job] = stage + 1
        for key in ((task, regime, stage), stage, None):
            self.durations.setdefault(key, []).append(duration)
        self._estimate()
        self._print(f"  {task} {regime} seed {seed}: {STAGES[stage]} ({duration:.0f} s); "
                    f"{self.status()}")  # fmt: skip

    def _run(self):
        while True:
            try:
                self._handle(self.events.get(timeout=min(0.5, self.every)))
                continue
            except queue.Empty:
                pass
            if self.stop.is_set():
                return
            if time.perf_counter() - self.last_line >= self.every:
                self._print(self.status())


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_and_versions() -> list[tuple[str, str]]:
    """The machine, the versions of what computes the results, and this
    package's git commit where the script runs from a checkout."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)  # fmt: skip
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("numpy", "scipy", "mnist1d", "mcmi-torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    root = pathlib.Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
        versions.append(
            f"mcmi_torch commit {commit}" + (" (with uncommitted changes)" if changed else "")
        )
    return [
        ("machine", f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} "
                    f"{platform.release()}"),
        ("versions", ", ".join(versions)),
        ("MKL", f"{'available' if torch.backends.mkl.is_available() else 'not used'}; worker "
                f"environment {' '.join(f'{k}={v}' for k, v in PORTABLE_ENV.items())}"),
    ]  # fmt: skip


def report(task, regime, args, results, elapsed) -> tuple[str, list[dict]]:
    """Writes the task and regime's report, CSV, JSON and plot; returns the
    report's text and the summary rows."""
    rows = summarize(results, regime)
    title = f"{TASK_TITLES[task.name]}, {regime.name} teachers, {len(results)} seeds"
    bayes = [r["bayes_accuracy"] for r in results if r["bayes_accuracy"] is not None]
    train_acc = [r["teachers"]["base"]["train_accuracy"] for r in results]
    teacher_note = (
        f"Regime: {regime.describe(task)}. Teachers not fine-tuned: training accuracy "
        f"{100 * min(train_acc):.1f}% to {100 * max(train_acc):.1f}% over seeds. "
        "Teachers (means over seeds): accuracy, NLL and CMI on the un-augmented training "
        "split, and the centroid peak there (mean over classes of the largest entry of the "
        "class centroid, 1 for one-hot centroids); acc, NLL, ECE (15 bins), CMI, NCMI"
        + (", KL(p* || teacher) and agreement with the Bayes decision" if bayes else "")
        + " on the test split; 'last-epoch val acc' and 'collapsed' (below the midpoint of "
        "chance and the not-fine-tuned teacher's best) at the last fine-tune epoch; guard "
        "warned: MCMILoss's CollapseWarning. "
        + (f"Bayes accuracy on the test split: {100 * statistics.fmean(bayes):.1f}%. " if bayes
           else "")
        + f"Fine-tunes: {args.finetune_epochs} epochs of the same schedule; temperature fitted "
        f"on validation by NLL (mean T "
        f"{statistics.fmean(r['teachers']['ts']['temperature'] for r in results):.2f}). "
        "Fine-tuning centroids (augmented training split, train mode): peak "
        f"{min(r['finetune_centroid_peak'] for r in results):.3f} to "
        f"{max(r['finetune_centroid_peak'] for r in results):.3f}, largest -log min_j Q_yj "
        f"{min(r['largest_cmi_reward'] for r in results):.1f} to "
        f"{max(r['largest_cmi_reward'] for r in results):.1f} nats, suggest_lambda(Q) "
        f"{min(r['suggested_lambda'] for r in results):.3f} to "
        f"{max(r['suggested_lambda'] for r in results):.3f} over seeds."
    )  # fmt: skip
    student_note = (
        "Students: mean test accuracy, and the paired difference to lambda 0's students "
        "(mean [95% CI] over seeds, points):"
    )
    warning = shortfall(regime, results)
    if warning:
        print(warning, file=sys.stderr)
        warning += "\n\n"
    text = (
        f"## {title}, {elapsed:.0f} s\n\n{warning}"
        f"{teacher_markdown(rows, len(results))}\n\n"
        f"{teacher_note}\n\n{student_note}\n\n{student_markdown(rows)}\n\n"
        f"Paired differences against the teacher that was not fine-tuned (points):\n\n"
        f"{markdown_vs_base(rows)}\n\n"
        f"Zero-shot accuracy per omitted class (%), mean over seeds:\n\n"
        f"{per_class_markdown(results, regime, task.num_classes)}\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mcmi_demo_{task.name}_{regime.name}"
    with open(f"{stem}.md", "w") as f:
        f.write(text)
    with open(f"{stem}.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        settings = {
            key: str(v) if isinstance(v, pathlib.Path) else v for key, v in vars(args).items()
        }
        json.dump({"args": settings, "regime": vars(regime), "results": results}, f, indent=1)
    plot(rows, pathlib.Path(f"{stem}.png"), title)
    return text + f"\nwritten: {stem}.md .csv .json .png\n", rows


def shortfall(regime, results) -> str:
    """A warning where a memorising regime's teacher fell short of the training
    accuracy it promises, else ''."""
    train_acc = [r["teachers"]["base"]["train_accuracy"] for r in results]
    short = sum(a < MEMORISING_TRAIN_ACCURACY for a in train_acc)
    if regime.keep != "last" or not short:
        return ""
    return (
        f"**Warning**: {short} of {len(results)} teachers fell short of "
        f"{100 * MEMORISING_TRAIN_ACCURACY:.0f}% training accuracy (lowest "
        f"{100 * min(train_acc):.1f}%): train them longer (--memorising-epochs)."
    )


def results_page(sections, args, meta, wall, cpu) -> str:
    """The results page: a header (machine, command, versions, time) and, per
    task and regime, one small table and the key intervals."""
    command = shlex.join(["python", "examples/mcmi_demo.py", *sys.argv[1:]])
    lines = ["# MCMI demo results", ""]
    lines += [f"- {key}: {value}" for key, value in meta]
    lines += [
        f"- command: `{command}`",
        f"- time: {wall:.0f} s of wall time, {cpu:.0f} s of CPU time ({args.workers or 1} "
        f"worker(s); load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())})",
        f"- MNIST-1D cache: {args.cache}",
        "",
        "Each table: the control (lambda 0, CE-fine-tuned) with its own values, the MCMI "
        "fine-tunes, the teacher that was not fine-tuned and the baselines, as paired "
        "differences to the control: mean [95% CI] over seeds. Train acc: the teachers' mean "
        "accuracy on the un-augmented training split; centroid peak: the mean over classes of "
        "the largest entry of their training-set class centroids (1: one-hot).",
    ]
    for task, regime, results, rows in sections:
        train_acc = [r["teachers"]["base"]["train_accuracy"] for r in results]
        best_lam = max((row for row in rows if row["source"].startswith("lambda ")
                        and row["source"] != label("ts") and row["source"] != label("0.0")),
                       key=lambda row: row["zero-shot_vs_base_diff"])  # fmt: skip
        lines += [
            "",
            f"## {TASK_TITLES[task.name]}, {regime.name} teachers ({len(results)} seeds)",
            "",
            f"{regime.describe(task)}. Teachers not "
            f"fine-tuned: training accuracy {100 * min(train_acc):.1f}% to "
            f"{100 * max(train_acc):.1f}% over seeds, test accuracy "
            f"{100 * rows[1]['teacher_accuracy']:.1f}%"
            + (f" (Bayes classifier: "
               f"{100 * statistics.fmean(r['bayes_accuracy'] for r in results):.1f}%)"
               if results[0]["bayes_accuracy"] is not None else "")
            + ".",
            *(["", warning] if (warning := shortfall(regime, results)) else []),
            "",
            summary_markdown(rows),
            "",
            f"Against the teacher that was not fine-tuned (the paper's baseline), the students "
            f"of {best_lam['source']} (the lambda best in zero-shot): full "
            f"{interval(best_lam, 'full_vs_base')}, few-shot "
            f"{interval(best_lam, 'few-shot_vs_base')}, zero-shot "
            f"{interval(best_lam, 'zero-shot_vs_base')} points.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, dict[str, list[dict]]]:
    args = parse_args(argv)
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    task_list = [make_task(name, args) for name in args.task]
    regimes = teacher_regimes(args)
    start = time.perf_counter()
    jobs = [(task, regime, seed) for regime in regimes for task in task_list
            for seed in range(args.seeds)]  # fmt: skip
    done = {(task.name, regime.name): {} for task in task_list for regime in regimes}
    with contextlib.ExitStack() as stack:
        keys = [(task.name, regime.name, seed) for task, regime, seed in jobs]
        if args.workers:
            stack.enter_context(portable_environment())
            context = multiprocessing.get_context("spawn")
            events = context.Queue()
            pool = stack.enter_context(ProcessPoolExecutor(
                args.workers, mp_context=context, initializer=set_progress_queue,
                initargs=(events,),
            ))  # fmt: skip
            stack.enter_context(Progress(keys, args.workers, events))
            futures = [
                pool.submit(run_seed, seed, task, regime, args) for task, regime, seed in jobs
            ]
            finished = (f.result() for f in as_completed(futures))
        else:
            events = queue.SimpleQueue()
            set_progress_queue(events)
            stack.enter_context(Progress(keys, 1, events))
            finished = (run_seed(seed, task, regime, args) for task, regime, seed in jobs)
        for result in finished:
            done[(result["task"], result["regime"])][result["seed"]] = result
    elapsed = time.perf_counter() - start
    print(f"\nall {len(jobs)} seeds in {elapsed:.0f} s ({args.workers or 1} worker(s))\n")
    out, sections = {}, []
    for regime in regimes:
        for task in task_list:
            results = [done[(task.name, regime.name)][seed] for seed in range(args.seeds)]
            out.setdefault(task.name, {})[regime.name] = results
            text, rows = report(task, regime, args, results, elapsed)
            print(text)
            sections.append((task, regime, results, rows))
    wall, cpu = time.perf_counter() - wall_start, cpu_seconds() - cpu_start
    page = results_page(sections, args, machine_and_versions(), wall, cpu)
    with open(args.out / "results.md", "w") as f:
        f.write(page)
    print(page)
    print(f"written: {args.out / 'results.md'}")
    print(f"wall time {wall:.0f} s, CPU time {cpu:.0f} s (this process and its workers)")
    return out


if __name__ == "__main__":
    main()
