"""Dataset-level class centroids of a model: the fixed ``Q`` of the MCMI recipe."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import all_reduce_sum
from .functional import class_sums


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def split_batch(batch) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from a loader batch: a pair, or a longer tuple
    whose first two entries are those (RepDistiller's instance loaders yield
    ``(img, target, index)``)."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("each batch must be a (inputs, targets, ...) tuple or list")


#: Picks the logits from what a model returns: an index (``1`` for
#: RepDistiller's ``(feats, logits)``, ``0`` for mdistiller's ``(logits,
#: feats)``), a key, or a callable on the output.
OutputSelector = Union[int, str, Callable[[Any], Tensor], None]


def select_logits(out: Any, output: OutputSelector) -> Tensor:
    """The logits tensor in a model's output, picked by ``output`` (see
    :data:`OutputSelector`; ``None``: the output itself)."""
    if output is None:
        if isinstance(out, Tensor):
            return out
        raise TypeError(
            f"the model returned a {type(out).__name__}, not a logits tensor: pass output= "
            "to pick the logits, an index or key (output=0 for (logits, feats) as mdistiller's "
            "models return, output=1 for (feats, logits) as RepDistiller's with is_feat=True) "
            "or a callable on the output"
        )
    if callable(output):
        picked = output(out)
    else:
        try:
            picked = out[output]
        except (IndexError, KeyError, TypeError) as error:
            raise ValueError(
                f"output={output!r} cannot pick the logits from the model's "
                f"{type(out).__name__} ({type(error).__name__}: {error}); pass an index or key "
                "of the model's output, or a callable on it"
            ) from None
    if not isinstance(picked, Tensor):
        raise TypeError(
            f"output={output!r} picked a {type(picked).__name__} from the model's "
            f"{type(out).__name__}, not a logits tensor"
        )
    return picked


def model_outputs(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    desc: str,
    progress: bool,
    train_mode: bool = False,
    output: OutputSelector = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(logits, targets)`` for each batch of ``loader``, on ``device``, with
    the model in train or eval mode (its own mode is restored afterwards) and
    a tqdm progress bar; the logits picked from the model's output by
    ``output`` (:func:`select_logits`). Call it under ``torch.no_grad()``."""
    was_training = model.training
    model.train(train_mode)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            inputs, targets = split_batch(batch)
            yield select_logits(model(inputs.to(device)), output), targets.to(device)
    finally:
        model.train(was_training)


@torch.no_grad()
def estimate_centroids(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    progress: bool = True,
    train_mode: bool = False,
    output: OutputSelector = None,
) -> Tensor:
    """Class centroids of ``model`` over ``loader``: ``Q_c`` is the mean of
    ``softmax(model(x) / T)`` over the samples of class ``c``.

    One pass over the loader, per-class sums accumulated in float64 through
    the class-sum kernel. With ``torch.distributed`` initialized the sums of
    all ranks are added, so every rank gets the centroids of the whole data.

    The model runs in **eval mode** by default: the centroids then describe
    the teacher's deterministic predictions (no dropout, batch-norm running
    statistics), the same distribution a student later distils from, and the
    pass leaves batch-norm statistics untouched. ``train_mode=True`` runs it
    in train mode as the MCMI authors' code does (batch statistics; note that
    this updates batch-norm running statistics). The model's mode is restored
    afterwards.

    Args:
        model: maps a batch of inputs to ``[B, C]`` logits.
        loader: yields ``(inputs, targets, ...)`` batches.
        num_classes: number of classes ``K``.
        device: where to run the model (default: the model's device).
        temperature: softmax temperature.
        ignore_index: label of samples to leave out (as the losses do).
        progress: show a tqdm progress bar.
        train_mode: run the model in train mode (see above).
        output: for a model that returns more than logits, what picks them:
            an index or key into its output (``output=0`` for mdistiller's
            ``(logits, feats)``, ``output=1`` for RepDistiller's ``(feats,
            logits)`` with ``is_feat=True``) or a callable on the output
            (``output=lambda out: out.logits``).

    Returns:
        ``[K, C]`` float32 centroids on ``device``, each row summing to 1.
        A class with no sample gets the uniform row, with a warning.
    """
    device = torch.device(device) if device is not None else model_device(model)
    sums = counts = None
    outputs = model_outputs(
        model,
        loader,
        device,
        desc="centroids",
        progress=progress,
        train_mode=train_mode,
        output=output,
    )
    for logits, targets in outputs:
        s, c = class_sums(
            logits, targets, num_classes, temperature=temperature, ignore_index=ignore_index
        )
        sums = s.double() if sums is None else sums + s
        counts = c if counts is None else counts + c
    if sums is None:
        raise ValueError("the loader yielded no batch")
    sums, counts = all_reduce_sum(sums, counts)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        warnings.warn(
            f"no sample of classes {missing[:10]}{'...' if len(missing) > 10 else ''}: "
            "their centroids are uniform",
            stacklevel=2,
        )
        sums[counts == 0] = 1.0
    return (sums / sums.sum(dim=1, keepdim=True)).float()
