"""Build parameter groups for randopt's optimizers from module names."""
from __future__ import annotations

from torch import nn

from ..randlora.layer import find_targets, linear_shape
from ..randlora.quantized import refuse_quantized
from ..validation import check_options, rank as check_rank


def param_groups(model: nn.Module, target_modules, rank: int = 32, **randlora_options) -> list[dict]:
    """Parameter groups for ``RandLoRAAdamW``: the weights of the targeted linear layers form RandLoRA
    groups (transformers ``Conv1D`` weights, stored ``in x out``, in a group with ``fan_in_fan_out=True``);
    every other trainable parameter (biases of targeted layers included) goes to a plain AdamW group.

    Extra keyword options (``alpha``, ``seed``, ``basis_kind``, ``lr``, ...) apply to the RandLoRA groups.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rank = check_rank(rank)
    randlora_options = check_options(randlora_options)
    linear, conv1d = [], []
    targets = find_targets(model, target_modules)
    refuse_quantized([(name, module.weight) for name, module in targets], f"target_modules={target_modules!r}")
    for name, module in targets:
        if module.weight.requires_grad:
            (conv1d if linear_shape(module)[2] else linear).append(module.weight)
    if not linear and not conv1d:
        raise ValueError(f"target_modules={target_modules!r} matched only frozen layers (requires_grad=False)")
    chosen = {id(p) for p in linear + conv1d}
    groups = [{"params": params, "rank": rank, "fan_in_fan_out": flag, **randlora_options}
              for params, flag in ((linear, False), (conv1d, True)) if params]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    if rest:
        groups.append({"params": rest, "rank": None})
    return groups
