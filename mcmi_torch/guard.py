"""Collapse guard for MCMI fine-tuning, and a safe choice of ``lam``.

The CMI term rewards a prediction by at most ``-log min_j Q_yj`` (docs/math.md,
"Collapse"), a bound that peaked centroids make large. Past a certain ``lam`` the
cheapest way to lower ``CE - lam * CMI`` is to move predictions off their label,
and a fine-tune can slide to chance accuracy. :class:`CollapseGuard` watches the
training-batch accuracy and warns once when it falls towards chance;
:func:`suggest_lambda` gives the largest ``lam`` for which leaving the label never
pays.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import torch
from torch import Tensor

from ._args import CENTROID_FLOOR, check_int
from ._modes import check_centroids
from ._ops import unwrapped


class CollapseWarning(UserWarning):
    """An MCMI fine-tune is losing the labels: ``lam`` is likely too large."""


@torch.no_grad()
def suggest_lambda(centroids: Tensor) -> float:
    """The largest ``lam`` for which no sample gains by leaving its label.

    For a sample of class ``y`` the CMI term is at most
    ``L_y = -log min_j Q_yj``, and it is ``-log Q_yy`` at the one-hot label.
    A prediction with at most half its mass on the label costs CE at least
    ``log 2``, so it never has a lower ``CE - lam * KL`` than the one-hot
    label while ``lam * (L_y + log Q_yy) < log 2``. This returns
    ``log 2 / max_y log(Q_yy / min_j Q_yj)`` (entries clamped at
    ``CENTROID_FLOOR``): a sufficient condition, so conservative. Larger
    values do not always collapse (fine-tuning starts at the label and may
    stay near it), but nothing then rules it out: watch the accuracy
    (``MCMILoss`` warns, see :class:`CollapseGuard`).

    Args:
        centroids: ``[K, K]`` class centroids (rows are probability vectors,
            row ``c`` of class ``c``), e.g. from ``estimate_centroids``;
            validated as ``MCMILoss`` validates them (finite, non-negative,
            rows summing to 1 within 1e-3; then renormalized).

    Returns:
        The bound as a float (``inf`` when every row is uniform).
    """
    centroids = check_centroids(centroids)
    if centroids.shape[0] != centroids.shape[1]:
        raise ValueError(
            f"centroids must be square [num_classes, num_classes], got {tuple(centroids.shape)}"
        )
    log_q = centroids.double().clamp_min(CENTROID_FLOOR).log()
    spread = (log_q.diagonal() - log_q.min(dim=1).values).max().item()
    return math.log(2) / spread if spread > 0 else math.inf


class _HostCounts:
    """``[hits, rows]`` of one check, readable on the host once :meth:`ready`:
    at once for CPU tensors; for a device, through a non-blocking copy and an
    event, so that no one waits for the device to finish."""

    def __init__(self, counts: Tensor) -> None:
        if counts.device.type == "cpu":
            self.host, self.event = counts, None
        else:
            self.host = torch.empty_like(counts, device="cpu", pin_memory=True)
            self.host.copy_(counts, non_blocking=True)
            # After the copy, on the stream it runs on (that of the counts'
            # device, which need not be the current device).
            self.event = torch.Event(device=counts.device)
            self.event.record(torch.accelerator.current_stream(counts.device))

    def ready(self) -> bool:
        return self.event is None or self.event.query()


def _observable(logits: Tensor | None) -> bool:
    """Whether a batch's accuracy can be kept: not batched by vmap (None),
    not on meta tensors (no values), not during CUDA graph capture (no copy
    then)."""
    if logits is None or logits.is_meta:
        return False
    return not (logits.is_cuda and torch.cuda.is_current_stream_capturing())


class CollapseGuard:
    """Warns once when the training-batch accuracy of an MCMI fine-tune falls
    from well above chance towards chance.

    :meth:`observe` is called with every training batch and its ``lam``; on the
    first call and every ``every``-th after it, it counts the batch's correct
    and valid rows on the batch's device and reads the counts once they are on
    the host: at once on the CPU; on a GPU through a non-blocking copy that a
    later call picks up when it has arrived, so the guard never waits for the
    device (no sync; a warning may come a few calls late). From the counts it
    keeps a running mean ``a`` (the mean of the last two checks) and the best
    ``a`` seen. It is armed once the best is well above chance (``1 / C`` for
    ``C`` logit columns): by at least a fifth of the way from chance to 1, and
    by four standard errors of a chance-level mean over the rows seen (so a
    model that never learned, trained on random labels say, does not arm it by
    luck). Armed, it issues a :class:`CollapseWarning` when ``a`` falls below
    the midpoint of the best and chance. The calls in between only count.
    Batches it cannot read are counted but not checked: meta tensors, calls
    inside ``torch.func.vmap`` (``grad`` and ``jvp`` are fine), under
    ``torch.compile`` and during CUDA graph capture. ``fired`` records whether
    it warned. Its state (``armed``, ``best``, ``fired``) lives on the
    object, not in a criterion's ``state_dict``: a criterion rebuilt from a
    checkpoint starts with a fresh, unarmed guard (``copy.deepcopy`` and
    pickling a whole criterion keep it).

    Args:
        every: check one batch in this many (an int >= 1).
    """

    def __init__(self, every: int = 20) -> None:
        self.every = every
        self.calls = 0
        self.last = None
        self.last_count = 0
        self.best = 0.0
        self.armed = False
        self.fired = False
        self._pending: deque[tuple[_HostCounts, int, float]] = deque()

    @property
    def every(self) -> int:
        """Check one batch in this many; an int >= 1, checked when set."""
        return self._every

    @every.setter
    def every(self, value: int) -> None:
        self._every = check_int("every", value, minimum=1)

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy``, ``torch.save`` of a
        criterion) leave out the checks still in flight: a device event
        cannot be copied."""
        return {**self.__dict__, "_pending": deque()}

    def observe(self, logits: Tensor, target: Tensor, ignore_index: int, lam: float) -> None:
        """Counts a batch; on the first and every ``every``-th one after it,
        counts its accuracy (``lam`` is quoted in the warning), and takes in
        the counts of earlier checks that have reached the host."""
        self.calls += 1
        if not self.fired and (self.calls - 1) % self.every == 0:
            self._count(logits, target, ignore_index, lam)
        while self._pending and self._pending[0][0].ready():
            counts, classes, lam_then = self._pending.popleft()
            hits, count = counts.host.tolist()
            if not self.fired and count:
                self._check(hits / count, count, classes, lam_then)

    def _count(self, logits: Tensor, target: Tensor, ignore_index: int, lam: float) -> None:
        # Inside torch.func.grad / jvp the values are those of the wrapped tensors.
        logits, target = unwrapped(logits.detach()), unwrapped(target)
        if not _observable(logits) or target is None:
            return
        valid = target != ignore_index
        hits = (logits.argmax(dim=1) == target) & valid
        counts = torch.stack([hits.sum(), valid.sum()])
        self._pending.append((_HostCounts(counts), logits.shape[1], lam))

    def _check(self, acc: float, count: int, classes: int, lam: float) -> None:
        if self.last is None:
            mean, rows = acc, count
        else:
            mean, rows = 0.5 * (acc + self.last), count + self.last_count
        self.last, self.last_count = acc, count
        chance = 1.0 / classes
        self.best = max(self.best, mean)
        noise = math.sqrt(chance * (1.0 - chance) / rows)
        self.armed = self.armed or mean - chance >= max(0.2 * (1.0 - chance), 4.0 * noise)
        if self.armed and mean < 0.5 * (self.best + chance):
            self.fired = True
            self._pending.clear()
            warnings.warn(
                f"MCMI fine-tune collapsing: training-batch accuracy fell from {self.best:.2f} "
                f"to {mean:.2f} (chance {chance:.2f}) with lam={lam:g}. The CMI term pays "
                "more for leaving the label than CE charges; lower lam, e.g. towards "
                "mcmi_torch.suggest_lambda(centroids) (docs/math.md, 'Collapse').",
                CollapseWarning,
                stacklevel=3,
            )
