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
- ``RandLoRAAdamW(model)`` (a module) means ``RandLoRAAdamW(param_groups(model, rank=rank))``: RandLoRA on
  every linear layer but the output layer and head, everything else frozen (see ``param_groups`` to name
  targets, a head to train, ``plain_lr``).
- ``rank`` defaults to ``DEFAULT_RANK`` (32): ``RandLoRAAdamW(model.parameters())`` trains EVERY parameter with
  two or more dimensions (embeddings included) through RandLoRA at rank 32, never silently as plain AdamW.
  Only a group that says ``"rank": None`` gets plain AdamW.
- ``alpha`` defaults to ``default_alpha(rank) = 20 * rank`` (scale 20), the rule ``inject_randlora`` uses too.
- A matrix or parameter whose gradient has a NaN/inf is not stepped (state kept); the skip is counted
  in its state (``nonfinite_skips``) and in ``RandLoRAAdamW.nonfinite_skips``.
- Bases are shared by all matrices of the same ``(rank, seed, basis_kind)`` and sized for the largest
  of them, as PEFT does; they are regenerated from the seed, never saved, and checked against the
  fingerprint stored in each matrix's state when a state dict is loaded.

Storage is separate from the math (``randopt.optim.locators``): the per-matrix code works on rectangular
blocks of the ``out x in`` matrix, and a locator says which blocks this process owns. Plain training owns
whole tensors. Under DeepSpeed ZeRO 1/2/3 (pass this optimizer to ``deepspeed.initialize`` as a client
optimizer, or use ``randopt.integrations.deepspeed``) each rank owns a flat fragment of some weights: it
projects only its fragment's gradient (partial sums of the projection), the coefficient gradients of all
matrices are summed over the data-parallel group in ONE flat all-reduce per real step (ZeRO's partition
gradients are already averaged), every rank runs the same coefficient AdamW (coefficients are replicated),
and each rank writes the update into the fp32 fragment it owns. No full-size gradient or weight is
gathered. DeepSpeed calls ``step()`` once per group or sub-group; the optimizer projects on each call and
finishes the real step on the last one. ``fused_backward`` and ``data_parallel`` are for plain training.
State stays keyed by the ORIGINAL parameters, so ``engine.save_checkpoint``/``load_checkpoint`` carry it.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from ..randlora.bases import BASIS_KINDS, RandLoRABases, make_bases
from ..randlora.functional import (DEFAULT_RANK, coefficient_shapes, default_alpha, init_coefficients, project,
                                   reconstruct, scaled_basis)
from ..randlora.quantized import refuse_quantized
from ..validation import (GroupChecks, check_dense_gradient, check_matrix_layout, check_options, check_params,
                          check_saved_state, choice, filled_in, group_params, rank as check_rank, real)
from .functional import adamw_results, clip_factor
from .groups import GROUP_OPTIONS, RANDLORA_OPTIONS, param_groups
from .locators import Block, DTensorShards, WholeTensors, locator_for, logical_shape
from .partitioned import PartitionAwareOptimizer
from .precision import updated_weight
from .state import (BLOCK_SIZE, MIN_8BIT_SIZE, check_state_dtype, encode_moment, init_moment, read_moment,
                    store_entries)

COEFFICIENTS = ("lambda", "gamma")
WEIGHT_UPDATES = ("stochastic", "exact")


def shape_as_matrix(shape, fan_in_fan_out: bool) -> tuple[int, int]:
    rows, cols = shape[0], math.prod(shape[1:])
    return (cols, rows) if fan_in_fan_out else (rows, cols)


