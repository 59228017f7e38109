"""The RepDistiller example (checkpoint format, fine-tuning, student losses) and the
torchdistill hook, on a small model and generated data."""

import os
import pathlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mcmi_torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "repdistiller"
sys.path.insert(0, str(EXAMPLES))

import finetune_teacher  # noqa: E402
import student_losses  # noqa: E402


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
