"""LoRA-Pro: adjust LoRA's factor gradients so their equivalent full gradient is the projection of the
true one onto the tangent space of rank-r matrices; ``LoRAProAdamW`` runs it as a swap-in optimizer."""
from .functional import (X_MODES, Gram, Grams, adjust_gradients, cut_eigh, default_rcond, equivalent_gradient,
                         factor_grams, lora_gradients, projected_gradient, solve_sylvester, solve_x,
                         sylvester_rhs)

_OPTIMIZER_NAMES = ("LoRAPair", "LoRAProAdamW", "find_lora_pairs", "lorapro_groups")


def __getattr__(name):
    # the optimizer module imports .functional, so importing it eagerly here would be circular
    if name in _OPTIMIZER_NAMES:
        from ..optim import lorapro_adamw
        return getattr(lorapro_adamw, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "X_MODES", "Gram", "Grams", "LoRAPair", "LoRAProAdamW", "adjust_gradients", "cut_eigh", "default_rcond",
    "equivalent_gradient", "factor_grams", "find_lora_pairs", "lora_gradients", "lorapro_groups",
    "projected_gradient", "solve_sylvester", "solve_x", "sylvester_rhs",
]
