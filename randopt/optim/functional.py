"""The one AdamW update rule every randopt optimizer uses, as functions over fp32 tensors.

Storage of the moments (fp32, bf16, 8-bit) is a separate concern (``state.py``): callers read the
moments into fp32 working tensors, call these functions, and write them back.
"""
from __future__ import annotations

import math

import torch


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Clear errors for the hyper-parameters every AdamW variant shares."""
    if not isinstance(lr, (int, float, torch.Tensor)) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def update_moments_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    beta1: float, beta2: float) -> None:
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> torch.Tensor:
    """Bias-corrected ``m_hat / (sqrt(v_hat) + eps)`` after ``step`` updates of the moments (step >= 1)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return (exp_avg / bias_correction1).div_(denom)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, as ``torch.optim.AdamW`` computes it (decoupled decay first)."""
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    update_moments_(grad, exp_avg, exp_avg_sq, beta1, beta2)
    param.add_(adam_direction(exp_avg, exp_avg_sq, step, beta1, beta2, eps), alpha=-lr)
