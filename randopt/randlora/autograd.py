"""The module route's autograd core: a RandLoRA linear layer that saves only its input.

PEFT's layer saves the ``~d x d`` scaled basis through ``F.linear``. Here forward and backward
rebuild ``Ahat`` from ``(lambda, gamma)`` (an elementwise product) and pick, per call, the cheaper of
two contraction orders from the layer shape and the token count:

- merged: form ``dW`` once (``D*rN*d``) and use it as a dense matrix; the coefficient gradients come
  from ``project`` of the (transient, never saved) weight gradient, exactly as in the optimizer route;
- factored: go through the bases (``tokens * rN * (D + d)``), never forming a ``D x d`` matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bases import LayerBases
from .functional import coefficient_grads, matmul_flops, project, reconstruct, scaled_basis


def _delta_factored(x: torch.Tensor, layer: LayerBases, basis: torch.Tensor, scale: float) -> torch.Tensor:
    if layer.transposed:
        return F.linear(F.linear(x, layer.B.T), basis.T).mul_(scale)
    return F.linear(F.linear(x, basis), layer.B).mul_(scale)


def _forward_merged(layer: LayerBases, tokens: int, same_input: bool) -> bool:
    cost = matmul_flops(layer, tokens)
    merged = cost["reconstruct"] + (0 if same_input else cost["dense"])
    return merged < cost["factored_D"] + cost["factored_d"]


def _backward_merged(layer: LayerBases, tokens: int, same_input: bool, needs_input_grad: bool) -> bool:
    cost = matmul_flops(layer, tokens)
    merged = 2 * cost["reconstruct"] + cost["dense"]
    factored = cost["factored_D"] + cost["factored_d"]
    if layer.transposed:
        factored += cost["factored_D"]  # the bases product of the input is recomputed, not saved
    if needs_input_grad:
        factored += cost["factored_d"] + (cost["factored_D"] if layer.transposed else 0)
        merged += 0 if same_input else cost["dense"]
    else:
        merged -= cost["reconstruct"]
    return merged < factored


class RandLoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + s * dropout(x) dW(lambda, gamma)^T`` with ``W`` ``out x in``.

    ``x_adapter`` is the adapter's (dropped-out) input; pass ``x`` itself when there is no dropout,
    which lets the merged order fold the update into the base weight.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lam, gam, layer: LayerBases, scale: float):
        same_input = x_adapter is x
        tokens = x.numel() // x.shape[-1]
        basis = scaled_basis(layer.A, lam, gam)
        if _forward_merged(layer, tokens, same_input):
            delta = reconstruct(layer, basis, scale)
            if same_input:
                y = F.linear(x, weight + delta, bias)
            else:
                y = F.linear(x, weight, bias) + F.linear(x_adapter, delta)
        else:
            y = F.linear(x, weight, bias) + _delta_factored(x_adapter, layer, basis, scale)
        ctx.layer, ctx.scale, ctx.same_input = layer, scale, same_input
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, x_adapter, weight, lam, gam)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, x_adapter, weight, lam, gam = ctx.saved_tensors
        layer, scale, same_input = ctx.layer, ctx.scale, ctx.same_input
        needs_x, needs_xa, needs_w, needs_b, needs_lam, needs_gam = ctx.needs_input_grad[:6]
        out_features, in_features = layer.out_features, layer.in_features
        gy = grad_y.reshape(-1, out_features)
        xa = x_adapter.reshape(-1, in_features)
        tokens = gy.shape[0]
        basis = scaled_basis(layer.A, lam, gam)
        grad_x = grad_xa = grad_w = grad_b = grad_lam = grad_gam = None
        needs_coefficients = needs_lam or needs_gam
        needs_xa = needs_xa or (same_input and needs_x)

        if _backward_merged(layer, tokens, same_input, needs_xa):
            if needs_xa:
                delta = reconstruct(layer, basis, scale)
                if same_input:
                    grad_x = gy @ (weight + delta)
                else:
                    grad_xa = gy @ delta
            if needs_coefficients:
                grad_lam, grad_gam = project(gy.T @ xa, layer, lam, gam, scale)
        else:
            if layer.transposed:
                through_bases = xa @ layer.B  # tokens x rN
                grad_basis = (through_bases.T @ gy).mul_(scale) if needs_coefficients else None
                if needs_xa:
                    grad_xa = ((gy @ basis.T) @ layer.B.T).mul_(scale)
            else:
                through_bases = gy @ layer.B  # tokens x rN
                grad_basis = (through_bases.T @ xa).mul_(scale) if needs_coefficients else None
                if needs_xa:
                    grad_xa = (through_bases @ basis).mul_(scale)
            if needs_coefficients:
                grad_lam, grad_gam = coefficient_grads(grad_basis, layer.A, lam, gam)
        if needs_x and grad_x is None:
            grad_x = gy @ weight
            if same_input and grad_xa is not None:
                grad_x += grad_xa
                grad_xa = None
        if grad_x is not None:
            grad_x = grad_x.view(grad_y.shape[:-1] + (in_features,))
        if grad_xa is not None:
            grad_xa = grad_xa.view(grad_y.shape[:-1] + (in_features,))
        if needs_w:
            grad_w = gy.T @ x.reshape(-1, in_features)
        if needs_b and ctx.has_bias:
            grad_b = gy.sum(0)
        if same_input:
            grad_xa = None
        return grad_x, grad_xa, grad_w, grad_b, grad_lam, grad_gam, None, None


def randlora_linear(x, weight, bias, lam, gam, layer: LayerBases, scale: float, x_adapter=None):
    """Functional RandLoRA linear layer (``weight`` is ``out x in``); ``x_adapter`` defaults to ``x``."""
    return RandLoRALinearFunction.apply(x, x if x_adapter is None else x_adapter, weight, bias, lam, gam, layer, scale)
