"""Export the full-rank update ``RandLoRAAdamW`` (or the module route) learned as a rank-r PEFT LoRA adapter.

A RandLoRA fine-tune changes every targeted weight by a (generally full-rank) ``dW = s * B @ Ahat(lambda,
gamma)``. Serving engines that only know LoRA can take its best rank-r approximation instead:
``export_lora(model, optimizer, out_dir, rank=16)`` (or ``energy=0.9``, per layer) writes an ordinary PEFT LoRA
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(base,
out_dir)``. Module names are found by matching the optimizer's RandLoRA matrices to the weights of the
model's ``nn.Linear`` / transformers ``Conv1D`` modules (Conv1D models get ``fan_in_fan_out: true``). A model with
``inject_randlora`` adapter layers needs no optimizer: ``export_lora(model, out_dir=..., rank=16)`` reads each
layer's own coefficients and bases (its base may be a quantized bitsandbytes layer; the factors are then saved in
the adapter's compute dtype).

Per layer, one of two routes (``method="auto"`` picks the cheaper by a multiply-add count, ``export_costs``):

- ``"dense"``: form ``dW`` (``D * rN * d`` multiply-adds, with ``d <= D`` the sides and ``rN >= d`` the basis
  columns) and take its full SVD (about ``SVD_COST * D * d^2``); exact, and the only route for an energy
  target, which needs the whole spectrum.
- ``"randomized"``: the randomised SVD of ``dW`` as an operator (``randlora_operator``): ``2 (q + 1)`` products
  with blocks of ``k + p`` columns through the bases, ``(D + d) rN (k + p)`` each, plus thin QRs. It wins when
  the target rank is well below ``d`` (e.g. 4096 x 4096 to rank 16: ~9x fewer multiply-adds than the dense
  route even with the exact-energy pass); on small layers or ranks near ``d`` the dense route is cheaper.
  ``exact_energy=True`` (default) adds one pass that forms ``dW`` a block of columns at a time (never whole)
  to get ``||dW||_F^2`` for the report; ``False`` skips it (energy reported as NaN).

The adapter goes on the ORIGINAL pre-trained model: ``RandLoRAAdamW`` trains the plain model in place, so the
model you hold is ``W0 + dW``. ``base_weights(model, optimizer)`` gives ``W0 = W - dW`` back for the layers it
trained (exact up to the rounding of the accumulated updates: ~1e-7 relative in fp32, ~1e-16 in fp64); load it
into a copy with ``base.load_state_dict(weights, strict=False)``. Other parameters the optimizer trained
(biases, norms) cannot be recovered, and a LoRA adapter does not hold them (a warning says so).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..randlora.bases import LayerBases
from ..randlora.functional import delta_weight, init_coefficients
from ..randlora.layer import linear_shape, randlora_layers, target_matches
from .adapters import PEFT_PREFIX, LayerReport, SqueezeResult, _check_out_dir, _config_for
from .functional import SVD, check_alpha, check_target, randlora_operator, select_rank, squeeze_operator, truncate

EXPORT_METHODS = ("auto", "dense", "randomized")
SVD_COST = 11.0
"""A dense SVD of an ``m x n`` matrix costs about this many times the multiply-adds of an ``m x n x min(m, n)``
matrix product (LAPACK gesdd vs GEMM on one CPU core, measured 11-12x for 256..1024 squares in fp64)."""
_QR_COST = 2.0  # Householder QR of an m x k block: ~2 m k^2


@dataclass(frozen=True)
class ExportLayerReport(LayerReport):
    """A ``LayerReport`` of an exported layer: ``source_rank`` is the layer's smaller side (the rank a RandLoRA
    update can reach), ``source_alpha`` RandLoRA's alpha, and ``method`` the SVD route, ``"dense"`` or
    ``"randomized"``."""

    method: str = "dense"


@dataclass(frozen=True)
class RandLoRAMatrix:
    """A weight ``RandLoRAAdamW`` trains through RandLoRA, matched to its module."""

    name: str
    module: nn.Module
    param: torch.Tensor
    group: dict
    out_features: int
    in_features: int


def randlora_matrices(model: nn.Module, optimizer, module_names=None) -> list[RandLoRAMatrix]:
    """The RandLoRA matrices of ``optimizer`` (a ``RandLoRAAdamW``) that are the weight of an ``nn.Linear`` or
    transformers ``Conv1D`` of ``model``, in module order; ``module_names`` picks some of them."""
    group_of = getattr(optimizer, "_group_of", None)
    if not isinstance(group_of, dict) or not hasattr(optimizer, "bases_for"):
        raise ValueError(f"optimizer must be a RandLoRAAdamW, got {type(optimizer).__name__}")
    modules = {id(m.weight): (n, m) for n, m in model.named_modules() if n and linear_shape(m) is not None}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    found, strays = {}, []
    for param, group in group_of.items():
        if group.get("rank") is None or len(getattr(param, "ds_shape", param.shape)) < 2:
            continue
        if id(param) not in modules:
            strays.append(tuple(param.shape))
            continue
        name, module = modules[id(param)]
        out_features, in_features, fan_in_fan_out = linear_shape(module)
        if bool(group["fan_in_fan_out"]) != fan_in_fan_out:
            raise ValueError(f"{name} is a {type(module).__name__} but its parameter group has fan_in_fan_out="
                             f"{group['fan_in_fan_out']}: its update would be transposed")
        found[name] = RandLoRAMatrix(name, module, param, group, out_features, in_features)
    if module_names is None:
        if strays:
            raise ValueError(f"the optimizer trains matrices of shapes {strays} through RandLoRA that are not the "
                             "weight of an nn.Linear/Conv1D of this model; pass module_names to export the others")
        names = sorted(found, key=order.__getitem__)
    else:
        if isinstance(module_names, str) or not all(isinstance(n, str) for n in module_names):
            raise ValueError(f"module_names must be a list of module names, got {module_names!r}")
        names = list(dict.fromkeys(module_names))
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"module_names {unknown} are not layers the optimizer trains through RandLoRA; those "
                             f"are {sorted(found, key=order.__getitem__)}")
    if not names:
        raise ValueError("the optimizer trains no nn.Linear/Conv1D weight of this model through RandLoRA: "
                         "nothing to export")
    return [found[n] for n in names]


def _coefficients(optimizer, matrix: RandLoRAMatrix, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    state = optimizer.state.get(matrix.param) or {}
    if "lambda" in state:
        lam, gam = state["lambda"], state["gamma"]
    else:  # never stepped: the update is still zero
        lam, gam = init_coefficients(matrix.out_features, matrix.in_features, matrix.group["rank"])
    device = matrix.param.device
    return lam.detach().to(device, dtype), gam.detach().to(device, dtype)


def _layer_bases(optimizer, matrix: RandLoRAMatrix, dtype):
    return optimizer.bases_for(matrix.group, matrix.param.device, dtype).layer(matrix.out_features,
                                                                               matrix.in_features)


def randlora_delta(optimizer, matrix: RandLoRAMatrix, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``dW`` (``out x in``) of one matrix from the optimizer's coefficients, computed in ``dtype``."""
    lam, gam = _coefficients(optimizer, matrix, dtype)
    return delta_weight(_layer_bases(optimizer, matrix, dtype), lam, gam, optimizer._scale(matrix.group),
                        (matrix.out_features, matrix.in_features))


