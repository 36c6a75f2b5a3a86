"""What trains: PEFT's trainable-set rule for every randopt route, and a summary of the result.

Outside the targeted matrices a model is frozen (``requires_grad=False``) unless the user names a module in
``modules_to_save`` (a new classification head, say: its parameters train as plain parameters) or passes
``train_rest=True`` (every parameter that was trainable before stays trainable). Biases and norms of the
targeted layers are "the rest" too, as PEFT's ``bias="none"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .validation import module as check_module

TRAINABLE_SET_KEYS = ("modules_to_save", "train_rest", "plain_lr")
"""The ``param_groups`` keywords that say what trains besides the targets (the Trainer factory and the DeepSpeed
config block pass them through)."""


def suffix_matches(name: str, names) -> bool:
    """A module ``name`` equals one of ``names`` (or ``names`` itself, a string) or ends with ``"." + one of them``."""
    names = [names] if isinstance(names, str) else names
    return any(name == n or name.endswith("." + n) for n in names)


def _as_names(value, argument: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{argument} must be a module name or a list of module names, got {value!r}")
    return names


def modules_to_save_params(model: nn.Module, modules_to_save) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every module ``modules_to_save`` names (a name or a dotted suffix, like a list of
    ``target_modules``); a ValueError naming each entry that matches no module of the model."""
    names = _as_names(modules_to_save, "modules_to_save")
    module_names = [n for n, _ in model.named_modules() if n]
    unmatched = [n for n in names if not any(suffix_matches(m, [n]) for m in module_names)]
    if unmatched:
        top = sorted({m.split(".")[0] for m in module_names})
        raise ValueError(f"modules_to_save={names!r}: {unmatched} matched no module of the model; its top-level "
                         f"modules are {top}")
    chosen = {}
    for module_name, module in model.named_modules():
        if module_name and suffix_matches(module_name, names):
            for param_name, p in module.named_parameters():
                chosen.setdefault(id(p), (f"{module_name}.{param_name}", p))
    return list(chosen.values())


def apply_trainable_set(model: nn.Module, targeted: list[torch.Tensor], modules_to_save=None,
                        train_rest: bool = False) -> list[torch.Tensor]:
    """Freeze what the user did not ask to train and return the plain parameters (trained by plain AdamW):
    the ``modules_to_save`` parameters (made trainable), plus, with ``train_rest``, every other parameter that
    is trainable now. ``targeted`` (the matrices or adapter coefficients the method trains) stay trainable.
    Checks everything before changing any ``requires_grad``."""
    saved = modules_to_save_params(model, modules_to_save) if modules_to_save else []
    targeted_ids = {id(p) for p in targeted}
    overlap = [name for name, p in saved if id(p) in targeted_ids]
    if overlap:
        raise ValueError(f"modules_to_save={modules_to_save!r} names parameters that are also targeted: {overlap}; "
                         "a module is either a target or saved whole, not both")
    plain = {id(p): p for _, p in saved}
    for p in model.parameters():
        if id(p) in targeted_ids or id(p) in plain:
            continue
        if train_rest and p.requires_grad:
            plain[id(p)] = p
        else:
            p.requires_grad_(False)
    for p in plain.values():
        p.requires_grad_(True)
    return list(plain.values())


@dataclass
class TrainableSummary:
    """What a model (and optionally its optimizer) trains. ``trainable``: the values that are learned (a matrix
    that ``RandLoRAAdamW`` trains through RandLoRA counts as its coefficients, as PEFT counts adapter
    parameters); ``total``: the model's parameters; ``through_method``/``plain``: parameter names trained through
    the method (RandLoRA matrices or coefficients, LoRA factors) and by plain AdamW."""
    trainable: int
    total: int
    through_method: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        plain = ", ".join(self.plain[:6]) + (f", ... ({len(self.plain)} in all)" if len(self.plain) > 6 else "")
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: "
                f"{self.percent:.4f} || through the method: {len(self.through_method)} tensors || plain: "
                f"{plain or 'none'}")


def _is_method_parameter(name: str) -> bool:
    return any(key in name for key in ("randlora_", "lora_A", "lora_B", "lora_embedding_"))


def trainable_summary(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainableSummary:
    """PEFT's ``print_trainable_parameters`` numbers, as a value. Without ``optimizer``, the trainable
    parameters are those with ``requires_grad`` (the module routes: adapter coefficients, LoRA factors,
    ``modules_to_save``). With one, the parameters it steps; for ``RandLoRAAdamW`` each RandLoRA matrix counts
    as the coefficients it learns, not the weight it writes into."""
    names = {id(p): n for n, p in check_module("model", model).named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    summary = TrainableSummary(0, total)
    if optimizer is None:
        entries = [(n, p, None) for n, p in model.named_parameters() if p.requires_grad]
    else:
        groups = getattr(optimizer, "_all_groups", optimizer.param_groups)
        params_of = getattr(optimizer, "_params_of", lambda g: g["params"])
        entries = [(names.get(id(p), "<not in model>"), p, g) for g in groups for p in params_of(g)]
    learned = getattr(optimizer, "_learned_numel", None)
    for name, p, group in entries:
        count = learned(p, group) if learned is not None else None
        summary.trainable += getattr(p, "ds_numel", p.numel()) if count is None else count
        is_method = count is not None or _is_method_parameter(name) or bool(group and group.get("lora_scale"))
        (summary.through_method if is_method else summary.plain).append(name)
    return summary


def print_trainable_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainableSummary:
    """Print ``trainable_summary(model, optimizer)`` (PEFT's one-line format, plus the plain parameters by name)
    and return it."""
    summary = trainable_summary(model, optimizer)
    print(summary)
    return summary
