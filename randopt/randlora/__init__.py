"""RandLoRA: full-rank updates from learned diagonal scalings of fixed random low-rank bases.

The names here are the public ones; projections' building blocks stay in ``functional``, ``bases``,
``autograd`` and ``layer``."""
from .bases import BASIS_KINDS, RandLoRABases, bases_from_tensors, make_bases
from .functional import DEFAULT_RANK, default_alpha, delta_weight, project, reconstruct
from .layer import RandLoRALinear, inject_randlora, merge_randlora, randlora_layers, unload_randlora, unmerge_randlora

__all__ = [
    "BASIS_KINDS", "DEFAULT_RANK", "RandLoRABases", "RandLoRALinear", "bases_from_tensors", "default_alpha",
    "delta_weight", "inject_randlora", "make_bases", "merge_randlora", "project", "randlora_layers", "reconstruct",
    "unload_randlora", "unmerge_randlora",
]
