"""Distillation losses: a student's logits against a frozen teacher's softened predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "kl_to_teacher"]


def kl_to_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(teacher_T || student_T)`` over logits ``(B, C)`` softened by ``temperature``, batch mean."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T)``, logits (B, C)."""
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    kl = kl_to_teacher(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * (temperature * temperature) * kl
