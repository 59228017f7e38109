"""MCMI teachers in mdistiller (github.com/megvii-research/mdistiller), without editing it.

Run from the root of an mdistiller checkout installed with ``python setup.py develop``, in
place of ``python tools/train.py``, with the same arguments::

    python -m mcmi_torch.integrations.mdistiller --cfg CONFIG.yaml [KEY VALUE ...]

It registers what follows, then runs mdistiller's own ``tools/train.py``:

* the distiller ``DISTILLER.TYPE: "MCMI"`` (:class:`MCMI`): mdistiller builds it as
  ``MCMI(student, teacher, cfg)`` with ``DISTILLER.TEACHER``'s pretrained weights as the
  teacher; it fine-tunes a copy of that teacher on ``CE - lam * CMI`` (the MCMI recipe);
  ``DISTILLER.STUDENT`` must name the same architecture. Its ``student_best`` checkpoint is
  the MCMI teacher.
* the config node ``MCMI`` (defaults in :data:`CFG_DEFAULTS`): ``LAM``, ``CENTROIDS``
  (``'fixed'``, ``'batch'`` or ``'ema'``), ``TEMPERATURE``, ``MOMENTUM`` and ``TEACHER``.
* ``MCMI.TEACHER``: a checkpoint whose ``'model'`` state dict replaces ``DISTILLER.TEACHER``'s
  pretrained weights, for every ``DISTILLER.TYPE`` but ``NONE``: for DKD, KD, ... the MCMI
  teacher (that ``student_best``); for MCMI, the teacher to start from (by default mdistiller's
  released one, from ``download_ckpts/``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import torch
from torch import Tensor, nn

from ..centroids import estimate_centroids
from ..loss import MCMILoss

#: The ``MCMI`` config node's keys and defaults.
CFG_DEFAULTS = {
    "LAM": 0.25,
    "CENTROIDS": "fixed",
    "TEMPERATURE": 1.0,
    "MOMENTUM": 0.1,
    "TEACHER": "",
}

try:
    from mdistiller.distillers._base import Distiller
except ImportError as exc:
    raise ImportError(
        "mcmi_torch.integrations.mdistiller needs mdistiller: clone "
        "github.com/megvii-research/mdistiller and run `python setup.py develop` in it"
    ) from exc


class _Logits(nn.Module):
    """mdistiller's models return ``(logits, features)``: this keeps the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]


class MCMI(Distiller):
    """mdistiller distiller ``"MCMI"``: fine-tunes the pretrained ``teacher`` on
    ``CE - lam * CMI`` with :class:`mcmi_torch.MCMILoss`.

    ``student`` is a fresh model of ``DISTILLER.STUDENT``, which must be the teacher's
    architecture: it gets the teacher's weights and is the model trained. With
    ``MCMI.CENTROIDS: "fixed"`` the class centroids are estimated once from the teacher over
    mdistiller's training loader (eval mode, on the GPU if there is one) and frozen. The
    frozen teacher is not kept: the checkpoints hold the fine-tuned model and the criterion.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg) -> None:
        try:
            student.load_state_dict(teacher.state_dict())
        except RuntimeError as exc:
            raise ValueError(
                "DISTILLER.TYPE MCMI fine-tunes DISTILLER.TEACHER: DISTILLER.STUDENT must name "
                "the same architecture, but the teacher's weights do not fit the student"
            ) from exc
        super().__init__(student, nn.Identity())
        mcmi = cfg.MCMI
        centroids = mcmi.CENTROIDS
        num_classes = None
        if centroids in ("fixed", "ema"):
            from mdistiller.dataset import get_dataset

            train_loader, _, _, num_classes = get_dataset(cfg)
        if centroids == "fixed":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            centroids = estimate_centroids(
                _Logits(teacher).to(device),
                train_loader,
                num_classes,
                temperature=mcmi.TEMPERATURE,
            ).cpu()
            teacher.cpu()
        self.criterion = MCMILoss(
            lam=mcmi.LAM,
            centroids=centroids,
            num_classes=num_classes,
            temperature=mcmi.TEMPERATURE,
            momentum=mcmi.MOMENTUM,
        )

    def forward_train(self, image: Tensor, target: Tensor, **kwargs):
        logits, _ = self.student(image)
        return logits, {"loss_mcmi": self.criterion(logits, target)}


def _use_teacher_checkpoint(cfg) -> None:
    """Points ``DISTILLER.TEACHER``'s entry in mdistiller's model table at ``MCMI.TEACHER``."""
    if cfg.DATASET.TYPE == "imagenet":
        raise ValueError(
            "MCMI.TEACHER is read for cifar100 and tiny_imagenet, whose teachers mdistiller "
            "loads from a checkpoint path; its imagenet teachers come from torchvision"
        )
    from mdistiller.models import cifar_model_dict, tiny_imagenet_model_dict

    table = tiny_imagenet_model_dict if cfg.DATASET.TYPE == "tiny_imagenet" else cifar_model_dict
    name = cfg.DISTILLER.TEACHER
    if name not in table:
        raise ValueError(f"DISTILLER.TEACHER {name!r} is not in mdistiller's model table")
    if not os.path.isfile(cfg.MCMI.TEACHER):
        raise FileNotFoundError(f"MCMI.TEACHER: no checkpoint at {cfg.MCMI.TEACHER!r}")
    table[name] = (table[name][0], cfg.MCMI.TEACHER)


def register() -> None:
    """Adds ``"MCMI"`` to mdistiller's ``distiller_dict`` and the ``MCMI`` node (with
    :data:`CFG_DEFAULTS`) to its global config, so config files may use both."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG
    from yacs.config import CfgNode

    distiller_dict["MCMI"] = MCMI
    if "MCMI" not in CFG:
        CFG.MCMI = CfgNode(dict(CFG_DEFAULTS))


def train_script() -> str:
    """Path of mdistiller's ``tools/train.py`` in the checkout that ``mdistiller`` comes from."""
    import mdistiller

    root = os.path.dirname(os.path.dirname(os.path.abspath(mdistiller.__file__)))
    path = os.path.join(root, "tools", "train.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {path}: install mdistiller from its checkout (`python setup.py develop`)"
        )
    return path


def main(argv: list[str] | None = None) -> None:
    """:func:`register`, then mdistiller's ``tools/train.py`` with ``argv``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    register()
    from mdistiller.engine.cfg import CFG

    # tools/train.py's own arguments, read here too to find MCMI.TEACHER.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg", type=str, default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER)
    args, _ = parser.parse_known_args(argv)
    cfg = CFG.clone()
    cfg.merge_from_file(args.cfg)
    cfg.merge_from_list(args.opts)
    if cfg.MCMI.TEACHER:
        if cfg.DISTILLER.TYPE == "NONE":
            raise ValueError("MCMI.TEACHER is set, but DISTILLER.TYPE NONE loads no teacher")
        _use_teacher_checkpoint(cfg)
    script = train_script()
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
