"""PEFT RandLora adapters out of and into ``RandLoRAAdamW``, with plain json + safetensors (PEFT is not imported).

Export: ``export_randlora_adapter(model, optimizer, out_dir)`` writes the directory that
``peft.PeftModel.from_pretrained(base_model, out_dir)`` (PEFT 0.21) loads:

- ``adapter_config.json``: ``peft_type: RANDLORA``, ``r``, ``randlora_alpha`` (our alpha, so PEFT's scaling
  ``alpha / r`` is ours), ``target_modules`` (the exported module names), ``fan_in_fan_out`` (True for transformers
  ``Conv1D`` models), ``sparse`` / ``very_sparse`` from the basis kind, ``projection_prng_key`` (our seed),
  ``save_projection``. Only fields PEFT knows: it accepts unknown ones, but warns that the config comes from a newer
  PEFT.
- ``adapter_model.safetensors``: ``base_model.model.<module>.randlora_lambda`` / ``randlora_gamma`` per layer, and the
  shared bases ONCE as ``base_model.randlora_A`` ``(r, 1, d)`` / ``base_model.randlora_B`` ``(D, N, r)``, sliced to the
  exported layers (PEFT sizes its buffers from the targeted layers). PEFT 0.21's own save adds a copy of both bases
  per layer; loading does not need them (every layer references the one shared buffer), so they are left out. PEFT
  then warns "Found missing adapter keys ... <module>.randlora_A.default ..." once per layer: a false positive (PEFT
  filters shared keys out of that warning for VB-LoRA and TinyLoRA, not for RandLora); the layers use the loaded bases.
- randopt's metadata (seed, basis kind, bases fingerprints, a checksum of the tensors) goes in the safetensors header
  (``__metadata__["randopt"]``): it travels with the tensors it describes and is dropped when PEFT re-saves the file.

``save_bases=False`` writes ``save_projection: false`` and no bases: only randopt can load that adapter (bases are
regenerated from the seed and checked against the fingerprint); PEFT would regenerate other bases (bf16/fp16, per
machine) and silently compute something else.

The base model the adapter goes on is the ORIGINAL pre-trained model. ``RandLoRAAdamW`` trains a plain model in place
(``W = W0 + dW``); ``base_weights_from(model, optimizer)`` gives back ``W0 = W - dW`` (exact up to the rounding of the
steps' updates: ~1e-7 relative in fp32, ~1e-16 in fp64) for users who no longer have the original weights.

Import: ``load_randlora_adapter(model, adapter_dir, optimizer=None)`` reads a RandLora adapter (ours, or saved by PEFT
with its per-layer copies of the bases), merges its update into the plain model's weights and, given a
``RandLoRAAdamW``, starts each adapted matrix from the adapter's ``(lambda, gamma)`` and bases (fresh AdamW moments).
Every check runs before anything is changed: on a ``ValueError`` the model and optimizer are untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from randopt import validation
from randopt._atomic import write_directory
from randopt.lorasqueeze.adapters import read_adapter_config
from randopt.lorasqueeze.export import base_weights, randlora_matrices
from randopt.randlora.bases import (BASIS_KINDS, RandLoRABases, bases_from_tensors, compute_fingerprint, make_bases,
                                    num_bases)
from randopt.randlora.functional import coefficient_shapes, delta_weight, init_coefficients
from randopt.randlora.layer import linear_shape, randlora_layers, target_matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_PREFIX = "base_model.model."
SHARED_KEYS = {"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}
COEFFICIENT_NAMES = ("randlora_lambda", "randlora_gamma")
METADATA_KEY = "randopt"
FORMAT = "randopt.randlora-adapter/1"

__all__ = ["RandLoRAAdapter", "base_weights_from", "export_randlora_adapter", "load_randlora_adapter"]


# ----- shared helpers ---------------------------------------------------------------------------------------------
def _bases_key(group: dict) -> tuple:
    return group["rank"], group["seed"], group["basis_kind"]


def _alpha(optimizer, group: dict) -> float:
    return group["alpha"] if group["alpha"] is not None else optimizer._scale(group) * group["rank"]


def _matrix_shape(param: torch.Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    rows, cols = param.shape[0], math.prod(param.shape[1:])
    return (cols, rows) if fan_in_fan_out else (rows, cols)


def _is_matrix(param: torch.Tensor, group: dict) -> bool:
    return group.get("rank") is not None and param.dim() >= 2


class _BasesOn:
    """The bases converted once per (device, dtype), so that per-layer slices are made once."""

    def __init__(self, bases: RandLoRABases):
        self.bases, self.copies = bases, {}

    def __call__(self, device, dtype) -> RandLoRABases:
        key = (str(device), dtype)
        if key not in self.copies:
            self.copies[key] = self.bases.to(device=device, dtype=dtype)
        return self.copies[key]


def _delta_in_storage_layout(bases_on: _BasesOn, lam, gam, scale: float, module: nn.Module) -> torch.Tensor:
    """``dW`` of one layer in its weight's storage layout and dtype (computed in at least fp32)."""
    out_features, in_features, fan_in_fan_out = linear_shape(module)
    weight = module.weight
    dtype = torch.promote_types(torch.promote_types(lam.dtype, weight.dtype), torch.float32)
    dw = delta_weight(bases_on(weight.device, dtype), lam.to(weight.device, dtype), gam.to(weight.device, dtype),
                      scale, (out_features, in_features))
    return (dw.T if fan_in_fan_out else dw).to(weight.dtype)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _coefficient_keys(name: str) -> tuple[str, str]:
    return tuple(f"{MODEL_PREFIX}{name}.{leaf}" for leaf in COEFFICIENT_NAMES)


