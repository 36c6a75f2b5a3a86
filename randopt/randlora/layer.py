"""RandLoRA adapter modules: a linear layer, injection by target module names, merge/unmerge/unload.

Base layers: ``nn.Linear``, transformers ``Conv1D``, and bitsandbytes ``Linear4bit`` (nf4/fp4) / ``Linear8bitLt``,
whose weights stay packed (see ``quantized.py``); the coefficients then live in the layer's compute dtype.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .autograd import randlora_linear
from .. import validation
from ..trainable import apply_trainable_set, suffix_matches
from .bases import BASIS_KINDS, RandLoRABases, check_rank, make_bases
from .functional import DEFAULT_RANK, default_alpha, delta_weight, init_coefficients
from .quantized import QuantizedWeight, add_to_quantized, is_quantized
from .sparse import TernaryMatrix

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "classifier", "score")
"""Output layers ``"all-linear"`` leaves out (with ``get_output_embeddings()``), as PEFT does."""
TARGET_MODULES_DOC = """``target_modules`` selects modules by name, PEFT's rule: a string is a regular expression that must
match the WHOLE module name (``"q_proj"`` matches only a top-level module named so; use
``r".*\\.(q_proj|v_proj)"``); a list matches a name or a dotted suffix (``["q_proj", "v_proj"]`` matches
``model.layers.0.self_attn.q_proj``); ``"all-linear"`` is every ``nn.Linear``/``Conv1D`` except the output layer
(``get_output_embeddings()``, ``lm_head``) and a classification head (``classifier``, ``score``). A pattern (or
a list entry) that matches nothing is an error."""


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def linear_shape(module: nn.Module):
    """``(out, in, fan_in_fan_out)`` of an ``nn.Linear`` or transformers ``Conv1D``; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        in_features, out_features = module.weight.shape
        return out_features, in_features, True
    return None


def weight_out_in(module: nn.Module):
    """The module's weight viewed as ``out x in`` (a transpose view for ``Conv1D``; a ``QuantizedWeight`` for a
    bitsandbytes layer)."""
    if is_quantized(module.weight):
        return QuantizedWeight(module)
    return module.weight.T if linear_shape(module)[2] else module.weight


def _dtype_and_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Where the adapter of ``module`` lives: its weight's dtype, or a quantized layer's compute dtype."""
    weight = weight_out_in(module)
    if isinstance(weight, QuantizedWeight):
        return weight.compute_dtype, weight.device
    return weight.dtype, weight.device


class SharedBases(nn.Module):
    """Holds the shared bases once for all layers (registered as a submodule of each layer, like tied
    weights, so ``model.to(...)`` moves them once). Not saved in the state dict: seed + fingerprint suffice."""

    def __init__(self, bases: RandLoRABases):
        super().__init__()
        self.register_buffer("A", bases.A, persistent=False)
        stored = bases.stored_B
        self.compact_shape = stored.shape if isinstance(stored, TernaryMatrix) else None
        if self.compact_shape is None:
            self.register_buffer("B", stored, persistent=False)
        else:  # compact ternary B: its CSR parts are the buffers, so .to() moves (and casts) them
            for name, tensor in zip(("B_crow", "B_col", "B_values"), (stored.crow, stored.col, stored.values)):
                self.register_buffer(name, tensor, persistent=False)
        self.kind, self.seed, self.fingerprint = bases.kind, bases.seed, bases.fingerprint
        self._bases = None

    @property
    def bases(self) -> RandLoRABases:
        if self._bases is None:
            stored = self.B if self.compact_shape is None else TernaryMatrix(self.B_crow, self.B_col, self.B_values,
                                                                               self.compact_shape)
            self._bases = RandLoRABases(self.A, stored, self.kind, self.seed, self.fingerprint)
        return self._bases

    def _apply(self, fn, *args, **kwargs):
        self._bases = None
        return super()._apply(fn, *args, **kwargs)


class RandLoRALinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` plus a RandLoRA update, computed by the memory-saving autograd core."""

    def __init__(self, base_layer: nn.Module, shared: SharedBases, rank: int, alpha: float | None = None,
                 dropout: float = 0.0, init_weights: bool = True):
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise ValueError(f"RandLoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        validation.check_options(dict(dropout=dropout, init_weights=init_weights))
        alpha = validation.real("alpha", alpha, positive=True, allow_none=True)
        self.out_features, self.in_features, self.fan_in_fan_out = shape
        self.rank = check_rank(rank)
        if alpha is None:
            alpha = default_alpha(rank)
        self.scaling = alpha / rank
        self.base_layer = base_layer
        self.shared = shared
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype, device = _dtype_and_device(base_layer)
        lam, gam = init_coefficients(self.out_features, self.in_features, rank, dtype=dtype, device=device)
        if not init_weights:
            lam.normal_()
        self.randlora_lambda = nn.Parameter(lam)
        self.randlora_gamma = nn.Parameter(gam)
        self.merged = False

    @property
    def layer_bases(self):
        return self.shared.bases.layer(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's storage layout."""
        dw = delta_weight(self.layer_bases, self.randlora_lambda, self.randlora_gamma, self.scaling,
                          (self.out_features, self.in_features))
        return dw.T if self.fan_in_fan_out else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x_adapter = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else x
        lam, gam = self.randlora_lambda.to(x.dtype), self.randlora_gamma.to(x.dtype)
        return randlora_linear(x, weight_out_in(self.base_layer), self.base_layer.bias, lam, gam,
                               self.layer_bases, self.scaling, x_adapter=x_adapter)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        if is_quantized(weight):
            add_to_quantized(self.base_layer, delta)
        else:
            weight += delta.to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight (a quantized one is re-quantized, as PEFT does, with a warning)."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"out={self.out_features}, in={self.in_features}, rank={self.rank}, scaling={self.scaling:g}, "
                f"bases={self.shared.fingerprint[:8]}")


def target_matches(name: str, target_modules) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list matches a name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return suffix_matches(name, target_modules)


def _all_linear(model: nn.Module) -> list[tuple[str, nn.Module]]:
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, RandLoRALinear)}
    return [(n, m) for n, m in model.named_modules()
            if n and m is not output and id(m) not in wrapped and n.split(".")[0] not in HEAD_NAMES
            and (linear_shape(m) is not None or isinstance(m, RandLoRALinear))]


