"""Student losses for distilling from an MCMI teacher, written from their papers.

- ``kd_loss``: Hinton, Vinyals, Dean (2015), "Distilling the knowledge in a neural network":
  ``T^2 KL(softmax(t / T) || softmax(s / T))``, usually mixed with CE on the labels.
- ``dkd_loss``: Zhao, Cui, Song, Qiu, Liang (CVPR 2022), "Decoupled knowledge distillation":
  KD split into a target-class term (TCKD, a binary KL between the target probability and the
  rest) and a non-target term (NCKD, a KL between the distributions over the non-target classes),
  weighted ``alpha * TCKD + beta * NCKD`` (mdistiller's defaults: alpha 1, beta 8, T 4, with a
  linear warm-up of the DKD term over the first 20 epochs).
- CRD (Tian, Krishnan, Isola, ICLR 2020) needs a memory bank of features over the dataset; use
  RepDistiller's own ``crd.criterion.CRDLoss`` with ``train_student.py --distill crd`` and point
  ``--path_t`` at the checkpoint ``finetune_teacher.py`` wrote: nothing in CRD depends on how the
  teacher was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(p_t^T || p_s^T)``, averaged over the batch."""
    return temperature**2 * F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )


def _binary_kl(p_t: Tensor, p_s: Tensor) -> Tensor:
    """KL between Bernoulli(p_t) and Bernoulli(p_s), per row."""
    eps = torch.finfo(p_s.dtype).tiny
    return p_t * (torch.log(p_t + eps) - torch.log(p_s + eps)) + (1 - p_t) * (
        torch.log(1 - p_t + eps) - torch.log(1 - p_s + eps)
    )


def dkd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``, each scaled by ``T^2``, batch mean."""
    t = temperature
    gt = F.one_hot(target, student.shape[1]).bool()
    p_s = F.softmax(student / t, dim=1)
    p_t = F.softmax(teacher / t, dim=1)
    tckd = _binary_kl(p_t[gt], p_s[gt]).mean()
    # Distributions over the non-target classes: mask the target logit out.
    masked_s = (student / t).masked_fill(gt, float("-inf"))
    masked_t = (teacher / t).masked_fill(gt, float("-inf"))
    log_q_s = F.log_softmax(masked_s, dim=1).masked_fill(gt, 0.0)
    log_q_t = F.log_softmax(masked_t, dim=1).masked_fill(gt, 0.0)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean()
    return t * t * (alpha * tckd + beta * nckd)
