"""The one AdamW update rule every randopt optimizer uses, as functions over fp32 tensors.

Storage of the moments (fp32, bf16, 8-bit) is a separate concern (``state.py``): callers read the
moments into fp32 working tensors, call these functions, and encode the results back.

Out of place: the update functions return new tensors and change nothing they are given (``adam_direction``'s optional
``scratch`` is the one tensor it writes, and only where the caller hands it over). So a step computes every result
first, from state it shares with the stored one instead of copying it, and stores them only once all exist: a failure
on the way changes nothing. Not guarded: the tensors and numbers are taken as given (the optimizers validate them).
"""
from __future__ import annotations

import math

import torch

from ..validation import check_options


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Clear errors for the hyper-parameters every AdamW variant shares (``randopt.validation``)."""
    check_options(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))


def updated_moments(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float,
                    beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The moments after one update, as new tensors (the same operations as ``adamw_results``, bit-identical), for a
    caller that must keep the old ones without copying them first (LoRA-Pro full mode's moments are ``m x n``)."""
    (new_exp_avg,), (new_exp_avg_sq,) = _updated_all_moments([grad], [exp_avg], [exp_avg_sq], beta1, beta2)
    return new_exp_avg, new_exp_avg_sq


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta1: float, beta2: float,
                   eps: float, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Bias-corrected ``m_hat / (sqrt(v_hat) + eps)`` after ``step`` updates of the moments (step >= 1).
    ``scratch``: a tensor of the moments' shape and dtype the caller no longer needs, overwritten with the denominator
    instead of a new one (LoRA-Pro full mode: one ``m x n`` allocation fewer)."""
    return _adam_directions([exp_avg], [exp_avg_sq], [step], beta1, beta2, eps,
                            None if scratch is None else [scratch])[0]


def adamw_results(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], steps: list[int], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(new params, new exp_avgs, new exp_avg_sqs)`` after one AdamW step of every ``params[i]`` (its own step count
    ``steps[i]``), as ``torch.optim.AdamW`` computes it (decoupled decay), as new tensors: nothing given changes, so a
    caller can compute every result first and store them only once all exist, without copying the old values first.
    Batched with ``torch._foreach_*`` as ``torch.optim.AdamW``'s multi-tensor path is: one call per operation instead
    of one per tensor, the same elementwise operations in the same order, so each tensor's result is bit-identical to
    a call on it alone. The moments equal ``torch.optim.AdamW``'s bit for bit, the parameters up to rounding (it folds
    ``lr / (1 - beta1^step)`` into one factor)."""
    if not params:
        return [], [], []
    new_exp_avgs, new_exp_avg_sqs = _updated_all_moments(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    directions = _adam_directions(new_exp_avgs, new_exp_avg_sqs, steps, beta1, beta2, eps)
    if weight_decay:
        new_params = torch._foreach_mul(params, 1 - lr * weight_decay)
        torch._foreach_add_(new_params, directions, alpha=-lr)
    else:
        new_params = torch._foreach_add(params, directions, alpha=-lr)
    return new_params, new_exp_avgs, new_exp_avg_sqs


def _updated_all_moments(grads, exp_avgs, exp_avg_sqs, beta1: float, beta2: float):
    new_exp_avg_sqs = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(new_exp_avg_sqs, grads, grads, value=1 - beta2)
    return torch._foreach_lerp(exp_avgs, grads, 1 - beta1), new_exp_avg_sqs


def _adam_directions(exp_avgs, exp_avg_sqs, steps, beta1: float, beta2: float, eps: float,
                     scratches=None) -> list[torch.Tensor]:
    bias_corrections1 = [1 - beta1 ** step for step in steps]
    bias_corrections2_sqrt = [math.sqrt(1 - beta2 ** step) for step in steps]
    if scratches is None:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denoms = [torch.sqrt(v, out=scratch) for v, scratch in zip(exp_avg_sqs, scratches)]
    torch._foreach_div_(denoms, bias_corrections2_sqrt)
    torch._foreach_add_(denoms, eps)
    directions = torch._foreach_div(exp_avgs, bias_corrections1)
    torch._foreach_div_(directions, denoms)
    return directions


def clip_factor(norms: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total_norm, factor)`` of ``torch.nn.utils.clip_grad_norm_``: the 2-norm over the given per-tensor
    gradient norms and ``min(1, max_norm / (total_norm + 1e-6))``, the factor every gradient is multiplied by."""
    total = torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms])) if norms else \
        torch.zeros((), dtype=torch.float64)
    return total, (max_norm / (total + 1e-6)).clamp(max=1.0)