def find_targets(model: nn.Module, target_modules, exclude=()) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a target spec selects (see ``TARGET_MODULES_DOC``), leaving out modules
    named in ``exclude`` (name or dotted suffix); a clear error if a pattern matches nothing, or a match is not
    linear."""
    target_modules = validation.target_modules(target_modules)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        found = _all_linear(model)
    else:
        found = [(n, m) for n, m in model.named_modules() if n and target_matches(n, target_modules)]
    found = [(n, m) for n, m in found if not suffix_matches(n, exclude)]
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_shape(m) is not None})
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no module of the model; "
                         f"its linear layers are named {names}")
    if not isinstance(target_modules, str):
        unmatched = [t for t in target_modules if not any(suffix_matches(n, [t]) for n, _ in found)]
        if unmatched:
            raise ValueError(f"target_modules={target_modules!r}: {unmatched} matched no module of the model; "
                             f"its linear layers are named {names}")
    for name, module in found:
        if linear_shape(module) is None and not isinstance(module, RandLoRALinear):
            raise ValueError(f"target_modules={target_modules!r} matched {name!r}, a {type(module).__name__}; "
                             "only nn.Linear and transformers Conv1D layers can be targeted")
    return found


def largest_shape(shapes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    shapes = list(shapes)
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_randlora(model: nn.Module, target_modules=ALL_LINEAR, rank: int = DEFAULT_RANK, alpha: float | None = None,
                    dropout: float = 0.0, seed: int = 0, kind: str = "dense", init_weights: bool = True,
                    bases: RandLoRABases | None = None, *, modules_to_save=None,
                    train_rest: bool = False) -> nn.Module:
    """Replace the targeted linear layers of ``model`` (in place) by ``RandLoRALinear`` and return the model.

    What trains afterwards is PEFT's rule: the RandLoRA coefficients, the parameters of the modules named in
    ``modules_to_save`` (e.g. ``["classifier"]``, a new head: a name or dotted suffix) and nothing else; with
    ``train_rest=True`` every other parameter that was trainable stays so. The targeted layers' own weights
    and biases are frozen. ``alpha`` defaults to ``default_alpha(rank) = 20 * rank`` (the optimizer's rule).
    Bases are generated from ``seed`` for the largest targeted shape unless given. An error leaves the model
    as it was.

    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_rank(rank)
    validation.check_options(dict(alpha=alpha, dropout=dropout, seed=seed, init_weights=init_weights))
    validation.choice("kind", kind, BASIS_KINDS)
    if bases is not None and not isinstance(bases, RandLoRABases):
        raise ValueError(f"bases must be RandLoRABases (make_bases) or None, got {type(bases).__name__}")
    targets = find_targets(model, target_modules, exclude=modules_to_save or ())
    adapted = [name for name, module in targets if isinstance(module, RandLoRALinear)]
    if adapted:
        raise ValueError(f"target_modules={target_modules!r} matched layers that already have a RandLoRA adapter: "
                         f"{adapted}")
    shapes = [linear_shape(m)[:2] for _, m in targets]
    if bases is None:
        bases = make_bases(largest_shape(shapes), rank, seed=seed, kind=kind)
    elif bases.rank != rank:
        raise ValueError(f"bases have rank {bases.rank} but rank={rank} was asked for")
    for shape in set(shapes):
        bases.layer(*shape)  # a clear error now rather than at the first forward
    dtype, device = _dtype_and_device(targets[0][1])
    shared = SharedBases(bases.to(device=device, dtype=dtype))
    # build every adapter before replacing any layer, so that an error leaves the model as it was
    adapters = [(name, RandLoRALinear(module, shared, rank, alpha, dropout, init_weights)) for name, module in targets]
    coefficients = [p for _, adapter in adapters for p in (adapter.randlora_lambda, adapter.randlora_gamma)]
    apply_trainable_set(model, [], modules_to_save, train_rest)  # checks its arguments before any change
    for name, adapter in adapters:
        adapter.base_layer.requires_grad_(False)
        _set_submodule(model, name, adapter)
    for p in coefficients:
        p.requires_grad_(True)
    return model


inject_randlora.__doc__ += TARGET_MODULES_DOC


def randlora_layers(model: nn.Module) -> list[tuple[str, RandLoRALinear]]:
    """``(name, layer)`` of every ``RandLoRALinear`` in ``model``, in module order."""
    return [(n, m) for n, m in validation.module("model", model).named_modules() if isinstance(m, RandLoRALinear)]


def merge_randlora(model: nn.Module) -> None:
    """Add every RandLoRA layer's update into its base weight (forward then uses the base layer alone)."""
    for _, module in randlora_layers(model):
        module.merge()


def unmerge_randlora(model: nn.Module) -> None:
    """Take merged updates back out of the base weights (training can continue)."""
    for _, module in randlora_layers(model):
        module.unmerge()


def unload_randlora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (with the update merged in when ``merge``) and return the model."""
    for name, module in randlora_layers(model):
        if merge:
            module.merge()
        elif module.merged:
            module.unmerge()
        _set_submodule(model, name, module.base_layer)
    return model
