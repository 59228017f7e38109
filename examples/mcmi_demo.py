"""Does an MCMI teacher give better students? A lambda sweep with paired statistics.

For each seed (a stratified 60/15/25 train/validation/test split):
  1. train a teacher MLP (hidden 256, 256, batch norm) with cross-entropy on augmented
     data (random shifts), keeping the epoch best on validation;
  2. estimate the class centroids Q at T = 1 over the augmented training loader with the
     teacher in train mode, and freeze them;
  3. fine-tune one copy per lambda on CE - lambda * CMI (MCMILoss, T = 1) for 20 epochs
     (SGD lr 0.05, momentum 0.9, wd 5e-4, cosine, batch 64), keeping the epoch best on
     validation; lambda = 0 is the CE-fine-tuned control;
  4. distil the same small student (one hidden layer, same initialisation and data order
     for every teacher) with Hinton KD (T = 4, alpha 0.9) from every fine-tuned teacher,
     from the teacher that was not fine-tuned, and without a teacher (CE), in three
     regimes: full data; few-shot (a stratified 5% of the training set, 240 epochs on it);
     zero-shot (one class removed from the student's training set, once for every class;
     accuracy on that class's test samples).
Reports, per teacher: test accuracy, CMI and NCMI (metrics.teacher_report); whether it
collapsed (last fine-tune epoch's validation accuracy below the midpoint of chance and
the not-fine-tuned teacher's validation accuracy); whether MCMILoss's collapse guard
warned; and the students' accuracy as paired differences against the lambda = 0 control
(per seed; zero-shot paired per omitted class and seed, averaged over classes), mean and
95% t-interval over seeds.
Writes a markdown table, a CSV, the zero-shot per-class accuracies, raw JSON and a plot
(accuracies against teacher CMI) to --out.

Departures from the MCMI authors' recipe (ResNets on CIFAR-100 in RepDistiller), all but
the validation split for a run of a few minutes on 2 CPU cores:
  - tasks: MNIST-1D (6000 generated signals) or 8x8 digits instead of CIFAR-100; MLP
    teachers (hidden 256, 256) and students (one hidden layer of 32 on MNIST-1D, 16 on
    digits, no batch norm) instead of ResNets/WRNs; augmentation is a random shift of up
    to 2 samples (MNIST-1D) or 1 pixel (digits) instead of crop and flip;
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

    python examples/mcmi_demo.py                       # MNIST-1D, 5 seeds, about 3 min on 2 cores
    python examples/mcmi_demo.py --task digits         # 8x8 digits, about 1 min
    python examples/mcmi_demo.py --full                # 10 seeds, 240 student epochs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import multiprocessing
import pathlib
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import mcmi_torch
from mcmi_torch.metrics import teacher_report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks

REGIMES = ("full", "few-shot", "zero-shot")
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
    batched network: ``forward(x)`` gives ``[n, B, classes]``. Student ``i`` is
    initialised like ``nn.Linear`` from seed ``seeds[i]``."""

    def __init__(self, seeds: list[int], in_dim: int, hidden: int, classes: int):
        super().__init__()
        w1, b1, w2, b2 = [], [], [], []
        for s in seeds:
            torch.manual_seed(s)
            a, b = nn.Linear(in_dim, hidden), nn.Linear(hidden, classes)
            w1.append(a.weight.T)
            b1.append(a.bias)
            w2.append(b.weight.T)
            b2.append(b.bias)
        self.w1 = nn.Parameter(torch.stack(w1).detach())
        self.b1 = nn.Parameter(torch.stack(b1).detach().unsqueeze(1))
        self.w2 = nn.Parameter(torch.stack(w2).detach())
        self.b2 = nn.Parameter(torch.stack(b2).detach().unsqueeze(1))

    def forward(self, x):
        h = torch.relu(torch.matmul(x.flatten(1), self.w1) + self.b1)
        return torch.matmul(h, self.w2) + self.b2


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
                t_log = torch.stack([t(xb) for t in teachers])[src]
                t_log = F.log_softmax(t_log / KD_T, -1)
            s_logits = bank(xb)
            s_log = F.log_softmax(s_logits / KD_T, -1)
            kd = (t_log.exp() * (t_log - s_log)).sum(-1)
            ce = F.cross_entropy(
                s_logits.transpose(1, 2), yb.expand(len(src), -1), reduction="none"
            )
            w = masks[:, yb].float()
            per_student = ((kd_w * kd + ce_w * ce) * w).sum(1) / w.sum(1).clamp_min(1)
            opt.zero_grad()
            per_student.sum().backward()
            opt.step()
        sched.step()
    return bank


