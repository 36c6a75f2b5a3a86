"""In-Squeeze: anneal the rank of a PEFT LoRA model during training, carrying the optimizer along.

``squeeze_in_training(model, optimizer, rank=... | energy=...)`` replaces every LoRA pair of the active
adapter(s) by its best approximation at the target rank (exact factored SVD, ``squeeze_for_training``), in
place, between two optimizer steps:

- the new factors are new ``nn.Parameter`` objects, put into the PEFT layer and swapped into the optimizer's
  param groups (same positions, so ``state_dict`` indices are unchanged) and state; references to the old
  factors held elsewhere go stale (re-read ``model.parameters()``). The PEFT layer's ``r``, ``lora_alpha``,
  ``scaling`` and the adapter's ``peft_config`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``)
  are rewritten, so ``save_pretrained`` writes an adapter that loads at the new ranks. The model output
  changes only by the truncation error.
- the optimizer's state for each factor is rebuilt at the new shape: ``moments="project"`` carries the
  moments into the new coordinates (``FactorMaps``, ``project_moments``), ``"reset"`` zeroes them. Step
  counters are kept, so bias correction and any step-driven schedule go on where they were; nothing touches
  ``lr`` or the scheduler.

Optimizers: ``torch.optim.AdamW``/``Adam`` (and Adam-like ones keeping ``exp_avg``/``exp_avg_sq``, optionally
``max_exp_avg_sq``; ``SGD``'s ``momentum_buffer`` too): their moments are of raw gradients, which are covectors
and move with ``grad_A_map``/``grad_B_map``. ``LoRAProAdamW`` (recognised by its pair groups: ``params == [A,
B]`` with ``lora_scale`` and ``mode``): ``"full"`` mode keeps ``m x n`` moments of the equivalent gradient,
which do not depend on the factorisation and carry over unchanged; ``"efficient"`` mode keeps moments of the
adjusted gradients, which are directions in the factors' space and move with ``A_map``/``B_map``. The pair
group's ``lora_scale`` is set to the new scale. Moment storage (fp32, bf16, 8-bit) is kept. State entries this
module does not know and that have the factor's shape are refused (ValueError) rather than guessed.
Not supported: DeepSpeed ZeRO / FSDP (they hold their own flat copies of the parameters), DDP (its buckets are
sized at wrap time), DoRA, LoRA biases, conv and embedding LoRA layers, merged adapters.

``RankSchedule`` + ``maybe_squeeze`` (called after ``optimizer.step()``) anneal by the optimizer's own step
count, read from its state, so a resumed run squeezes at the same steps; a squeeze happens only for layers
whose rank is above the schedule's rank for that count, so calling it again (or after a resume) is a no-op.
``restore_ranks`` reshapes a fresh model to the ranks of a saved adapter config before its weights and
optimizer state are loaded.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..optim.state import ABSMAX, CODES, MIN_8BIT_SIZE, init_moment, read_moment, write_moment
from ..optim.partitioned import PartitionAwareOptimizer
from .adapters import CONFIG_NAME, LayerReport, _config_for, _plain_number, pattern_value
from .functional import (_is_int, check_alpha_policy, check_target, check_target_rank, energy_kept, lora_scale,
                         project_moments, squeeze_for_training)

MOMENT_MODES = ("project", "reset")
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LINEAR_MOMENTS = ("momentum_buffer",)


# --------------------------------------------------------------------------------------------- finding pairs


@dataclass
class LoraPair:
    """One LoRA pair of a PEFT layer: ``W = W0 + scale * B @ A`` for ``adapter`` on module ``name``."""

    name: str
    adapter: str
    module: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    alpha: float
    rslora: bool

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def label(self) -> str:
        return self.name if self.adapter == "default" else f"{self.name}[{self.adapter}]"


def unwrap_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` (accelerate's ``AcceleratedOptimizer`` keeps it as ``.optimizer``)."""
    seen = set()
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer (or a wrapper keeping one as .optimizer) or None, "
                         f"got {type(optimizer).__name__}")
    return optimizer


