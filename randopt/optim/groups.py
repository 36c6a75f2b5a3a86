"""Build parameter groups for randopt's optimizers from module names."""
from __future__ import annotations

from torch import nn

from ..randlora.functional import DEFAULT_RANK
from ..randlora.layer import ALL_LINEAR, TARGET_MODULES_DOC, find_targets, linear_shape
from ..randlora.quantized import refuse_quantized
from ..trainable import apply_trainable_set
from ..validation import check_keyword_names, check_options, module as check_module, rank as check_rank

RANDLORA_OPTIONS = ("rank", "alpha", "seed", "basis_kind", "fan_in_fan_out")
"""Group options that define a RandLoRA group's math (they cannot change mid-training)."""
GROUP_OPTIONS = ("lr", "betas", "eps", "weight_decay") + RANDLORA_OPTIONS


def param_groups(model: nn.Module, target_modules=ALL_LINEAR, rank: int = DEFAULT_RANK, *, modules_to_save=None,
                 train_rest: bool = False, plain_lr: float | None = None, **randlora_options) -> list[dict]:
    """Parameter groups for ``RandLoRAAdamW``, and the model's trainable set to match (PEFT's rule).

    The weights of the targeted linear layers form RandLoRA groups (transformers ``Conv1D`` weights, stored
    ``in x out``, in a group with ``fan_in_fan_out=True``). Everything else is frozen (``requires_grad=False``,
    so no gradient and no optimizer state is kept for it) except the modules named in ``modules_to_save``
    (e.g. ``["classifier"]``, a new head; names or dotted suffixes), which are made trainable and go to a plain
    AdamW group (``rank=None``). ``train_rest=True`` keeps every other trainable parameter (embeddings, norms,
    biases, other matrices) in that plain group instead: a full fine-tune of the rest, with its memory.
    ``plain_lr`` is the plain group's learning rate (default: the optimizer's ``lr``): RandLoRA's coefficient
    updates are scaled by ``alpha / rank`` (20 by default), so a head usually wants a larger rate than the
    coefficients.

    Extra keyword options (``alpha``, ``seed``, ``basis_kind``, ``lr``, ...) apply to the RandLoRA groups.

    """
    check_module("model", model)
    rank = check_rank(rank)
    # rank is its own argument, fan_in_fan_out follows each layer
    check_keyword_names("param_groups", randlora_options, set(GROUP_OPTIONS) - {"rank", "fan_in_fan_out"})
    randlora_options = check_options(randlora_options)
    linear, conv1d = [], []
    targets = find_targets(model, target_modules, exclude=modules_to_save or ())
    refuse_quantized([(name, module.weight) for name, module in targets], f"target_modules={target_modules!r}")
    for name, module in targets:
        if module.weight.requires_grad:
            (conv1d if linear_shape(module)[2] else linear).append(module.weight)
    if not linear and not conv1d:
        raise ValueError(f"target_modules={target_modules!r} matched only frozen layers (requires_grad=False)")
    if plain_lr is not None and not plain_lr >= 0:
        raise ValueError(f"plain_lr must be >= 0, got {plain_lr!r}")
    plain = apply_trainable_set(model, linear + conv1d, modules_to_save, train_rest)
    groups = [{"params": params, "rank": rank, "fan_in_fan_out": flag, **randlora_options}
              for params, flag in ((linear, False), (conv1d, True)) if params]
    if plain:
        groups.append({"params": plain, "rank": None, **({} if plain_lr is None else {"lr": plain_lr})})
    return groups


param_groups.__doc__ += TARGET_MODULES_DOC
