"""Focal and Dice losses for binary segmentation that skip pixels marked ``IGNORE``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emseg import IGNORE


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float | None = None) -> torch.Tensor:
    """Mean focal loss over annotated pixels; ``target`` holds 0/1/IGNORE."""
    valid = (target != IGNORE).to(logits.dtype)
    t = (target == 1).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = torch.exp(-bce)  # probability given to the true class
    loss = (1 - p_t) ** gamma * bce
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice over the whole batch, annotated pixels only."""
    valid = (target != IGNORE).to(logits.dtype)
    p = torch.sigmoid(logits) * valid
    t = (target == 1).to(logits.dtype) * valid
    inter = (p * t).sum()
    return 1 - (2 * inter + smooth) / (p.sum() + t.sum() + smooth)


def segmentation_loss(logits, target, focal_weight=1.0, dice_weight=1.0, gamma=2.0, alpha=None) -> torch.Tensor:
    return focal_weight * focal_loss(logits, target, gamma, alpha) + dice_weight * dice_loss(logits, target)


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     confidence: float = 0.5) -> torch.Tensor:
    """Mean squared difference of the two foreground probabilities over every pixel (mean teacher's
    consistency); pixels where the teacher is less sure than ``confidence`` (max(p, 1 - p)) add 0.
    The teacher's side is a target: no gradient flows into it."""
    p_t = torch.sigmoid(teacher_logits.detach())
    sq = (torch.sigmoid(student_logits) - p_t) ** 2
    if confidence > 0.5:
        sq = sq * (torch.maximum(p_t, 1 - p_t) >= confidence).to(sq.dtype)
    return sq.mean()
