"""LoRA-Squeeze: compress a LoRA update to a lower rank with an exact factored SVD, or a full-rank update
(e.g. RandLoRA's) with a randomised SVD of its operator."""
from .adapters import (LayerReport, SqueezeResult, adapter_from_model, load_adapter_dir, lora_layers, save_adapter,
                       squeeze_adapter, squeeze_lora)
from .functional import (ALPHA_POLICIES, SVD, FactoredSVD, LinearOperator, Squeezed, check_energy, check_target_rank,
                         dense_operator, energy_kept, factored_svd, lora_operator, lora_scale, randlora_operator,
                         randomized_svd, select_rank, split_factors, squeeze_factors, squeeze_operator, target_alpha,
                         truncate)

__all__ = [
    "ALPHA_POLICIES", "FactoredSVD", "LayerReport", "LinearOperator", "SVD", "SqueezeResult", "Squeezed",
    "adapter_from_model", "check_energy", "check_target_rank", "dense_operator", "energy_kept", "factored_svd",
    "load_adapter_dir", "lora_layers", "lora_operator", "lora_scale", "randlora_operator", "randomized_svd",
    "save_adapter", "select_rank", "split_factors", "squeeze_adapter", "squeeze_factors", "squeeze_lora",
    "squeeze_operator", "target_alpha", "truncate",
]
