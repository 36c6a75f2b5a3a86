"""One validation layer for every public entry point: the optimizers' constructors and per-step checks, the
module route (``inject_randlora``), ``param_groups``, the transformers factory and the DeepSpeed config block.

Every check raises ``ValueError`` naming the option, the value it got and what was expected, and changes
nothing. Values from configs (YAML, JSON) arrive as strings such as ``"1e-8"``: they are refused, not parsed,
so a typo cannot turn into a silently different number. ``bool`` is not accepted where a number is meant.
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from typing import Callable

import torch

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
"""What ``torch.Generator.manual_seed`` accepts."""


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def real(name: str, value, *, minimum: float | None = None, positive: bool = False, below: float | None = None,
         allow_none: bool = False) -> float | None:
    """A finite real number (not a bool, not a string), ``>= minimum``, ``> 0`` when ``positive``,
    ``< below``; returned as ``float``."""
    if value is None and allow_none:
        return None
    bounds = [f">= {minimum:g}"] if minimum is not None else []
    bounds += ["> 0"] if positive else []
    bounds += [f"< {below:g}"] if below is not None else []
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}")
    if ((minimum is not None and value < minimum) or (positive and value <= 0)
            or (below is not None and value >= below)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
            allow_none: bool = False) -> int | None:
    """An ``int`` (not a bool, not a float such as ``2.0``) in ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    expected = "an integer"
    if minimum is not None and maximum is not None:
        expected += f" in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected += f" >= {minimum}"
    elif maximum is not None:
        expected += f" <= {maximum}"
    expected += " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {expected}, got {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def flag(name: str, value) -> bool:
    """``True`` or ``False`` (not ``"no"``, not ``0``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return value


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def seed(name: str, value) -> int:
    """A seed for ``torch.Generator.manual_seed``."""
    return integer(name, value, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])


def betas(value, name: str = "betas") -> tuple[float, float]:
    """Two numbers in ``[0, 1)`` (a list or tuple)."""
    expected = f"{name} must be two numbers in [0, 1) (a tuple or list), got {_describe(value)}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(expected)
    for b in value:
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= b < 1.0:
            raise ValueError(expected)
    return tuple(float(b) for b in value)


def target_modules(value, name: str = "target_modules"):
    """A regex string or a non-empty list/tuple of module names."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must be a regex string or a non-empty list of module names, got ''")
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {error}") from None
        return value
    if (not isinstance(value, (list, tuple, set, frozenset)) or not value
            or not all(isinstance(t, str) and t for t in value)):
        raise ValueError(f"{name} must be a regex string or a non-empty list of module names, got {_describe(value)}")
    return list(value)


# ----- options by name: what every entry point shares ---------------------------------------------------------
OPTIONS: dict[str, Callable] = {
    "lr": lambda v: real("lr", v, minimum=0.0),
    "betas": betas,
    "eps": lambda v: real("eps", v, positive=True),  # eps = 0 turns a zero gradient into 0/0 = NaN
    "weight_decay": lambda v: real("weight_decay", v, minimum=0.0),
    "alpha": lambda v: real("alpha", v, positive=True, allow_none=True),
    "seed": lambda v: seed("seed", v),
    "fan_in_fan_out": lambda v: flag("fan_in_fan_out", v),
    "fused_backward": lambda v: flag("fused_backward", v),
    "data_parallel": lambda v: flag("data_parallel", v),
    "rounding_seed": lambda v: seed("rounding_seed", v),
    "min_8bit_size": lambda v: integer("min_8bit_size", v, minimum=0),
    "rcond": lambda v: real("rcond", v, minimum=0.0, allow_none=True),
    "decay_base_weight": lambda v: flag("decay_base_weight", v),
    "dropout": lambda v: real("dropout", v, minimum=0.0, below=1.0),
    "init_weights": lambda v: flag("init_weights", v),
    "target_modules": target_modules,
}
"""Checks of the options whose valid values are the same wherever they are given. ``rank`` (None allowed or
not) and choices (``basis_kind``, ``mode``...) are checked by their owners with ``rank`` and ``choice``."""


def check_options(options: dict) -> dict:
    """``options`` with every option known to ``OPTIONS`` checked (numbers as ``float``, betas as a tuple).
    Other keys pass through unchanged: their owner checks them."""
    return {key: OPTIONS[key](value) if key in OPTIONS else value for key, value in options.items()}


