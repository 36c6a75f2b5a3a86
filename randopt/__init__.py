"""randopt: gradient-space optimizers for parameter-efficient fine-tuning (RandLoRA, LoRA-Pro, LoRA-Squeeze)."""
from . import randlora
from .lorasqueeze import squeeze_lora as squeeze
from .optim import RandLoRAAdamW, param_groups
from .randlora import delta_weight, inject_randlora, make_bases, project

__version__ = "0.1.0"
__all__ = ["RandLoRAAdamW", "squeeze", "delta_weight", "inject_randlora", "make_bases", "param_groups", "project", "randlora",
           "__version__"]