# ----- export -----------------------------------------------------------------------------------------------------
def _common_group_settings(optimizer, matrices) -> dict:
    settings = {}
    for name, module, group in ((m.name, m.module, m.group) for m in matrices):
        settings.setdefault((*_bases_key(group), _alpha(optimizer, group)), []).append(name)
        if linear_shape(module)[2] != bool(group["fan_in_fan_out"]):
            raise ValueError(f"{name} is a {type(module).__name__} but its parameter group has "
                             f"fan_in_fan_out={group['fan_in_fan_out']}: its update would be transposed")
    if len(settings) > 1:
        described = {f"rank={r}, seed={s}, basis_kind={k!r}, alpha={a:g}": names[:3]
                     for (r, s, k, a), names in settings.items()}
        raise ValueError("a PEFT RandLora adapter has one rank, alpha, seed and basis kind, but the layers to export "
                         f"use several: {described}; export each set with module_names=")
    (rank, seed, kind, alpha), = settings
    return {"rank": rank, "seed": seed, "basis_kind": kind, "alpha": alpha, "group": matrices[0].group}


def _target_modules(model: nn.Module, names: list[str]):
    """A PEFT ``target_modules`` that selects exactly ``names``: the list itself, or an anchored regex when PEFT's
    suffix rule would make the list select more layers."""
    as_list = sorted(names)
    selected = {n for n, _ in model.named_modules() if n and target_matches(n, as_list)}
    if selected == set(names):
        return as_list
    return "|".join(re.escape(n) for n in as_list)


def _plain_trained(optimizer) -> int:
    return sum(1 for g in optimizer.param_groups for p in g["params"]
               if not _is_matrix(p, g) and optimizer.state.get(p))


def _optimizer_layers(model: nn.Module, optimizer, module_names) -> tuple[list, dict]:
    """``[(name, linear module, lambda, gamma, (out, in))]`` and the common settings, from a ``RandLoRAAdamW``."""
    matrices = randlora_matrices(model, optimizer, module_names)
    settings = _common_group_settings(optimizer, matrices)
    settings["bases"] = optimizer._bases[_bases_key(settings.pop("group"))]
    layers = []
    for name, module, p, group in ((m.name, m.module, m.param, m.group) for m in matrices):
        shape = _matrix_shape(p, group["fan_in_fan_out"])
        state = optimizer.state.get(p) or {}
        if "lambda" in state:
            lam, gam = state["lambda"], state["gamma"]
        else:  # never stepped: the update is still zero
            lam, gam = init_coefficients(*shape, settings["rank"], dtype=torch.promote_types(p.dtype, torch.float32))
        layers.append((name, module, lam, gam, shape))
    return layers, settings


