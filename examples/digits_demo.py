"""End-to-end MCMI demo on scikit-learn's bundled handwritten digits (no download).

For each seed:
  1. train a teacher MLP with cross-entropy;
  2. fine-tune two copies for 20 epochs with the MCMI authors' recipe (SGD, lr 0.05,
     cosine, batch 64, wd 5e-4): one on plain CE (lam = 0, the control), one on
     CE - lam * CMI with centroids estimated once and frozen (the MCMI teacher);
  3. distil the same small student from each teacher with Hinton KD, from the MCMI
     teacher also with KD + MIMKD (mutual information between penultimate features),
     and train it without a teacher, in three regimes: full data, few-shot (5% of the
     student's training set) and zero-shot (one class removed from the student's
     training set; the accuracy on that class is reported);
  4. measure, for the full-data KD students, the PID of the label information in
     teacher and student features: what the student holds of it redundantly with the
     teacher, and what is still unique to the teacher (bits; all 1797 digits, 8 PCA
     components, 5 k-means clusters per representation).
Prints a table (mean +- std over seeds) and saves a PNG plot.

    python examples/digits_demo.py                 # 5 seeds, about a minute on 2 cores
    python examples/digits_demo.py --seeds 2 --lam 0.5 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import mcmi_torch
from mcmi_torch.metrics import teacher_report
from mcmi_torch.mimkd import MIMKDLoss
from mcmi_torch.pid import representation_pid

NUM_CLASSES = 10


class MLP(nn.Module):
    """Hidden layers (Linear, BatchNorm, ReLU) then a linear head; ``features``
    gives the penultimate representation (used by MIMKD and the PID)."""

    def __init__(self, hidden: list[int]):
        super().__init__()
        layers, width = [], 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, NUM_CLASSES)
        self.width = width

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def load_split(seed: int):
    """Stratified 2/3 train, 1/3 test split of the 1797 digits, pixels in [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = (2 * len(idx)) // 3
        train.append(idx[:cut])
        test.append(idx[cut:])
    train, test = torch.cat(train), torch.cat(test)
    return (x[train], y[train]), (x[test], y[test])


def loader(x, y, *, shuffle: bool, seed: int = 0, batch_size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def train(model, data, step_loss, *, epochs, lr, seed, extra=None):
    """SGD (momentum 0.9, wd 5e-4), cosine schedule, batch 64; ``step_loss(model, x, y)``
    gives each step's loss; ``extra`` is a module trained alongside (MIMKD critics)."""
    params = list(model.parameters()) + (list(extra.parameters()) if extra else [])
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    batches = loader(*data, shuffle=True, seed=seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches:
            loss = step_loss(model, xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def plain(criterion):
    return lambda model, x, y: criterion(model(x), y)


def distil(teacher, kd, mimkd=None, beta=0.1):
    """Hinton KD from ``teacher``, plus ``beta`` times the MIMKD loss on the
    penultimate features when ``mimkd`` is given."""

    def step(student, x, y):
        with torch.no_grad():
            t_feat = teacher.features(x)
            t_logits = teacher.head(t_feat)
        s_feat = student.features(x)
        loss = kd(student.head(s_feat), y, t_logits)
        if mimkd is not None:
            loss = loss + beta * mimkd([s_feat], [t_feat])
        return loss

    return step


def hinton_kd(temperature: float = 4.0, alpha: float = 0.9):
    """Hinton et al. (2015): alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE."""

    def loss(s_logits, target, t_logits):
        kd = F.kl_div(
            F.log_softmax(s_logits / temperature, 1),
            F.log_softmax(t_logits / temperature, 1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * temperature**2 * kd + (1 - alpha) * F.cross_entropy(s_logits, target)

    return loss


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() if len(y) else float("nan")


SOURCES = {
    "none": "no teacher (CE only)",
    "CE": "CE teacher, KD",
    "MCMI": "MCMI teacher, KD",
    "MCMI+MIMKD": "MCMI teacher, KD + MIMKD",
}


def run_seed(seed: int, args) -> dict:
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = load_split(seed)
    train_data = (xtr, ytr)

    teacher = train(
        MLP([256, 256]),
        train_data,
        plain(F.cross_entropy),
        epochs=args.teacher_epochs,
        lr=0.1,
        seed=seed,
    )
    eval_loader = loader(xtr, ytr, shuffle=False)
    q = mcmi_torch.estimate_centroids(
        teacher, eval_loader, NUM_CLASSES, temperature=args.temperature, progress=False
    )

    teachers = {}
    for name, lam in (("CE", 0.0), ("MCMI", args.lam)):
        t = copy.deepcopy(teacher)
        criterion = mcmi_torch.MCMILoss(lam=lam, centroids=q, temperature=args.temperature)
        torch.manual_seed(seed + 1)
        teachers[name] = train(t, train_data, plain(criterion), epochs=20, lr=0.05, seed=seed + 1)

    g = torch.Generator().manual_seed(seed + 2)
    few = torch.randperm(len(ytr), generator=g)[: max(NUM_CLASSES, round(0.05 * len(ytr)))]
    omitted = seed % NUM_CLASSES
    keep = ytr != omitted
    regimes = {
        "full": (xtr, ytr),
        "few-shot": (xtr[few], ytr[few]),
        "zero-shot": (xtr[keep], ytr[keep]),
    }

    result = {"seed": seed, "omitted_class": omitted, "teachers": {}, "students": {}, "pid": {}}
    for name, t in teachers.items():
        rep = teacher_report(t, loader(xte, yte, shuffle=False), NUM_CLASSES, progress=False)
        result["teachers"][name] = {"accuracy": rep.accuracy, "cmi": rep.cmi, "ncmi": rep.ncmi}
    x_all, y_all = torch.cat([xtr, xte]), torch.cat([ytr, yte])
    for source in SOURCES:
        for regime, data in regimes.items():
            torch.manual_seed(seed + 3)
            student = MLP([args.student_width])
            mimkd = None
            if source == "none":
                step = plain(F.cross_entropy)
            else:
                teacher_model = teachers[source.split("+")[0]]
                if source.endswith("MIMKD"):
                    mimkd = MIMKDLoss(
                        [student.width], [teacher_model.width], proj_dim=32, hidden=64
                    )
                step = distil(teacher_model, hinton_kd(), mimkd, beta=args.mimkd_beta)
            fit = train(
                student, data, step, epochs=args.student_epochs, lr=0.05, seed=seed, extra=mimkd
            )
            if regime == "zero-shot":
                acc = accuracy(fit, xte[yte == omitted], yte[yte == omitted])
            else:
                acc = accuracy(fit, xte, yte)
            result["students"][f"{source}/{regime}"] = acc
            if regime == "full" and source != "none":
                with torch.no_grad():
                    pid = representation_pid(
                        teacher_model.features(x_all),
                        fit.features(x_all),
                        y_all,
                        n_components=8,
                        n_clusters=5,
                        seed=seed,
                    )
                result["pid"][source] = {
                    "redundant": pid.redundant,
                    "unique_teacher": pid.unique_teacher,
                }
    return result


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:5.1f} +- {100 * s:4.1f}"


def summarize(results: list[dict]) -> str:
    rows = [
        "| student of | teacher acc (%) | teacher CMI | student full (%) | few-shot 5% (%) "
        "| zero-shot, omitted class (%) | PID red / uni teacher (bits) |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, label in SOURCES.items():
        teacher = source.split("+")[0]
        if teacher == "none":
            t_acc = t_cmi = "-"
        else:
            t_acc = mean_std([r["teachers"][teacher]["accuracy"] for r in results])
            cmis = [r["teachers"][teacher]["cmi"] for r in results]
            spread = statistics.stdev(cmis) if len(cmis) > 1 else 0.0
            t_cmi = f"{statistics.fmean(cmis):.3f} +- {spread:.3f}"
        cells = [
            mean_std([r["students"][f"{source}/{regime}"] for r in results])
            for regime in ("full", "few-shot", "zero-shot")
        ]
        if source in results[0]["pid"]:
            red = statistics.fmean(r["pid"][source]["redundant"] for r in results)
            uni = statistics.fmean(r["pid"][source]["unique_teacher"] for r in results)
            pid = f"{red:.2f} / {uni:.2f}"
        else:
            pid = "-"
        rows.append(f"| {label} | {t_acc} | {t_cmi} | " + " | ".join(cells) + f" | {pid} |")
    return "\n".join(rows)


def plot(results: list[dict], path: pathlib.Path, lam: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = ("full", "few-shot", "zero-shot")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.2
    for k, (source, label) in enumerate(SOURCES.items()):
        vals = [[100 * r["students"][f"{source}/{g}"] for r in results] for g in regimes]
        means = [statistics.fmean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        xs = [i + (k - 1.5) * width for i in range(len(regimes))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(regimes)))
    ax.set_xticklabels(["full data", "few-shot (5%)", "zero-shot (omitted class)"])
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"Students on sklearn digits, lam={lam}, {len(results)} seeds (mean +- std)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.2, help="weight of the CMI term")
    parser.add_argument(
        "--temperature", type=float, default=4.0, help="softmax temperature of the CMI term"
    )
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--student-epochs", type=int, default=60)
    parser.add_argument("--student-width", type=int, default=16)
    parser.add_argument("--mimkd-beta", type=float, default=0.1, help="weight of the MIMKD loss")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()

    torch.set_num_threads(1)  # these models are tiny: one thread is fastest
    start = time.perf_counter()
    results = [run_seed(seed, args) for seed in tqdm(range(args.seeds), desc="seeds")]
    elapsed = time.perf_counter() - start

    table = summarize(results)
    print(f"\nsklearn digits, {args.seeds} seeds, lam={args.lam}, {elapsed:.0f} s\n")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "digits_demo.png", args.lam)
    with open(args.out / "digits_demo.json", "w") as f:
        json.dump({"args": {**vars(args), "out": str(args.out)}, "results": results}, f, indent=1)
    print(f"\nplot: {args.out / 'digits_demo.png'}  raw results: {args.out / 'digits_demo.json'}")
    assert all(math.isfinite(r["teachers"]["MCMI"]["cmi"]) for r in results)


if __name__ == "__main__":
    main()
