"""LoRA-Pro: adjust LoRA's factor gradients so their equivalent full gradient is the projection of the
true one onto the tangent space of rank-r matrices; ``LoRAProAdamW`` runs it as a swap-in optimizer."""
from .functional import adjust_gradients, equivalent_gradient, projected_gradient

_OPTIMIZER_NAMES = ("LoRAPair", "LoRAProAdamW", "find_lora_pairs", "lorapro_groups")


def __getattr__(name):
    # the optimizer module imports .functional, so importing it eagerly here would be circular
    if name in _OPTIMIZER_NAMES:
        from ..optim import lorapro_adamw
        return getattr(lorapro_adamw, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoRAPair", "LoRAProAdamW", "adjust_gradients", "equivalent_gradient", "find_lora_pairs", "lorapro_groups",
           "projected_gradient"]
