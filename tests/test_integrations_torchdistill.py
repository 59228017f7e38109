"""The torchdistill config of docs/integrations.md, through torchdistill's own YAML loader,
dependency import, criterion builder and TrainingBox."""

import pathlib
import re

import pytest
import torch
from torch import nn

import mcmi_torch

pytest.importorskip(
    "torchdistill", reason="torchdistill is not installed (`pip install torchdistill`)"
)

from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies
from torchdistill.core.training import get_training_box
from torchdistill.losses.registry import LOW_LEVEL_LOSS_DICT, get_low_level_loss

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
CLASSES = 10


def docs_config() -> str:
    """The YAML block of the torchdistill section of docs/integrations.md."""
    section = DOCS.read_text().split("## torchdistill", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the torchdistill section should hold one YAML config"
    return blocks[0]


def test_importing_the_module_registers_both_losses():
    import mcmi_torch.integrations.torchdistill

    loss = get_low_level_loss("MCMILoss", lam=0.5, centroids="ema", num_classes=CLASSES)
    assert isinstance(loss, mcmi_torch.MCMILoss)
    assert (loss.lam, loss.mode) == (0.5, "ema")
    assert LOW_LEVEL_LOSS_DICT["MCMILossFromFile"] is mcmi_torch.integrations.mcmi_loss_from_file


def test_the_documented_config_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_path = tmp_path / "mcmi.yaml"
    config_path.write_text(docs_config())
    config = yaml_util.load_yaml_file(str(config_path))
    import_dependencies(config.get("dependencies", None))

    # The centroids file the config names, written as the docs say.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = torch.arange(32) % CLASSES
    teacher = nn.Linear(8, CLASSES)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    q = mcmi_torch.estimate_centroids(teacher, loader, CLASSES, progress=False)
    kwargs = config["train"]["criterion"]["kwargs"]["sub_terms"]["mcmi"]["criterion"]["kwargs"]
    path = pathlib.Path(kwargs["centroids_path"])
    path.parent.mkdir(parents=True)
    torch.save(q, path)

    # What the rest of a torchdistill config holds for this test's model and data.
    train_config = dict(config["train"])
    train_config.update(
        num_epochs=1,
        train_data_loader={
            "dataset_id": "train",
            "sampler": {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": None},
            "kwargs": {"batch_size": 16},
        },
        model={"forward_proc": "forward_batch_only"},
        optimizer={"key": "SGD", "kwargs": {"lr": 0.1}},
    )
    model = nn.Linear(8, CLASSES)
    model.load_state_dict(teacher.state_dict())
    box = get_training_box(
        model, {"train": loader.dataset}, train_config, torch.device("cpu"), None, False, 1
    )
    expected_criterion = mcmi_torch.MCMILoss(lam=kwargs["lam"], centroids=q)
    for sample_batch, targets, supp_dict in box.train_data_loader:
        expected = expected_criterion(model(sample_batch), targets)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        torch.testing.assert_close(loss, expected)
        before = model.weight.detach().clone()
        box.post_forward_process(loss)
        assert not torch.equal(model.weight, before)
