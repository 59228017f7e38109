"""mcmi_torch.integrations.mdistiller against mdistiller's own code.

mdistiller is not on the package index: point MDISTILLER_SRC at a checkout of it
(verified at commit a08d46f10d6102bd6e3f258ca5ac880b020ea259); without it the tests skip. The
runs below go through its tools/train.py, trainer, CIFAR-100 loaders, models and DKD, on a small
generated CIFAR-100; tests/mdistiller_cpu.py makes its `.cuda()` calls no-ops (no GPU needed).
"""

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import mcmi_torch

pytest.importorskip("torchvision", reason="mdistiller's datasets need torchvision")
pytest.importorskip("yacs", reason="mdistiller's config needs yacs")
pytest.importorskip("tensorboardX", reason="mdistiller's trainer needs tensorboardX")
yaml = pytest.importorskip("yaml", reason="mdistiller's config needs PyYAML")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("MDISTILLER_SRC")
if not SOURCE or not os.path.isfile(os.path.join(SOURCE, "tools", "train.py")):
    pytest.skip("set MDISTILLER_SRC to an mdistiller checkout", allow_module_level=True)
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "mdistiller")
N_TRAIN, N_TEST, BATCH = 20, 20, 10
SMALL_RUN = {
    "SOLVER": {"EPOCHS": 1, "BATCH_SIZE": BATCH},
    "DATASET": {"NUM_WORKERS": 0, "TEST": {"BATCH_SIZE": BATCH}},
}


def write_cifar100(folder, rng):
    """CIFAR-100 in torchvision's file format, every class present in each split."""
    os.makedirs(folder)
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 100 for i in range(n)]}, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An mdistiller tree with data and a 'released' resnet56 teacher, first on sys.path."""
    root = str(tmp_path_factory.mktemp("mdistiller"))
    shutil.copytree(SOURCE, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    write_cifar100(os.path.join(root, "data", "cifar-100-python"), np.random.default_rng(0))
    sys.path.insert(0, root)
    import torchvision
    from mdistiller.models import cifar_model_dict

    net, path = cifar_model_dict["resnet56"]
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    torch.save({"model": net(num_classes=100).state_dict()}, path)
    check = torchvision.datasets.cifar.check_integrity
    torchvision.datasets.cifar.check_integrity = lambda *args: True
    yield root
    torchvision.datasets.cifar.check_integrity = check
    sys.path.remove(root)


def config(root, example, **overrides):
    """The example config with SMALL_RUN and `overrides` (nested dicts) merged in, saved."""
    with open(os.path.join(EXAMPLES, example)) as f:
        cfg = yaml.safe_load(f)
    for key, value in {**SMALL_RUN, **overrides}.items():
        for sub, v in value.items():
            if isinstance(v, dict):
                cfg.setdefault(key, {}).setdefault(sub, {}).update(v)
            else:
                cfg.setdefault(key, {})[sub] = v
    path = os.path.join(root, example)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def train(root, cfg_path):
    """`python -m mcmi_torch.integrations.mdistiller --cfg cfg_path`, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=root)
    cmd = [sys.executable, os.path.join(HERE, "mdistiller_cpu.py"), "--cfg", cfg_path]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def mdistiller_cfg(**mcmi):
    from mdistiller.engine.cfg import CFG

    from mcmi_torch.integrations.mdistiller import register

    register()
    cfg = CFG.clone()
    cfg.DISTILLER.TYPE = "MCMI"
    cfg.SOLVER.BATCH_SIZE = BATCH
    cfg.DATASET.NUM_WORKERS = 0
    for key, value in mcmi.items():
        cfg.MCMI[key] = value
    return cfg


