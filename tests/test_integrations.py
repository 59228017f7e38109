"""The integrations say what to install when their framework is missing."""

import importlib
import sys

import pytest


def test_torchdistill_missing(monkeypatch):
    for name in ("torchdistill", "torchdistill.losses", "torchdistill.losses.registry"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "mcmi_torch.integrations.torchdistill", raising=False)
    with pytest.raises(ImportError, match="pip install torchdistill"):
        importlib.import_module("mcmi_torch.integrations.torchdistill")


def test_mdistiller_missing(monkeypatch):
    for name in ("mdistiller", "mdistiller.distillers", "mdistiller.distillers._base"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "mcmi_torch.integrations.mdistiller", raising=False)
    with pytest.raises(ImportError, match=r"setup\.py develop"):
        importlib.import_module("mcmi_torch.integrations.mdistiller")