def _tuner_root(model: nn.Module) -> nn.Module:
    """The module whose names PEFT matches ``rank_pattern`` keys against (a PeftModel's ``base_model.model``)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # no PEFT: duck-typed layers named from the model itself
        return model
    if isinstance(model, PeftModel):
        return model.base_model.model if isinstance(model.base_model, BaseTuner) else model.base_model
    if isinstance(model, BaseTuner):
        return model.model
    return model


def _active(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", "default")
    return [active] if isinstance(active, str) else list(active)


def lora_pairs(model: nn.Module, adapter_names=None) -> list[LoraPair]:
    """Every LoRA pair of the active adapters (or of ``adapter_names``) of a PEFT LoRA model, with clear errors
    for layers this module cannot squeeze in place."""
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    pairs, seen_adapters = [], set()
    for name, module in _tuner_root(model).named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not (isinstance(lora_A, nn.ModuleDict) and isinstance(lora_B, nn.ModuleDict)
                and isinstance(getattr(module, "r", None), dict)
                and isinstance(getattr(module, "scaling", None), dict)):
            continue
        wanted = adapter_names if adapter_names is not None else _active(module)
        embedding = getattr(module, "lora_embedding_A", None) or {}
        for adapter in wanted:
            if adapter in embedding:
                raise ValueError(f"{name}: adapter {adapter!r} is an embedding LoRA layer; in-training squeeze "
                                 "supports linear LoRA layers only")
            if adapter not in lora_A:
                continue
            seen_adapters.add(adapter)
            where = f"{name}: adapter {adapter!r}"
            if adapter in getattr(module, "merged_adapters", []):
                raise ValueError(f"{where} is merged into the base weight; unmerge it before squeezing")
            if adapter in (getattr(module, "lora_variant", None) or {}) or \
                    (getattr(module, "use_dora", None) or {}).get(adapter, False):
                raise ValueError(f"{where} uses a LoRA variant (e.g. DoRA) whose update is not s * B @ A")
            if (getattr(module, "lora_bias", None) or {}).get(adapter, False):
                raise ValueError(f"{where} has a LoRA bias; only plain LoRA pairs can be squeezed")
            A, B = lora_A[adapter].weight, lora_B[adapter].weight
            if not isinstance(lora_A[adapter], nn.Linear) or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise ValueError(f"{where} is not a linear LoRA pair (A {tuple(A.shape)}, B {tuple(B.shape)}); "
                                 "conv LoRA layers cannot be squeezed in training")
            alpha = module.lora_alpha[adapter]
            rslora = bool((getattr(module, "use_rslora", None) or {}).get(adapter, False))
            if not math.isclose(module.scaling[adapter], lora_scale(alpha, A.shape[0], rslora), rel_tol=1e-12):
                raise ValueError(f"{where} has scaling {module.scaling[adapter]} but alpha {alpha} and rank "
                                 f"{A.shape[0]} give {lora_scale(alpha, A.shape[0], rslora)} (set_scale or "
                                 "scale_layer in effect?); squeezing would write a wrong alpha")
            pairs.append(LoraPair(name, adapter, module, A, B, float(alpha), rslora))
    if adapter_names is not None and set(adapter_names) - seen_adapters:
        raise ValueError(f"adapters {sorted(set(adapter_names) - seen_adapters)} have no LoRA layer in the model")
    if not pairs:
        raise ValueError(f"no LoRA layer with an active adapter found in {type(model).__name__} (expected PEFT LoRA "
                         "layers: modules with lora_A/lora_B ModuleDicts and r/scaling dicts)")
    return pairs


def lora_ranks(model: nn.Module, adapter_names=None) -> dict[str, int]:
    """``{layer: rank}`` of the active adapters (layer names as in ``LoraPair.label``)."""
    return {pair.label: pair.rank for pair in lora_pairs(model, adapter_names)}


# ----------------------------------------------------------------------------------------------- reports


def rank_metrics(ranks: dict[str, int], prefix: str = "squeeze/") -> dict[str, float]:
    values = list(ranks.values())
    if not values:
        return {}
    return {f"{prefix}rank_min": float(min(values)), f"{prefix}rank_max": float(max(values)),
            f"{prefix}rank_mean": sum(values) / len(values)}


@dataclass(frozen=True)
class InSqueezeReport:
    """One in-training squeeze: the optimizer step count it happened at, the per-layer report (squeezed layers and,
    under an energy target, layers left at their rank) and the ranks of all pairs afterwards."""

    step: int
    moments: str
    layers: tuple[LayerReport, ...]
    ranks: dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "squeeze/") -> dict[str, float]:
        """Numbers for a training log: current ranks, and the kept energy of this squeeze (``||dW_t||^2 /
        ||dW||^2`` per layer; mean and min)."""
        energies = [layer.energy for layer in self.layers]
        metrics = rank_metrics(self.ranks, prefix)
        metrics[f"{prefix}step"] = float(self.step)
        if energies:
            metrics[f"{prefix}energy_kept_mean"] = sum(energies) / len(energies)
            metrics[f"{prefix}energy_kept_min"] = min(energies)
        return metrics


# --------------------------------------------------------------------------------------------- optimizer


def optimizer_step_count(optimizer) -> int:
    """The optimizer's step count, read from its state (the largest ``step`` entry; 0 before the first step, and
    for optimizers without step counters such as SGD). It comes back with ``optimizer.load_state_dict``, so a
    resumed run continues the count."""
    optimizer = unwrap_optimizer(optimizer)
    steps = [state["step"] for state in optimizer.state.values() if isinstance(state, dict) and "step" in state]
    return max((int(s.item()) if isinstance(s, torch.Tensor) else int(s) for s in steps), default=0)


def _group_of(optimizer, param) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def _is_lorapro_pair(group: dict | None, pair: LoraPair) -> bool:
    return (group is not None and group.get("lora_scale") is not None and "mode" in group
            and len(group["params"]) == 2 and group["params"][0] is pair.A and group["params"][1] is pair.B)


def _moment_name(key: str) -> str:
    for suffix in (CODES, ABSMAX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _store(out: dict, old: dict, name: str, value: torch.Tensor, optimizer) -> None:
    """Write a moment at its new shape in the storage the old one used (8-bit, bf16, fp32, ...)."""
    if name + CODES in old:
        init_moment(out, name, value.float(), "8bit", getattr(optimizer, "min_8bit_size", MIN_8BIT_SIZE))
        write_moment(out, name, value.float())
    else:
        stored = old[name]
        out[name] = value.to(device=stored.device, dtype=stored.dtype).contiguous()


def _moved_state(state: dict, where: str, matrix: torch.Tensor, side: str, new_shape, step: int, betas,
                 moments: str, optimizer) -> dict:
    """A factor's optimizer state at the new shape: moments projected by ``matrix`` (or zeroed), counters kept."""
    out, names = {}, []
    for key, value in state.items():
        name = _moment_name(key)
        if name in _ADAM_MOMENTS + _LINEAR_MOMENTS:
            if name not in names:
                names.append(name)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            raise ValueError(f"{where}: optimizer state entry {key!r} of shape {tuple(value.shape)} is not a moment "
                             f"this module knows how to carry to the new rank ({_ADAM_MOMENTS + _LINEAR_MOMENTS}); "
                             "nothing was changed")
        else:
            out[key] = value
    if "exp_avg" in names and "exp_avg_sq" not in names:
        raise ValueError(f"{where}: optimizer state has exp_avg but no exp_avg_sq; not an Adam-like state")
    values = {name: read_moment(state, name) for name in names}
    new = {}
    if moments == "reset":
        new = {name: torch.zeros(new_shape, dtype=v.dtype, device=v.device) for name, v in values.items()}
    else:
        if "exp_avg" in values:
            m, v = values["exp_avg"], values["exp_avg_sq"]
            new["exp_avg"], new["exp_avg_sq"] = project_moments(m, v, matrix, side, step=step, betas=betas)
            if "max_exp_avg_sq" in values:  # AMSGrad: the same rule on its running maximum
                new["max_exp_avg_sq"] = project_moments(m, values["max_exp_avg_sq"], matrix, side, step=step,
                                                        betas=betas)[1]
        for name in _LINEAR_MOMENTS:
            if name in values:
                x, M = values[name], matrix.to(values[name].dtype)
                new[name] = M @ x if side == "left" else x @ M
    for name, value in new.items():
        _store(out, state, name, value, optimizer)
    return out


