"""RandLoRAAdamW: a swap-in for ``torch.optim.AdamW`` that trains each weight matrix through RandLoRA.

For every matrix ``W`` in a RandLoRA group (a group with ``rank`` set) the optimizer keeps RandLoRA
coefficients ``(lambda, gamma)`` (PEFT's init, so the update starts at zero), projects ``dL/dW`` onto
them (``project``), runs AdamW on the coefficients, and writes ``dW(new) - dW(old)`` into ``W``
(``reconstruct`` of the change of the scaled basis). The model stays a plain model.

Rules:
- A parameter with two or more dimensions in a RandLoRA group is a matrix ``(shape[0], rest)``
  (``fan_in_fan_out=True`` for weights stored ``in x out``, like transformers' ``Conv1D``). Parameters
  with fewer dimensions (biases, norms) in a RandLoRA group get plain AdamW: they are ``O(d)``.
  ``plain_parameters_in_randlora_groups`` lists them.
- Groups without ``rank`` (``rank=None``) get plain AdamW.
- A matrix or parameter whose gradient has a NaN/inf is not stepped (state kept); the skip is counted
  in its state (``nonfinite_skips``) and in ``RandLoRAAdamW.nonfinite_skips``.
- Bases are shared by all matrices of the same ``(rank, seed, basis_kind)`` and sized for the largest
  of them, as PEFT does; they are regenerated from the seed, never saved, and checked against the
  fingerprint stored in each matrix's state when a state dict is loaded.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..randlora.bases import BASIS_KINDS, RandLoRABases, check_rank, make_bases
from ..randlora.functional import init_coefficients, project, reconstruct, scaled_basis
from .functional import adamw_step_, check_hyperparameters
from .precision import add_update_
from .state import (MIN_8BIT_SIZE, check_min_8bit_size, check_state_dtype, init_moment, read_moment,
                    write_moment)

COEFFICIENTS = ("lambda", "gamma")


def matrix_view(tensor: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A parameter (or its gradient) as the ``out x in`` matrix RandLoRA works on."""
    matrix = tensor if tensor.dim() == 2 else tensor.view(tensor.shape[0], -1)
    return matrix.T if fan_in_fan_out else matrix


