"""Optimizers: one functional AdamW core under thin stateful classes."""
from .functional import adam_direction, adamw_step_, check_hyperparameters, update_moments_
from .groups import param_groups
from .lorapro_adamw import LoRAProAdamW, find_lora_pairs, lorapro_groups
from .randlora_adamw import RandLoRAAdamW

__all__ = ["LoRAProAdamW", "RandLoRAAdamW", "find_lora_pairs", "lorapro_groups", "adam_direction", "adamw_step_", "check_hyperparameters", "param_groups",
           "update_moments_"]