def _betas(group: dict) -> tuple[float, float]:
    betas = group.get("betas", (0.9, 0.999))
    return float(betas[0]), float(betas[1])


def _step_of(state: dict) -> int:
    step = state.get("step", 0)
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def _plan_optimizer(optimizer, pair: LoraPair, squeezed, moments: str):
    """``(new states {param: state}, group updates [(group, key, value)])`` for one pair; changes nothing."""
    if optimizer is None:
        return {}, []
    maps, updates, pair_step = squeezed.maps, [], None
    group = _group_of(optimizer, pair.A)
    lorapro = _is_lorapro_pair(group, pair)
    if lorapro:
        updates = [(group, "lora_scale", squeezed.scale)]
        if group["mode"] == "full":  # m x n moments of the equivalent gradient: independent of the factors
            return {}, updates
        # efficient mode: moments of the adjusted gradients, directions that move like the factors
        matrices, pair_step = (maps.A_map, maps.B_map), _step_of(optimizer.state.get(pair.A) or {})
    else:  # moments of raw gradients: covectors
        matrices = (maps.grad_A_map, maps.grad_B_map)
    plan = {}
    for param, new, matrix, side in ((pair.A, squeezed.A, matrices[0], "left"),
                                     (pair.B, squeezed.B, matrices[1], "right")):
        state = optimizer.state.get(param)
        if not state:
            continue
        own_group = group if lorapro else (_group_of(optimizer, param) or {})
        step = pair_step if lorapro else _step_of(state)
        where = f"{pair.label} ({'A' if param is pair.A else 'B'})"
        plan[param] = _moved_state(state, where, matrix, side, tuple(new.shape), step, _betas(own_group), moments,
                                   optimizer)
    return plan, updates


