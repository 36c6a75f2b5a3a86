"""LoRA-Squeeze: compress a LoRA update to a lower rank with an exact factored SVD, or a full-rank update
(e.g. RandLoRA's) with a randomised SVD of its operator; export RandLoRAAdamW's update as a LoRA adapter;
anneal a LoRA model's rank during training (In-Squeeze) with the optimizer's moments carried along."""
from .adapters import (LayerReport, SqueezeResult, adapter_from_model, load_adapter_dir, lora_layers, save_adapter,
                       squeeze_adapter, squeeze_lora)
from .export import (EXPORT_METHODS, ExportLayerReport, RandLoRAMatrix, base_weights, export_costs, export_lora,
                     randlora_delta, randlora_matrices)
from .functional import (ALPHA_POLICIES, SVD, FactoredSVD, FactorMaps, LinearOperator, Squeezed, TrainingSqueeze,
                         check_energy, check_target_rank, dense_operator, energy_kept, factor_maps, factored_svd,
                         lora_operator, lora_scale, project_moments, randlora_operator, randomized_svd, select_rank,
                         split_factors, squeeze_factors, squeeze_for_training, squeeze_operator, target_alpha,
                         truncate)
from .training import (MOMENT_MODES, InSqueezeReport, LoraPair, RankSchedule, lora_pairs, lora_ranks, maybe_squeeze,
                       optimizer_step_count, rank_metrics, restore_ranks, squeeze_in_training, unwrap_optimizer)

__all__ = [
    "ALPHA_POLICIES", "EXPORT_METHODS", "ExportLayerReport", "FactorMaps", "FactoredSVD", "InSqueezeReport",
    "LayerReport", "LinearOperator", "LoraPair", "MOMENT_MODES", "RandLoRAMatrix", "RankSchedule", "SVD",
    "SqueezeResult", "Squeezed", "TrainingSqueeze", "adapter_from_model", "base_weights", "check_energy",
    "check_target_rank", "dense_operator", "energy_kept", "export_costs", "export_lora", "factor_maps",
    "factored_svd", "load_adapter_dir", "lora_layers", "lora_operator", "lora_pairs", "lora_ranks", "lora_scale",
    "maybe_squeeze", "optimizer_step_count", "project_moments", "randlora_delta", "randlora_matrices",
    "randlora_operator", "randomized_svd", "rank_metrics", "restore_ranks", "save_adapter", "select_rank",
    "split_factors", "squeeze_adapter", "squeeze_factors", "squeeze_for_training", "squeeze_in_training",
    "squeeze_lora", "squeeze_operator", "target_alpha", "truncate", "unwrap_optimizer",
]