@torch.no_grad()
def base_weights(model: nn.Module, optimizer, module_names=None) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W0 = W - dW}`` (storage layout and dtype) for the layers ``optimizer`` trains through
    RandLoRA: ``copy.load_state_dict(base_weights(model, optimizer), strict=False)`` turns a copy of the
    fine-tuned model back into the base model an exported adapter goes on."""
    weights = {}
    for matrix in randlora_matrices(model, optimizer, module_names):
        weight = matrix.param
        dtype = torch.promote_types(torch.promote_types(weight.dtype, torch.float32),
                                    (optimizer.state.get(weight) or {}).get("lambda", weight).dtype)
        delta = randlora_delta(optimizer, matrix, dtype)
        delta = delta.T if matrix.group["fan_in_fan_out"] else delta
        weights[f"{matrix.name}.weight"] = (weight.detach().to(dtype) - delta.reshape(weight.shape)).to(weight.dtype)
    return weights


# ---------------------------------------------------------------------------------------------- the route


@dataclass(frozen=True)
class _ExportSource:
    """One layer's RandLoRA update as the export needs it, from either route, in the compute dtype."""

    name: str
    shape: tuple[int, int]
    lam: torch.Tensor
    gam: torch.Tensor
    layer: LayerBases
    scale: float
    rank: int
    dtype: torch.dtype  # of the saved factors unless the caller picks one
    fan_in_fan_out: bool