def _module_layers(model: nn.Module, module_names) -> tuple[list, dict]:
    """The same from the ``RandLoRALinear`` layers ``inject_randlora`` put in ``model`` (no optimizer needed)."""
    found = dict(randlora_layers(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no RandLoRALinear layer (inject_randlora) and no optimizer was "
                         "given: pass the RandLoRAAdamW that trained the model")
    if module_names is not None:
        unknown = [n for n in module_names if n not in found]
        if isinstance(module_names, str) or unknown:
            raise ValueError(f"module_names {module_names!r}: {unknown} are not RandLoRA layers; those are "
                             f"{list(found)}")
        found = {n: found[n] for n in module_names}
    if any(m.merged for m in found.values()):
        raise ValueError("the RandLoRA layers are merged: unmerge_randlora(model) before exporting")
    settings = {(m.rank, m.scaling * m.rank, m.shared.fingerprint): m for m in found.values()}
    if len(settings) > 1:
        raise ValueError("a PEFT RandLora adapter has one rank, alpha, seed and basis kind, but the layers to export "
                         f"use several: {sorted(k[:2] for k in settings)}; export each set with module_names=")
    first = next(iter(found.values()))
    bases = first.shared.bases
    common = {"rank": first.rank, "alpha": first.scaling * first.rank, "seed": bases.seed, "basis_kind": bases.kind,
              "bases": bases}
    return [(n, m.base_layer, m.randlora_lambda, m.randlora_gamma, (m.out_features, m.in_features))
            for n, m in found.items()], common


def export_randlora_adapter(model: nn.Module, optimizer=None, out_dir=None, *, module_names=None,
                            save_bases: bool = True) -> str:
    """Write the RandLoRA update trained into ``model`` as a PEFT RandLora adapter directory ``out_dir``; returns
    its path.

    Two routes: ``optimizer`` is the ``RandLoRAAdamW`` that trained a plain model, or None for a model with
    ``inject_randlora`` adapter layers (``export_randlora_adapter(model, out_dir="adapter")``: the layers' own
    coefficients and bases, no optimizer needed). ``module_names``: the layers to export (default: every
    nn.Linear/Conv1D weight trained through RandLoRA). They must share rank, alpha, seed and basis kind (one PEFT
    config). ``save_bases=False`` leaves the bases out (only randopt can load that adapter, see the module doc).
    ``out_dir`` is written atomically (old or new adapter, complete, even if the process is killed; see
    ``randopt._atomic``): our two files replace an existing adapter's, other files in that directory are kept, and a
    non-empty directory that is not an adapter's is refused.
    """
    if out_dir is None:
        raise ValueError("out_dir is required: the directory to write the adapter into")
    validation.module("model", model)
    if optimizer is None:
        layers, settings = _module_layers(model, module_names)
    else:
        layers, settings = _optimizer_layers(model, optimizer, module_names)
    rank, alpha, kind, full = settings["rank"], settings["alpha"], settings["basis_kind"], settings["bases"]
    if not save_bases and settings["seed"] < 0:
        raise ValueError("these bases were given as tensors (no seed to regenerate them from): save_bases must be True")
    tensors = {}
    for name, module, lam, gam, _ in layers:
        for key, value in zip(_coefficient_keys(name), (lam, gam)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: the {key.rsplit('.', 1)[1]} coefficients have non-finite values; "
                                 "refusing to export a broken adapter")
            tensors[key] = value.detach().to("cpu").contiguous().clone()
    shapes = [shape for *_, shape in layers]
    d, D = sorted((max(s[0] for s in shapes), max(s[1] for s in shapes)))
    A = full.A[:, :, :d].detach().to("cpu").contiguous().clone()
    B = full.B[:D, :num_bases(d, d, rank), :].detach().to("cpu").contiguous().clone()
    if save_bases:
        tensors[SHARED_KEYS["randlora_A"]], tensors[SHARED_KEYS["randlora_B"]] = A, B
    unrepresented = _plain_trained(optimizer) if optimizer is not None else 0
    if unrepresented:
        warnings.warn(f"the optimizer also trained {unrepresented} parameters that are not RandLoRA matrices (biases, "
                      "norms, embeddings, ...); a RandLora adapter does not hold them, so the base model plus this "
                      "adapter will not reproduce their training", stacklevel=2)
    metadata = {
        "format": FORMAT, "rank": rank, "alpha": alpha, "seed": settings["seed"], "basis_kind": kind,
        "bases_fingerprint": full.fingerprint, "bases_max_shape": list(full.max_shape),
        "saved_bases_fingerprint": compute_fingerprint(A, B) if save_bases else None,
        "tensors_sha256": _checksum(tensors),
    }
    config = {
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "bias": "none",
        "fan_in_fan_out": all(linear_shape(module)[2] for _, module, *_ in layers),
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "RANDLORA",
        "projection_prng_key": settings["seed"],
        "r": rank,
        "randlora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "randlora_dropout": 0.0,
        "revision": None,
        "save_projection": bool(save_bases),
        "sparse": kind == "sparse",
        "target_modules": _target_modules(model, [name for name, *_ in layers]),
        "task_type": None,
        "very_sparse": kind == "very_sparse",
    }
    return _write_directory(out_dir, config, tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata)})


