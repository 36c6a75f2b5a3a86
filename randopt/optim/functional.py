"""The one AdamW update rule every randopt optimizer uses, as functions over fp32 tensors.

Storage of the moments (fp32, bf16, 8-bit) is a separate concern (``state.py``): callers read the
moments into fp32 working tensors, call these functions, and write them back.

Not guarded: these functions take their tensors and numbers as given (the optimizers validate them) and work
in place; a function cannot know that it already ran, so calling ``adamw_step_`` twice applies two steps, and a
failure halfway (e.g. mismatched shapes) can leave ``param`` decayed but not stepped. The optimizers compute on
copies and commit only complete results.
"""
from __future__ import annotations

import math

import torch

from ..validation import check_options


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Clear errors for the hyper-parameters every AdamW variant shares (``randopt.validation``)."""
    check_options(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))


def update_moments_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    beta1: float, beta2: float) -> None:
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> torch.Tensor:
    """Bias-corrected ``m_hat / (sqrt(v_hat) + eps)`` after ``step`` updates of the moments (step >= 1)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)  # one m x n temporary, not two (LoRA-Pro full)
    return (exp_avg / bias_correction1).div_(denom)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, as ``torch.optim.AdamW`` computes it (decoupled decay first)."""
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    update_moments_(grad, exp_avg, exp_avg_sq, beta1, beta2)
    param.add_(adam_direction(exp_avg, exp_avg_sq, step, beta1, beta2, eps), alpha=-lr)


def clip_factor(norms: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total_norm, factor)`` of ``torch.nn.utils.clip_grad_norm_``: the 2-norm over the given per-tensor
    gradient norms and ``min(1, max_norm / (total_norm + 1e-6))``, the factor every gradient is multiplied by."""
    total = torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])) if norms else \
        torch.zeros((), dtype=torch.float64)
    return total, (max_norm / (total + 1e-6)).clamp(max=1.0)
