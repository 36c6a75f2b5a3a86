"""LoRAProAdamW: LoRA-Pro's optimal gradient adjustment as a swap-in AdamW for LoRA models.

Each LoRA pair ``(A, B, scale[, W0])`` is its own parameter group (``params == [A, B]``, the scale in
``group["lora_scale"]``); every other trainable parameter gets ordinary AdamW in a group whose
``lora_scale`` is None. Modes:

- ``"full"`` (the paper): Adam moments of the equivalent gradient at full ``m x n`` size, the
  bias-corrected Adam direction ``D`` projected back through the closed form, an SGD step on A, B.
  Decoupled weight decay decays the LoRA update ``s B A``: A and B by ``sqrt(1 - lr*wd)`` (decay first, then
  the step, as ``torch.optim.AdamW``; the adjustment uses the factors at which the gradient was taken). The
  paper also decays the frozen ``W0`` by ``1 - lr*wd``: that is opt-in (``decay_base_weight=True``), because it
  changes the base model in place, so the saved adapter alone no longer reproduces the trained model and a
  resume from an adapter checkpoint starts from the undecayed ``W0``. It is refused where it cannot be exact:
  a ``W0`` in bf16/fp16 (``1 - lr*wd`` rounds to 1) or quantized, or a pair whose ``W0`` is not found (e.g. a
  model partitioned by ZeRO-3 at load).
- ``"efficient"``: low-rank AdamW (moments of A's and B's size) on the adjusted ``gA, gB``.

State (tensors only, through ``randopt.optim.state``): ``state[A]`` holds the pair's ``step`` and
``nonfinite_skips`` counters (fp32 / int64 scalars on CPU, as in ``RandLoRAAdamW``) and, in full mode,
``w_exp_avg``/``w_exp_avg_sq`` (``m x n``); in efficient mode ``state[A]`` and ``state[B]`` hold
``exp_avg``/``exp_avg_sq`` of their factor. Plain parameters: ``step``, ``exp_avg``, ``exp_avg_sq``.
Moments are fp32 (fp64 for fp64 factors) unless ``state_dtype`` asks for bf16 first moments or 8-bit
(then ``<name>_codes``/``<name>_absmax``, see ``state.py``). LoRA factors in bf16/fp16 are updated in
fp32 and rounded to nearest when written back.

A pair whose gradients (or, in efficient mode, adjusted gradients; in full mode, new factors) are not
finite is not stepped: its parameters, moments and step stay, and ``state[A]["nonfinite_skips"]`` counts
it (``skipped_steps`` per pair, ``nonfinite_skips`` in all). Plain parameters get ``torch.optim.AdamW``'s
update, and the same check: a NaN/inf gradient skips the parameter and counts in its state. A pair with no gradient on either factor is left alone (not counted: per-pair step counts
stay right when only some groups get gradients); a missing gradient on one factor counts as zero.
PEFT's ``lora_dropout`` makes the factor gradients come from dropped inputs: LoRA-Pro's projection
then applies to that gradient, not to ``dL/dW``.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ..lorapro.functional import (adjust_gradients, check_x_mode, factor_grams, lora_gradients,
                                  projected_gradient, working_dtype)
from ..randlora.quantized import is_quantized, refuse_quantized
from ..validation import (GroupChecks, check_dense_gradient, check_options, check_params, check_saved_state, choice,
                          filled_in, group_params, module as validation_module)
from .functional import adam_direction, adamw_results, updated_moments
from .locators import DTensorShards, is_dtensor, logical_shape, shard_like
from .partitioned import PartitionAwareOptimizer
from .state import BLOCK_SIZE, CODES, MIN_8BIT_SIZE, check_state_dtype, encode_moment, init_moment, read_moment

MODES = ("full", "efficient")
_FULL_MOMENTS = ("w_exp_avg", "w_exp_avg_sq")
_MOMENTS = ("exp_avg", "exp_avg_sq")
_COUNTERS = ("step", "nonfinite_skips")
_MOMENT_PREFIXES = (_MOMENTS[0], _FULL_MOMENTS[0])  # state keys of the moments (with 8-bit suffixes)
GROUP_OPTIONS = ("lr", "betas", "eps", "weight_decay", "mode", "x_mode", "rcond", "lora_scale")


class LoRAPair(NamedTuple):
    """One LoRA update ``s * B @ A``: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``; ``base_weight`` is the
    frozen ``W0`` (any layout: only full mode's weight decay touches it) or None."""
    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    base_weight: torch.Tensor | None = None


def _active_adapters(module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", "default")
    return [active] if isinstance(active, str) else list(active)


def _base_weight(module):
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
    weight = getattr(base, "weight", None)
    if is_quantized(weight):  # also a Params4bit stored as bf16: floating point, but packed bytes
        return weight
    return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2 else None


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every (lora_A, lora_B, scaling) of the active adapter(s) in a PEFT-style LoRA model.

    Duck typed (no peft import): a LoRA layer has ``lora_A``/``lora_B`` ModuleDicts, a ``scaling``
    dict (read as PEFT uses it: ``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA) and ``active_adapters``.
    Layers whose factors are not 2-D (Conv2d LoRA) or that use DoRA are not LoRA-Pro's math: they are
    skipped with a warning and their parameters fall back to plain AdamW. With several active adapters
    on one layer, only the first gets the ``W0`` handle so full mode decays ``W0`` once. LoRA on embeddings
    (``lora_embedding_A``/``B``) is not LoRA-Pro's math either: warned about the same way.
    """
    validation_module("model", model)
    pairs, lora_layers = [], 0
    for name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        scaling = getattr(module, "scaling", None)
        embedding_A = getattr(module, "lora_embedding_A", None)
        if isinstance(embedding_A, nn.ParameterDict) and any(a in embedding_A for a in _active_adapters(module)):
            warnings.warn(f"{name}: LoRA on an embedding is not LoRA-Pro's math (no 2-D pair of linear factors); its "
                          "parameters get plain AdamW", stacklevel=2)
        if not (isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict)
                and isinstance(scaling, dict)):
            continue
        lora_layers += 1
        base_weight = _base_weight(module)
        for adapter in _active_adapters(module):
            if adapter not in lora_A or adapter not in lora_B:
                continue
            A, B = lora_A[adapter].weight, lora_B[adapter].weight
            if A.dim() != 2 or B.dim() != 2 or getattr(module, "use_dora", {}).get(adapter, False):
                warnings.warn(f"{name}: adapter {adapter!r} is not a plain 2-D LoRA pair (DoRA or conv); "
                              "its parameters get plain AdamW", stacklevel=2)
                continue
            pairs.append(LoRAPair(f"{name}:{adapter}", A, B, float(scaling[adapter]), base_weight))
            base_weight = None
    if not lora_layers:
        raise ValueError(f"model: no LoRA layers found in {type(model).__name__} (expected modules with "
                         "lora_A/lora_B ModuleDicts and a scaling dict, as PEFT's LoRA layers)")
    if not pairs:
        raise ValueError(f"model: {lora_layers} LoRA layers but none has a 2-D pair for its active adapter(s)")
    return pairs


def lorapro_groups(pairs, **group_options) -> list[dict]:
    """Parameter groups for explicit LoRA pairs: ``(A, B, scale)``, ``(A, B, scale, W0)`` or ``LoRAPair``.

    ``A`` is ``(r, in)``, ``B`` is ``(out, r)`` with ``W = W0 + scale * B @ A``. ``group_options``
    (lr, betas, eps, weight_decay, mode, x_mode, rcond) apply to every returned group.
    """
    if isinstance(pairs, (torch.Tensor, str, dict)) or not hasattr(pairs, "__iter__"):
        raise ValueError(f"pairs must be a list of (A, B, scale) or (A, B, scale, W0), got {type(pairs).__name__}")
    groups = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, LoRAPair):
            if not isinstance(pair, (tuple, list)) or len(pair) not in (3, 4):
                raise ValueError(f"pairs[{i}]: expected (A, B, scale) or (A, B, scale, W0), got {pair!r:.80}")
            pair = LoRAPair(f"pair{i}", *pair)
        groups.append({**group_options, "params": [pair.A, pair.B], "lora_scale": pair.scale,
                       "name": pair.name, "base_weight": pair.base_weight})
    return groups


def model_groups(model: nn.Module, **group_options) -> list[dict]:
    """Pair groups for the active LoRA adapter(s), plus one plain-AdamW group of the other trainable
    parameters (other adapters' factors included if the caller left them trainable)."""
    pairs = find_lora_pairs(model)
    in_pairs = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    groups = lorapro_groups(pairs, **group_options)
    if plain:
        groups.append({**group_options, "params": plain, "name": "plain"})
    return groups


def _check_pair(name, A, B, base_weight) -> None:
    for label, factor in (("lora_A", A), ("lora_B", B)):
        if not isinstance(factor, torch.Tensor) or not factor.is_floating_point() or factor.dim() != 2:
            raise ValueError(f"{name}: {label} must be a 2-D floating-point tensor, got "
                             f"{getattr(factor, 'shape', type(factor).__name__)}")
        if not factor.requires_grad:
            raise ValueError(f"{name}: {label} {tuple(factor.shape)} is frozen (requires_grad=False); "
                             "LoRA-Pro needs both factors trainable")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not match: "
                         "expected A (r, in) and B (out, r) with the same r")
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(f"{name}: lora_A ({A.dtype}, {A.device}) and lora_B ({B.dtype}, {B.device}) "
                         "must share dtype and device")
    if base_weight is not None and not isinstance(base_weight, torch.Tensor):
        raise ValueError(f"{name}: base weight W0 must be a tensor or None, got {type(base_weight).__name__}")
    if base_weight is not None:
        shape, expected = tuple(base_weight.shape), (B.shape[0], A.shape[1])
        if shape not in (expected, expected[::-1]) or not base_weight.is_floating_point():
            raise ValueError(f"{name}: base weight {shape} {base_weight.dtype} must be floating point and "
                             f"{expected} (or transposed, Conv1D layout)")


def _all_finite(*tensors) -> bool:
    # a sum is NaN/inf iff an entry is (or the sum overflows fp32/fp64: a gradient worth skipping)
    return bool(torch.stack([t.sum() for t in tensors]).isfinite().all())


def _working(param: torch.Tensor) -> torch.Tensor:
    return param.to(working_dtype(param.dtype))


def _adamw_result(weight, grad, state, step, group) -> torch.Tensor:
    """``weight`` (of any float dtype) after one AdamW step (``adamw_results``), as a new tensor of the working dtype.
    The new moments replace those in ``state``, the step's copy (``_trial``), whose moments may be the stored
    tensors: they are read, never written, so nothing stored changes."""
    exp_avg, exp_avg_sq = (read_moment(state, n) for n in _MOMENTS)
    beta1, beta2 = group["betas"]
    (new_weight,), new_exp_avgs, new_exp_avg_sqs = adamw_results(
        [weight.detach().to(working_dtype(weight.dtype))], [grad.to(exp_avg.dtype)], [exp_avg], [exp_avg_sq], [step],
        group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
    for name, (value,) in zip(_MOMENTS, (new_exp_avgs, new_exp_avg_sqs)):
        state.update(encode_moment(state, name, value))
    return new_weight


def _decay_base_weight_(weight: torch.Tensor, factor: float) -> None:
    """Decay a frozen ``W0`` where this process holds it: whole (plain training, ZeRO 1/2 keep frozen weights
    whole on every rank), or under ZeRO-3 this rank's partition ``ds_tensor`` (and the gathered copy if the
    parameter is currently whole, e.g. persistent)."""
    partition = getattr(weight, "ds_tensor", None)
    if partition is None:
        weight.mul_(factor)
        return
    partition.data.mul_(factor)
    if weight.data.numel() == getattr(weight, "ds_numel", -1):
        weight.data.mul_(factor)


def _new_step() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32)


def _new_counters() -> dict:
    return {"step": _new_step(), "nonfinite_skips": torch.zeros((), dtype=torch.int64)}


class LoRAProAdamW(PartitionAwareOptimizer):
    """AdamW with LoRA-Pro's gradient adjustment on every LoRA pair; plain AdamW elsewhere.

    ``params``: a PEFT-style LoRA model (pairs found with ``find_lora_pairs``), or parameter groups,
    e.g. ``lorapro_groups(pairs=[(A, B, scale), ...])`` plus plain groups. ``rcond``: relative
    eigenvalue cutoff of the pseudo-inverses (None: ``r * eps`` of the working dtype).
    ``state_dtype`` (``"fp32"``, ``"bf16"`` first moments, ``"8bit"`` block-wise) and ``min_8bit_size``
    choose the moment storage as in ``RandLoRAAdamW``; 8-bit matters most for full mode's ``m x n`` moments.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, mode: str = "full", x_mode: str = "sylvester",
                 rcond: float | None = None, *, state_dtype: str = "fp32", min_8bit_size: int = MIN_8BIT_SIZE,
                 decay_base_weight: bool = False):
        options = self.check_arguments(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=mode,
                                       x_mode=x_mode, rcond=rcond, state_dtype=state_dtype,
                                       min_8bit_size=min_8bit_size, decay_base_weight=decay_base_weight)
        defaults = {**{k: options[k] for k in GROUP_OPTIONS if k != "lora_scale"}, "lora_scale": None, "name": None}
        self.state_dtype = options["state_dtype"]
        self.min_8bit_size = options["min_8bit_size"]
        self.decay_base_weight = options["decay_base_weight"]
        self._model = params if isinstance(params, nn.Module) else None
        params = model_groups(params) if self._model is not None else check_params(params)
        self._group_checks = GroupChecks(self._check_options, GROUP_OPTIONS)
        self._base_weights: dict[torch.Tensor, torch.Tensor | None] = {}
        self._adjustment = [torch.zeros(()), torch.zeros(())]  # squared distance raw -> adjusted, squared raw norm
        super().__init__(params, defaults)
        if not any(g["lora_scale"] is not None for g in self.param_groups):
            raise ValueError("params: no LoRA pair given; pass a LoRA model or lorapro_groups(pairs=...)")

    @classmethod
    def check_arguments(cls, **kwargs) -> dict:
        """The constructor's keyword arguments (defaults filled in) checked as the constructor checks them, without
        parameters: ``ValueError`` naming the first bad one, or the arguments with numbers as ``float``. The
        transformers factory and the DeepSpeed block call it to fail before training starts."""
        options = filled_in(cls, kwargs)
        cls._check_options({**options, "lora_scale": None, "name": None})
        check_state_dtype(options["state_dtype"])
        return check_options(options)

    @staticmethod
    def _check_options(group: dict) -> None:
        """The options of one group (``ValueError`` naming the first bad one); changes nothing."""
        check_options({k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "rcond")})
        choice("mode", group["mode"], MODES)
        check_x_mode(group["x_mode"])
        scale = group["lora_scale"]
        # the closed form divides by the square: it must be a normal float (|s| within about 1e+-154)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                                  or not sys.float_info.min <= float(scale) * float(scale) < math.inf):
            raise ValueError(f"{group['name'] or 'pair'}: lora_scale must be a finite nonzero number whose square is "
                             f"finite and nonzero (|s| between about 1e-154 and 1e154), got {scale!r}")
        if group["mode"] == "full" and group["lr"] * group["weight_decay"] > 1:
            raise ValueError(f"lr * weight_decay must be <= 1 in full mode (W decays by sqrt(1 - lr*wd)), "
                             f"got {group['lr']} * {group['weight_decay']}")

    def add_param_group(self, param_group: dict) -> None:
        params = group_params(param_group)
        group = {**param_group, "params": params}
        base_weight = group.pop("base_weight", None)
        merged = {**self.defaults, **group}
        self._check_options(merged)
        group = check_options(group)
        if merged["lora_scale"] is None:
            refuse_quantized([(f"params[{i}]", p) for i, p in enumerate(params)], "LoRAProAdamW")
        else:
            if len(params) != 2:
                raise ValueError(f"{merged['name']}: a LoRA pair group holds params [A, B], got {len(params)}")
            # a packed (quantized) W0 has its storage's shape: _base_to_decay speaks for it
            _check_pair(merged["name"] or "pair", *params, None if is_quantized(base_weight) else base_weight)
            group["params"] = params
        base_weight = self._base_to_decay(base_weight, merged)
        super().add_param_group(group)
        self._remember_group(self.param_groups[-1])
        self._group_checks.accept(self.param_groups[-1])
        if merged["lora_scale"] is not None:
            self._base_weights[group["params"][0]] = base_weight

    def _parameters_replaced(self, replaced: dict) -> None:
        """Re-key the base-weight handles. fully_shard (through accelerate, or the Trainer) also swaps each base
        weight for a DTensor the optimizer was not given: an optimizer built from the model finds it there."""
        self._base_weights = {replaced.get(A, A): weight for A, weight in self._base_weights.items()}
        if self._model is not None and self.decay_base_weight:
            found = {pair.A: pair.base_weight for pair in find_lora_pairs(self._model)}
            self._base_weights.update((A, found[A]) for A in self._base_weights if A in found)
        for group in self._all_groups:
            if group["lora_scale"] is None:
                continue
            A = self._params_of(group)[0]
            weight = self._base_weights.get(A)
            if weight is None or not is_dtensor(A) or is_dtensor(weight):
                continue
            if group["mode"] != "full":  # only full mode's weight decay touches W0
                self._base_weights[A] = None
            else:
                raise RuntimeError(f"{group['name']}: the LoRA factors were sharded with fully_shard after this "
                                   "optimizer was built, but the base weight W0 it was given (for full mode's weight "
                                   "decay) is not the one in the model now: build LoRAProAdamW from the model "
                                   "(LoRAProAdamW(model)), or after sharding")

    def _base_to_decay(self, base_weight, group: dict):
        """The ``W0`` full mode's weight decay scales in place (``decay_base_weight=True``), or None; refused where the
        decay cannot be exact."""
        if not (self.decay_base_weight and group["lora_scale"] is not None and group["mode"] == "full"):
            return None
        name = group["name"] or "pair"
        if base_weight is None:
            raise ValueError(f"{name}: decay_base_weight=True needs the pair's frozen W0, and none was found (pass "
                             "lorapro_groups([(A, B, scale, W0)]); under DeepSpeed ZeRO-3 build the optimizer before the "
                             "model is partitioned); or keep decay_base_weight=False")
        if is_quantized(base_weight) or base_weight.dtype not in (torch.float32, torch.float64):
            kind = "quantized" if is_quantized(base_weight) else str(base_weight.dtype).removeprefix("torch.")
            raise ValueError(f"{name}: decay_base_weight=True cannot decay a {kind} W0 exactly (a quantized W0 cannot "
                             "take a written update; in bf16/fp16 1 - lr*wd rounds to 1); keep decay_base_weight=False")
        return base_weight

    def _check_kind(self, group: dict) -> None:
        """A pair group stays a pair and a plain group plain (a new ``lora_scale`` value is fine: In-Squeeze sets one)."""
        params = self._params_of(group)
        was_pair = bool(params) and params[0] in self._base_weights
        if was_pair != (group["lora_scale"] is not None):
            raise ValueError(f"{group['name'] or 'a parameter group'}: lora_scale was set to {group['lora_scale']!r}, "
                             f"but the group was {'a LoRA pair' if was_pair else 'plain'} when it was added; whether a "
                             "group is a pair cannot change: build a new optimizer")

    def _check_state(self, group: dict) -> None:
        if group["lora_scale"] is None:
            return
        state = self.state.get(self._params_of(group)[0], {})
        other = _MOMENTS[0] if group["mode"] == "full" else _FULL_MOMENTS[0]
        if other in state or other + CODES in state:
            raise ValueError(f"{group['name']}: mode={group['mode']!r} but its state holds the other mode's "
                             "moments; the mode of a pair cannot change during training")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # validate everything first so a bad setting changes nothing: every group's options, also those of the groups
        # DeepSpeed steps in its other calls of this real step (it shows one group per call)
        for group in self._all_groups:
            self._group_checks.check(group)
            self._check_kind(group)
            self._check_state(group)
        for group in self.param_groups:
            for p in group["params"]:
                check_dense_gradient(p)
        locator = self._update_locator()
        if not locator.distributed or self._real_step.call < 0:  # a new real step
            self._adjustment = [torch.zeros(()), torch.zeros(())]
        if locator.distributed:
            self._sharded_call(locator, lambda group, p: self._visit(locator, group, p))
            return loss
        for group in self.param_groups:
            if group["lora_scale"] is None:
                self._plain_step(group)
            else:
                self._pair_step(group)
        return loss

    def _plain_step(self, group: dict) -> None:
        """AdamW on the plain parameters of a group; one with a NaN/inf gradient is skipped and counted (one
        device sync for the whole group)."""
        params = [p for p in group["params"] if p.grad is not None]
        finite = torch.stack([p.grad.sum().float() for p in params]).isfinite().tolist() if params else []
        for p, ok in zip(params, finite):
            self._step_plain(p, p.data, p.grad, self._plain_trial(p, p), ok, group)

    def _step_plain(self, p, weight, grad, state, finite: bool, group: dict) -> None:
        """AdamW on ``weight`` (a plain parameter ``p``, or the part of it this rank owns), all or nothing: computed
        on ``state``, the step's copy, and a new weight, then stored; a non-finite gradient counts a skip instead."""
        if finite:
            new_weight = _adamw_result(weight, grad, state, int(state["step"]) + 1, group)
            state["step"] += 1
        else:
            new_weight = None
            state["nonfinite_skips"] += 1
        self.state[p] = state
        if new_weight is not None:
            weight.copy_(new_weight)

    def _trial(self, p) -> dict:
        """A copy of ``p``'s state (empty before its first step) for a step to compute on: the step stores it whole
        once it is complete, so a failure on the way leaves the stored state as it was. The moments (every storage:
        fp32/bf16 tensors, 8-bit codes and scales) are shared, not copied: a step replaces them by new tensors
        (``_direction_gradients``, ``_adamw_result``), never writes into them; the counters, which it increments in
        place, are copied."""
        return {key: value if key.startswith(_MOMENT_PREFIXES) else value.clone()
                for key, value in self.state.get(p, {}).items()}

    def _plain_trial(self, p, like) -> dict:
        state = self._trial(p)
        if not state:
            state = _new_counters()
            for name in _MOMENTS:
                self._init_moment(state, name, like)
        state.setdefault("nonfinite_skips", torch.zeros((), dtype=torch.int64))  # state saved before it was counted
        return state

    def _init_moment(self, state, name, like) -> None:
        init_moment(state, name, like, self.state_dtype, self.min_8bit_size)

    def _pair_trials(self, A, B, mode) -> dict:
        """Copies of the pair's states to compute a step on (``_trial``; built fresh at its first step): ``A``'s
        (counters, and full mode's moments or A's), and in efficient mode ``B``'s."""
        trials = {A: self._trial(A)}
        if mode == "efficient":
            trials[B] = self._trial(B)
        if not trials[A]:
            trials[A] = _new_counters()
            if mode == "full":
                shape_of_w = A.new_zeros(()).expand(B.shape[0], A.shape[1])  # a view: nothing m x n allocated
                for name in _FULL_MOMENTS:
                    self._init_moment(trials[A], name, shape_of_w)
            else:
                for factor in (A, B):
                    for name in _MOMENTS:
                        self._init_moment(trials[factor], name, factor)
        return trials

    def _pair_step(self, group: dict) -> None:
        """One pair, all or nothing: its new factors, moments and counters are computed on copies and stored once all
        of them exist (or its skip is counted); a failure anywhere leaves the pair as it was."""
        A, B = group["params"]
        if A.grad is None and B.grad is None:
            return
        gA_lora = A.grad if A.grad is not None else torch.zeros_like(A)
        gB_lora = B.grad if B.grad is not None else torch.zeros_like(B)
        trials = self._pair_trials(A, B, group["mode"])
        A_w, B_w = _working(A), _working(B)
        gA_lora, gB_lora = gA_lora.to(A_w.dtype), gB_lora.to(A_w.dtype)
        grams = factor_grams(A_w, B_w, group["rcond"])
        if group["mode"] == "full":
            new = self._full_step(group, trials[A], A_w, B_w, gA_lora, gB_lora, grams)
        else:
            new = None
            adjusted = self._efficient_gradients(group, trials[A], A_w, B_w, gA_lora, gB_lora, grams)
            if adjusted is not None:
                gA, gB, step = adjusted
                new = (_adamw_result(A, gA, trials[A], step, group), _adamw_result(B, gB, trials[B], step, group))
        if new is None and group["mode"] == "full":  # skipped: only the count changes
            trials = self._pair_trials(A, B, "full")
            trials[A]["nonfinite_skips"] += 1
        self.state.update(trials)
        if new is None:
            return
        base_weight = self._base_weights.get(A)
        if group["mode"] == "full" and base_weight is not None and group["weight_decay"]:
            base_weight.mul_(1 - group["lr"] * group["weight_decay"])
        A.copy_(new[0])
        B.copy_(new[1])

    def _efficient_gradients(self, group, state, A_w, B_w, gA_lora, gB_lora, grams):
        """Efficient mode: ``(adjusted gA, adjusted gB, step)`` for the AdamW step of the factors, or None (and
        the skip counted) when a gradient is not finite."""
        gA, gB = self._adjusted(group, A_w, B_w, gA_lora, gB_lora, grams)
        if not _all_finite(gA_lora, gB_lora, gA, gB):
            state["nonfinite_skips"] += 1
            return None
        state["step"] += 1
        return gA, gB, int(state["step"])

    def _full_step(self, group, state, A_w, B_w, gA_lora, gB_lora, grams):
        """Full mode on a whole pair: the new factors (new tensors), the moments replaced and the step counted in
        ``state`` (the step's copy), or None when the pair is to be skipped: its gradients are not finite, or its
        finite gradients still give a non-finite update (e.g. a tiny ``lora_scale``, whose closed form divides by its
        square)."""
        gA, gB = self._full_update(group, state, A_w, B_w, gA_lora, gB_lora, grams)
        A_new, B_new = A_w.clone(), B_w.clone()
        self._decay_and_descend(group, A_new, B_new, gA, gB)
        return (A_new, B_new) if _all_finite(gA_lora, gB_lora, A_new, B_new) else None

    def _full_update(self, group, state, A_w, B_w, gA_lora, gB_lora, grams):
        """Full mode's moments of the equivalent gradient and the adjusted factor updates of their Adam direction."""
        gA_d, gB_d = self._direction_gradients(group, state, A_w, B_w, gA_lora, gB_lora, grams)
        return self._adjusted(group, A_w, B_w, gA_d, gB_d, grams)

    def _direction_gradients(self, group, state, A_w, B_w, gA_lora, gB_lora, grams, rows=slice(None)):
        """Full mode's moments of the equivalent gradient (its ``rows`` of W, where this rank holds only those) and
        what LoRA's factors would get for their Adam direction: for a row block, ``B``'s share of ``A``'s gradient
        (partial sums over the row blocks) and ``B``'s gradient on those rows."""
        scale = group["lora_scale"]
        beta1, beta2 = group["betas"]
        g_equiv = projected_gradient(A_w, B_w, gA_lora, gB_lora, scale, grams, rows=rows)
        state["step"] += 1
        step = int(state["step"])
        exp_avg, exp_avg_sq = (read_moment(state, n) for n in _FULL_MOMENTS)
        # new tensors, not updated in place: a step's copy of the state shares the stored moments instead of copying
        # them (m x n each)
        g_equiv = g_equiv.to(exp_avg.dtype)
        exp_avg, exp_avg_sq = updated_moments(g_equiv, exp_avg, exp_avg_sq, beta1, beta2)
        for name, value in zip(_FULL_MOMENTS, (exp_avg, exp_avg_sq)):
            state.update(encode_moment(state, name, value))
        # g_equiv is used up: its memory takes the direction's denominator
        direction = adam_direction(exp_avg, exp_avg_sq, step, beta1, beta2, group["eps"], scratch=g_equiv)
        direction = direction.to(A_w.dtype)
        return lora_gradients(A_w, B_w[rows], direction, scale)

    def _adjusted(self, group, A_w, B_w, gA_raw, gB_raw, grams):
        """LoRA-Pro's adjusted factor gradients, recording how far they moved from the raw ones (``metrics``)."""
        gA, gB = adjust_gradients(A_w, B_w, gA_raw, gB_raw, group["lora_scale"], group["x_mode"], grams, group["rcond"])
        moved = (gA - gA_raw).square().sum() + (gB - gB_raw).square().sum()
        raw = gA_raw.square().sum() + gB_raw.square().sum()
        # a non-finite pair is skipped (and counted) by the caller: it adds nothing here
        self._adjustment = [total + part.float().nan_to_num(0.0, 0.0, 0.0)
                            for total, part in zip(self._adjustment, (moved, raw))]
        return gA, gB

    def metrics(self) -> dict[str, float]:
        """The last step's distance between the raw and the adjusted factor gradients, summed over pairs (the raw
        ones: LoRA's gradients in efficient mode, those of the Adam direction in full mode), absolute and
        relative to the raw ones' norm: ``adjustment_distance = sqrt(sum ||gA - gA_raw||^2 + ||gB - gB_raw||^2)``,
        ``relative_adjustment = adjustment_distance / sqrt(sum ||gA_raw||^2 + ||gB_raw||^2)``. The closed form
        multiplies by ``(A A^T)^-1 / s^2`` and ``(B^T B)^-1``, large while ``A``'s singular values are small and
        ``B`` is near zero (early training), so values in the hundreds or thousands are normal: compare the metric
        over steps, not with 1. Logged by ``RandoptCallback``. Under DeepSpeed in full mode each rank
        adjusts only the pairs whose moments it holds, so each rank reports its own pairs."""
        moved, raw = (math.sqrt(float(t)) for t in self._adjustment)
        return {"lorapro/adjustment_distance": moved, "lorapro/relative_adjustment": moved / raw if raw else 0.0}

    @staticmethod
    def _decay_and_descend(group, A_w, B_w, gA, gB) -> None:
        """Full mode on the factors: decay (decoupled, W decays by 1 - lr*wd), then the SGD step, in place."""
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            factor_decay = math.sqrt(1 - lr * wd)
            A_w.mul_(factor_decay)
            B_w.mul_(factor_decay)
        A_w.add_(gA, alpha=-lr)
        B_w.add_(gB, alpha=-lr)

    # ----- DeepSpeed ZeRO 1/2/3 -----------------------------------------------------------------------
    def _visit(self, locator, group: dict, p: torch.Tensor) -> None:
        """A parameter carried by one of DeepSpeed's per-group (ZeRO 1/2) or per-sub-group (ZeRO-3) calls.

        Plain parameters are stepped at once on the fragment this rank owns. LoRA factors' fragments (fp32
        master weight views and a copy of their gradient, which DeepSpeed frees after the call) wait for the
        last call of the real step, which assembles every pair, runs the math and writes back the owned
        fragments, re-syncing the low-precision copies DeepSpeed made after earlier calls.
        """
        span = locator.span(p)
        if group["lora_scale"] is None:
            if span is not None and span.grad is not None:
                self._step_span(p, group, span)
        else:
            grad = None if span is None or span.grad is None else span.grad.clone()
            self._pending[id(p)] = (span, grad)

    def _step_span(self, p, group, span) -> None:
        """Plain AdamW on the fragment of a plain parameter this rank owns (moments sized like the fragment)."""
        state = self._plain_trial(p, span.state_like)
        self._check_span(logical_shape(p), state, span)
        self._step_plain(p, span.weight, span.grad, state, _all_finite(span.grad), group)

    def _pairs_process_group(self, locator, pairs):
        groups = {id(locator.process_group(p)): locator.process_group(p) for g in pairs for p in self._params_of(g)}
        if len(groups) != 1:
            raise RuntimeError("LoRA factors live in different data-parallel groups; LoRAProAdamW under DeepSpeed "
                               "expects one data-parallel group for all of them")
        return next(iter(groups.values()))

    def _finish_real_step(self, locator) -> None:
        """The last call of a real step: assemble, compute, write back (see the module docstring).

        All or nothing: every pair's new factors, moments and counters are computed on copies (``_trial``) and
        stored only once the whole step is computed, so a failure anywhere, also in a collective, leaves every pair
        as it was. The price: in full mode this rank holds a second copy of its moments until the step is stored."""
        pairs = [g for g in self._all_groups if g["lora_scale"] is not None]
        process_group = self._pairs_process_group(locator, pairs)
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(group=process_group) if distributed else 1
        rank = dist.get_rank(group=process_group) if distributed else 0
        factors = [p for g in pairs for p in self._params_of(g)]
        dtype = torch.float32
        for p in factors:
            dtype = torch.promote_types(dtype, working_dtype(p.dtype))
        device = factors[0].device
        # 1. every pair whole on every rank: own fragments of weights and gradients in zeros, one all-reduce (sum).
        # ZeRO's partition gradients are already the data-parallel average (and unscaled, clipped).
        sizes = [math.prod(locator.shape(p)) for p in factors]
        flat = torch.zeros(2 * sum(sizes), dtype=dtype, device=device)
        whole, offset = {}, 0
        for p, numel in zip(factors, sizes):
            weight, grad = flat.narrow(0, offset, numel), flat.narrow(0, offset + numel, numel)
            offset += 2 * numel
            span, span_grad = self._pending.get(id(p), (None, None))
            if span is not None:
                weight.narrow(0, span.start, span.numel).copy_(span.weight.reshape(-1))
                if span_grad is not None:
                    grad.narrow(0, span.start, span.numel).copy_(span_grad.reshape(-1))
            shape = locator.shape(p)
            whole[p] = (weight.view(shape), grad.view(shape))
        self._all_reduce_(flat, process_group)
        # 2. the math. Efficient mode: every rank adjusts (r-sized work) and runs AdamW on its own fragments.
        # Full mode under ZeRO: pair i's m x n moments live on rank i % world only; the owner computes the adjusted
        # factor updates, and one all-reduce (sum, zeros from the others) hands them to every rank. Full mode under
        # FSDP2: every rank holds the moments' rows that match its rows of B (a DTensor sharded like W), computes
        # their share of the direction's factor gradients (partial sums for A, its rows for B); after the all-reduce
        # every rank adjusts them (r-sized work). Nothing m x n is communicated either way.
        updates = torch.zeros(sum(sizes), dtype=dtype, device=device)
        update_of, offset, full_pairs, grams_of = {}, 0, [], {}
        trials, new_fragments, base_decays, owners = {}, {}, [], {}  # what the step stores once it is computed
        row_sharded = isinstance(locator, DTensorShards)
        for p, numel in zip(factors, sizes):
            update_of[p] = updates.narrow(0, offset, numel).view(locator.shape(p))
            offset += numel
        for index, group in enumerate(pairs):
            A, B = self._params_of(group)
            (A_w, gA_lora), (B_w, gB_lora) = whole[A], whole[B]
            owner = owners[id(group)] = row_sharded or index % world == rank
            state = trials[A] = self._sharded_pair_trial(A, B, group["mode"], owner, A_w, B_w, locator)
            rcond = group["rcond"]
            if group["mode"] == "full" and not _all_finite(gA_lora, gB_lora):
                state["nonfinite_skips"] += 1
                continue
            grams = factor_grams(A_w, B_w, rcond)
            if group["mode"] == "efficient":
                adjusted = self._efficient_gradients(group, state, A_w, B_w, gA_lora, gB_lora, grams)
                if adjusted is not None:
                    gA, gB, step = adjusted
                    for p, g in ((A, gA), (B, gB)):
                        span = self._pending.get(id(p), (None, None))[0]
                        if span is not None:
                            if p not in trials:  # B (A's moments live with the pair's counters)
                                trials[p] = self._trial(p)
                            new_fragments[p] = self._fragment_result(p, g, span, step, group, trials[p])
                continue
            if row_sharded:
                rows = locator.rows(B)
                gA_d, gB_d = self._direction_gradients(group, state, A_w, B_w, gA_lora, gB_lora, grams, rows)
                update_of[A].copy_(gA_d)
                update_of[B][rows] = gB_d
                grams_of[id(group)] = grams
            elif owner:
                gA, gB = self._full_update(group, state, A_w, B_w, gA_lora, gB_lora, grams)
                update_of[A].copy_(gA)
                update_of[B].copy_(gB)
            else:
                state["step"] += 1
            full_pairs.append(group)
        if full_pairs:
            self._all_reduce_(updates, process_group)
        for group in full_pairs:
            A, B = self._params_of(group)
            A_w, B_w = whole[A][0], whole[B][0]  # this step's buffer: written in place
            gA, gB = update_of[A], update_of[B]
            if row_sharded:
                gA, gB = self._adjusted(group, A_w, B_w, gA, gB, grams_of[id(group)])
            self._decay_and_descend(group, A_w, B_w, gA, gB)
            if not _all_finite(A_w, B_w):  # e.g. a tiny lora_scale; the same on every rank (the same whole pair)
                trials[A] = self._sharded_pair_trial(A, B, "full", owners[id(group)], A_w, B_w, locator)
                trials[A]["nonfinite_skips"] += 1
                continue
            for p, new in ((A, A_w), (B, B_w)):
                span = self._pending.get(id(p), (None, None))[0]
                if span is not None:
                    new_fragments[p] = new.reshape(-1).narrow(0, span.start, span.numel).view_as(span.weight)
            base_weight = self._base_weights.get(A)
            if base_weight is not None and group["weight_decay"]:
                base_decays.append((base_weight, 1 - group["lr"] * group["weight_decay"]))
        # 3. the whole step is computed: store it
        self.state.update(trials)
        for p, new in new_fragments.items():
            self._pending[id(p)][0].weight.copy_(new)
        for base_weight, factor in base_decays:
            _decay_base_weight_(base_weight, factor)
        # 4. low-precision copies DeepSpeed made after earlier calls
        for p in new_fragments:
            if self._real_step.earlier_call(p):
                locator.refresh(p)

    def _sharded_pair_trial(self, A, B, mode, owner, A_w, B_w, locator):
        """A copy of the pair's state for this rank (``_trial``; built fresh at its first step): counters, and in full
        mode the moments of the pairs (ZeRO) or rows (FSDP2) this rank holds."""
        state = self._trial(A)
        if not state:
            state.update(_new_counters())
            if mode == "full" and owner:
                shape_of_w = A_w.new_zeros(()).expand(B_w.shape[0], A_w.shape[1])
                if isinstance(locator, DTensorShards):  # the rows of W this rank holds of B
                    shape_of_w = shard_like(shape_of_w[locator.rows(B)], B, shape=shape_of_w.shape)
                for name in _FULL_MOMENTS:
                    self._init_moment(state, name, shape_of_w)
        if mode == "full" and owner != (_FULL_MOMENTS[0] in state or _FULL_MOMENTS[0] + CODES in state):
            raise RuntimeError("this rank's full-mode moments do not match the pairs it is assigned (pair i goes to "
                               "data-parallel rank i % world size): was the state saved with another world size?")
        return state

    def _fragment_result(self, p, grad, span, step, group, state) -> torch.Tensor:
        """Efficient mode: the fragment this rank owns after AdamW (a new tensor), moments sized like the fragment
        replaced in ``state`` (the step's copy)."""
        if _MOMENTS[0] not in state and _MOMENTS[0] + CODES not in state:
            for name in _MOMENTS:
                self._init_moment(state, name, span.state_like)
        self._check_span(logical_shape(p), state, span)
        return _adamw_result(span.weight, grad.reshape(-1).narrow(0, span.start, span.numel).view_as(span.weight),
                             state, step, group)

    @property
    def skipped_steps(self) -> dict[str, int]:
        """Steps skipped for non-finite gradients, per pair name (``module:adapter`` or ``pairN``)."""
        firsts = [(g["name"], self._params_of(g)[0]) for g in self._all_groups if g["lora_scale"] is not None]
        return {name: int(self.state[A]["nonfinite_skips"]) if "nonfinite_skips" in self.state.get(A, {}) else 0
                for name, A in firsts}

    @property
    def nonfinite_skips(self) -> int:
        """All pair and plain-parameter steps skipped for non-finite gradients or updates (the name
        ``RandLoRAAdamW`` uses)."""
        return int(sum(s["nonfinite_skips"].item() for s in self.state.values() if "nonfinite_skips" in s))

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, keyed by the ORIGINAL parameters' positions also under DeepSpeed
        (each rank saves its own: fragment moments, and full mode's moments of the pairs it is assigned). Full mode
        keeps a pair's state with A; B is listed with an empty state, so that strict loading through
        ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` finds every trainable parameter."""
        state_dict = self._state_dict_by_originals()
        for group in state_dict["param_groups"]:
            if group["lora_scale"] is not None and group["params"][0] in state_dict["state"]:
                state_dict["state"].setdefault(group["params"][1], {})
        return state_dict

    _KIND_OPTIONS = GROUP_OPTIONS
    _MATH_OPTIONS = ("mode", "lora_scale")

    def _check_group_options(self, group: dict) -> None:
        self._check_options(group)

    def _check_saved_state(self, group: dict, p: torch.Tensor, saved: dict) -> None:
        where = f"state_dict: state of {group['name'] or 'a parameter'} ({tuple(logical_shape(p))})"
        counters = {"step": ((), (torch.float32,)), "nonfinite_skips": ((), (torch.int64,))}
        span = saved.get("span")
        numel = int(span[1]) if isinstance(span, torch.Tensor) and span.numel() == 2 else logical_shape(p)
        fragment = {"span": ((2,), (torch.int64,))}
        if group["lora_scale"] is None:
            check_saved_state(where, saved, {"step": counters["step"]}, dict.fromkeys(_MOMENTS, numel), BLOCK_SIZE,
                              optional={**fragment, "nonfinite_skips": counters["nonfinite_skips"]})
            return
        A, B = self._params_of(group)
        if group["mode"] == "full":
            if p is B:
                check_saved_state(where, saved, {}, {}, BLOCK_SIZE)
                return
            shape_of_w = (logical_shape(B)[0], logical_shape(A)[1])
            # under DeepSpeed each rank keeps the moments of the pairs it is assigned only
            check_saved_state(where, saved, counters, dict.fromkeys(_FULL_MOMENTS, shape_of_w), BLOCK_SIZE,
                              optional_moments=True)
        else:
            check_saved_state(where, saved, counters if p is A else {}, dict.fromkeys(_MOMENTS, numel), BLOCK_SIZE,
                              optional=fragment)

    def load_state_dict(self, state_dict: dict) -> None:
        """Checks everything first (that it is a LoRAProAdamW state dict, which groups are pairs, the group layout,
        ``mode`` and ``lora_scale``, hyper-parameters, parameter shapes, every state entry's key, shape and dtype)
        and refuses with ``ValueError``, leaving the optimizer as it was. Group hyper-parameters come from the state
        dict, as in torch; state tensors are copied (never shared with ``state_dict``)."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), (list, tuple)):
            saved = state_dict["param_groups"]
            kind = {True: "plain", False: "a LoRA pair"}
            if len(saved) == len(self.param_groups):
                for i, (group, saved_group) in enumerate(zip(self.param_groups, saved)):
                    here = group["lora_scale"] is None
                    there = not isinstance(saved_group, dict) or saved_group.get("lora_scale") is None
                    if here != there:
                        name = saved_group.get("name") if isinstance(saved_group, dict) else None
                        raise ValueError(f"state_dict: parameter group {i} ({name}) is {kind[there]} there but "
                                         f"{kind[here]} here ({group['name']})")
        matched = self._checked_positions(state_dict)
        self._load_group_options(state_dict)
        # a moment's storage format (fp32, bf16, 8-bit) and the CPU counters are its own: no dtype cast
        state = defaultdict(dict)
        for position, _, param in matched:
            for key, value in state_dict["state"].get(position, {}).items():
                if isinstance(value, torch.Tensor):
                    device = value.device if key in _COUNTERS or key == "span" else param.device
                    value = value.to(device=device, copy=True)
                state[param][key] = value
        self.state = state
        self._forget_pending()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_base_weights", {})
        self.__dict__.setdefault("_model", None)
        self.__dict__.setdefault("_adjustment", [torch.zeros(()), torch.zeros(())])
