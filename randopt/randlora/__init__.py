"""RandLoRA: full-rank updates from learned diagonal scalings of fixed random low-rank bases."""
from .autograd import RandLoRALinearFunction, randlora_linear
from .bases import (BASIS_KINDS, LayerBases, RandLoRABases, bases_from_tensors, check_rank, make_bases,
                    num_bases)
from .functional import (coefficient_grads, coefficient_shapes, delta_weight, init_coefficients, project,
                         reconstruct, scaled_basis)
from .layer import (RandLoRALinear, SharedBases, find_targets, inject_randlora, linear_shape, merge_randlora,
                    randlora_layers, unload_randlora, unmerge_randlora)

__all__ = [
    "BASIS_KINDS", "LayerBases", "RandLoRABases", "RandLoRALinear", "RandLoRALinearFunction", "SharedBases",
    "bases_from_tensors", "check_rank", "coefficient_grads", "coefficient_shapes", "delta_weight",
    "find_targets", "init_coefficients", "inject_randlora", "linear_shape", "make_bases", "merge_randlora",
    "num_bases", "project", "randlora_layers", "randlora_linear", "reconstruct", "scaled_basis",
    "unload_randlora", "unmerge_randlora",
]