# ---------------------------------------------------------------------------------------------- configs


def _plan_configs(model: nn.Module, pairs: list[LoraPair], new: dict[int, tuple[int, float]]) -> dict:
    """``{adapter: (r, lora_alpha, rank_pattern, alpha_pattern)}`` for each adapter config the squeeze changes."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    touched = {pair.adapter for i, pair in enumerate(pairs) if i in new}
    planned = {}
    for adapter in touched:
        if adapter not in configs:
            continue
        ranks, alphas = {}, {}
        for i, pair in enumerate(pairs):
            if pair.adapter == adapter:
                ranks[pair.name], alphas[pair.name] = new.get(i, (pair.rank, pair.alpha))
        config = _config_for({"r": None, "lora_alpha": None}, ranks, alphas)
        planned[adapter] = (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"])
    return planned


def _set_config(config, values) -> None:
    config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern = values


def _set_pair(pair: LoraPair, A: torch.Tensor, B: torch.Tensor, alpha: float, scale: float) -> dict:
    """Put new-rank factors into the PEFT layer as NEW parameters; returns ``{old param: new param}``.

    New ``nn.Parameter`` objects, not ``param.data`` swaps: autograd caches each leaf's gradient accumulator
    with the shape it had, and a graph still alive (e.g. a loss tensor kept by the caller) would make the next
    backward fail with a shape mismatch.
    """
    rank = A.shape[0]
    module, adapter = pair.module, pair.adapter
    swapped = {}
    for linear, old, value, attribute in ((module.lora_A[adapter], pair.A, A, "out_features"),
                                          (module.lora_B[adapter], pair.B, B, "in_features")):
        new = nn.Parameter(value.detach().to(device=old.device, dtype=old.dtype).contiguous(),
                           requires_grad=old.requires_grad)
        linear.weight = new
        setattr(linear, attribute, rank)
        swapped[old] = new
    pair.A, pair.B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    module.r[adapter] = rank
    module.lora_alpha[adapter] = _plain_number(alpha)
    module.scaling[adapter] = scale
    return swapped


def _swap_in_optimizer(optimizer, swapped: dict, states: dict) -> None:
    """Replace old parameters by new ones in the param groups (same positions), the state (``states`` holds the
    rebuilt entries, keyed by the old parameters) and LoRAProAdamW's base-weight handles."""
    if isinstance(optimizer, PartitionAwareOptimizer):  # it also remembers the parameters each group was given
        optimizer.replace_parameters(swapped)
    else:
        for group in optimizer.param_groups:
            group["params"] = [swapped.get(p, p) for p in group["params"]]
    for old, new in swapped.items():
        state = optimizer.state.pop(old, None)
        state = states.get(old, state)  # rebuilt at the new shape, or carried as is (LoRA-Pro full mode)
        if state:
            optimizer.state[new] = state
    base_weights = getattr(optimizer, "_base_weights", None)  # LoRAProAdamW: {A: W0 handle} for weight decay
    if isinstance(base_weights, dict):
        for old, new in swapped.items():
            if old in base_weights:
                base_weights[new] = base_weights.pop(old)


