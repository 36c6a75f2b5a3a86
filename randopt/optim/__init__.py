"""Optimizers: one functional AdamW core (``randopt.optim.functional``) under thin stateful classes."""
from .groups import param_groups
from .lorapro_adamw import LoRAProAdamW, find_lora_pairs, lorapro_groups
from .randlora_adamw import RandLoRAAdamW

__all__ = ["LoRAProAdamW", "RandLoRAAdamW", "find_lora_pairs", "lorapro_groups", "param_groups"]