def run_seed(seed: int, task: tasks.Task, args) -> dict:
    torch.set_num_threads(1)  # these models are tiny: one thread per seed is fastest
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
    g = torch.Generator().manual_seed(seed + 1)
    q = mcmi_torch.estimate_centroids(
        copy.deepcopy(base), list(tasks.batches(*train, task.shift, g)), k,
        progress=False, train_mode=True,
    )  # fmt: skip

    test_batches = [test]
    teachers, rows = [base], {"base": {}}
    for lam in args.lambdas:
        criterion = mcmi_torch.MCMILoss(lam=lam, centroids=q)
        torch.manual_seed(seed + 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mcmi_torch.CollapseWarning)  # counted below
            t, history = train_teacher(
                copy.deepcopy(base), task, train, val, criterion,
                epochs=args.finetune_epochs, lr=0.05, seed=seed + 2,
            )  # fmt: skip
        teachers.append(t)
        rows[lam] = {
            "collapsed": history[-1] < 0.5 * (chance + max(base_history)),
            "guard": criterion.guard.fired,
            "best_epoch": history.index(max(history)) + 1,
        }
    for key, t in zip(rows, teachers):
        rep = teacher_report(t, test_batches, k, progress=False)
        rows[key].update(accuracy=rep.accuracy, cmi=rep.cmi, ncmi=rep.ncmi)

    # Sources: no teacher (None), then teachers[0] (base), teachers[1:] (lambdas).
    n_src = len(teachers) + 1
    sources = [None, *range(len(teachers))]
    keep = torch.ones(k + 1, k, dtype=torch.bool)  # row 0: full data; row 1 + c: omit c
    keep[1:].fill_diagonal_(False)
    init = [1000 * seed + j for j in range(k + 1)]  # one initialisation per regime slot
    bank = StudentBank(init * n_src, in_dim, task.student_hidden, k)
    train_students(
        bank, teachers, [s for s in sources for _ in range(k + 1)], keep.repeat(n_src, 1),
        task, train, epochs=args.student_epochs, seed=seed + 3,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 4)
    few = []
    for c in range(k):
        idx = (train[1] == c).nonzero().flatten()
        few.append(idx[torch.randperm(len(idx), generator=g)[: max(1, round(args.few * len(idx)))]])
    few = torch.cat(few)
    few_bank = StudentBank([init[0]] * n_src, in_dim, task.student_hidden, k)
    train_students(
        few_bank, teachers, sources, torch.ones(n_src, k, dtype=torch.bool), task,
        (train[0][few], train[1][few]), epochs=args.few_epochs, seed=seed + 5,
    )  # fmt: skip

    with torch.no_grad():
        pred = bank(test[0]).argmax(-1).view(n_src, k + 1, -1)
        few_pred = few_bank(test[0]).argmax(-1)
    hit, few_hit = pred == test[1], few_pred == test[1]
    names = ["none", "base", *args.lambdas]
    students = {}
    for i, name in enumerate(names):
        students[str(name)] = {
            "full": hit[i, 0].float().mean().item(),
            "few-shot": few_hit[i].float().mean().item(),
            "zero-shot": [hit[i, 1 + c, test[1] == c].float().mean().item() for c in range(k)],
        }
    return {
        "seed": seed,
        "teachers": {str(key): value for key, value in rows.items()},
        "students": students,
        "fewshot_samples": len(few),
        "suggested_lambda": mcmi_torch.suggest_lambda(q),
        "largest_cmi_reward": -q.clamp_min(mcmi_torch.CENTROID_FLOOR).min().log().item(),
    }


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
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def student_mean(results, name, regime):
    values = [r["students"][name][regime] for r in results]
    return statistics.fmean(statistics.fmean(v) if regime == "zero-shot" else v for v in values)


