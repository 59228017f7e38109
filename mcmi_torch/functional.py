"""Functional form of the CMI estimate and of the MCMI regularizer."""

from __future__ import annotations

from torch import Tensor

from . import _ops


def cmi(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Conditional mutual information estimate :math:`I(X; \hat Y \mid Y)`.

    For each sample ``i`` whose label is not ``ignore_index``,
    ``KL_i = KL(softmax(logits_i / T) || Q[target_i])``; the result is their
    mean (``reduction='mean'``), sum (``'sum'``) or the vector of them with 0
    at ignored rows (``'none'``). With no valid row the mean is 0.

    Args:
        logits: ``[B, C]`` float32, float64, bfloat16 or float16.
        target: ``[B]`` int64 labels in ``[0, K)`` or ``ignore_index``.
        centroids: ``[K, C]`` class centroids whose rows are probability
            vectors (e.g. from :func:`mcmi_torch.estimate_centroids`), used as
            constants; or ``None`` for in-batch centroids (the mean softmax of
            each class present in the batch, ``K = C``). Entries are clamped
            from below by :data:`mcmi_torch.CENTROID_FLOOR` before the log.
            Rows that do not sum to 1 (within 1e-3) raise an error.
        temperature: softmax temperature ``T > 0``, at least ``1 / finfo.max``
            of the compute dtype (about 2.9e-39 for float32, bfloat16 and
            float16 logits; 5.6e-309 for float64), below which ``1 / T``
            overflows: smaller values raise ``ValueError``.
        ignore_index: label value of rows to skip (an int within int64).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A 0-D tensor (or ``[B]`` for ``'none'``) in the dtype of ``logits``.
        Differentiable with respect to ``logits``, twice as well:
        ``backward(create_graph=True)`` gives a gradient autograd can
        differentiate again (a gradient penalty, a Hessian-vector product).
    """
    return _ops.loss(
        logits,
        target,
        centroids,
        ce_weight=0.0,
        cmi_weight=1.0,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def mcmi(
    logits: Tensor,
    target: Tensor,
    centroids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The MCMI regularizer, ``-cmi(...)``: a term to *minimize*, so that

    ``loss = F.cross_entropy(logits, y) + lam * mcmi(logits, y, centroids=Q)``

    trains a teacher that maximizes its conditional mutual information.
    Arguments and return value as in :func:`cmi`.
    """
    return _ops.loss(
        logits,
        target,
        centroids,
        ce_weight=0.0,
        cmi_weight=-1.0,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
    )