def _optimizer_sources(model: nn.Module, optimizer, module_names, dtype) -> list[_ExportSource]:
    return [_ExportSource(m.name, (m.out_features, m.in_features), *_coefficients(optimizer, m, dtype),
                          _layer_bases(optimizer, m, dtype), optimizer._scale(m.group), m.group["rank"],
                          m.param.dtype, bool(m.group["fan_in_fan_out"]))
            for m in randlora_matrices(model, optimizer, module_names)]


def _module_sources(model: nn.Module, module_names, dtype) -> list[_ExportSource]:
    """The ``inject_randlora`` layers of ``model`` (all, or those named), read without an optimizer."""
    layers = dict(randlora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA adapter layer (inject_randlora) and no optimizer "
                         "was given: pass the RandLoRAAdamW that trained the model")
    if module_names is not None:
        if isinstance(module_names, str) or any(n not in layers for n in module_names):
            raise ValueError(f"module_names must be a list of the model's RandLoRA layers {list(layers)}, got "
                             f"{module_names!r}")
        layers = {n: layers[n] for n in dict.fromkeys(module_names)}
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"RandLoRA layers {merged[:5]} are merged into their base: unmerge them before exporting")
    bases_in_dtype = {}
    sources = []
    for name, m in layers.items():
        key = id(m.shared)
        if key not in bases_in_dtype:
            bases_in_dtype[key] = m.shared.bases.to(device=m.randlora_lambda.device, dtype=dtype)
        lam, gam = (p.detach().to(dtype) for p in (m.randlora_lambda, m.randlora_gamma))
        sources.append(_ExportSource(name, (m.out_features, m.in_features), lam, gam,
                                     bases_in_dtype[key].layer(m.out_features, m.in_features), m.scaling, m.rank,
                                     m.randlora_lambda.dtype, m.fan_in_fan_out))
    return sources


def export_costs(out_features: int, in_features: int, basis_columns: int, rank: int, *, oversample: int = 10,
                 power_iters: int = 2, exact_energy: bool = True) -> dict[str, float]:
    """Multiply-add counts of the two routes for one layer (see the module doc); the SVD weighted by
    ``SVD_COST`` because LAPACK's SVD runs far below GEMM speed."""
    d, D = sorted((out_features, in_features))
    width = min(rank + oversample, d)
    form = D * basis_columns * d
    dense = form + SVD_COST * D * d * d
    passes = 2 * (power_iters + 1)
    randomized = (basis_columns * d + passes * (D + d) * basis_columns * width + passes * _QR_COST * D * width ** 2
                  + SVD_COST * d * width ** 2 + (form if exact_energy else 0))
    return {"dense": float(dense), "randomized": float(randomized)}


def _frobenius_sq(op, block: int = 256) -> float:
    """``||M||_F^2`` of an operator from products with blocks of identity columns (never the whole matrix)."""
    n = op.shape[1]
    total = 0.0
    for start in range(0, n, block):
        stop = min(start + block, n)
        eye = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        total += float(op.matmul(eye).double().square().sum())
    return total


def _check_method(method) -> str:
    if method not in EXPORT_METHODS:
        raise ValueError(f"method must be one of {EXPORT_METHODS}, got {method!r}")
    return method


def _target_modules(model: nn.Module, names: list[str]):
    """A PEFT ``target_modules`` that selects exactly ``names``: the list, or an anchored regex when PEFT's
    suffix rule would select more layers with the list."""
    as_list = sorted(names)
    selected = {n for n, _ in model.named_modules() if n and target_matches(n, as_list)}
    return as_list if selected == set(names) else "|".join(map(re.escape, as_list))