@pytest.mark.filterwarnings("ignore:no sample of classes")  # 20 images, 100 classes
def test_mcmi_distiller_starts_from_the_teacher_with_its_centroids(root):
    from mdistiller.dataset import get_dataset
    from mdistiller.models import cifar_model_dict

    from mcmi_torch.integrations.mdistiller import MCMI, _Logits

    net, path = cifar_model_dict["resnet56"]
    teacher = net(num_classes=100)
    teacher.load_state_dict(load(path)["model"])
    student = net(num_classes=100)
    cfg = mdistiller_cfg(CENTROIDS="fixed", LAM=0.3)
    torch.manual_seed(1)
    distiller = MCMI(student, teacher, cfg)
    for (name, p), q in zip(student.state_dict().items(), teacher.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    torch.manual_seed(1)
    expected = mcmi_torch.estimate_centroids(_Logits(teacher), get_dataset(cfg)[0], 100)
    torch.testing.assert_close(distiller.criterion.centroids, expected)
    assert distiller.criterion.lam == 0.3
    assert not any(k.startswith("teacher.") for k in distiller.state_dict())

    image = torch.randn(8, 3, 32, 32)
    target = torch.arange(8)
    distiller.train()
    logits, losses = distiller(image=image, target=target, epoch=1)
    assert set(losses) == {"loss_mcmi"}
    torch.testing.assert_close(losses["loss_mcmi"], distiller.criterion(logits, target))


@pytest.mark.parametrize("centroids", ["batch", "ema"])
def test_mcmi_distiller_in_batch_and_ema_centroids(root, centroids):
    from mdistiller.models import cifar_model_dict

    from mcmi_torch.integrations.mdistiller import MCMI

    net = cifar_model_dict["resnet20"][0]
    distiller = MCMI(
        net(num_classes=100), net(num_classes=100), mdistiller_cfg(CENTROIDS=centroids)
    )
    assert distiller.criterion.mode == centroids
    assert distiller.criterion.num_classes == (100 if centroids == "ema" else None)


def test_mcmi_distiller_needs_the_teachers_architecture(root):
    from mdistiller.models import cifar_model_dict

    from mcmi_torch.integrations.mdistiller import MCMI

    student = cifar_model_dict["resnet20"][0](num_classes=100)
    teacher = cifar_model_dict["resnet56"][0](num_classes=100)
    with pytest.raises(ValueError, match="same architecture"):
        MCMI(student, teacher, mdistiller_cfg(CENTROIDS="batch"))


def test_mcmi_teacher_errors(root):
    from mcmi_torch.integrations.mdistiller import main

    vanilla = config(root, "mcmi_res56.yaml", DISTILLER={"TYPE": "NONE"})
    with pytest.raises(ValueError, match="loads no teacher"):
        main(["--cfg", vanilla, "MCMI.TEACHER", "somewhere"])
    dkd = config(root, "dkd_res56_res20_mcmi.yaml")
    with pytest.raises(FileNotFoundError, match=r"MCMI\.TEACHER"):
        main(["--cfg", dkd, "MCMI.TEACHER", os.path.join(root, "missing")])


def test_finetune_then_dkd_from_the_mcmi_teacher(root):
    """The two documented commands, through mdistiller's tools/train.py."""
    out = train(root, config(root, "mcmi_res56.yaml"))
    assert "MCMI" in out
    folder = os.path.join(root, "output", "cifar100_mcmi", "mcmi,res56")
    latest = load(os.path.join(folder, "latest"))["model"]
    q = latest["module.criterion.centroids"]
    assert q.shape == (100, 100)
    torch.testing.assert_close(q.sum(1), torch.ones(100))
    from mdistiller.models import cifar_model_dict

    mcmi_teacher = load(os.path.join(folder, "student_best"))["model"]
    cifar_model_dict["resnet56"][0](num_classes=100).load_state_dict(mcmi_teacher)
    released = load(cifar_model_dict["resnet56"][1])["model"]
    assert not torch.equal(mcmi_teacher["fc.weight"], released["fc.weight"])

    # DKD reads the MCMI teacher (the example's relative path, from mdistiller's root).
    train(root, config(root, "dkd_res56_res20_mcmi.yaml"))
    dkd = load(os.path.join(root, "output", "cifar100_mcmi", "dkd,res56_mcmi,res20", "latest"))
    for name, value in mcmi_teacher.items():
        torch.testing.assert_close(dkd["model"][f"module.teacher.{name}"], value, msg=name)
