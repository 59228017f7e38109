"""Dataset-level teacher metrics: accuracy, CMI, separation, NCMI and calibration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._args import CENTROID_FLOOR, check_int, class_means
from .centroids import OutputSelector, model_device, model_outputs, split_batch
from .distributed import all_reduce_sum
from .functional import class_sums

#: Maps a batch's inputs (as the loader yields them) to ``[B, C]`` reference
#: class probabilities, e.g. the Bayes posterior ``p*(y | x)`` of a known
#: generative model.
Posterior = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TeacherReport:
    """Metrics of a model over a dataset (docs/math.md, "Dataset-level teacher metrics").

    All probabilities are ``P = softmax(logits / T)`` at the report's temperature.

    Attributes:
        accuracy: fraction of samples whose arg-max class is the label.
        cmi: ``I(X; Y_hat | Y)`` estimate: mean KL between each sample's
            softmax and its class centroid (centroids from the same data).
        separation: Gamma, the mean cross-entropy ``-sum_k P_ik log P_jk``
            over ordered pairs of samples from different classes.
        ncmi: ``cmi / separation``.
        samples: number of samples seen.
        nll: mean negative log-likelihood of the labels, ``-log P_iy``.
        ece: expected calibration error: samples binned by confidence
            ``max_j P_ij`` into equal-width bins, the sample-weighted mean
            over bins of ``|accuracy - mean confidence|``.
        kl_to_reference: with a reference posterior ``p*``, the mean of
            ``KL(p*_i || P_i) = sum_j p*_ij (log p*_ij - log P_ij)``
            (``0 log 0 = 0``); ``None`` without one.
        reference_agreement: with a reference posterior, the fraction of
            samples where the arg-max of ``P`` is the arg-max of ``p*`` (for
            a Bayes posterior: agreement with the Bayes decision); ``None``
            without one.
    """

    accuracy: float
    cmi: float
    separation: float
    ncmi: float
    samples: int
    nll: float
    ece: float
    kl_to_reference: float | None = None
    reference_agreement: float | None = None


def report_from_sums(
    prob_sums: Tensor,
    log_sums: Tensor,
    counts: Tensor,
    totals: Tensor,
    gaps: Tensor,
    reference: Tensor | None = None,
) -> TeacherReport:
    """The metrics from per-class sums S_c (softmax rows), L_c (log-softmax
    rows) and counts n_c; ``totals`` = (sum of P log P, number correct, sum of
    -log P_iy); ``bins`` = ``[2, bins]`` per-bin sample counts and sums of
    (correct - confidence); ``reference`` = (sum of KL to the reference, number
    agreeing with its arg-max) or None. All in O(K C + bins), with no pass over
    pairs of samples."""
    prob_sums, log_sums, counts = prob_sums.double(), log_sums.double(), counts.double()
    n = counts.sum().item()
    if n == 0:
        raise ValueError("no sample to report on")
    neg_entropy, correct, nll = totals.double().tolist()
    present = counts > 0
    centroids = class_means(prob_sums, counts)[present]
    cross = (prob_sums[present] * centroids.clamp_min(CENTROID_FLOOR).log()).sum().item()
    cmi = (neg_entropy - cross) / n
    pairs = n * n - (counts * counts).sum().item()
    if pairs > 0:
        between = (prob_sums.sum(0) * log_sums.sum(0)).sum() - (prob_sums * log_sums).sum()
        separation = -between.item() / pairs
    else:
        separation = float("nan")
    kl = agreement = None
    if reference is not None:
        kl, agreement = (v / n for v in reference.double().tolist())
    return TeacherReport(
        accuracy=correct / n,
        cmi=cmi,
        separation=separation,
        ncmi=cmi / separation if pairs > 0 else float("nan"),
        samples=int(n),
        nll=nll / n,
        ece=gaps.double().abs().sum().item() / n,
        kl_to_reference=kl,
        reference_agreement=agreement,
    )


class _TappedLoader:
    """Iterates ``loader`` unchanged, keeping the reference posterior of the
    inputs of the batch it yielded last (``latest``), checked to be ``[B, C]``
    for a batch of ``B`` targets and made a tensor."""

    def __init__(self, loader: Iterable, posterior: Posterior):
        self.loader, self.posterior, self.latest = loader, posterior, None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            inputs, targets = split_batch(batch)
            self.latest = _posterior_rows(self.posterior(inputs), targets.shape[0])
            yield batch


def _posterior_rows(given, rows: int) -> Tensor:
    """What ``posterior`` returned for a batch of ``rows`` samples, as a
    tensor: a tensor, a numpy array or a nested list of ``[rows, C]``
    probabilities."""
    if not isinstance(given, Tensor):
        try:
            given = torch.as_tensor(given)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"posterior must return [B, C] probabilities (a tensor, numpy array or nested "
                f"list), got {type(given).__name__}"
            ) from None
    if given.dim() != 2 or given.shape[0] != rows:
        raise ValueError(
            f"posterior must return [B, C] probabilities for a batch of B = {rows} samples, "
            f"got shape {tuple(given.shape)}"
        )
    if given.is_complex():
        raise TypeError(f"posterior must return real probabilities, got {given.dtype}")
    return given


def reference_sums(logp: Tensor, posterior: Tensor) -> Tensor:
    """(sum of KL(p* || P), number of arg-max agreements) over a batch, from
    float64 log-probabilities ``logp`` and reference probabilities ``[B, C]``."""
    if posterior.shape != logp.shape:
        raise ValueError(
            f"posterior gave shape {tuple(posterior.shape)} for logits of shape "
            f"{tuple(logp.shape)}: it must return [B, C] probabilities, C the model's classes"
        )
    p = posterior.to(logp.device, torch.float64)
    if not (torch.isfinite(p).all() and (p >= 0).all()):
        raise ValueError("posterior gave negative or non-finite probabilities")
    if ((p.sum(1) - 1).abs() > 1e-4).any():
        raise ValueError("posterior's rows must sum to 1 (to 1e-4)")
    kl = torch.special.xlogy(p, p).sum() - torch.where(p > 0, p * logp, 0.0).sum()
    agree = (logp.argmax(1) == p.argmax(1)).sum().double()
    return torch.stack([kl, agree])


def _batch_sums(logits, targets, k, temperature, ignore_index, ece_bins):
    """The sums :func:`report_from_sums` takes over one batch's valid rows,
    and their float64 log-probabilities."""
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    s, c = class_sums(logits, targets, k, **kw)
    lsum, _ = class_sums(logits, targets, k, log_probs=True, **kw)
    keep = targets != ignore_index
    targets = targets[keep]
    # Labels are checked against num_classes by class_sums; with more classes
    # than logit columns, against the columns too (no NLL for a label without one).
    if k > logits.shape[1] and targets.numel() and targets.max().item() >= logits.shape[1]:
        raise ValueError(
            f"targets hold label {targets.max().item()} but the model gives {logits.shape[1]} "
            f"logit columns: teacher_report needs labels below the number of columns "
            f"(num_classes={k})"
        )
    logp = torch.log_softmax(logits[keep].double() / temperature, dim=1)
    confidence, predicted = logp.max(1)
    confidence = confidence.exp()
    hit = (predicted == targets).double()
    prob = logp.exp()
    # 0 log 0 = 0: a class of probability 0 (a -inf logit) adds nothing.
    neg_entropy = torch.where(prob > 0, prob * logp, 0.0).sum()
    extra = torch.stack([neg_entropy, hit.sum(), -logp.gather(1, targets.view(-1, 1)).sum()])
    which = (confidence * ece_bins).ceil().long().sub(1).clamp(0, ece_bins - 1)
    gaps = torch.zeros(ece_bins, dtype=torch.float64, device=logp.device)
    gaps.index_add_(0, which, hit - confidence)
    return [s.double(), lsum.double(), c, extra, gaps], logp


@torch.no_grad()
def teacher_report(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    progress: bool = True,
    output: OutputSelector = None,
    posterior: Posterior | None = None,
    ece_bins: int = 15,
) -> TeacherReport:
    """Accuracy, CMI, separation, NCMI, NLL and calibration of ``model`` over
    ``loader``, and its distance to a reference posterior if one is given.

    One pass in eval mode (every submodule's own mode is restored afterwards,
    also when the pass raises), linear in the
    number of samples: per-class sums of softmax and log-softmax rows through
    the class-sum kernel, the rest accumulated in float64. With
    ``torch.distributed`` initialized, sums from all ranks are added, so every
    rank reports on the whole data.

    Samples labelled ``ignore_index`` are left out of every metric (the
    class sums, the entropy term, the accuracy, NLL, ECE, the reference
    fields and ``samples``), as the losses leave them out. ``output`` picks
    the logits from a model that returns more (a tuple, a dict): an index, a
    key or a callable, as in :func:`mcmi_torch.estimate_centroids`.

    ``posterior`` maps each batch's inputs (as the loader yields them) to
    ``[B, C]`` reference probabilities (a tensor, numpy array or nested list;
    rows summing to 1, checked to 1e-4), such as the Bayes
    posterior of synthetic data; the report then gives the mean
    ``KL(p* || P)`` and the agreement of the arg-maxes. ``ece_bins``: the
    number of equal-width confidence bins of the ECE (bin ``b`` holds
    confidences in ``((b - 1) / bins, b / bins]``, the first also 0).
    """
    ece_bins = check_int("ece_bins", ece_bins, minimum=1)
    device = torch.device(device) if device is not None else model_device(model)
    ignore_index = check_int("ignore_index", ignore_index)
    k = num_classes
    tapped = _TappedLoader(loader, posterior) if posterior is not None else None
    totals = None
    outputs = model_outputs(
        model,
        tapped if tapped is not None else loader,
        device,
        desc="teacher report",
        progress=progress,
        output=output,
    )
    with contextlib.closing(outputs):
        for logits, targets in outputs:
            step, logp = _batch_sums(logits, targets, k, temperature, ignore_index, ece_bins)
            if tapped is not None:
                keep = (targets != ignore_index).to(tapped.latest.device)
                step.append(reference_sums(logp, tapped.latest[keep]))
            totals = step if totals is None else [a + b for a, b in zip(totals, step)]
    if totals is None:
        raise ValueError("the loader yielded no batch")
    return report_from_sums(*all_reduce_sum(*totals))
