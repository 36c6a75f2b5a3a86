"""Squeeze a PEFT LoRA adapter (a directory, or the adapter of an in-memory PEFT model) to a lower rank.

Adapter files are read and written with ``safetensors`` and ``json`` directly, so the library needs PEFT
only for the in-memory case (imported lazily there). The output is an ordinary PEFT LoRA adapter: the
config's ``r``/``lora_alpha`` hold the most common target rank/alpha and ``rank_pattern``/``alpha_pattern``
hold the layers that differ, keyed by full module name (PEFT matches a key ``k`` against a module name
``n`` with ``re.match(rf"(.*\\.)?({k})$", n)``).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .._atomic import check_out_dir, write_directory
from .functional import (check_alpha_policy, check_target, check_target_rank, factored_svd, lora_scale, select_rank,
                         target_alpha, truncate)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Config fields under which a LoRA checkpoint is not just ``s * B @ A`` per layer (extra parameters, or
# factors with another meaning): squeezing those would silently change the model.
_VARIANT_FIELDS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
                   "monteclora_config", "target_parameters")
# Suffixes of the two factors: (A key, B key). Conv factors are flattened to matrices and reshaped back.
_FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass(frozen=True)
class LayerReport:
    """What squeezing did to one layer. ``energy`` is the kept fraction of ``||dW||_F^2``."""

    name: str
    shape: tuple[int, int]
    source_rank: int
    rank: int
    source_alpha: float
    alpha: float
    energy: float


@dataclass
class SqueezeResult:
    """The squeezed adapter: ``config`` (the ``adapter_config.json`` content), ``tensors`` (the safetensors
    content, in the source dtype) and a per-layer report. ``out_dir`` is where it was written, if anywhere."""

    config: dict
    tensors: dict[str, torch.Tensor]
    layers: list[LayerReport] = field(default_factory=list)
    out_dir: str | None = None

    def save(self, out_dir, overwrite: bool = False) -> str:
        self.out_dir = save_adapter(out_dir, self.config, self.tensors, overwrite=overwrite)
        return self.out_dir


# ------------------------------------------------------------------------------------------------ reading


def pattern_value(patterns: dict | None, name: str, default):
    """The value PEFT gives module ``name`` under ``rank_pattern``/``alpha_pattern`` (first matching key)."""
    if patterns is not None and not isinstance(patterns, dict):
        raise ValueError(f"rank_pattern/alpha_pattern must be a JSON object (module pattern: value), got {patterns!r}")
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as error:
            raise ValueError(f"pattern key {key!r} of rank_pattern/alpha_pattern is not a valid regex: {error}") \
                from None
    return default


def _json_safe(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def check_lora_config(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", ""))
    if peft_type.rsplit(".", 1)[-1].upper() != "LORA":
        raise ValueError(f"{where} is not a LoRA adapter: peft_type={config.get('peft_type')!r}, expected 'LORA'")
    variants = [f"{k}={config[k]!r}" for k in _VARIANT_FIELDS if config.get(k)]
    if variants:
        raise ValueError(f"{where} uses a LoRA variant whose update is not s * B @ A ({', '.join(variants)}); "
                         "only plain LoRA (optionally rsLoRA) adapters can be squeezed")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where} has {key}={value!r}, expected a positive number")


def read_adapter_config(path) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter directory (any PEFT type) as a dict, with clear errors for a
    missing directory or file and for a corrupted or truncated one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"adapter directory {path!r} does not exist or is not a directory")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a PEFT adapter directory: {CONFIG_NAME} is missing")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path!r} is not valid JSON (corrupted or truncated?): {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} must hold a JSON object, got {type(config).__name__}")
    return config


def load_adapter_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a PEFT LoRA adapter directory, with clear errors for anything else."""
    path = os.fspath(path)
    config = read_adapter_config(path)
    check_lora_config(config, repr(path))
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights):
        try:
            tensors = load_file(weights)
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{weights!r} could not be read as safetensors: {error}") from None
    elif os.path.isfile(os.path.join(path, PICKLE_WEIGHTS_NAME)):
        tensors = torch.load(os.path.join(path, PICKLE_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path!r} has no adapter weights: neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}")
    return config, tensors


