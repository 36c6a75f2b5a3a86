"""How optimizer moments are stored: state entries are tensors only and describe their own format.

A moment ``name`` is kept as ``state[name]`` (fp32, or fp64 for fp64 parameters, or bf16). Every optimizer reads moments into fp32
working tensors with ``read_moment`` and stores them back with ``write_moment``; for fp32 the working
tensor *is* the stored one, so nothing is copied.
"""
from __future__ import annotations

import torch

STATE_DTYPES = ("fp32", "bf16")


def check_state_dtype(state_dtype: str) -> str:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return state_dtype


def init_moment(state: dict, name: str, like: torch.Tensor, state_dtype: str = "fp32") -> None:
    """Zero moment shaped like ``like``. bf16 is allowed for first moments only (``exp_avg``):
    a bf16 second moment cannot decay (``v * 0.999`` rounds back to ``v``)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if state_dtype == "bf16" and name.endswith("exp_avg"):
        dtype = torch.bfloat16
    state[name] = torch.zeros(like.shape, dtype=dtype, device=like.device)


def read_moment(state: dict, name: str) -> torch.Tensor:
    stored = state[name]
    return stored if stored.dtype in (torch.float32, torch.float64) else stored.float()


def write_moment(state: dict, name: str, value: torch.Tensor) -> None:
    stored = state[name]
    if value is not stored:
        stored.copy_(value)


def moment_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
