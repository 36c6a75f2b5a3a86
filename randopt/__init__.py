"""randopt: gradient-space optimizers for parameter-efficient fine-tuning (RandLoRA, LoRA-Pro, LoRA-Squeeze)."""
from . import randlora
from .randlora import delta_weight, inject_randlora, make_bases, project

__version__ = "0.1.0"
__all__ = ["randlora", "delta_weight", "inject_randlora", "make_bases", "project", "__version__"]
