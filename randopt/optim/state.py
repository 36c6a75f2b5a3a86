"""How optimizer moments are stored: state entries are tensors only and describe their own format.

A moment ``name`` is kept either as ``state[name]`` (fp32; fp64 for fp64 parameters; bf16 for a first
moment when asked) or, in 8-bit, as ``state[name + "_codes"]`` (uint8, block-wise dynamic quantisation
through bitsandbytes: a signed map for first moments, an unsigned one for second moments) plus
``state[name + "_absmax"]`` (one fp32 scale per block). Every optimizer reads moments into working
tensors with ``read_moment`` and stores them back with ``write_moment``, or, to store them only once a
whole step is computed, ``encode_moment``: one update rule, several storages. For fp32 the working tensor
*is* the stored one, so nothing is copied, and writing into it writes into the stored state (the update
rule in ``functional.py`` returns new tensors instead).
"""
from __future__ import annotations

import functools

import torch

from .locators import is_dtensor, local_part, shard_like

STATE_DTYPES = ("fp32", "bf16", "8bit")
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
"""Moments with fewer elements stay fp32 under ``state_dtype="8bit"``: their scales would cost about as
much as they save. Optimizers take ``min_8bit_size`` to change it; ``state_summary`` reports what is what."""

CODES, ABSMAX = "_codes", "_absmax"


def check_state_dtype(state_dtype: str) -> str:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return state_dtype


def _is_second_moment(name: str) -> bool:
    return name.endswith("exp_avg_sq")


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool, device: str) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.create_dynamic_map(signed=signed).to(device)


def quantize(x: torch.Tensor, signed: bool):
    """Block-wise 8-bit codes and per-block absmax of fp32 ``x`` (any shape; codes keep the shape)."""
    import bitsandbytes.functional as bnb_functional

    codes, quant_state = bnb_functional.quantize_blockwise(
        A=x.float().contiguous(), code=_dynamic_map(signed, str(x.device)), blocksize=BLOCK_SIZE)
    return codes.view(x.shape), quant_state.absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_blockwise(A=codes, absmax=absmax, code=_dynamic_map(signed, str(codes.device)),
                                               blocksize=BLOCK_SIZE).view(codes.shape)


def init_moment(state: dict, name: str, like: torch.Tensor, state_dtype: str = "fp32",
                min_8bit_size: int = MIN_8BIT_SIZE) -> None:
    """A zero moment shaped like ``like``, stored as ``state_dtype`` asks.

    bf16 applies to first moments only: a bf16 second moment cannot decay (``v * 0.999`` rounds back to ``v``).
    A DTensor ``like`` (FSDP2) gives a DTensor moment of the same sharding; ``read_moment``/``write_moment`` work
    on its local shard.
    """
    if is_dtensor(like):
        if state_dtype == "8bit" and like.numel() >= min_8bit_size:
            raise ValueError("state_dtype='8bit' is not supported for DTensor (FSDP2) parameters")
        local = {}
        init_moment(local, name, local_part(like), state_dtype, min_8bit_size)
        state[name] = shard_like(local[name], like)
        return
    if state_dtype == "8bit" and like.numel() >= min_8bit_size:
        codes, absmax = quantize(torch.zeros(like.shape, dtype=torch.float32, device=like.device),
                                 signed=not _is_second_moment(name))
        state[name + CODES], state[name + ABSMAX] = codes, absmax
        return
    dtype = torch.promote_types(like.dtype, torch.float32)
    if state_dtype == "bf16" and not _is_second_moment(name):
        dtype = torch.bfloat16
    state[name] = torch.zeros(like.shape, dtype=dtype, device=like.device)


def read_moment(state: dict, name: str) -> torch.Tensor:
    if name + CODES in state:
        return dequantize(state[name + CODES], state[name + ABSMAX], signed=not _is_second_moment(name))
    stored = local_part(state[name])
    return stored if stored.dtype in (torch.float32, torch.float64) else stored.float()


def encode_moment(state: dict, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state entries that would store ``value`` (a working tensor from ``read_moment``) as moment ``name`` in
    its present format (8-bit codes and scales, or a tensor of the stored dtype, a DTensor where the stored one is),
    computed without storing anything, so a step can compute everything first and commit after: ``store_entries``
    copies them into the stored tensors, or a step's copy of the state takes them as they are (``state.update``),
    which leaves the tensors it shares with the stored state untouched."""
    if name + CODES in state:
        codes, absmax = quantize(value, signed=not _is_second_moment(name))
        return {name + CODES: codes, name + ABSMAX: absmax}
    stored = state[name]
    local = value.to(local_part(stored).dtype)
    return {name: shard_like(local, stored) if is_dtensor(stored) and not is_dtensor(local) else local}


def store_entries(state: dict, entries: dict[str, torch.Tensor]) -> None:
    for key, value in entries.items():
        stored, value = local_part(state[key]), local_part(value)
        if value is not stored:
            stored.copy_(value)


def write_moment(state: dict, name: str, value: torch.Tensor) -> None:
    store_entries(state, encode_moment(state, name, value))


def state_summary(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """``{format: {"moments": count, "elements": n, "bytes": b}}`` over all moments of an optimizer, where
    format is ``"8bit"``, ``"float32"``, ``"bfloat16"``..., so a state that silently stayed fp32 shows."""
    summary: dict[str, dict[str, int]] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or "exp_avg" not in key or key.endswith(ABSMAX):
                continue
            if key.endswith(CODES):
                fmt, extra = "8bit", state[key[: -len(CODES)] + ABSMAX]
                nbytes = value.numel() + extra.numel() * extra.element_size()
            else:
                fmt, nbytes = str(value.dtype).removeprefix("torch."), value.numel() * value.element_size()
            entry = summary.setdefault(fmt, {"moments": 0, "elements": 0, "bytes": 0})
            entry["moments"] += 1
            entry["elements"] += value.numel()
            entry["bytes"] += nbytes
    return summary