def adapter_from_model(model, adapter_name: str = "default") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of one adapter of an in-memory PEFT model, as ``save_pretrained`` would write them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        available = sorted(configs) if isinstance(configs, dict) else None
        raise ValueError(f"source must be a PEFT adapter directory or a PEFT model with adapter "
                         f"{adapter_name!r}; got {type(model).__name__} with adapters {available}")
    from peft import get_peft_model_state_dict

    config = _json_safe(configs[adapter_name].to_dict())
    config["inference_mode"] = True  # what save_pretrained writes: the output is an adapter to load
    check_lora_config(config, f"adapter {adapter_name!r} of the model")
    tensors = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    return config, tensors


def lora_layers(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """``{module key: (A key, B key)}``; an error for unpaired factors or LoRA tensors of unknown kind."""
    layers, claimed = {}, set()
    for key in tensors:
        for suffix_A, suffix_B in _FACTOR_SUFFIXES:
            if key.endswith(suffix_A):
                module = key[: -len(suffix_A)]
                key_B = module + suffix_B
                if key_B not in tensors:
                    raise ValueError(f"adapter tensor {key!r} has no matching {key_B!r}")
                layers[module] = (key, key_B)
                claimed.update((key, key_B))
    unknown = sorted(k for k in tensors if k not in claimed and re.search(r"(^|\.)lora_", k))
    if unknown:
        raise ValueError(f"adapter tensors {unknown[:5]} are not LoRA A/B factor pairs (DoRA magnitudes, "
                         "LoRA biases or an unpaired factor?); only plain LoRA adapters can be squeezed")
    if not layers:
        raise ValueError("the adapter has no LoRA factors (no '*.lora_A.weight' / '*.lora_B.weight' tensors)")
    return layers


def _as_matrices(module: str, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if A.dim() < 2 or B.dim() < 2 or B.shape[1] != A.shape[0] or math.prod(B.shape[2:]) != 1:
        raise ValueError(f"layer {module!r} has mismatched LoRA shapes: A {tuple(A.shape)} and B "
                         f"{tuple(B.shape)}; expected A (r, in, ...) and B (out, r, 1, ...) with the same r")
    return B.reshape(B.shape[0], B.shape[1]), A.reshape(A.shape[0], -1)


# ------------------------------------------------------------------------------------------------ squeezing


def _module_name(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _plain_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values):
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _config_for(source: dict, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    config = dict(source)
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    config["r"], config["lora_alpha"] = r, _plain_number(alpha)
    config["rank_pattern"] = {n: v for n, v in ranks.items() if v != r}
    config["alpha_pattern"] = {n: _plain_number(v) for n, v in alphas.items() if v != alpha}
    for name in ranks:  # names are read back as regexes: make sure each one resolves to itself
        if (pattern_value(config["rank_pattern"], name, r), pattern_value(config["alpha_pattern"], name, alpha)) \
                != (ranks[name], alphas[name]):
            raise ValueError(f"module name {name!r} cannot be keyed unambiguously in rank_pattern/alpha_pattern")
    return config


def _source_alpha(config: dict, name: str, source_rank: int) -> float:
    """The layer's alpha under the source config, after checking its rank there matches the weights."""
    expected = pattern_value(config.get("rank_pattern"), name, config["r"])
    if source_rank != expected:
        raise ValueError(f"layer {name!r} has LoRA rank {source_rank} in the weights but the config says "
                         f"{expected} (r / rank_pattern): mismatched shapes")
    alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"layer {name!r} has alpha {alpha!r} (lora_alpha / alpha_pattern), expected a positive "
                         "number")
    return float(alpha)


def squeeze_adapter(config: dict, tensors: dict[str, torch.Tensor], rank: int | None = None,
                    energy: float | None = None, alpha="keep_scale",
                    compute_dtype: torch.dtype = torch.float64) -> SqueezeResult:
    """Squeeze an adapter given as ``(config, tensors)``; tensors that are not LoRA factors pass through."""
    check_target(rank, energy)
    check_alpha_policy(alpha)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"use_rslora must be true or false, got {rslora!r}")
    layers = lora_layers(tensors)
    factors = {key for pair in layers.values() for key in pair}
    out = {k: v for k, v in tensors.items() if k not in factors}
    reports, ranks, alphas = [], {}, {}
    for module, (key_A, key_B) in layers.items():
        A, B = tensors[key_A], tensors[key_B]
        B2, A2 = _as_matrices(module, A, B)
        name = _module_name(module)
        if not (A.is_floating_point() and B.is_floating_point()):
            # the squeezed factors would be rounded to integers on the way out
            raise ValueError(f"layer {name!r} has LoRA factors of dtype {A.dtype}/{B.dtype}, expected floating point")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"layer {name!r} has non-finite values (NaN or inf) in its LoRA factors")
        source_rank = A.shape[0]
        source_alpha = _source_alpha(config, name, source_rank)
        svd = factored_svd(B2.to(compute_dtype), A2.to(compute_dtype), lora_scale(source_alpha, source_rank, rslora))
        if energy is not None:
            target = select_rank(svd.S, energy)
        else:
            target = check_target_rank(rank, source_rank, what=f"rank for layer {name!r}")
        alpha_t = target_alpha(alpha, source_alpha, source_rank, target, rslora)
        squeezed = truncate(svd, target, alpha_t, rslora)
        out[key_A] = squeezed.A.reshape(target, *A.shape[1:]).to(A.dtype).contiguous()
        out[key_B] = squeezed.B.reshape(B.shape[0], target, *B.shape[2:]).to(B.dtype).contiguous()
        ranks[name], alphas[name] = target, alpha_t
        reports.append(LayerReport(name, (B2.shape[0], A2.shape[1]), source_rank, target, source_alpha, alpha_t,
                                   squeezed.energy))
    return SqueezeResult(_config_for(config, ranks, alphas), out, reports)