def summarize(results, lambdas):
    """One row per student source: teacher metrics and paired student differences."""
    names = ["none", "base", *map(str, lambdas)]
    labels = {"none": "no teacher", "base": "not fine-tuned"}
    rows = []
    for name in names:
        row = {"source": labels.get(name, f"lambda {name}")}
        if name != "none":
            ts = [r["teachers"][name] for r in results]
            row.update(
                teacher_acc=statistics.fmean(t["accuracy"] for t in ts),
                teacher_cmi=statistics.fmean(t["cmi"] for t in ts),
                teacher_ncmi=statistics.fmean(t["ncmi"] for t in ts),
            )
            if name != "base":
                row["collapsed_seeds"] = sum(t["collapsed"] for t in ts)
                row["guard_seeds"] = sum(t["guard"] for t in ts)
        for regime in REGIMES:
            row[f"{regime}_acc"] = student_mean(results, name, regime)
            d, lo, hi = paired(results, name, regime)
            row.update({f"{regime}_diff": d, f"{regime}_lo": lo, f"{regime}_hi": hi})
        for regime in REGIMES if name not in ("none", "base") else ():
            values = paired(results, name, regime, ref="base")
            row.update({f"{regime}_vs_base_{k}": v for k, v in zip(("diff", "lo", "hi"), values)})
        rows.append(row)
    return rows


