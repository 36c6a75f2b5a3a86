"""LoRA-Squeeze: compress a LoRA update to a lower rank with an exact factored SVD, or a full-rank update
(e.g. RandLoRA's) with a randomised SVD of its operator; export RandLoRAAdamW's update as a LoRA adapter;
anneal a LoRA model's rank during training (In-Squeeze) with the optimizer's moments carried along.

The names here are the public ones; the math (``functional``), adapter files (``adapters``), export details
(``export``) and training internals (``training``) stay in their modules."""
from .adapters import LayerReport, SqueezeResult, squeeze_lora
from .export import EXPORT_METHODS, ExportLayerReport, base_weights, export_lora
from .functional import ALPHA_POLICIES
from .training import InSqueezeReport, RankSchedule, maybe_squeeze, restore_ranks, squeeze_in_training

__all__ = [
    "ALPHA_POLICIES", "EXPORT_METHODS", "ExportLayerReport", "InSqueezeReport", "LayerReport", "RankSchedule",
    "SqueezeResult", "base_weights", "export_lora", "maybe_squeeze", "restore_ranks", "squeeze_in_training",
    "squeeze_lora",
]
