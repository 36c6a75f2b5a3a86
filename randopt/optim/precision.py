"""Writing fp32 updates into low-precision weights without losing the small ones."""
from __future__ import annotations

import torch


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unbiased rounding of fp32 ``x`` to bf16: add uniform noise below bf16's last bit, then truncate.

    bf16 keeps the top 16 bits of an fp32 word, so an update far below a weight's resolution moves it
    to the next bf16 value with probability proportional to its size instead of vanishing.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    rounded = (bits + noise) & -65536
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x.float()).to(torch.bfloat16)


def updated_weight(weight: torch.Tensor, update: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``weight + update`` in the weight's dtype, as a new tensor, where ``update`` is in higher precision; bf16
    weights round stochastically. A new tensor, so that a step can have every new value before it stores any."""
    if weight.dtype == torch.bfloat16 and generator is not None:
        return stochastic_round_bf16(weight.float() + update, generator)
    return weight + update.to(weight.dtype)