def export_lora(model: nn.Module, optimizer=None, out_dir=None, *, rank: int | None = None, energy: float | None = None,
                alpha: float | None = None, rslora: bool = False, method: str = "auto", oversample: int = 10,
                power_iters: int = 2, seed: int = 0, exact_energy: bool = True, module_names=None,
                dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float64,
                overwrite: bool = False) -> SqueezeResult:
    """The learned RandLoRA update as a PEFT LoRA adapter at ``rank`` (or per-layer ``energy``): from
    ``optimizer``, the ``RandLoRAAdamW`` that trained a plain model, or (``optimizer=None``) from the model's
    ``inject_randlora`` layers, e.g. ``export_lora(model, out_dir="adapter", rank=16)``.

    ``rank``: the target for every layer; a layer whose smaller side is at most ``rank`` is exported at full
    rank (exactly). ``energy`` in ``(0, 1]``: per layer the smallest rank keeping that fraction of
    ``||dW||_F^2`` (dense route). ``alpha``: the alpha written for every layer; None (default) writes each
    layer's rank (scale 1 without rsLoRA). ``method``: ``"auto"``, ``"dense"`` or ``"randomized"`` (see the
    module doc; ``oversample``, ``power_iters``, ``seed`` and ``exact_energy`` are the randomised route's).
    ``dtype``: of the saved factors (default: each weight's dtype; the coefficients' for the module route). ``out_dir``: written atomically as in
    ``squeeze_lora``. Returns the adapter (config, tensors) and a per-layer ``ExportLayerReport``. For plain
    (not DeepSpeed-partitioned) models.
    """
    check_target(rank, energy)
    _check_method(method)
    if energy is not None and method == "randomized":
        raise ValueError("an energy target needs the whole spectrum: use method='dense' (or 'auto'), or a rank")
    if alpha is not None:
        check_alpha(alpha)
    for label, value in (("oversample", oversample), ("power_iters", power_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    sources = (_module_sources(model, module_names, compute_dtype) if optimizer is None else
               _optimizer_sources(model, optimizer, module_names, compute_dtype))
    if out_dir is not None:
        _check_out_dir(os.fspath(out_dir), overwrite)
    tensors, reports, ranks, alphas = {}, [], {}, {}
    for source in sources:
        shape, lam, gam, layer, scale = source.shape, source.lam, source.gam, source.layer, source.scale
        if not (torch.isfinite(lam).all() and torch.isfinite(gam).all()):
            raise ValueError(f"{source.name}: the RandLoRA coefficients have non-finite values; refusing to export a "
                             "broken adapter")
        full = min(shape)
        target = None if energy is not None else min(rank, full)
        route = method
        if route == "auto":
            route = "dense" if energy is not None else min(
                export_costs(*shape, layer.stored_B.shape[1], target, oversample=oversample, power_iters=power_iters,
                             exact_energy=exact_energy).items(), key=lambda item: item[1])[0]
        if route == "dense":
            U, S, Vh = torch.linalg.svd(delta_weight(layer, lam, gam, scale, shape), full_matrices=False)
            svd = SVD(U, S, Vh.T)
            target = select_rank(S, energy) if energy is not None else target
            alpha_t = float(target) if alpha is None else float(alpha)
            squeezed = truncate(svd, target, alpha_t, rslora)
        else:
            op = randlora_operator(layer, lam, gam, scale)
            alpha_t = float(target) if alpha is None else float(alpha)
            squeezed = squeeze_operator(op, target, alpha_t, rslora, oversample=oversample, power_iters=power_iters,
                                        seed=seed, total_energy=_frobenius_sq(op) if exact_energy else None)
        out_dtype = source.dtype if dtype is None else dtype
        key = f"{PEFT_PREFIX}{source.name}"
        tensors[f"{key}.lora_A.weight"] = squeezed.A.to("cpu", out_dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = squeezed.B.to("cpu", out_dtype).contiguous()
        ranks[source.name], alphas[source.name] = target, alpha_t
        reports.append(ExportLayerReport(source.name, shape, full, target, scale * source.rank, alpha_t,
                                         squeezed.energy, route))
    plain = 0 if optimizer is None else sum(
        1 for p, g in optimizer._group_of.items()
        if optimizer.state.get(p) and (g.get("rank") is None or len(getattr(p, "ds_shape", p.shape)) < 2))
    if plain:
        warnings.warn(f"the optimizer also trained {plain} parameters that are not RandLoRA matrices (biases, norms, "
                      "embeddings, ...); a LoRA adapter does not hold them, so the base model plus this adapter will "
                      "not reproduce their training", stacklevel=2)
    config = _config_for({
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "bias": "none", "fan_in_fan_out": any(s.fan_in_fan_out for s in sources), "inference_mode": True,
        "init_lora_weights": True, "lora_dropout": 0.0, "modules_to_save": None, "use_dora": False,
        "use_rslora": bool(rslora), "target_modules": _target_modules(model, [s.name for s in sources]),
    }, ranks, alphas)
    result = SqueezeResult(config, tensors, reports)
    if out_dir is not None:
        result.save(out_dir, overwrite=overwrite)
    return result