def _write_directory(out_dir, config: dict, tensors: dict, metadata: dict) -> str:
    def write(directory: str) -> None:
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    return write_directory(out_dir, write, overwrite=True, owner_file=CONFIG_NAME)


@torch.no_grad()
def base_weights_from(model: nn.Module, optimizer, module_names=None) -> dict[str, torch.Tensor]:
    """The pre-trained weights ``W0 = W - dW`` as ``{"<module>.weight": W0}``, for
    ``base.load_state_dict(weights, strict=False)``; see ``randopt.lorasqueeze.base_weights``. Other trained
    parameters (biases, norms) cannot be recovered."""
    return base_weights(model, optimizer, module_names)


# ----- import -----------------------------------------------------------------------------------------------------
@dataclass
class RandLoRAAdapter:
    """A RandLora adapter as ``load_randlora_adapter`` read it (and merged it into ``modules``' weights)."""

    module_names: list[str]
    rank: int
    alpha: float
    seed: int
    basis_kind: str
    bases: RandLoRABases = field(repr=False)
    coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    modules: dict[str, nn.Module] = field(repr=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def param_groups(self, model: nn.Module, **options) -> list[dict]:
        """``randopt.param_groups`` for exactly the adapter's layers, with its rank, alpha, seed and basis kind
        (other trainable parameters go to a plain AdamW group, as usual)."""
        from randopt.optim.groups import param_groups

        targets = "|".join(re.escape(n) for n in self.module_names)
        return param_groups(model, targets, rank=self.rank, alpha=self.alpha, seed=self.seed,
                            basis_kind=self.basis_kind, **options)

    def install(self, optimizer) -> None:
        """Start ``optimizer``'s matrices of the adapter's layers from its coefficients and bases (fresh moments)."""
        _install(optimizer, self.bases, self._optimizer_entries(optimizer))

    def _optimizer_entries(self, optimizer) -> list:
        """Check that ``optimizer`` can continue this adapter; ``[(param, group, lambda, gamma)]``."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        entries, keys = [], set()
        for name in self.module_names:
            module = self.modules[name]
            p = module.weight
            group = group_of.get(id(p))
            if group is None or not _is_matrix(p, group):
                raise ValueError(f"the weight of {name} is not in a RandLoRA parameter group of the optimizer")
            if (group["rank"], group["basis_kind"]) != (self.rank, self.basis_kind) or \
                    not math.isclose(optimizer._scale(group), self.scale, rel_tol=1e-12):
                raise ValueError(f"{name}: the optimizer's group has rank={group['rank']}, basis_kind="
                                 f"{group['basis_kind']!r}, scale={optimizer._scale(group):g}, but the adapter has "
                                 f"rank={self.rank}, basis_kind={self.basis_kind!r}, scale={self.scale:g} "
                                 f"(alpha={self.alpha:g}); build the groups with adapter.param_groups(model)")
            if bool(group["fan_in_fan_out"]) != linear_shape(module)[2]:
                raise ValueError(f"{name}: the optimizer's group has fan_in_fan_out={group['fan_in_fan_out']}, "
                                 f"wrong for its {type(module).__name__} layer")
            if optimizer.state.get(p):
                raise ValueError(f"the optimizer already has state for the weight of {name}; import the adapter into "
                                 "a fresh optimizer")
            entries.append((p, group, *self.coefficients[name]))
            keys.add(_bases_key(group))
        for group in optimizer.param_groups:
            if group.get("rank") is None or _bases_key(group) not in keys:
                continue
            for p in group["params"]:
                shape = _matrix_shape(p, group["fan_in_fan_out"]) if p.dim() >= 2 else None
                if shape is not None and not self.bases.covers(*shape):
                    raise ValueError(f"the adapter's bases cover layers up to (min side, max side) "
                                     f"{self.bases.max_shape}, but the optimizer's group sharing them also trains a "
                                     f"matrix of shape (out={shape[0]}, in={shape[1]})")
        return entries


def _install(optimizer, bases: RandLoRABases, entries) -> None:
    """Give the optimizer the adapter's bases and start each ``(param, group, lambda, gamma)`` from them."""
    for group in {id(g): g for _, g, _, _ in entries}.values():
        optimizer.set_bases(bases, group)
    for p, _, lam, gam in entries:
        optimizer.load_coefficients(p, lam, gam)


def _read_config(adapter_dir: str) -> dict:
    config = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type != "RANDLORA":
        raise ValueError(f"{adapter_dir} holds a {peft_type!r} adapter, not a RandLora one (peft_type 'RANDLORA')")
    rank, alpha = config.get("r"), config.get("randlora_alpha", 640)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{path}: r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{path}: randlora_alpha must be a positive number, got {alpha!r}")
    return config


def _read_weights(adapter_dir: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        other = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.exists(os.path.join(adapter_dir, n))]
        raise ValueError(f"{adapter_dir} has no {WEIGHTS_NAME}" +
                         (f" (only {other}: re-save it with safe_serialization=True)" if other else ""))
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error type, or OSError/RuntimeError on bad data
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {error}") from None
    metadata = None
    if METADATA_KEY in header:
        try:
            metadata = json.loads(header[METADATA_KEY])
            assert isinstance(metadata, dict) and metadata.get("format") == FORMAT
        except (json.JSONDecodeError, AssertionError):
            raise ValueError(f"{path}: the randopt metadata in its header is unreadable (corrupted?)") from None
        if metadata.get("tensors_sha256") != _checksum(tensors):
            raise ValueError(f"{path}: the tensors do not match the checksum recorded when the adapter was exported "
                             "(corrupted file)")
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {value.dtype}; RandLora tensors are floating point")
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: {key} has non-finite values (corrupted or diverged adapter)")
    return tensors, metadata


def _split_keys(tensors: dict, path: str):
    """``(coefficients {module: (lambda, gamma)}, shared bases {"randlora_A": ...}, per-layer copies [(A, B)])``."""
    coefficients, per_layer, shared, unknown = {}, {}, {}, []
    reverse_shared = {v: k for k, v in SHARED_KEYS.items()}
    for key, value in tensors.items():
        if key in reverse_shared:
            shared[reverse_shared[key]] = value
            continue
        module, _, leaf = key.removeprefix(MODEL_PREFIX).rpartition(".")
        if module and leaf in COEFFICIENT_NAMES:
            coefficients.setdefault(module, {})[leaf] = value
        elif module and leaf in SHARED_KEYS:
            per_layer.setdefault(module, {})[leaf] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path} holds tensors that are not RandLora coefficients or bases: {sorted(unknown)[:5]} "
                         "(bias='all' or modules_to_save?); only RandLora layers can be imported")
    incomplete = sorted(m for m, leaves in coefficients.items() if len(leaves) != 2)
    if incomplete or not coefficients:
        raise ValueError(f"{path} must hold randlora_lambda and randlora_gamma for each adapted layer; "
                         + (f"incomplete: {incomplete}" if incomplete else "it has none"))
    copies = []
    for module, leaves in per_layer.items():
        if len(leaves) != 2:
            raise ValueError(f"{path}: {module} has only {sorted(leaves)} of the bases")
        copies.append((leaves["randlora_A"], leaves["randlora_B"]))
    if len(shared) == 1:
        raise ValueError(f"{path} holds only {sorted(shared)} of the shared bases")
    coefficients = {m: (leaves["randlora_lambda"], leaves["randlora_gamma"]) for m, leaves in coefficients.items()}
    return coefficients, shared, copies