def squeeze_lora(source, rank: int | None = None, energy: float | None = None, out_dir=None, *,
                 alpha="keep_scale", adapter_name: str = "default", overwrite: bool = False,
                 compute_dtype: torch.dtype = torch.float64) -> SqueezeResult:
    """Compress a PEFT LoRA adapter to a lower rank with the exact factored SVD (LoRA-Squeeze).

    ``source``: an adapter directory, or an in-memory PEFT model (its adapter ``adapter_name``).
    Target: ``rank`` (the same for every layer; must be below each layer's rank) or ``energy`` in
    ``(0, 1]`` (per layer, the smallest rank keeping that fraction of ``||dW||_F^2``).
    ``alpha``: ``"keep_scale"`` (default: the scale ``s`` of each layer is unchanged, so alpha shrinks
    with the rank), ``"keep_alpha"`` (the source alpha), or a number. The alpha is written to the config,
    and the factors are built for the scale PEFT will compute from it, so the loaded adapter's update is
    the best approximation at the target rank whichever is chosen. rsLoRA adapters stay rsLoRA.
    ``out_dir``: if given, the adapter is written there atomically (an existing adapter directory is
    replaced only with ``overwrite=True``). Returns the adapter and a per-layer report.
    """
    if isinstance(source, (str, os.PathLike)):
        config, tensors = load_adapter_dir(source)
    else:
        config, tensors = adapter_from_model(source, adapter_name)
    if out_dir is not None:
        _check_out_dir(out_dir, overwrite)
    result = squeeze_adapter(config, tensors, rank=rank, energy=energy, alpha=alpha, compute_dtype=compute_dtype)
    if out_dir is not None:
        result.save(out_dir, overwrite=overwrite)
    return result


# ------------------------------------------------------------------------------------------------ writing


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    check_out_dir(out_dir, overwrite, owner_file=CONFIG_NAME)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:  # write_directory fsyncs everything before it swaps the directory in
        f.write(data)


def save_adapter(out_dir, config: dict, tensors: dict[str, torch.Tensor], overwrite: bool = False) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` to ``out_dir`` atomically: old or new
    directory, complete, even if the process is killed (see ``randopt._atomic``). Other files in an existing
    adapter directory are kept; a non-empty directory that is not an adapter's is refused.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(directory: str) -> None:
        _write_file(os.path.join(directory, WEIGHTS_NAME), safetensors_bytes(cpu, metadata={"format": "pt"}))
        _write_file(os.path.join(directory, CONFIG_NAME),
                    (json.dumps(_json_safe(config), indent=2, sort_keys=True) + "\n").encode())

    return write_directory(out_dir, write, overwrite=overwrite, owner_file=CONFIG_NAME)