def matrix_shape(param: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    return shape_as_matrix(logical_shape(param), fan_in_fan_out)


def coefficient_dtype(param: torch.Tensor) -> torch.dtype:
    """Coefficients and moments never go below fp32; fp64 models keep fp64 throughout."""
    return torch.promote_types(param.dtype, torch.float32)


def _working_moment(state: dict, name: str, grad: torch.Tensor) -> torch.Tensor:
    """Moment ``name`` to compute with, in the gradient's dtype: bf16 and 8-bit moments read back as fp32, which an
    fp64 model's fp64 gradients cannot be combined with (for the other cases the stored tensor itself, no copy)."""
    return read_moment(state, name).to(grad.dtype)


def oriented(blocks: list[Block], fan_in_fan_out: bool) -> list[tuple]:
    """Blocks of the stored layout as ``(grad, weight, rows, cols)`` of the ``out x in`` matrix."""
    result = []
    for block in blocks:
        grad, weight, row, col = block.grad, block.weight, block.row_start, block.col_start
        if fan_in_fan_out:
            grad, weight, row, col = None if grad is None else grad.T, weight.T, col, row
        result.append((grad, weight, slice(row, row + weight.shape[0]), slice(col, col + weight.shape[1])))
    return result


class RandLoRAAdamW(PartitionAwareOptimizer):
    """AdamW on RandLoRA coefficients for every weight matrix of a RandLoRA group, plain AdamW for the rest: a
    swap-in for ``torch.optim.AdamW`` on a plain model (see the module documentation for the rules)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, rank: int | None = DEFAULT_RANK, alpha: float | None = None,
                 seed: int = 0, basis_kind: str = "dense", fan_in_fan_out: bool = False,
                 fused_backward: bool = False, data_parallel: bool = False, state_dtype: str = "fp32",
                 min_8bit_size: int = MIN_8BIT_SIZE, rounding_seed: int = 0, weight_update: str = "stochastic",
                 max_grad_norm: float | None = None):
        """``params``: parameters, parameter groups or a model (``param_groups(model, rank=rank)``: all-linear
        targets, the rest frozen). ``rank`` (default 32) applies to every group without a ``rank`` of its own;
        ``"rank": None`` makes a group plain AdamW. ``alpha`` defaults to ``default_alpha(rank) = 20 * rank``
        (scale 20, PEFT's recommendation, and ``inject_randlora``'s default). ``fused_backward`` projects
        each weight's gradient inside backward and frees it at once (gradient accumulation works: the
        projections add up until ``zero_grad``, as ``.grad`` does, each taken at the coefficients of its backward
        pass). ``data_parallel`` averages the coefficient gradients (and plain parameters'
        gradients) over the default process group at each step: use it instead of DDP, so no full-size
        gradient is communicated. ``state_dtype`` is ``"fp32"``, ``"bf16"`` (first moments only) or
        ``"8bit"`` (block-wise quantised moments for tensors of at least ``min_8bit_size`` elements; see
        ``randopt.optim.state``). ``rounding_seed`` seeds the stochastic rounding of bf16 weights.

        ``weight_update`` says how a matrix's update reaches its weight. ``"stochastic"`` adds
        ``dW(new) - dW(old)`` to the weight, a bf16 weight rounding stochastically: unbiased, but the weight
        drifts from ``W0 + dW`` by a random walk of rounding errors that grows with the steps. ``"exact"``
        keeps a copy of the starting weight ``W0`` (in the weight's own dtype: one more weight's worth of
        memory per trained matrix, in the optimizer state) and writes ``round(W0 + dW)`` at every step, so
        the model always equals the adapter the coefficients describe (up to one rounding of the sum).
        Both apply to matrices; plain parameters always get AdamW with stochastic rounding in bf16.

        ``max_grad_norm`` clips inside the step, where the optimizer still sees every gradient (with
        ``fused_backward`` ``torch.nn.utils.clip_grad_norm_`` cannot: the matrices' gradients are projected and
        freed during backward). The total norm is the 2-norm over the full ``dL/dW`` of every RandLoRA matrix and
        the gradient of every plain parameter, as ``clip_grad_norm_`` over the model would compute it; every
        coefficient gradient (projection is linear, so this equals clipping ``dL/dW`` first) and plain gradient
        is multiplied by ``min(1, max_grad_norm / (total + 1e-6))``. With fused backward and several backward
        passes per step, a matrix's norm is the sum of its per-backward norms (an upper bound of the
        accumulated gradient's norm: clipping is then at least as strong). Parameters with NaN/inf gradients are
        skipped and left out of the norm. The last total norm is in ``last_grad_norm``. Not with
        ``data_parallel``, DeepSpeed or FSDP (use their own clipping)."""
        options = self.check_arguments(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, alpha=alpha, seed=seed,
            basis_kind=basis_kind, fan_in_fan_out=fan_in_fan_out, fused_backward=fused_backward,
            data_parallel=data_parallel, state_dtype=state_dtype, min_8bit_size=min_8bit_size,
            rounding_seed=rounding_seed, weight_update=weight_update, max_grad_norm=max_grad_norm)
        defaults = {k: options[k] for k in GROUP_OPTIONS}
        self.min_8bit_size = options["min_8bit_size"]
        self.fused_backward = options["fused_backward"]
        self.data_parallel = options["data_parallel"]
        self.state_dtype = options["state_dtype"]
        self.rounding_seed = options["rounding_seed"]
        self.weight_update = options["weight_update"]
        self.max_grad_norm = options["max_grad_norm"]
        self.last_grad_norm: float | None = None
        """The total gradient norm the last step clipped with (``max_grad_norm`` set), else None."""
        self._norm_bounds: dict[torch.Tensor, torch.Tensor] = {}
        self._group_checks = GroupChecks(self._check_group_options, GROUP_OPTIONS, frozen=RANDLORA_OPTIONS,
                                         why_frozen="rank, alpha, seed, basis_kind and fan_in_fan_out define a "
                                         "group's RandLoRA bases and the update its coefficients stand for; build "
                                         "a new optimizer to change them")
        self._bases: dict[tuple, RandLoRABases] = {}
        self._bases_on: dict[tuple, RandLoRABases] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._accumulated: dict[torch.Tensor, list[torch.Tensor]] = {}
        self._hooks = []
        self._generators: dict[str, torch.Generator] = {}
        self._shapes: dict[torch.Tensor, tuple[int, ...]] = {}  # logical shapes (DeepSpeed empties .data)
        if isinstance(params, nn.Module):
            params = param_groups(params, rank=DEFAULT_RANK if rank is None else rank)
        super().__init__(check_params(params), defaults)

    @classmethod
    def check_arguments(cls, **kwargs) -> dict:
        """The constructor's keyword arguments (defaults filled in) checked as the constructor checks them, without
        parameters: ``ValueError`` naming the first bad one, or the arguments with numbers as ``float``. The
        transformers factory and the DeepSpeed block call it to fail before training starts."""
        options = filled_in(cls, kwargs)
        cls._check_group_options(options)
        check_state_dtype(options["state_dtype"])
        choice("weight_update", options["weight_update"], WEIGHT_UPDATES)
        options["max_grad_norm"] = real("max_grad_norm", options["max_grad_norm"], positive=True, allow_none=True)
        if options["max_grad_norm"] is not None and options["data_parallel"]:
            raise ValueError(f"max_grad_norm={options['max_grad_norm']} cannot be combined with data_parallel=True: "
                             "the norm of the averaged gradient is not known to each rank")
        return check_options(options)

    # ----- groups and bases -------------------------------------------------------------------------
    def _shape(self, p: torch.Tensor) -> tuple[int, ...]:
        shape = self._shapes.get(p)
        return shape if shape is not None else logical_shape(p)

    def _is_matrix(self, param: torch.Tensor, group: dict) -> bool:
        return group["rank"] is not None and len(self._shape(param)) >= 2

    def _matrix_shape(self, p: torch.Tensor, group: dict) -> tuple[int, int]:
        return shape_as_matrix(self._shape(p), group["fan_in_fan_out"])

    @staticmethod
    def _bases_key(group: dict) -> tuple:
        return group["rank"], group["seed"], group["basis_kind"]

    @staticmethod
    def _check_group_options(group: dict) -> None:
        """The options of one group (``ValueError`` naming the first bad one); changes nothing."""
        check_options({k: group[k] for k in GROUP_OPTIONS if k != "rank" and k != "basis_kind"})
        check_rank(group["rank"], allow_none=True)
        choice("basis_kind", group["basis_kind"], BASIS_KINDS)

    def _validate_group(self, group: dict, params: list) -> None:
        # first: a packed weight's shape is its storage's, which would make every other message misleading
        refuse_quantized([(f"params[{i}] {tuple(p.shape)}", p) for i, p in enumerate(params)], "RandLoRAAdamW")
        self._check_group_options(group)
        if group["rank"] is not None:
            rank = group["rank"]
            shapes = [shape_as_matrix(logical_shape(p), group["fan_in_fan_out"]) for p in params
                      if len(logical_shape(p)) >= 2]
            if shapes:
                largest_min_side = max(min(s) for s in shapes)
                if rank > largest_min_side:
                    raise ValueError(f"rank={rank} is larger than allowed: at most {largest_min_side}, the smaller "
                                     "side of the largest matrix in the group")
        seen = {id(p) for g in self._all_groups for p in self._params_of(g)}
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ValueError("a parameter appears in two parameter groups (or twice in one): each parameter must "
                             "be in exactly one group")
        if group["rank"] is not None:
            for p in params:
                check_matrix_layout(p)

    def _required_bases(self, groups_and_params) -> dict[tuple, tuple[int, int]]:
        required: dict[tuple, tuple[int, int]] = {}
        for group, params in groups_and_params:
            for p in params:
                shape = logical_shape(p)
                if group["rank"] is not None and len(shape) >= 2:
                    key = self._bases_key(group)
                    out_in = shape_as_matrix(shape, group["fan_in_fan_out"])
                    old = required.get(key, (0, 0))
                    required[key] = (max(old[0], out_in[0]), max(old[1], out_in[1]))
        return required

    def add_param_group(self, param_group: dict) -> None:
        params = group_params(param_group)
        group = {**self.defaults, **param_group, "params": params}
        self._validate_group(group, params)
        group = check_options(group)
        existing = [(g, self._params_of(g)) for g in self._all_groups]
        required = self._required_bases(existing + [(group, params)])
        new_bases = dict(self._bases)
        for key, shape in required.items():
            current = self._bases.get(key)
            if current is not None and current.covers(*shape) and current.covers(*shape[::-1]):
                continue
            if current is not None and any(self.state.values()):
                raise ValueError(f"cannot add a group needing RandLoRA bases of shape {shape} after training started "
                                 f"with bases of max shape {current.max_shape}")
            rank, seed, kind = key
            new_bases[key] = make_bases(shape, rank, seed=seed, kind=kind)
        super().add_param_group(group)
        self._bases = new_bases
        self._bases_on.clear()
        self._remember_group(self.param_groups[-1])
        self._group_checks.accept(self.param_groups[-1])
        for p in params:
            self._shapes[p] = logical_shape(p)
            self._group_of[p] = group
            if self.fused_backward and self._is_matrix(p, group):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._project_in_backward))

    def _parameters_replaced(self, replaced: dict) -> None:
        for old, new in replaced.items():
            if old in self._group_of:
                self._group_of[new] = self._group_of.pop(old)
            if self._shapes.pop(old, None) is not None:  # the new shape: In-Squeeze gives smaller factors
                self._shapes[new] = logical_shape(new)

    def bases_for(self, group: dict, device, dtype) -> RandLoRABases:
        key = (self._bases_key(group), str(device), dtype)
        bases = self._bases_on.get(key)
        if bases is None:
            bases = self._bases[self._bases_key(group)].to(device=device, dtype=dtype)
            self._bases_on[key] = bases
        return bases

    def set_bases(self, bases: RandLoRABases, group: dict) -> None:
        """Use ``bases`` (e.g. an imported adapter's) for every group sharing ``group``'s bases; before training.
        Checkpoints record their fingerprint, so resuming needs the same bases installed again."""
        key = self._bases_key(group)
        if bases.rank != group["rank"]:
            raise ValueError(f"bases have rank {bases.rank}, the group has rank={group['rank']}")
        for g in self._all_groups:
            if self._bases_key(g) != key:
                continue
            for p in self._params_of(g):
                if self._is_matrix(p, g):
                    if self.state.get(p):
                        raise ValueError("set_bases must be called before the first step: "
                                         f"a parameter of shape {tuple(self._shape(p))} already has state")
                    if not bases.covers(*self._matrix_shape(p, g)):
                        raise ValueError(f"bases cover (min side, max side) up to {bases.max_shape}, but the group "
                                         f"trains a matrix of shape {self._matrix_shape(p, g)}")
        self._bases[key] = bases
        self._bases_on.clear()

    def load_coefficients(self, param: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> None:
        """Start ``param``'s RandLoRA coefficients from ``(lambda, gamma)`` (with fresh moments), e.g. to continue
        an imported adapter. The weight must already hold the matching update."""
        group = self._group_of.get(param)
        if group is None or not self._is_matrix(param, group):
            raise ValueError("load_coefficients: the parameter is not a matrix of a RandLoRA group of this optimizer")
        self.state.pop(param, None)
        state = self._init_state(param, group)
        for name, value in zip(COEFFICIENTS, (lam, gam)):
            if value.shape != state[name].shape:
                self.state.pop(param, None)
                raise ValueError(f"load_coefficients: {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(state[name].shape)}")
            state[name].copy_(value)

    def matrices(self):
        """``(param, group, lambda, gamma, layer_bases, scale)`` for every RandLoRA matrix with state, keyed by
        the original parameters (also under DeepSpeed)."""
        for group in self._all_groups:
            for p in self._params_of(group):
                state = self.state.get(p)
                if state and "lambda" in state:
                    yield p, group, state["lambda"], state["gamma"], self._layer(p, group), self._scale(group)

    @property
    def plain_parameters_in_randlora_groups(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["rank"] is not None for p in self._params_of(g)
                if len(self._shape(p)) < 2]

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
        alpha = group["alpha"] if group["alpha"] is not None else default_alpha(group["rank"])
        return alpha / group["rank"]

    def _learned_numel(self, p: torch.Tensor, group: dict) -> int | None:
        """The number of coefficients learned for ``p`` if it is a RandLoRA matrix, else None (``trainable_summary``)."""
        if not self._is_matrix(p, group):
            return None
        lam, gam = coefficient_shapes(*self._matrix_shape(p, group), group["rank"])
        return lam[0] * lam[1] + gam[0] * gam[1]

    def _layer(self, p: torch.Tensor, group: dict):
        state = self.state[p]
        bases = self.bases_for(group, p.device, state["lambda"].dtype)
        return bases.layer(*self._matrix_shape(p, group))

    def _init_state(self, p: torch.Tensor, group: dict, like: torch.Tensor | None = None) -> dict:
        """A parameter's state; a plain parameter's moments are shaped like ``like`` (the part this process
        owns), by default the whole parameter. Built whole before it is stored: a failure leaves no state."""
        if self.state.get(p):
            return self.state[p]
        state = {}
        dtype = coefficient_dtype(p)
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64)
        if self._is_matrix(p, group):
            out_features, in_features = self._matrix_shape(p, group)
            lam, gam = init_coefficients(out_features, in_features, group["rank"], dtype=dtype, device=p.device)
            state["lambda"], state["gamma"] = lam, gam
            state["bases_fingerprint"] = self._bases[self._bases_key(group)].fingerprint_tensor()
            for name, coefficient in zip(COEFFICIENTS, (lam, gam)):
                self._init_moments(state, f"{name}_", coefficient)
        else:
            like = torch.empty(self._shape(p), dtype=dtype, device=p.device) if like is None else like
            self._init_moments(state, "", like)
        self.state[p] = state
        return state

    def _init_moments(self, state: dict, prefix: str, like: torch.Tensor) -> None:
        for name in ("exp_avg", "exp_avg_sq"):
            init_moment(state, prefix + name, like, self.state_dtype, self.min_8bit_size)

    def _project_blocks(self, p: torch.Tensor, group: dict, blocks: list[tuple]) -> list[torch.Tensor]:
        """Coefficient gradients from the gradient blocks this process holds: partial sums that add up."""
        state = self._init_state(p, group)
        lam, gam = state["lambda"], state["gamma"]
        layer, shape, scale = self._layer(p, group), self._matrix_shape(p, group), self._scale(group)
        total = None
        for grad, _, rows, cols in blocks:
            if grad is None:
                continue
            parts = project(grad.to(lam.dtype), layer, lam, gam, scale, shape=shape, row_start=rows.start,
                            col_start=cols.start)
            total = list(parts) if total is None else [t.add_(part) for t, part in zip(total, parts)]
        return total if total is not None else [torch.zeros_like(lam), torch.zeros_like(gam)]

    def _whole_blocks(self, p: torch.Tensor, group: dict) -> list[tuple]:
        return oriented(WholeTensors().blocks(p), group["fan_in_fan_out"])

    def _project_in_backward(self, p: torch.Tensor) -> None:
        group = self._group_of[p]
        grads = self._project_blocks(p, group, self._whole_blocks(p, group))
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.float64)
            self._norm_bounds[p] = self._norm_bounds[p] + norm if p in self._norm_bounds else norm
        accumulated = self._accumulated.get(p)
        if accumulated is None:
            self._accumulated[p] = grads
        else:
            for total, g in zip(accumulated, grads):
                total.add_(g)
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._accumulated.clear()
        self._norm_bounds.clear()
        super().zero_grad(set_to_none)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.rounding_seed)
            self._generators[key] = generator
        return generator

    # ----- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()
        locator = self._update_locator()
        if locator.distributed:
            if self.fused_backward:
                raise RuntimeError("fused_backward=True cannot be used under DeepSpeed ZeRO or FSDP, which own the "
                                   "gradients: create RandLoRAAdamW with fused_backward=False")
            if self.weight_update == "exact" and isinstance(locator, DTensorShards):
                raise ValueError("weight_update='exact' is not supported under FSDP2 (fully_shard) yet: use "
                                 "weight_update='stochastic'")
            if self.max_grad_norm is not None:
                raise RuntimeError("max_grad_norm cannot be used under DeepSpeed ZeRO or FSDP: use their own clipping "
                                   "(DeepSpeed's \"gradient_clipping\"), which sees the gradients before the optimizer "
                                   "projects them")
            self._sharded_call(locator, lambda group, p: self._visit(locator, group, p))
        else:
            self._whole_step()
        return loss

    def _check_before_step(self) -> None:
        """Everything a step relies on that may have changed since construction, checked before anything moves:
        group options (a scheduler or a user may have set them; re-checked only when changed), the matrices'
        memory layout and dense gradients. Every group's options, also those of the groups DeepSpeed steps in its
        other calls of this real step (it shows one group per call)."""
        for group in self._all_groups:
            self._group_checks.check(group)
            for p in self._params_of(group):
                check_dense_gradient(p)
                if self._is_matrix(p, group):
                    check_matrix_layout(p)

    def _whole_step(self) -> None:
        """Plain training: the groups passed in now hold whole parameters."""
        work = self._collect_gradients()
        if self.data_parallel:
            self._all_reduce([grads for _, _, grads, _ in work], None, average=True)
        finite = self._finite([grads for _, _, grads, _ in work])
        if self.max_grad_norm is not None:
            self._clip([item for item, ok in zip(work, finite) if ok])
        stepped = []
        for item, ok in zip(work, finite):
            if ok:
                stepped.append(item)
            else:
                self.state[item[0]]["nonfinite_skips"] += 1
        coefficients = self._new_coefficients([(p, group, grads) for p, group, grads, _ in stepped
                                               if self._is_matrix(p, group)])
        # plain parameters in their exact dtype, batched; the others (rounded into a low-precision weight, which
        # draws from the rounding generator) keep their turn among the matrices
        exact = [(p.data, grads[0], self.state[p], group) for p, group, grads, _ in stepped
                 if not self._is_matrix(p, group) and p.dtype == coefficient_dtype(p)]
        for (weight, _, state, _), new in zip(exact, self._new_plain(exact)):
            self._store_plain(state, new)
            weight.copy_(new[0])
        for p, group, grads, blocks in stepped:
            if self._is_matrix(p, group):
                self._step_matrix(p, group, self.state[p], coefficients[p], blocks)
            elif p.dtype != coefficient_dtype(p):
                self._step_plain(p.data, grads[0], self.state[p], group)

    def _clip(self, work) -> None:
        """Scale the gradients about to be stepped as ``clip_grad_norm_`` would scale the full ones."""
        norms = []
        for p, group, grads, _ in work:
            if not self._is_matrix(p, group):
                norms.append(torch.linalg.vector_norm(grads[0], dtype=torch.float64))
            elif self.fused_backward:
                norms.append(self._norm_bounds.pop(p))
            else:
                norms.append(torch.linalg.vector_norm(p.grad, dtype=torch.float64))
        total, factor = clip_factor(norms, self.max_grad_norm)
        self.last_grad_norm = float(total)
        if factor < 1:
            for _, _, grads, _ in work:
                for g in grads:
                    g.mul_(factor.to(g.dtype))

    def _collect_gradients(self):
        """``[(param, group, grads, blocks)]``: coefficient gradients for matrices, the gradient for the rest."""
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                blocks = None
                if self._is_matrix(p, group):
                    blocks = self._whole_blocks(p, group)
                    grads = self._accumulated_gradients(p) if self.fused_backward else (
                        None if p.grad is None else self._project_blocks(p, group, blocks))
                else:
                    grads = None if p.grad is None else [p.grad.to(coefficient_dtype(p))]
                if grads is not None:
                    self._init_state(p, group)
                    work.append((p, group, grads, blocks))
        return work

    def _accumulated_gradients(self, p: torch.Tensor) -> list[torch.Tensor] | None:
        """A copy of what fused backward accumulated for ``p``; the sums stay until ``zero_grad``, as ``.grad``
        does in unfused training, so skipping ``zero_grad`` accumulates matrices and plain parameters alike."""
        accumulated = self._accumulated.get(p)
        return None if accumulated is None else [g.clone() for g in accumulated]

    @staticmethod
    def _finite(grad_lists) -> list[bool]:
        """Whether each list's tensors are free of NaN/inf, with one batched reduction and one device sync: a tensor's
        largest magnitude is finite iff all its entries are (the max propagates NaN; an empty tensor is finite)."""
        grads = [g for gs in grad_lists for g in gs if g.numel()]
        if not grads:
            return [True] * len(grad_lists)
        finite = iter(torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().tolist())
        return [all([next(finite) for g in gs if g.numel()]) for gs in grad_lists]

    def _all_reduce(self, grad_lists, process_group, average: bool) -> None:
        """Sum (or average) the tensors of ``grad_lists`` over ``process_group`` in one flat all-reduce."""
        grads = [g for gs in grad_lists for g in gs]
        if not grads or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(group=process_group) == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        world = self._all_reduce_(flat, process_group)
        if average:
            flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def _visit(self, locator, group: dict, p: torch.Tensor) -> None:
        """A parameter carried by one of DeepSpeed's per-group (ZeRO 1/2) or per-sub-group (ZeRO-3) calls.

        Plain parameters are stepped on the part this rank owns, at once. Matrices are projected from the
        blocks this rank owns and kept pending; the last call of the real step sums all pending coefficient
        gradients over the data-parallel group in one all-reduce, steps the coefficients and writes every
        owned block, re-syncing the low-precision copies DeepSpeed made after the earlier calls.
        """
        if self._is_matrix(p, group):
            blocks = oriented(locator.blocks(p), group["fan_in_fan_out"])
            grads = self._project_blocks(p, group, blocks)
            self._pending[p] = (group, grads, [(None,) + block[1:] for block in blocks])
        else:
            span = locator.span(p)
            if span is not None and span.grad is not None:
                self._step_span(p, group, span)

    def _finish_real_step(self, locator) -> None:
        order = [p for g in self._all_groups for p in self._params_of(g) if p in self._pending]
        by_group: dict[int, tuple] = {}
        for p in order:
            process_group = locator.process_group(p)
            by_group.setdefault(id(process_group), (process_group, []))[1].append(self._pending[p][1])
        for process_group, grad_lists in by_group.values():
            self._all_reduce(grad_lists, process_group, average=False)
        finite = self._finite([self._pending[p][1] for p in order])
        coefficients = self._new_coefficients([(p, *self._pending[p][:2]) for p, ok in zip(order, finite) if ok])
        for p, ok in zip(order, finite):
            group, _, blocks = self._pending[p]
            state = self.state[p]
            if not ok:
                state["nonfinite_skips"] += 1
                continue
            self._step_matrix(p, group, state, coefficients[p], blocks)
            if blocks and self._real_step.earlier_call(p):
                locator.refresh(p)

    def _step_span(self, p: torch.Tensor, group: dict, span) -> None:
        """Plain AdamW on the part of a plain parameter this rank owns (moments sized like that part)."""
        state = self._init_state(p, group, like=span.state_like)
        self._check_span(self._shape(p), state, span)
        grad = span.grad.to(coefficient_dtype(p))
        if not bool(grad.isfinite().all()):
            state["nonfinite_skips"] += 1
            return
        self._step_plain(span.weight, grad, state, group)

    @staticmethod
    def _new_plain(items) -> list[tuple[torch.Tensor, dict]]:
        """For each of ``[(weight, grad, state, group)]`` (weights in their exact dtype): the weight after one AdamW
        step and the state entries of its moments (``encode_moment``), as new tensors, batched per group
        (``adamw_results``). Nothing stored changes: ``_store_plain`` commits once every result exists."""
        by_group: dict[int, tuple[dict, list]] = {}
        for index, (_, _, _, group) in enumerate(items):
            by_group.setdefault(id(group), (group, []))[1].append(index)
        new = [None] * len(items)
        for group, indices in by_group.values():
            weights, grads, states, _ = zip(*(items[index] for index in indices))
            beta1, beta2 = group["betas"]
            results = adamw_results(list(weights), list(grads),
                                    [_working_moment(state, "exp_avg", grad) for state, grad in zip(states, grads)],
                                    [_working_moment(state, "exp_avg_sq", grad) for state, grad in zip(states, grads)],
                                    [int(state["step"].item()) + 1 for state in states], group["lr"], beta1, beta2,
                                    group["eps"], group["weight_decay"])
            for index, state, weight, m, v in zip(indices, states, *results):
                new[index] = weight, {**encode_moment(state, "exp_avg", m), **encode_moment(state, "exp_avg_sq", v)}
        return new

    @staticmethod
    def _store_plain(state: dict, new: tuple[torch.Tensor, dict]) -> None:
        """The moments of ``new`` (from ``_new_plain``) replace the stored ones (new tensors, so nothing is copied) and
        the step is counted; the caller writes the weight."""
        state.update(new[1])
        state["step"] += 1

    def _new_coefficients(self, matrices) -> dict[torch.Tensor, tuple[list[torch.Tensor], dict]]:
        """``{param: ([lambda, gamma], moment entries)}`` after one AdamW step of the coefficients of every matrix in
        ``[(param, group, coefficient grads)]``, as new tensors (nothing stored changes) and batched per group:
        one ``adamw_results`` call for all the group's coefficients instead of two calls a matrix
        (bit-identical results; the per-tensor Python overhead was a visible part of a step with many small
        matrices or sparse bases)."""
        by_group: dict[int, tuple[dict, list]] = {}
        for p, group, grads in matrices:
            by_group.setdefault(id(group), (group, []))[1].append((p, grads))
        new = {}
        for group, items in by_group.values():
            values, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p, coefficient_grads in items:
                state = self.state[p]
                step = int(state["step"].item()) + 1
                for name, grad in zip(COEFFICIENTS, coefficient_grads):
                    values.append(state[name])
                    grads.append(grad)
                    exp_avgs.append(_working_moment(state, f"{name}_exp_avg", grad))
                    exp_avg_sqs.append(_working_moment(state, f"{name}_exp_avg_sq", grad))
                    steps.append(step)
            beta1, beta2 = group["betas"]
            results = iter(zip(*adamw_results(values, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1, beta2,
                                              group["eps"], group["weight_decay"])))
            for p, _ in items:
                state, coefficients, entries = self.state[p], [], {}
                for name in COEFFICIENTS:
                    value, m, v = next(results)
                    coefficients.append(value)
                    entries.update(encode_moment(state, f"{name}_exp_avg", m))
                    entries.update(encode_moment(state, f"{name}_exp_avg_sq", v))
                new[p] = coefficients, entries
        return new

    def _step_matrix(self, p, group, state, new, blocks) -> None:
        """The coefficients and moments ``new`` (from ``_new_coefficients``) stored, and the new update written into
        each owned block of the matrix: the change ``dW(new) - dW(old)`` added (``"stochastic"``) or
        ``round(W0 + dW(new))`` (``"exact"``).

        All or nothing: the weight blocks' new values are computed into temporaries first (at most one weight's
        size) and everything is stored only once every one of them exists, so a failure anywhere leaves the weight,
        the coefficients and the moments as they were."""
        layer = self._layer(p, group)
        lam, gam = state["lambda"], state["gamma"]
        (new_lam, new_gam), moments = new
        scale = self._scale(group)
        exact = self.weight_update == "exact"
        old_basis = scaled_basis(layer.A, lam, gam)
        base_weight = None
        if exact and blocks:
            base_weight = state.get("base_weight")
            if base_weight is None:
                base_weight = self._starting_weight(layer, old_basis, scale, blocks)
        new_basis = scaled_basis(layer.A, new_lam, new_gam)
        if exact and blocks:
            values = [reconstruct(layer, new_basis, scale, rows=rows, cols=cols).add_(base)
                      for (_, _, rows, cols), base in zip(blocks, self._base_blocks(base_weight, blocks))]
        else:
            change_basis = new_basis - old_basis
            values = [updated_weight(weight, reconstruct(layer, change_basis, scale, rows=rows, cols=cols,
                                                         layout_of=weight), self._generator(weight.device))
                      for _, weight, rows, cols in blocks]
        # every new value exists: store them
        lam.copy_(new_lam)
        gam.copy_(new_gam)
        store_entries(state, moments)
        state["step"] += 1
        if base_weight is not None:
            state["base_weight"] = base_weight
        for (_, weight, _, _), value in zip(blocks or [], values):
            weight.copy_(value)

    @staticmethod
    def _starting_weight(layer, basis, scale, blocks) -> torch.Tensor:
        """``W0 = W - dW`` over the owned blocks, flat in block order and in the weight's dtype (``W`` itself
        at a fresh start, where ``dW`` is zero; an imported adapter's coefficients are taken out)."""
        parts = [(weight - reconstruct(layer, basis, scale, rows=rows, cols=cols).to(weight.dtype)).reshape(-1)
                 for _, weight, rows, cols in blocks]
        return torch.cat(parts)

    @staticmethod
    def _base_blocks(base, blocks) -> list[torch.Tensor]:
        sizes = [weight.numel() for _, weight, _, _ in blocks]
        if sum(sizes) != base.numel():
            raise RuntimeError(f"the starting weight kept for exact updates has {base.numel()} elements, but this "
                               f"process now owns {sum(sizes)} of the matrix: the state was saved with a different "
                               "partitioning")
        return [part.view(weight.shape) for part, (_, weight, _, _) in zip(base.split(sizes), blocks)]

    def _step_plain(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """One AdamW step of a plain parameter (or of the part this rank owns), counted in its state; a weight below
        fp32 takes the update through stochastic rounding. All or nothing: everything is computed before anything is
        stored."""
        exact = weight.to(coefficient_dtype(weight))
        new = self._new_plain([(exact, grad, state, group)])[0]
        if exact is weight:
            self._store_plain(state, new)
            weight.copy_(new[0])
            return
        rounded = updated_weight(weight, new[0] - exact, self._generator(weight.device))
        self._store_plain(state, new)
        weight.copy_(rounded)

    def state_dict(self) -> dict:
        """Like ``torch.optim.Optimizer.state_dict``, keyed by the ORIGINAL parameters' positions in the groups
        (also while DeepSpeed holds flat partitions in ``group["params"]``); every state entry is a tensor."""
        return {**self._state_dict_by_originals(),
                "rounding_generators": {k: g.get_state() for k, g in self._generators.items()}}

    _KIND_OPTIONS = GROUP_OPTIONS
    _MATH_OPTIONS = RANDLORA_OPTIONS

    def _check_saved_state(self, group: dict, p: torch.Tensor, saved: dict) -> None:
        where = f"state_dict: state of the parameter of shape {tuple(self._shape(p))}"
        counters = {"step": ((), (torch.float32,)), "nonfinite_skips": ((), (torch.int64,))}
        if not self._is_matrix(p, group):
            span = saved.get("span")
            numel = int(span[1]) if isinstance(span, torch.Tensor) and span.numel() == 2 else self._shape(p)
            check_saved_state(where, saved, counters, {"exp_avg": numel, "exp_avg_sq": numel}, BLOCK_SIZE,
                              optional={"span": ((2,), (torch.int64,))})
            return
        lam_shape, gam_shape = coefficient_shapes(*self._matrix_shape(p, group), group["rank"])
        dtypes = (coefficient_dtype(p),)
        fingerprint = self._bases[self._bases_key(group)].fingerprint_tensor()
        check_saved_state(where, saved, {**counters, "lambda": (lam_shape, dtypes), "gamma": (gam_shape, dtypes),
                                          "bases_fingerprint": (fingerprint.shape, (fingerprint.dtype,))},
                          {f"{name}_{moment}": shape for name, shape in (("lambda", lam_shape), ("gamma", gam_shape))
                           for moment in ("exp_avg", "exp_avg_sq")}, BLOCK_SIZE,
                          optional={"base_weight": (None, (p.dtype,))})
        self._bases[self._bases_key(group)].check_fingerprint(saved["bases_fingerprint"], "optimizer state dict")
        base, numel = saved.get("base_weight"), math.prod(self._shape(p))
        # flat over the blocks this process owns: the whole weight, or under ZeRO a fragment (checked at the step)
        whole = not locator_for(self.param_groups, self._params_of, self._locator).distributed
        if base is not None and (base.dim() != 1 or base.numel() > numel or (whole and base.numel() != numel)):
            raise ValueError(f"{where}: base_weight has shape {tuple(base.shape)}, expected a flat tensor of "
                             f"{'' if whole else 'at most '}{numel} elements")

    def load_state_dict(self, state_dict: dict) -> None:
        """Checks everything first (that it is a RandLoRAAdamW state dict, the group layout and the options that
        define the math, hyper-parameters, parameter shapes, every state entry's key, shape and dtype, the bases'
        fingerprints) and refuses with ``ValueError``, leaving the optimizer as it was. Group hyper-parameters come
        from the state dict, as in torch; state tensors are copied (never shared with ``state_dict``) and keep their
        own dtypes."""
        matched = self._checked_positions(state_dict)
        generators = self._saved_generators(state_dict.get("rounding_generators", {}))
        saved_state = state_dict["state"]
        self._load_group_options(state_dict)
        state = defaultdict(dict)
        for position, _, p in matched:
            saved = saved_state.get(position)
            if saved:
                state[p] = {k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                            for k, v in saved.items()}
        self.state = state
        self._accumulated.clear()
        self._forget_pending()
        self._generators.update(generators)

    @staticmethod
    def _saved_generators(saved) -> dict[str, torch.Generator]:
        """The rounding generators a state dict saved, built here, so that a state or device torch cannot take fails
        (``ValueError``) before anything is loaded."""
        if not isinstance(saved, dict) or not all(
                isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in saved.values()):
            raise ValueError("state_dict: rounding_generators must map devices to generator states (uint8 tensors)")
        generators = {}
        for key, generator_state in saved.items():
            try:
                device = torch.device(key)
                generator = torch.Generator(device=device)
                generator.set_state(generator_state.clone())
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"state_dict: rounding_generators[{key!r}] is not a generator state this process can "
                                 f"use: {error}") from None
            generators[str(device)] = generator
        return generators