def matrix_shape(param: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    rows, cols = param.shape[0], math.prod(param.shape[1:])
    return (cols, rows) if fan_in_fan_out else (rows, cols)


def coefficient_dtype(param: torch.Tensor) -> torch.dtype:
    """Coefficients and moments never go below fp32; fp64 models keep fp64 throughout."""
    return torch.promote_types(param.dtype, torch.float32)


class RandLoRAAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rank: int | None = None, alpha: float | None = None,
                 seed: int = 0, basis_kind: str = "dense", fan_in_fan_out: bool = False,
                 fused_backward: bool = False, data_parallel: bool = False, state_dtype: str = "fp32",
                 min_8bit_size: int = MIN_8BIT_SIZE, rounding_seed: int = 0):
        """``alpha`` defaults to ``20 * rank`` (scale 20, PEFT's recommendation). ``fused_backward`` projects
        each weight's gradient inside backward and frees it at once (gradient accumulation works: the
        projections add up). ``data_parallel`` averages the coefficient gradients (and plain parameters'
        gradients) over the default process group at each step: use it instead of DDP, so no full-size
        gradient is communicated. ``state_dtype`` is ``"fp32"``, ``"bf16"`` (first moments only) or
        ``"8bit"`` (block-wise quantised moments for tensors of at least ``min_8bit_size`` elements; see
        ``randopt.optim.state``). ``rounding_seed`` seeds the stochastic rounding of bf16 weights."""
        check_state_dtype(state_dtype)
        self.min_8bit_size = check_min_8bit_size(min_8bit_size)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, alpha=alpha,
                        seed=seed, basis_kind=basis_kind, fan_in_fan_out=fan_in_fan_out)
        self.fused_backward = fused_backward
        self.data_parallel = data_parallel
        self.state_dtype = state_dtype
        self.rounding_seed = rounding_seed
        self._bases: dict[tuple, RandLoRABases] = {}
        self._bases_on: dict[tuple, RandLoRABases] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._accumulated: dict[torch.Tensor, list[torch.Tensor]] = {}
        self._hooks = []
        self._generators: dict[str, torch.Generator] = {}
        super().__init__(params, defaults)

    # ----- groups and bases -------------------------------------------------------------------------
    @staticmethod
    def _is_matrix(param: torch.Tensor, group: dict) -> bool:
        return group["rank"] is not None and param.dim() >= 2

    @staticmethod
    def _bases_key(group: dict) -> tuple:
        return group["rank"], group["seed"], group["basis_kind"]

    def _validate_group(self, group: dict, params: list) -> None:
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if group["rank"] is not None:
            rank = check_rank(group["rank"])
            if group["basis_kind"] not in BASIS_KINDS:
                raise ValueError(f"basis_kind must be one of {BASIS_KINDS}, got {group['basis_kind']!r}")
            if group["alpha"] is not None and not group["alpha"] > 0:
                raise ValueError(f"alpha must be > 0, got {group['alpha']!r}")
            shapes = [matrix_shape(p, group["fan_in_fan_out"]) for p in params if p.dim() >= 2]
            if shapes:
                largest_min_side = max(min(s) for s in shapes)
                if rank > largest_min_side:
                    raise ValueError(f"rank={rank} is larger than allowed: at most {largest_min_side}, the smaller "
                                     "side of the largest matrix in the group")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ValueError("a parameter appears in two parameter groups (or twice in one): each parameter must "
                             "be in exactly one group")
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.is_leaf:
                raise ValueError(f"params must be leaf tensors, got {type(p).__name__}")

    def _required_bases(self, groups) -> dict[tuple, tuple[int, int]]:
        required: dict[tuple, tuple[int, int]] = {}
        for group in groups:
            for p in group["params"]:
                if self._is_matrix(p, group):
                    key = self._bases_key(group)
                    shape = matrix_shape(p, group["fan_in_fan_out"])
                    old = required.get(key, (0, 0))
                    required[key] = (max(old[0], shape[0]), max(old[1], shape[1]))
        return required

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group = {**self.defaults, **param_group, "params": params}
        group["betas"] = tuple(group["betas"])
        self._validate_group(group, params)
        required = self._required_bases(self.param_groups + [group])
        new_bases = dict(self._bases)
        for key, shape in required.items():
            current = self._bases.get(key)
            if current is not None and current.covers(*shape) and current.covers(*shape[::-1]):
                continue
            if current is not None and any(self.state):
                raise ValueError(f"cannot add a group needing RandLoRA bases of shape {shape} after training started "
                                 f"with bases of max shape {current.max_shape}")
            rank, seed, kind = key
            new_bases[key] = make_bases(shape, rank, seed=seed, kind=kind)
        super().add_param_group(group)
        self._bases = new_bases
        self._bases_on.clear()
        for p in params:
            self._group_of[p] = group
            if self.fused_backward and self._is_matrix(p, group):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._project_in_backward))

    def bases_for(self, group: dict, device, dtype) -> RandLoRABases:
        key = (self._bases_key(group), str(device), dtype)
        bases = self._bases_on.get(key)
        if bases is None:
            bases = self._bases[self._bases_key(group)].to(device=device, dtype=dtype)
            self._bases_on[key] = bases
        return bases

    @property
    def plain_parameters_in_randlora_groups(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["rank"] is not None for p in g["params"] if p.dim() < 2]

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter steps were skipped because a gradient had a NaN or inf."""
        return int(sum(s["nonfinite_skips"].item() for s in self.state.values() if "nonfinite_skips" in s))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ----- per-parameter state ------------------------------------------------------------------------
    def _scale(self, group: dict) -> float:
        alpha = group["alpha"] if group["alpha"] is not None else 20.0 * group["rank"]
        return alpha / group["rank"]

    def _layer(self, p: torch.Tensor, group: dict):
        state = self.state[p]
        bases = self.bases_for(group, p.device, state["lambda"].dtype)
        return bases.layer(*matrix_shape(p, group["fan_in_fan_out"]))

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        dtype = coefficient_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        if self._is_matrix(p, group):
            out_features, in_features = matrix_shape(p, group["fan_in_fan_out"])
            lam, gam = init_coefficients(out_features, in_features, group["rank"], dtype=dtype, device=p.device)
            state["lambda"], state["gamma"] = lam, gam
            state["bases_fingerprint"] = self._bases[self._bases_key(group)].fingerprint_tensor()
            for name, coefficient in zip(COEFFICIENTS, (lam, gam)):
                self._init_moments(state, f"{name}_", coefficient)
        else:
            self._init_moments(state, "", torch.empty(p.shape, dtype=dtype, device=p.device))
        return state

    def _init_moments(self, state: dict, prefix: str, like: torch.Tensor) -> None:
        for name in ("exp_avg", "exp_avg_sq"):
            init_moment(state, prefix + name, like, self.state_dtype, self.min_8bit_size)

    def _project(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> list[torch.Tensor]:
        state = self._init_state(p, group)
        G = matrix_view(grad, group["fan_in_fan_out"]).to(state["lambda"].dtype)
        return list(project(G, self._layer(p, group), state["lambda"], state["gamma"], self._scale(group)))

    def _project_in_backward(self, p: torch.Tensor) -> None:
        group = self._group_of[p]
        grads = self._project(p, group, p.grad)
        accumulated = self._accumulated.get(p)
        if accumulated is None:
            self._accumulated[p] = grads
        else:
            for total, g in zip(accumulated, grads):
                total.add_(g)
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._accumulated.clear()
        super().zero_grad(set_to_none)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.rounding_seed)
            self._generators[key] = generator
        return generator

    # ----- the step -----------------------------------------------------------------------------------
    def _collect_gradients(self):
        """``[(param, group, grads)]``: coefficient gradients for matrices, the gradient for the rest."""
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if self._is_matrix(p, group):
                    grads = self._accumulated.pop(p, None) if self.fused_backward else (
                        None if p.grad is None else self._project(p, group, p.grad))
                else:
                    grads = None if p.grad is None else [p.grad.to(coefficient_dtype(p))]
                if grads is not None:
                    self._init_state(p, group)
                    work.append((p, group, grads))
        return work

    def _average_over_processes(self, work) -> None:
        grads = [g for _, _, gs in work for g in gs]
        if not grads or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect_gradients()
        if self.data_parallel:
            self._average_over_processes(work)
        finite = torch.stack([torch.stack([g.isfinite().all() for g in gs]).all() for _, _, gs in work]).tolist() \
            if work else []
        for (p, group, grads), ok in zip(work, finite):
            state = self.state[p]
            if not ok:
                state["nonfinite_skips"] += 1
                continue
            state["step"] += 1
            if self._is_matrix(p, group):
                self._step_matrix(p, group, state, grads)
            else:
                self._step_plain(p, group, state, grads[0])
        return loss

    def _adamw(self, param, grad, state, prefix, group) -> None:
        beta1, beta2 = group["betas"]
        m, v = read_moment(state, f"{prefix}exp_avg"), read_moment(state, f"{prefix}exp_avg_sq")
        adamw_step_(param, grad, m, v, int(state["step"].item()), group["lr"], beta1, beta2, group["eps"],
                    group["weight_decay"])
        write_moment(state, f"{prefix}exp_avg", m)
        write_moment(state, f"{prefix}exp_avg_sq", v)

    def _step_matrix(self, p, group, state, grads) -> None:
        layer = self._layer(p, group)
        lam, gam = state["lambda"], state["gamma"]
        old_basis = scaled_basis(layer.A, lam, gam)
        for name, coefficient, grad in zip(COEFFICIENTS, (lam, gam), grads):
            self._adamw(coefficient, grad, state, f"{name}_", group)
        change = reconstruct(layer, scaled_basis(layer.A, lam, gam) - old_basis, self._scale(group))
        add_update_(matrix_view(p.data, group["fan_in_fan_out"]), change, self._generator(p.device))

    def _step_plain(self, p, group, state, grad) -> None:
        if p.dtype == coefficient_dtype(p):
            self._adamw(p.data, grad, state, "", group)
            return
        exact = p.data.to(coefficient_dtype(p))
        before = exact.clone()
        self._adamw(exact, grad, state, "", group)
        add_update_(p.data, exact - before, self._generator(p.device))

    # ----- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["rounding_generators"] = {k: g.get_state() for k, g in self._generators.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("rounding_generators", {})
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for saved_group, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(index, {})
                if "bases_fingerprint" in saved:
                    self._bases[self._bases_key(group)].check_fingerprint(saved["bases_fingerprint"],
                                                                          "optimizer state dict")
                    expected = init_coefficients(*matrix_shape(p, group["fan_in_fan_out"]), group["rank"])[0].shape
                    if saved["lambda"].shape != expected:
                        raise ValueError(f"state dict holds lambda of shape {tuple(saved['lambda'].shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}; expected {tuple(expected)}")
        super().load_state_dict(state_dict)
        # torch casts every loaded state tensor to the parameter's dtype; coefficients, moments and
        # counters keep their own dtypes here (fp32 coefficients for bf16 weights, int64 counters).
        for saved_group, group in zip(saved_groups, self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(index, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, copy=True)
        for key, generator_state in generators.items():
            self._generator(torch.device(key)).set_state(generator_state)