# ---------------------------------------------------------------------------------------------- squeezing


def _check_moments(moments) -> str:
    if moments not in MOMENT_MODES:
        raise ValueError(f"moments must be one of {MOMENT_MODES}, got {moments!r}")
    return moments


def _squeeze(model, optimizer, pairs: list[LoraPair], due: list[int], rank, energy, moments, alpha,
             compute_dtype, step: int | None = None) -> InSqueezeReport:
    """Squeeze ``pairs[i]`` for ``i`` in ``due`` (all pairs are needed to rewrite the adapter configs)."""
    optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
    if step is None:
        step = 0 if optimizer is None else optimizer_step_count(optimizer)
    results, states, group_updates, reports, new = {}, {}, [], [], {}
    for i in due:
        pair = pairs[i]
        B, A = pair.B.detach().to(compute_dtype), pair.A.detach().to(compute_dtype)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{pair.label}: LoRA factors have non-finite values (NaN or inf); nothing was changed")
        if rank is not None:
            check_target_rank(rank, pair.rank, what=f"rank for layer {pair.label!r}")
        squeezed = squeeze_for_training(B, A, pair.alpha, rank=rank, energy=energy, target_alpha_policy=alpha,
                                        rslora=pair.rslora)
        shape = (B.shape[0], A.shape[1])
        if squeezed.rank >= pair.rank:  # an energy target that keeps everything: leave the pair as it is
            reports.append(LayerReport(pair.label, shape, pair.rank, pair.rank, pair.alpha, pair.alpha,
                                       energy_kept(squeezed.svd.S, pair.rank)))
            continue
        plan, updates = _plan_optimizer(optimizer, pair, squeezed, moments)
        results[i], new[i] = squeezed, (squeezed.rank, squeezed.alpha)
        states.update(plan)
        group_updates += updates
        reports.append(LayerReport(pair.label, shape, pair.rank, squeezed.rank, pair.alpha, squeezed.alpha,
                                   squeezed.energy))
    configs = _plan_configs(model, pairs, new)
    # everything is computed and checked: apply
    swapped = {}
    for i, squeezed in results.items():
        swapped.update(_set_pair(pairs[i], squeezed.A, squeezed.B, squeezed.alpha, squeezed.scale))
    if optimizer is not None:
        _swap_in_optimizer(optimizer, swapped, states)
    for group, key, value in group_updates:
        group[key] = value
    for adapter, values in configs.items():
        _set_config(model.peft_config[adapter], values)
    return InSqueezeReport(step, moments, tuple(reports), {pair.label: pair.rank for pair in pairs})


def squeeze_in_training(model: nn.Module, optimizer, *, rank: int | None = None, energy: float | None = None,
                        moments: str = "project", alpha="keep_scale", adapter_names=None,
                        compute_dtype: torch.dtype = torch.float64) -> InSqueezeReport:
    """Squeeze every LoRA pair of the active adapters (or ``adapter_names``) of a PEFT model in place.

    ``rank``: the target for every layer (must be below each layer's current rank), or ``energy`` in ``(0, 1]``
    (per layer; a layer that needs its whole rank is left alone). ``alpha``: as in ``squeeze_lora``
    (``"keep_scale"`` by default, so the effective learning rate of the factors is unchanged). ``moments``:
    ``"project"`` or ``"reset"``. ``optimizer`` may be None (model only) or wrapped (``.optimizer``). Call it
    after ``optimizer.step()`` and before the next backward. Every check runs before anything changes: on a
    ``ValueError`` the model, its config and the optimizer are untouched.
    """
    check_target(rank, energy)
    _check_moments(moments)
    check_alpha_policy(alpha)
    pairs = lora_pairs(model, adapter_names)
    return _squeeze(model, optimizer, pairs, list(range(len(pairs))), rank, energy, moments, alpha, compute_dtype)