def _basis_kind(config: dict, metadata: dict | None, path: str) -> str:
    flags = "very_sparse" if config.get("very_sparse") else "sparse" if config.get("sparse") else "dense"
    if metadata is None:
        return flags
    kind = metadata.get("basis_kind")
    if kind not in BASIS_KINDS or kind != flags:
        raise ValueError(f"{path}: the config's sparse/very_sparse flags say {flags!r} bases, the randopt metadata "
                         f"says {kind!r}")
    return kind


def _bases(config: dict, metadata: dict | None, shared: dict, copies: list, kind: str, path: str) -> RandLoRABases:
    rank = config["r"]
    if shared:
        A, B = shared["randlora_A"], shared["randlora_B"]
    elif copies:
        A, B = copies[0]
    else:
        if metadata is None:
            raise ValueError(f"{path} holds no bases (saved with save_projection=False) and no randopt metadata to "
                             "regenerate them: PEFT regenerates them from projection_prng_key in bf16/fp16, which "
                             "depends on the machine; re-save the adapter with save_projection=True")
        seed, max_shape = metadata.get("seed"), metadata.get("bases_max_shape")
        if not (isinstance(max_shape, list) and len(max_shape) == 2):
            raise ValueError(f"{path}: the randopt metadata has no valid bases_max_shape to regenerate the bases from")
        bases = make_bases(tuple(max_shape), rank, seed=seed, kind=kind)
        bases.check_fingerprint(metadata.get("bases_fingerprint"), f"adapter {path}")
        return bases
    if any(not (torch.equal(a, A) and torch.equal(b, B)) for a, b in copies):
        raise ValueError(f"{path}: the per-layer copies of the bases differ from each other or from the shared bases "
                         "(corrupted file)")
    if A.dim() != 3 or A.shape[0] != rank or B.dim() != 3 or B.shape[2] != rank:
        raise ValueError(f"{path}: bases of shapes A={tuple(A.shape)}, B={tuple(B.shape)} do not fit r={rank} "
                         "(expected A=(r, 1, d) and B=(D, N, r))")
    dtype = torch.promote_types(A.dtype, torch.float32)
    bases = bases_from_tensors(A.to(dtype), B.to(dtype), kind=kind,
                               seed=metadata.get("seed", -1) if metadata else config.get("projection_prng_key", -1))
    if metadata is not None and metadata.get("saved_bases_fingerprint") is not None:
        bases.check_fingerprint(metadata["saved_bases_fingerprint"], f"adapter {path}")
    return bases