def rank(value, allow_none: bool = False) -> int | None:
    """A rank: a positive integer (or None where that means "no RandLoRA", in a plain AdamW group)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"rank must be a positive integer{' or None' if allow_none else ''}, got {_describe(value)}")
    return int(value)


def module(name: str, value) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{name} must be a torch.nn.Module, got {_describe(value)}")
    return value


def keyword_arguments(cls) -> list[str]:
    """Keyword arguments of a class's constructor, other than ``params``."""
    signature = inspect.signature(cls.__init__)
    return [n for n, p in signature.parameters.items() if n not in ("self", "params")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_keyword_names(owner: str, given, accepted) -> None:
    """Refuse keyword names ``owner`` does not take, naming them and listing what it accepts."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown} for {owner}; it accepts {sorted(accepted)}")


def filled_in(cls, kwargs: dict) -> dict:
    """``kwargs`` for ``cls``'s constructor, names checked, with the defaults of the ones not given."""
    check_keyword_names(cls.__name__, kwargs, keyword_arguments(cls))
    parameters = inspect.signature(cls.__init__).parameters
    return {name: kwargs.get(name, parameters[name].default) for name in keyword_arguments(cls)}


class GroupChecks:
    """Re-checks parameter groups' options at each step, cheaply: only when one of ``keys`` changed since the
    last check (a scheduler or a user may set ``group["lr"]`` etc. between steps). ``check(group)`` runs
    ``validate(group)`` (which raises ``ValueError``) before anything moves; the ``frozen`` keys may not change
    at all once a group was accepted."""

    def __init__(self, validate: Callable[[dict], None], keys: tuple[str, ...], frozen: tuple[str, ...] = (),
                 why_frozen: str = ""):
        self.validate, self.keys, self.frozen, self.why_frozen = validate, keys, frozen, why_frozen
        self._accepted: dict[int, tuple] = {}
        self._frozen_values: dict[int, tuple] = {}

    def accept(self, group: dict) -> None:
        """Record a group its owner has just validated (``add_param_group``, ``load_state_dict``)."""
        self._accepted[id(group)] = tuple(group.get(k) for k in self.keys)
        self._frozen_values[id(group)] = tuple(group.get(k) for k in self.frozen)

    def check(self, group: dict) -> None:
        missing = [key for key in self.keys if key not in group]
        if missing:
            raise ValueError(f"parameter group {group.get('name') or ''}: option(s) {missing} were removed; every group "
                             f"of this optimizer holds {list(self.keys)}")
        accepted = self._accepted.get(id(group))
        current = tuple(group.get(k) for k in self.keys)
        if accepted is not None and all(a is b or (type(a) is type(b) and a == b) for a, b in zip(accepted, current)):
            return  # (2.0 == 2 and True == 1: a new type is a change)
        self.validate(group)
        for key, old in zip(self.frozen, self._frozen_values.get(id(group), ())):
            if group.get(key) != old:
                raise ValueError(f"group option {key} was changed from {old!r} to {group.get(key)!r}: "
                                 f"{self.why_frozen}")
        self.accept(group)


# ----- parameters ------------------------------------------------------------------------------------------------
def check_params(params) -> list:
    """An optimizer's ``params``: an iterable of tensors or of parameter-group dicts (as a list)."""
    if isinstance(params, torch.Tensor) or isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise ValueError("params must be an iterable of tensors or of parameter-group dicts (or, for LoRAProAdamW, a "
                         f"LoRA model), got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params is empty: the optimizer has nothing to train")
    if not (all(isinstance(p, torch.Tensor) for p in params) or all(isinstance(p, dict) for p in params)):
        kinds = sorted({type(p).__name__ for p in params})
        raise ValueError(f"params must be all tensors or all parameter-group dicts, got {kinds}")
    return params


def group_params(param_group) -> list:
    """The tensors of a parameter-group dict (its ``"params"``: one tensor or an iterable of them)."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        raise ValueError(f"a parameter group must be a dict with a 'params' entry, got {_describe(param_group)}")
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise ValueError(f"a parameter group's 'params' must be a tensor or an iterable of tensors, got "
                         f"{type(params).__name__}")
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor) or not p.is_leaf:
            raise ValueError(f"a parameter group's 'params' must be leaf tensors, got {type(p).__name__}"
                             + ("" if not isinstance(p, torch.Tensor) else " (not a leaf)"))
    return params


def check_matrix_layout(param: torch.Tensor) -> None:
    """A weight trained as a matrix is viewed as ``(shape[0], rest)``: that needs the default (contiguous)
    layout; a ``channels_last`` convolution weight has none."""
    if param.dim() > 2 and param.numel() and not param.is_contiguous():
        raise ValueError(f"a parameter of shape {tuple(param.shape)} and strides {param.stride()} (channels_last?) "
                         "cannot be trained as a matrix: RandLoRA views a weight as (shape[0], rest); keep the "
                         "model in torch.contiguous_format (model.to(memory_format=torch.contiguous_format))")


def check_dense_gradient(param: torch.Tensor) -> None:
    if param.grad is not None and param.grad.is_sparse:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} has a sparse gradient (nn.Embedding("
                         "sparse=True)?): randopt's optimizers need dense gradients; build the embedding with "
                         "sparse=False")


# ----- saved optimizer state ------------------------------------------------------------------------------------
MOMENT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _check_entry(where: str, key: str, value, shape, dtypes) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {key} must be a tensor, got {type(value).__name__}")
    if isinstance(shape, int) and value.numel() != shape:
        raise ValueError(f"{where}: {key} has {value.numel()} elements, expected {shape}")
    if shape is not None and not isinstance(shape, int) and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{where}: {key} has dtype {value.dtype}, expected one of {list(dtypes)}")


def check_saved_state(where: str, saved, required: dict, moments: dict, block_size: int, optional: dict = None,
                      optional_moments: bool = False) -> None:
    """One parameter's saved optimizer state against what the optimizer keeps: ``required`` and ``optional`` map
    keys to ``(shape, dtypes)`` (a shape of None: any; an int: that many elements; dtypes None: any); ``moments``
    map names to shapes, each stored either as ``name`` (fp32/fp64/bf16) or as ``name_codes`` (uint8, that shape)
    plus ``name_absmax`` (fp32, one per ``block_size`` elements), see ``randopt.optim.state``; with
    ``optional_moments`` they may be absent, all of them. Any other key is refused."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(saved).__name__}")
    optional = optional or {}
    known = set(required) | set(optional)
    for key, (shape, dtypes) in required.items():
        if key not in saved:
            raise ValueError(f"{where}: {key!r} is missing (it holds {sorted(saved)})")
        _check_entry(where, key, saved[key], shape, dtypes)
    for key, (shape, dtypes) in optional.items():
        if key in saved:
            _check_entry(where, key, saved[key], shape, dtypes)
    moment_keys = {key for name in moments for key in (name, name + "_codes", name + "_absmax")}
    known |= moment_keys
    if optional_moments and not moment_keys & set(saved):
        moments = {}  # none kept here (all or none)
    for name, shape in moments.items():
        codes, absmax = name + "_codes", name + "_absmax"
        if name in saved and codes not in saved and absmax not in saved:
            _check_entry(where, name, saved[name], shape, MOMENT_DTYPES)
        elif codes in saved and absmax in saved and name not in saved:
            _check_entry(where, codes, saved[codes], shape, (torch.uint8,))
            numel = shape if isinstance(shape, int) else math.prod(shape)
            _check_entry(where, absmax, saved[absmax], (-(-numel // block_size),), (torch.float32,))
        else:
            raise ValueError(f"{where}: moment {name!r} must be stored as {name!r} or as {codes!r} + {absmax!r}, "
                             f"the state holds {sorted(saved)}")
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{where}: unexpected entries {unknown}; this optimizer keeps {sorted(known)}")
    for key, value in saved.items():
        _check_value(where, key, value)


_COUNTERS = ("step", "nonfinite_skips", "span")


def _check_value(where: str, key: str, value: torch.Tensor) -> None:
    """Values no step writes, which would make every later step write NaN: counters (``step``, ``nonfinite_skips``,
    ``span``) that are negative or not whole numbers, non-finite floating-point entries (moments, coefficients,
    base weights, 8-bit scales), negative second moments or scales. A DTensor is checked on this rank's shard."""
    local = value.to_local() if hasattr(value, "to_local") else value
    if key in _COUNTERS:
        whole = local.isfinite() & (local == local.floor()) if local.is_floating_point() else torch.ones_like(local, dtype=torch.bool)
        bad = ~(whole & (local >= 0))
        expected = "whole numbers >= 0"
    elif local.is_floating_point():
        bad = ~local.isfinite()
        if key.endswith("exp_avg_sq") or key.endswith("_absmax"):
            bad |= local < 0
            expected = "finite numbers >= 0"
        else:
            expected = "finite numbers"
    else:
        return
    if bool(bad.any()):
        raise ValueError(f"{where}: {key} holds {local[bad].reshape(-1)[0].item()!r} at {int(bad.sum())} of "
                         f"{local.numel()} places; expected {expected} (no step writes that; was the state dict edited "
                         "or saved from a diverged run?)")
