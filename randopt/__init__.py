"""randopt: gradient-space optimizers for parameter-efficient fine-tuning (RandLoRA, LoRA-Pro, LoRA-Squeeze)."""
from . import randlora
from .lorasqueeze import squeeze_lora as squeeze
from .optim import LoRAProAdamW, RandLoRAAdamW, find_lora_pairs, lorapro_groups, param_groups
from .randlora import delta_weight, inject_randlora, make_bases, project
from .randlora.functional import DEFAULT_RANK, default_alpha
from .trainable import TrainableSummary, print_trainable_parameters, trainable_summary

__version__ = "0.1.0"
__all__ = ["LoRAProAdamW", "RandLoRAAdamW", "find_lora_pairs", "lorapro_groups", "squeeze", "delta_weight", "inject_randlora", "make_bases", "param_groups", "project", "randlora",
           "DEFAULT_RANK", "default_alpha", "TrainableSummary", "print_trainable_parameters", "trainable_summary",
           "__version__"]
