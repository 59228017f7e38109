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

import torch
from torch import Tensor

from ._args import CENTROID_FLOOR


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
            row ``c`` of class ``c``), e.g. from ``estimate_centroids``.

    Returns:
        The bound as a float (``inf`` when every row is uniform).
    """
    if centroids.dim() != 2 or centroids.shape[0] != centroids.shape[1]:
        raise ValueError(
            f"centroids must be square [num_classes, num_classes], got {tuple(centroids.shape)}"
        )
    log_q = centroids.double().clamp_min(CENTROID_FLOOR).log()
    spread = (log_q.diagonal() - log_q.min(dim=1).values).max().item()
    return math.log(2) / spread if spread > 0 else math.inf


class CollapseGuard:
    """Warns once when the training-batch accuracy of an MCMI fine-tune falls
    from well above chance towards chance.

    :meth:`observe` is called with every training batch and its ``lam``; on the
    first call and every ``every``-th after it, it reads the batch accuracy (one
    device sync) and keeps a running mean ``a`` (the mean of the last two checks)
    and the best ``a`` seen. It is armed once the best is well above chance
    (``1 / C`` for ``C`` logit columns): by at least a fifth of the way from
    chance to 1, and by four standard errors of a chance-level mean over the rows
    seen (so a model that never learned, trained on random labels say, does not
    arm it by luck). Armed, it issues a :class:`CollapseWarning` when ``a`` falls
    below the midpoint of the best and chance. The calls in between only count.
    ``fired`` records whether it warned.

    Args:
        every: check one batch in this many.
    """

    def __init__(self, every: int = 20) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.calls = 0
        self.last = None
        self.last_count = 0
        self.best = 0.0
        self.armed = False
        self.fired = False

    def observe(self, logits: Tensor, target: Tensor, ignore_index: int, lam: float) -> None:
        """Counts a batch; on the first and every ``every``-th one after it,
        checks its accuracy (``lam`` is quoted in the warning)."""
        self.calls += 1
        if self.fired or (self.calls - 1) % self.every:
            return
        valid = target != ignore_index
        hits = (logits.detach().argmax(dim=1) == target) & valid
        count = valid.sum().item()
        if count == 0:
            return
        acc = hits.sum().item() / count
        if self.last is None:
            mean, rows = acc, count
        else:
            mean, rows = 0.5 * (acc + self.last), count + self.last_count
        self.last, self.last_count = acc, count
        chance = 1.0 / logits.shape[1]
        self.best = max(self.best, mean)
        noise = math.sqrt(chance * (1.0 - chance) / rows)
        self.armed = self.armed or mean - chance >= max(0.2 * (1.0 - chance), 4.0 * noise)
        if self.armed and mean < 0.5 * (self.best + chance):
            self.fired = True
            warnings.warn(
                f"MCMI fine-tune collapsing: training-batch accuracy fell from {self.best:.2f} "
                f"to {mean:.2f} (chance {chance:.2f}) with lam={lam:g}. The CMI term pays "
                "more for leaving the label than CE charges; lower lam, e.g. towards "
                "mcmi_torch.suggest_lambda(centroids) (docs/math.md, 'Collapse').",
                CollapseWarning,
                stacklevel=2,
            )
