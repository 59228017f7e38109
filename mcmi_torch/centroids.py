"""Dataset-level class centroids of a model: the fixed ``Q`` of the MCMI recipe."""

from __future__ import annotations

import contextlib
import copy
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


def split_batch(batch) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` from a loader batch: a pair, or a longer tuple
    whose first two entries are those (RepDistiller's instance loaders yield
    ``(img, target, index)``). The inputs are as the loader gives them (a
    tensor, or a dict, list or tuple of them); the targets ``[B]`` class
    indices of any integer dtype, as a tensor, a list or a numpy array (made
    an int64 tensor)."""
    if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
        got = type(batch).__name__
        raise TypeError(f"each batch must be an (inputs, targets, ...) tuple or list, got {got}")
    inputs, targets = batch[0], batch[1]
    if targets is not None and not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):
            targets = None
    if targets is None or targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"each batch's targets must be a tensor of class indices (or a list or numpy "
            f"array of them), got {type(batch[1]).__name__}"
            + (f" of {targets.dtype}" if targets is not None else "")
        )
    if targets.dim() != 1:
        raise ValueError(
            f"each batch's targets must be 1-D [B] class indices, got shape {list(targets.shape)}"
        )
    return inputs, targets.long()


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` on ``device``: a tensor moved, the tensors in a dict, list
    or tuple moved (nested too; a dict subclass such as ``defaultdict`` and a
    named tuple keep their type), anything else as it is."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        moved = copy.copy(inputs)
        moved.update((key, to_device(value, device)) for key, value in inputs.items())
        return moved
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(to_device(value, device) for value in inputs))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(value, device) for value in inputs)
    return inputs


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
    the model in train or eval mode and a tqdm progress bar; the logits picked
    from the model's output by ``output`` (:func:`select_logits`); the batch's
    inputs (:func:`split_batch`) passed to the model as one argument, on
    ``device``. Every submodule's own mode is restored when the generator
    ends or is closed: use it under ``contextlib.closing`` so that an error
    in the loop restores it at once. Call it under ``torch.no_grad()``."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(train_mode)
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            inputs, targets = split_batch(batch)
            yield select_logits(model(to_device(inputs, device)), output), targets.to(device)
    finally:
        model.train(modes[0][1])
        for module, training in modes:
            module.training = training


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
    this updates batch-norm running statistics). Afterwards every submodule
    is back in its own mode (a batch-norm the model kept in eval stays so),
    also when the pass raises.

    Args:
        model: maps a batch of inputs to ``[B, C]`` logits.
        loader: yields ``(inputs, targets, ...)`` batches (any iterable, a
            generator too); inputs a tensor, or a dict, list or tuple of
            tensors, passed to the model as one argument; targets a tensor
            of class indices, or a list or numpy array of them.
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
    with contextlib.closing(outputs):
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
