"""Fine-tune a RepDistiller teacher with the MCMI recipe.

Run from the root of a RepDistiller checkout (github.com/HobbitLong/RepDistiller):

    python /path/to/finetune_teacher.py \
        --path_t save/models/resnet56_cifar100_lr_0.05_decay_0.0005_trial_0/resnet56_best.pth \
        --lam 0.25

It loads the teacher checkpoint (``{'model': state_dict, ...}``), estimates one centroid per
class over the training set (eval mode, see ``mcmi_torch.estimate_centroids``), freezes them,
and fine-tunes for 20 epochs on ``CE - lam * CMI`` with the MCMI authors' settings: SGD,
lr 0.05 (0.005 for MobileNetV2 / ShuffleV1 / ShuffleV2), momentum 0.9, weight decay 5e-4,
cosine schedule, batch 64. Checkpoints go to

    save/models/{model}_{dataset}_mcmi_lam_{lam}_trial_{trial}/{model}_best.pth  (and _last.pth)

a folder name whose first segment(s) ``train_student.py`` parses as the teacher's architecture.
They hold ``epoch, model, best_acc, optimizer`` like RepDistiller's own, tensors on the CPU, plus
``lam``, ``centroids`` and ``opt`` as a plain dict (no pickled Namespace), so both
``train_student.py --path_t ...`` and ``torch.load(path, weights_only=True)`` load them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

import mcmi_torch

SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def teacher_name(path: str) -> str:
    """The architecture name RepDistiller's train_student.py reads from a checkpoint path."""
    segments = os.path.basename(os.path.dirname(path)).split("_")
    return "_".join(segments[:3]) if segments[0] == "wrn" else segments[0]


def save_folder(root: str, model: str, dataset: str, lam: float, trial: int) -> str:
    return os.path.join(root, f"{model}_{dataset}_mcmi_lam_{lam}_trial_{trial}")


def load_teacher(path: str, build: Callable[[], nn.Module]) -> nn.Module:
    """A model from ``build()`` with the weights of a RepDistiller checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build()
    model.load_state_dict(state["model"])
    return model


def cpu_state(obj):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_state(v) for v in obj)
    return obj


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, criterion: nn.Module, device
) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean loss; the criterion is called under no_grad, as
    RepDistiller's validate() does (an 'ema' criterion is left unchanged)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        out = model(x)
        loss_sum += criterion(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    *,
    lam: float,
    epochs: int = 20,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    folder: str,
    model_name: str,
    extra: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Estimate centroids, fine-tune on CE - lam * CMI, save best and last checkpoints.
    Returns ``{'best_acc', 'last_acc', 'centroids'}``."""
    os.makedirs(folder, exist_ok=True)
    model = model.to(device)
    centroids = mcmi_torch.estimate_centroids(
        model, train_loader, num_classes, device=device, temperature=temperature
    )
    criterion = mcmi_torch.MCMILoss(lam=lam, centroids=centroids, temperature=temperature)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best_acc = -math.inf
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in train_loader:
            x, y = batch[0].to(device), batch[1].to(device)
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        acc, val_loss = evaluate(model, val_loader, criterion, device)
        log(f"epoch {epoch}: val acc {acc:.2f}  val loss {val_loss:.4f}")
        state = {
            "epoch": epoch,
            "model": cpu_state(model.state_dict()),
            "best_acc": max(best_acc, acc),
            "optimizer": cpu_state(optimizer.state_dict()),
            "lam": lam,
            "centroids": centroids.cpu(),
            "opt": dict(extra or {}),
        }
        if acc > best_acc:
            best_acc = acc
            torch.save(state, os.path.join(folder, f"{model_name}_best.pth"))
    torch.save(state, os.path.join(folder, f"{model_name}_last.pth"))
    return {"best_acc": best_acc, "last_acc": acc, "centroids": centroids}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MCMI fine-tuning of a RepDistiller teacher")
    p.add_argument("--path_t", required=True, help="teacher checkpoint ({model}_best.pth)")
    p.add_argument("--lam", type=float, default=0.25, help="weight of the CMI term")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax T of the CMI term")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--learning_rate", type=float, default=None, help="default 0.05 (0.005 small)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--dataset", default="cifar100", choices=["cifar100"])
    p.add_argument("--model_path", default="./save/models")
    p.add_argument("-t", "--trial", type=int, default=0)
    opt = p.parse_args(argv)
    opt.model = teacher_name(opt.path_t)
    if opt.learning_rate is None:
        opt.learning_rate = 0.005 if opt.model in SMALL_LR_MODELS else 0.05
    return opt


def main(argv=None) -> None:
    opt = parse_args(argv)
    sys.path.insert(0, os.getcwd())  # RepDistiller's packages, from the checkout's root
    from dataset.cifar100 import get_cifar100_dataloaders
    from models import model_dict

    train_loader, val_loader = get_cifar100_dataloaders(
        batch_size=opt.batch_size, num_workers=opt.num_workers
    )
    model = load_teacher(opt.path_t, lambda: model_dict[opt.model](num_classes=100))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = save_folder(opt.model_path, opt.model, opt.dataset, opt.lam, opt.trial)
    result = finetune(
        model,
        train_loader,
        val_loader,
        100,
        lam=opt.lam,
        epochs=opt.epochs,
        lr=opt.learning_rate,
        momentum=opt.momentum,
        weight_decay=opt.weight_decay,
        temperature=opt.temperature,
        device=device,
        folder=folder,
        model_name=opt.model,
        extra=vars(opt),
    )
    print(
        f"best accuracy {result['best_acc']:.2f}, last {result['last_acc']:.2f}; saved in {folder}"
    )


if __name__ == "__main__":
    main()