def _check_against_model(model: nn.Module, config: dict, coefficients: dict, bases: RandLoRABases, path: str) -> dict:
    """``{module name: module}`` for the adapter's layers; a ValueError naming what does not fit the model."""
    rank = config["r"]
    modules = dict(model.named_modules())
    missing = sorted(n for n in coefficients if n not in modules)
    if missing:
        raise ValueError(f"the adapter's target modules {missing[:5]} are not in the model (an adapter for another "
                         "model?)")
    found, order = {}, {name: index for index, name in enumerate(modules)}
    for name in sorted(coefficients, key=order.__getitem__):
        lam, gam = coefficients[name]
        shape = linear_shape(modules[name])
        if shape is None:
            raise ValueError(f"the adapter targets {name}, a {type(modules[name]).__name__} in this model; RandLora "
                             "adapts nn.Linear and transformers Conv1D layers")
        out_features, in_features, _ = shape
        expected = coefficient_shapes(out_features, in_features, rank)
        if (tuple(lam.shape), tuple(gam.shape)) != expected:
            raise ValueError(f"{name}: the adapter has lambda {tuple(lam.shape)} and gamma {tuple(gam.shape)}, but the "
                             f"model's layer (out={out_features}, in={in_features}) with r={rank} needs lambda "
                             f"{expected[0]} and gamma {expected[1]} (an adapter for another model?)")
        if not bases.covers(out_features, in_features):
            raise ValueError(f"{name}: the adapter's bases cover layers up to (min side, max side) {bases.max_shape}, "
                             f"smaller than the model's layer (out={out_features}, in={in_features}) (an adapter for "
                             "another model?)")
        found[name] = modules[name]
    targets = config.get("target_modules")
    if targets and targets != "all-linear" and config.get("layers_to_transform") is None:
        targets = targets if isinstance(targets, str) else list(targets)
        selected = {n for n, m in model.named_modules() if n and linear_shape(m) is not None
                    and target_matches(n, targets)}
        if selected != set(found):
            raise ValueError(f"{path}: the config's target_modules={targets!r} select the model's layers "
                             f"{sorted(selected - set(found))[:5]} that the adapter has no coefficients for, and "
                             f"{sorted(set(found) - selected)[:5]} the adapter has coefficients for are not selected "
                             "(an adapter for another model?)")
    return found