# ----------------------------------------------------------------------------------------------- schedule


class RankSchedule:
    """Stages ``[(step, rank), ...]``: from optimizer step count ``step`` on, the LoRA rank is ``rank``.

    Steps strictly increase and ranks strictly decrease (annealing only). Before the first stage's step the
    schedule asks for nothing. ``maybe_squeeze`` is called after ``optimizer.step()``, so with a stage
    ``(200, 32)`` the first 200 steps run at the previous rank and step 201 is the first at rank 32.
    """

    def __init__(self, stages):
        try:
            stages = [tuple(stage) for stage in stages]
        except TypeError:
            raise ValueError(f"stages must be a list of (step, rank) pairs, got {stages!r}") from None
        if not stages:
            raise ValueError("a rank schedule needs at least one (step, rank) stage")
        for stage in stages:
            if len(stage) != 2 or not all(_is_int(x) for x in stage) or stage[0] < 0 or stage[1] <= 0:
                raise ValueError(f"each stage must be (step >= 0, rank > 0) with integers, got {stage!r}")
        for (step0, rank0), (step1, rank1) in zip(stages, stages[1:]):
            if step1 <= step0:
                raise ValueError(f"stage steps must strictly increase, got {step0} then {step1} in {stages}")
            if rank1 >= rank0:
                raise ValueError(f"stage ranks must strictly decrease (the rank is annealed down), got {rank0} then "
                                 f"{rank1} in {stages}")
        self.stages: tuple[tuple[int, int], ...] = tuple(stages)

    @classmethod
    def linear(cls, start: int, end: int, total_steps: int, stages: int) -> "RankSchedule":
        """``stages`` equal-length stages over ``total_steps``, ranks linearly from ``start`` to ``end``
        (rounded), e.g. ``linear(64, 8, 800, 4)``: ``[(0, 64), (200, 45), (400, 27), (600, 8)]``."""
        return cls._spaced(start, end, total_steps, stages, lambda t: start + (end - start) * t)

    @classmethod
    def geometric(cls, start: int, end: int, total_steps: int, stages: int) -> "RankSchedule":
        """Like ``linear`` with ranks spaced geometrically: ``geometric(64, 8, 800, 4)`` is 64 -> 32 -> 16 -> 8
        at steps 0, 200, 400, 600 (the paper's halving)."""
        if not (_is_int(start) and _is_int(end) and start > 0 and end > 0):
            raise ValueError(f"start and end must be positive integers, got {start!r} and {end!r}")
        return cls._spaced(start, end, total_steps, stages, lambda t: start * (end / start) ** t)

    @classmethod
    def _spaced(cls, start, end, total_steps, stages, rank_at) -> "RankSchedule":
        for label, value in (("start", start), ("end", end), ("total_steps", total_steps), ("stages", stages)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not end < start:
            raise ValueError(f"end rank must be below start rank, got start={start}, end={end}")
        if stages < 2 or stages > total_steps:
            raise ValueError(f"stages must be in [2, total_steps={total_steps}], got {stages}")
        steps = [i * total_steps // stages for i in range(stages)]
        ranks = [int(round(rank_at(i / (stages - 1)))) for i in range(stages)]
        ranks[0], ranks[-1] = start, end
        return cls(list(zip(steps, ranks)))

    def rank_at(self, step: int) -> int | None:
        """The rank for optimizer step count ``step`` (None before the first stage)."""
        rank = None
        for stage_step, stage_rank in self.stages:
            if step < stage_step:
                break
            rank = stage_rank
        return rank

    def __iter__(self):
        return iter(self.stages)

    def __eq__(self, other) -> bool:
        return isinstance(other, RankSchedule) and self.stages == other.stages

    def __repr__(self) -> str:
        return f"RankSchedule({list(self.stages)})"


def maybe_squeeze(model: nn.Module, optimizer, schedule: RankSchedule, *, moments: str = "project",
                  alpha="keep_scale", adapter_names=None, step: int | None = None,
                  compute_dtype: torch.dtype = torch.float64) -> InSqueezeReport | None:
    """Call after ``optimizer.step()``: squeeze the layers whose rank is above ``schedule.rank_at(step count)``
    to that rank (the step count read from the optimizer's state, or ``step`` if given: for optimizers that
    keep no step counter, e.g. SGD). Returns the report, or None when nothing was due; repeated calls and
    calls after a resume at the scheduled ranks are no-ops."""
    if not isinstance(schedule, RankSchedule):
        raise ValueError(f"schedule must be a RankSchedule, got {type(schedule).__name__}")
    _check_moments(moments)
    check_alpha_policy(alpha)
    if step is not None and (not _is_int(step) or step < 0):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = optimizer_step_count(optimizer) if step is None else step
    target = schedule.rank_at(step)
    if target is None:
        return None
    pairs = lora_pairs(model, adapter_names)
    due = [i for i, pair in enumerate(pairs) if pair.rank > target]
    if not due:
        return None
    return _squeeze(model, optimizer, pairs, due, target, None, moments, alpha, compute_dtype, step)


# ------------------------------------------------------------------------------------------------- resume


def _read_config(source) -> dict:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        path = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise ValueError(f"no adapter config at {path!r}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if isinstance(source, dict):
        return source
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ValueError(f"source must be an adapter directory, an adapter_config.json path, a dict or a PEFT config, "
                     f"got {type(source).__name__}")


def restore_ranks(model: nn.Module, source, adapter_name: str = "default") -> dict[str, int]:
    """Reshape ``adapter_name``'s LoRA pairs to the ranks (and alphas) of a saved adapter config, so that a
    checkpoint taken after a squeeze can be loaded (``model.load_state_dict``, ``PeftModel.load_adapter``,
    ``Trainer(resume_from_checkpoint=...)``). ``source``: the saved adapter directory (``save_pretrained`` writes
    the squeezed ranks to its ``adapter_config.json``), the config file, a dict or a ``LoraConfig``.

    Call it on a freshly built model before building the optimizer: reshaped factors hold zeros until the
    checkpoint's weights are loaded. Returns ``{layer: rank}`` of the layers that changed.
    """
    config = _read_config(source)
    for key in ("r", "lora_alpha"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)) or not config[key] > 0:
            raise ValueError(f"adapter config has {key}={config.get(key)!r}, expected a positive number")
    pairs = lora_pairs(model, [adapter_name])
    planned = {}
    for i, pair in enumerate(pairs):
        rank = pattern_value(config.get("rank_pattern"), pair.name, config["r"])
        alpha = float(pattern_value(config.get("alpha_pattern"), pair.name, config["lora_alpha"]))
        if not _is_int(rank) or rank <= 0:
            raise ValueError(f"{pair.label}: saved rank {rank!r} is not a positive integer")
        if rank > pair.rank:
            raise ValueError(f"{pair.label}: the saved adapter has rank {rank}, above the model's {pair.rank}; build "
                             "the model at the higher rank (squeezes only go down)")
        if (rank, alpha) != (pair.rank, pair.alpha):
            planned[i] = (rank, alpha)
    configs = _plan_configs(model, pairs, planned)
    for i, (rank, alpha) in planned.items():
        pair = pairs[i]
        scale = lora_scale(alpha, rank, pair.rslora)
        if rank == pair.rank:  # only the alpha differs: keep the factors
            pair.module.lora_alpha[pair.adapter], pair.module.scaling[pair.adapter] = _plain_number(alpha), scale
            continue
        _set_pair(pair, pair.A.new_zeros(rank, pair.A.shape[1]), pair.B.new_zeros(pair.B.shape[0], rank), alpha, scale)
    for adapter, values in configs.items():
        _set_config(model.peft_config[adapter], values)
    return {pairs[i].label: rank for i, (rank, _) in planned.items()}