def markdown(rows, n_seeds) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def diff(row, regime):
        if row["source"] == "lambda 0.0":
            return "(control)"
        return interval(row, regime)

    lines = [
        "| teacher | teacher acc (%) | CMI | NCMI | collapsed | guard warned "
        + "".join(f"| {r} acc (%) | {r} vs lambda 0 " for r in REGIMES)
        + "|",
        "|---" * (6 + 2 * len(REGIMES)) + "|",
    ]
    for row in rows:
        cells = [
            row["source"],
            pct(row.get("teacher_acc")),
            f"{row['teacher_cmi']:.3f}" if "teacher_cmi" in row else "-",
            f"{row['teacher_ncmi']:.4f}" if "teacher_ncmi" in row else "-",
            f"{row['collapsed_seeds']}/{n_seeds}" if "collapsed_seeds" in row else "-",
            f"{row['guard_seeds']}/{n_seeds}" if "guard_seeds" in row else "-",
        ]
        for regime in REGIMES:
            cells += [pct(row[f"{regime}_acc"]), diff(row, regime)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval(row, prefix) -> str:
    d, lo, hi = (100 * row[f"{prefix}_{s}"] for s in ("diff", "lo", "hi"))
    return f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def markdown_vs_base(rows) -> str:
    """The fine-tuned teachers' students against those of the teacher that was
    not fine-tuned (the MCMI authors' baseline)."""
    lines = [
        "| teacher " + "".join(f"| {r} vs not fine-tuned " for r in REGIMES) + "|",
        "|---" * (1 + len(REGIMES)) + "|",
    ]
    for row in rows[2:]:
        cells = [row["source"], *(interval(row, f"{r}_vs_base") for r in REGIMES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_markdown(results, lambdas, k) -> str:
    """Zero-shot accuracy on each omitted class, mean over seeds."""
    lines = [
        "| teacher |" + "".join(f" {c} |" for c in range(k)) + " mean |",
        "|---" * (k + 2) + "|",
    ]
    for name in ["none", "base", *map(str, lambdas)]:
        per = [
            statistics.fmean(r["students"][name]["zero-shot"][c] for r in results) for c in range(k)
        ]
        cells = "".join(f" {100 * v:.0f} |" for v in per)
        lines.append(f"| {name} |{cells} {100 * statistics.fmean(per):.1f} |")
    return "\n".join(lines)


def plot(rows, lambdas, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = rows[2:]
    cmi = [r["teacher_cmi"] for r in sweep]
    collapsed = [r["collapsed_seeds"] > 0 for r in sweep]
    series = [("teacher", "teacher_acc", axes[0])] + [
        (f"student, {g}", f"{g}_acc", axes[1]) for g in REGIMES
    ]
    for label, key, ax in series:
        ys = [100 * r[key] for r in sweep]
        (line,) = ax.plot(cmi, ys, "-", alpha=0.5)
        for x, y, lam, bad in zip(cmi, ys, lambdas, collapsed):
            ax.plot(x, y, "x" if bad else "o", color=line.get_color())
            ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        line.set_label(label)
        ax.axhline(100 * rows[1][key], color=line.get_color(), ls=":", lw=1)
    axes[0].set_ylabel("teacher test accuracy (%)")
    axes[1].set_ylabel("student test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("teacher CMI (nats), one point per lambda (x: collapsed in a seed)")
        ax.legend(fontsize=8)
    fig.suptitle(title + "  (dotted: the teacher that was not fine-tuned)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("mnist1d", "digits"), default="mnist1d")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--few", type=float, default=0.05, help="few-shot fraction")
    parser.add_argument("--few-epochs", type=int, default=240)
    parser.add_argument("--samples", type=int, default=6000, help="MNIST-1D samples")
    parser.add_argument("--full", action="store_true", help="10 seeds, 240 student epochs")
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args(argv)
    if args.full:
        args.seeds, args.student_epochs = 10, 240
    if 0.0 not in args.lambdas:
        parser.error("--lambdas must include 0 (the control)")
    args.lambdas = sorted(set(args.lambdas))
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    task = tasks.digits() if args.task == "digits" else tasks.mnist1d(args.out, args.samples)
    start = time.perf_counter()
    seeds = range(args.seeds)
    results = []
    with contextlib.ExitStack() as stack:
        run = map
        if args.workers > 1:
            context = multiprocessing.get_context("spawn")
            run = stack.enter_context(ProcessPoolExecutor(args.workers, mp_context=context)).map
        for result in run(run_seed, seeds, [task] * len(seeds), [args] * len(seeds)):
            results.append(result)
            print(f"seed {result['seed']} done, {time.perf_counter() - start:.0f} s", flush=True)
    elapsed = time.perf_counter() - start

    rows = summarize(results, args.lambdas)
    title = (
        f"{task.name}, {args.seeds} seeds, {elapsed:.0f} s; students: mean accuracy, and "
        "the paired difference to lambda 0 (mean [95% CI] over seeds, points)"
    )
    table = markdown(rows, args.seeds)
    table_base = markdown_vs_base(rows)
    per_class = per_class_markdown(results, args.lambdas, task.num_classes)
    note = (
        "teacher acc: on the test split, at the epoch best on validation; collapsed: last "
        "fine-tune epoch's validation accuracy below the midpoint of chance "
        "and the not-fine-tuned teacher's validation accuracy; "
        "guard warned: MCMILoss's CollapseWarning. Centroids: largest -log min_j Q_yj "
        f"{min(r['largest_cmi_reward'] for r in results):.1f} to "
        f"{max(r['largest_cmi_reward'] for r in results):.1f} nats, suggest_lambda(Q) "
        f"{min(r['suggested_lambda'] for r in results):.3f} to "
        f"{max(r['suggested_lambda'] for r in results):.3f} over seeds"
    )
    vs_base = "Paired differences against the teacher that was not fine-tuned (points):"
    per_class_title = "Zero-shot accuracy per omitted class (%), mean over seeds:"
    report = (
        f"{title}\n\n{table}\n\n{note}\n\n{vs_base}\n\n{table_base}\n\n"
        f"{per_class_title}\n\n{per_class}\n"
    )
    print("\n" + report)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mcmi_demo_{task.name}"
    with open(f"{stem}.md", "w") as f:
        f.write(report)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[2]), restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        json.dump({"args": {**vars(args), "out": str(args.out)}, "results": results}, f, indent=1)
    plot(rows, args.lambdas, pathlib.Path(f"{stem}.png"), title.split(";")[0])
    print(f"\nwritten: {stem}.md .csv .json .png")
    return results


if __name__ == "__main__":
    main()