def load_randlora_adapter(model: nn.Module, adapter_dir, optimizer=None) -> RandLoRAAdapter:
    """Import the PEFT RandLora adapter in ``adapter_dir`` into the plain ``model`` (the base model it was trained on):
    its update is merged into the adapted layers' weights. Given ``optimizer`` (a ``RandLoRAAdamW`` whose RandLoRA
    groups hold those weights with the adapter's rank, alpha and basis kind, e.g. built from
    ``adapter.param_groups(model)``; no state yet), each matrix continues from the adapter's ``(lambda, gamma)`` with
    its bases (taken from the file, or regenerated from randopt's metadata and fingerprint-checked) and fresh moments.

    Returns the ``RandLoRAAdapter`` read (``install(optimizer)`` does the optimizer part later). Everything is checked
    before anything changes: a ``ValueError`` leaves the model and the optimizer as they were.
    """
    validation.module("model", model)
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise ValueError(f"adapter_dir must be a path (str or os.PathLike), got {adapter_dir!r}")
    adapter_dir = os.fspath(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise ValueError(f"{adapter_dir} is not a directory")
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    config = _read_config(adapter_dir)
    tensors, metadata = _read_weights(adapter_dir)
    coefficients, shared, copies = _split_keys(tensors, path)
    kind = _basis_kind(config, metadata, path)
    bases = _bases(config, metadata, shared, copies, kind, path)
    modules = _check_against_model(model, config, coefficients, bases, path)
    names = list(modules)
    adapter = RandLoRAAdapter(
        module_names=names, rank=config["r"], alpha=config["randlora_alpha"],
        seed=metadata["seed"] if metadata else config.get("projection_prng_key", 0), basis_kind=kind, bases=bases,
        coefficients={n: coefficients[n] for n in names}, modules={n: modules[n] for n in names})
    entries = adapter._optimizer_entries(optimizer) if optimizer is not None else None
    bases_on = _BasesOn(bases)
    deltas = [(modules[n].weight, _delta_in_storage_layout(bases_on, *coefficients[n], adapter.scale, modules[n]))
              for n in names]
    with torch.no_grad():
        for weight, delta in deltas:
            weight.add_(delta)
    if entries is not None:
        _install(optimizer, bases, entries)
    return adapter
