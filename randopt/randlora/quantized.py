"""Quantized base weights (bitsandbytes ``Linear4bit`` nf4/fp4 and ``Linear8bitLt``) behind the autograd core.

The core only needs the base weight as a dense ``out x in`` matrix for a product, transiently. A
``QuantizedWeight`` is that weight kept packed: the core asks it for the dense matrix when a product needs it
(forward, and again in backward for the input gradient) and drops it right after, as bitsandbytes' own
autograd does, so neither a dequantized copy of the base nor a ``d x d`` tensor is saved for backward.

The dense matrix is ``dequantize(W)`` in the compute dtype. For ``Linear4bit`` that is what the layer itself
multiplies by. For ``Linear8bitLt`` (LLM.int8) the layer quantizes its input to int8 too; here the input is
used as it is, so outputs differ from the bare layer's by that int8 rounding of the activations (about 1e-2
relative), not by anything of the weight.

A packed weight cannot take a written update: merging re-quantizes ``dequantize(W) + dW`` (as PEFT does, with
the same rounding loss, so unmerge does not give the original weight back exactly), and optimizers that write
weights refuse quantized ones (``is_quantized``). bitsandbytes is imported only when a packed weight is used.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def is_quantized(weight) -> bool:
    """True for a bitsandbytes packed weight (``Params4bit``; ``Int8Params`` holding int8), whatever its storage
    dtype (``Params4bit(quant_storage=torch.bfloat16)`` is a floating-point tensor of packed bytes)."""
    if not isinstance(weight, torch.Tensor):
        return False
    kind = type(weight).__name__
    return kind == "Params4bit" or (kind == "Int8Params" and weight.dtype == torch.int8)


def _scale_rows(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt moves CB/SCB from the weight to module.state at its first forward
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"{type(module).__name__}: the int8 weight has no row scales (SCB); move the layer to its "
                         "device once (.to(device)) so bitsandbytes quantizes it")
    return scb


class QuantizedWeight:
    """The packed weight of a bitsandbytes linear layer, seen as its ``out x in`` matrix on demand."""

    def __init__(self, module: nn.Module):
        if not is_quantized(getattr(module, "weight", None)):
            raise ValueError(f"{type(module).__name__} has no bitsandbytes-quantized weight")
        self.module = module
        self.shape = (module.out_features, module.in_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: ``Linear4bit.compute_dtype``, else fp32 (int8 weights are dequantized)."""
        dtype = getattr(self.module, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dense ``out x in`` matrix (the caller may modify it in place)."""
        weight = self.module.weight
        dtype = self.compute_dtype if dtype is None else dtype
        if type(weight).__name__ == "Params4bit":
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                # bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time the layer runs in
                # eval mode without gradients; back to the standard layout, as it does itself before saving it
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)
            dense = dequantize_4bit(weight.data, weight.quant_state)
            return dense.to(dtype) if dense.dtype != dtype else dense
        scale = _scale_rows(self.module).to(dtype).mul(1.0 / 127.0)
        return weight.data.to(dtype).mul_(scale[:, None])

    @torch.no_grad()
    def requantize(self, dense: torch.Tensor) -> None:
        """Replace the layer's packed weight by ``dense`` quantized the same way (same type, block size, storage)."""
        import bitsandbytes as bnb
        module, weight = self.module, self.module.weight
        device = weight.device
        if type(weight).__name__ == "Params4bit":
            new = bnb.nn.Params4bit(dense.to("cpu"), requires_grad=False, blocksize=weight.blocksize,
                                    compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                                    quant_storage=weight.quant_storage, module=module)
            module.weight = new._quantize(device) if device.type == "cpu" else new.to(device)
        else:
            module.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                              has_fp16_weights=False)._quantize(device)
            state = getattr(module, "state", None)
            if state is not None:
                state.reset_grads()
                state.CB, state.SCB = None, None


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a dense matrix for a product: a plain tensor as it is, a ``QuantizedWeight`` dequantized."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedWeight) else weight


def add_to_quantized(module: nn.Module, delta: torch.Tensor) -> None:
    """``W <- quantize(dequantize(W) + delta)`` for a bitsandbytes layer, with PEFT's warning about the rounding."""
    warnings.warn(f"merging into a quantized {type(module).__name__} re-quantizes the weight: its rounding changes "
                  "the outputs slightly, and unmerge does not restore the original weight exactly", stacklevel=3)
    quantized = QuantizedWeight(module)
    dense = quantized.dequantize(torch.promote_types(delta.dtype, torch.float32))
    quantized.requantize(dense.add_(delta.to(dense.dtype)))


def refuse_quantized(named_weights, where: str) -> None:
    """A ``ValueError`` naming the quantized weights among ``(name, weight)`` pairs, for routes that write weights."""
    quantized = [name for name, weight in named_weights if is_quantized(weight)]
    if quantized:
        more = f" and {len(quantized) - 5} more" if len(quantized) > 5 else ""
        raise ValueError(f"{where}: {quantized[:5]}{more} hold quantized bitsandbytes weights, which cannot take a "
                         "written update (each optimizer step writes W += dW, and a packed 4-/8-bit weight has no "
                         "room for it). Train a quantized base through the module route instead: "
                         "randopt.inject_randlora(model, target_modules, rank=...) puts RandLoRA coefficients beside "
                         "the frozen quantized base, for any optimizer (e.g. torch.optim.AdamW); or use "
                         "LoRAProAdamW on a PEFT LoRA model")
