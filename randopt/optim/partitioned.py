"""What randopt's optimizers share to run under DeepSpeed ZeRO (and plain data parallel): the bookkeeping, not
the math.

DeepSpeed replaces ``group["params"]`` by flat fp32 partitions and calls ``step()`` once per group (ZeRO 1/2)
or sub-group (ZeRO-3). ``PartitionAwareOptimizer`` remembers the parameters each group was given, tells the
calls of one real step apart (``RealStep``), runs a subclass's per-parameter visit on each call and its
``_finish_real_step`` once every parameter was carried, counts its own collective traffic, and keys its state
dict by the original parameters' positions so that checkpoints look the same with or without DeepSpeed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .locators import DTensorShards, RealStep, Span, is_dtensor, locator_for, logical_shape


class PartitionAwareOptimizer(Optimizer):
    def __init__(self, params, defaults: dict):
        self._originals: dict[int, list[torch.Tensor]] = {}  # id(group dict) -> the parameters it was given
        self._all_groups: list[dict] = []
        self._locator = None
        self._real_step = RealStep()
        self._pending: dict = {}
        """What the calls of the current real step leave for its last call (the subclass's format)."""
        self.communicated = {"all_reduces": 0, "bytes": 0}
        """Collective calls this optimizer made and the bytes it reduced (per process), over its lifetime."""
        self.engine = None
        """The DeepSpeed engine running this optimizer, when known (``randopt.integrations.deepspeed``)."""
        super().__init__(params, defaults)

    @property
    def engine_skipped_steps(self) -> int:
        """Whole steps the DeepSpeed engine skipped (a NaN/inf gradient under its loss scaling or overflow check):
        it then never calls this optimizer, so ``nonfinite_skips`` cannot count them. 0 without an engine."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def _remember_group(self, group: dict) -> None:
        """Call from ``add_param_group`` with the group dict as stored in ``self.param_groups``."""
        self._originals[id(group)] = list(group["params"])
        self._all_groups.append(group)

    def _params_of(self, group: dict) -> list[torch.Tensor]:
        """The parameters a group was given (DeepSpeed may have replaced ``group["params"]``)."""
        return self._originals.get(id(group), group["params"])

    def replace_parameters(self, replaced: dict) -> None:
        """Put new parameter objects where old ones were, at the same positions in their groups (In-Squeeze's
        rank change); moving their state is the caller's business."""
        for group in self.param_groups:
            group["params"] = [replaced.get(p, p) for p in group["params"]]
            if id(group) in self._originals:
                self._originals[id(group)] = [replaced.get(p, p) for p in self._originals[id(group)]]
        self._parameters_replaced(replaced)

    def _parameters_replaced(self, replaced: dict) -> None:
        """Subclasses re-key what they remember per parameter."""

    def _update_locator(self):
        self._adopt_sharded_parameters()
        locator = locator_for(self.param_groups, self._params_of, self._locator)
        if isinstance(locator, DTensorShards) and getattr(self, "state_dtype", None) == "8bit":
            raise ValueError("state_dtype='8bit' is not supported under FSDP2 (fully_shard): use 'fp32' or 'bf16'")
        self._locator = locator
        return locator

    def _adopt_sharded_parameters(self) -> None:
        """Take the DTensors that replaced this optimizer's parameters in its groups as its parameters: accelerate
        (and the Trainer through it) swaps them in when the optimizer was created before ``fully_shard``."""
        replaced = {}
        for group in self._all_groups:
            given, current = self._originals[id(group)], group["params"]
            if len(given) != len(current) or any(is_dtensor(p) for p in given):
                continue
            if all(is_dtensor(new) and new.shape == old.shape for old, new in zip(given, current)):
                replaced.update((old, new) for old, new in zip(given, current) if old is not new)
        if not replaced:
            return
        stepped = [tuple(old.shape) for old in replaced if self.state.get(old)]
        if stepped:
            raise RuntimeError(f"parameters of shapes {stepped} were sharded with fully_shard after this optimizer "
                               "had stepped them; shard the model before the first step")
        for old in replaced:
            self.state.pop(old, None)
        self.replace_parameters(replaced)

    # ----- one of DeepSpeed's per-group calls ---------------------------------------------------------------
    def _sharded_call(self, locator, visit: Callable[[dict, torch.Tensor], None]) -> None:
        """``visit(group, p)`` for every trainable parameter this call carries; after the call that completes the
        real step, ``self._finish_real_step(locator)``. The pending work is cleared once the real step is done, and
        also when any call fails: the next call then starts a new real step instead of finding this one's parameters
        carried already."""
        try:
            self._real_step.start_call()
            for group, params in locator.carried(self.param_groups, self._params_of):
                for p in params:
                    if not p.requires_grad:  # DeepSpeed does not train it; plain training would skip it (no grad)
                        continue
                    self._real_step.carry(p)
                    visit(group, p)
            expected = [p for g in self._all_groups for p in self._params_of(g) if p.requires_grad]
            done = self._real_step.complete(expected)
            if done:
                self._finish_real_step(locator)
        except BaseException:
            self._forget_pending()
            raise
        if done:
            self._forget_pending()

    def _finish_real_step(self, locator) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_span(shape, state: dict, span: Span) -> None:
        """Record which elements of a parameter this rank's state covers; refuse state from another partitioning.
        DTensor state (FSDP2) carries its sharding itself, and checkpoints reshard it: nothing to record."""
        if span.sharded is not None:
            return
        where = torch.tensor([span.start, span.numel], dtype=torch.int64)
        if "span" not in state:
            state["span"] = where
        elif not torch.equal(state["span"], where):
            raise RuntimeError(f"this rank's optimizer state for a parameter of shape {tuple(shape)} covers elements "
                               f"{state['span'].tolist()} (start, count), but the rank now owns {where.tolist()}: "
                               "the state was saved with a different partitioning")

    def _all_reduce_(self, flat: torch.Tensor, process_group) -> int:
        """Sum ``flat`` over ``process_group`` in place; returns the world size (1: nothing to do, not counted)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        world = dist.get_world_size(group=process_group)
        if world > 1:
            dist.all_reduce(flat, group=process_group)
            self.communicated["all_reduces"] += 1
            self.communicated["bytes"] += flat.numel() * flat.element_size()
        return world

    # ----- checkpoints ------------------------------------------------------------------------------------
    def _state_dict_by_originals(self) -> dict:
        """``torch.optim.Optimizer.state_dict``'s layout, keyed by the ORIGINAL parameters' positions in the groups
        (also while DeepSpeed holds flat partitions in ``group["params"]``)."""
        index: dict[int, int] = {}
        groups, state = [], {}
        for group in self.param_groups:
            ids = []
            for p in self._params_of(group):
                position = index.setdefault(id(p), len(index))
                ids.append(position)
                if self.state.get(p):
                    state[position] = dict(self.state[p])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        shapes = [None] * len(index)
        for group in self.param_groups:
            for p in self._params_of(group):
                shapes[index[id(p)]] = list(self._shape(p))
        return {"state": state, "param_groups": groups, "param_shapes": shapes}

    def _shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(logical_shape(p))

    # what a subclass says about its state dicts, for ``_checked_positions``
    _KIND_OPTIONS: tuple[str, ...] = ()
    """Group options every group of this optimizer has: a state dict whose groups lack one is another optimizer's."""
    _MATH_OPTIONS: tuple[str, ...] = ()
    """Group options that define what the state means: they must be the same in a state dict to load."""

    def _check_group_options(self, group: dict) -> None:
        raise NotImplementedError

    def _check_saved_state(self, group: dict, p: torch.Tensor, saved: dict) -> None:
        raise NotImplementedError

    def _checked_positions(self, state_dict) -> list[tuple[int, dict, torch.Tensor]]:
        """``_saved_positions`` after checking everything about ``state_dict`` before anything changes: its layout,
        that it comes from this kind of optimizer, the groups' sizes, math-defining options and hyper-parameters,
        the parameters' shapes and every parameter's saved state (``_check_saved_state``)."""
        name = type(self).__name__
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), (list, tuple))):
            raise ValueError("state_dict must be a dict with 'state' (a dict) and 'param_groups' (a list), as "
                             f"{name}.state_dict() returns")
        for i, saved_group in enumerate(state_dict["param_groups"]):
            if not isinstance(saved_group, dict) or not isinstance(saved_group.get("params"), (list, tuple)):
                raise ValueError(f"state_dict: parameter group {i} must be a dict with a 'params' list")
            missing = [k for k in self._KIND_OPTIONS if k not in saved_group]
            if missing:
                raise ValueError(f"state_dict: parameter group {i} has no {missing}: this is not a {name} state dict "
                                 "(torch.optim.AdamW's or another optimizer's?)")
        matched = self._saved_positions(state_dict)
        for i, (saved_group, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            for key in self._MATH_OPTIONS:
                if saved_group[key] != group[key]:
                    raise ValueError(f"state_dict: parameter group {i} was saved with {key}={saved_group[key]!r}, this "
                                     f"optimizer's has {key}={group[key]!r}; {key} defines what the saved state means: "
                                     "build the optimizer with the options it was saved with")
            try:
                self._check_group_options({**group, **saved_group})
            except ValueError as error:
                raise ValueError(f"state_dict: parameter group {i}: {error}") from None
        positions = {position for position, _, _ in matched}
        unknown = sorted(set(state_dict["state"]) - positions, key=str)
        if unknown:
            raise ValueError(f"state_dict: state for parameter positions {unknown}, which no group lists")
        shapes = state_dict.get("param_shapes")
        if shapes is not None and (not isinstance(shapes, (list, tuple)) or len(shapes) != len(matched)):
            raise ValueError(f"state_dict: param_shapes must list the shapes of its {len(matched)} parameters")
        for position, _, p in matched:
            if shapes is not None and list(shapes[position]) != list(self._shape(p)):
                raise ValueError(f"state_dict: parameter {position} was saved with shape {tuple(shapes[position])}, "
                                 f"here it has shape {tuple(self._shape(p))}")
        for position, group, p in matched:
            saved = state_dict["state"].get(position)
            if saved:
                self._check_saved_state(group, p, saved)
        return matched

    def _saved_positions(self, state_dict: dict) -> list[tuple[int, dict, torch.Tensor]]:
        """``(saved position, its group here, parameter here)`` for every parameter, after checking that the
        state dict's groups match this optimizer's in number and size (nothing is changed)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        matched = []
        for saved_group, group in zip(saved_groups, self.param_groups):
            params = self._params_of(group)
            if len(saved_group["params"]) != len(params):
                raise ValueError(f"a parameter group of the state dict has {len(saved_group['params'])} parameters, "
                                 f"this optimizer's has {len(params)}")
            matched.extend((position, group, p) for position, p in zip(saved_group["params"], params))
        return matched

    def _load_group_options(self, state_dict: dict) -> None:
        """Group hyper-parameters come from the state dict, as in torch."""
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            group["betas"] = tuple(group["betas"])

    def _forget_pending(self) -> None:
        self._pending.clear()
        self._real_step.reset()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_originals", {id(g): list(g["params"]) for g in self.param_groups})
        self.__dict__.setdefault("_all_groups", list(self.param_groups))
        self.__dict__.setdefault("_locator", None)
        self.__dict__.setdefault("_real_step", RealStep())
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("communicated", {"all_reduces": 0, "bytes": 0})
        self.__dict__.setdefault("engine", None)
