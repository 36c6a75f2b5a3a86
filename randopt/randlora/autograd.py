"""The module route's autograd core: a RandLoRA linear layer that saves no ``d x d`` tensor.

PEFT's layer saves the ``~d x d`` scaled basis through ``F.linear``. Here forward and backward
rebuild ``Ahat`` from ``(lambda, gamma)`` (an elementwise product) and pick, per call, the cheaper of
two contraction orders from the layer shape and the token count:

- merged: form ``dW`` (``D*rN*d``) and use it as a dense matrix, folded into the base weight when the
  adapter sees the same input; the coefficient gradients come from projecting the transient weight gradient;
- factored: go through the bases (``tokens * rN * (D + d)``), never forming a ``D x d`` matrix.

Saved for backward: the adapter input when ``B`` sits on the output side; when ``B`` sits on the input
side (``in > out``) and the forward is factored, ``x_a @ B`` (``tokens x rN``, no larger than the input)
instead, which makes the coefficient gradients one small product.

The base weight is a tensor or a ``QuantizedWeight`` (bitsandbytes 4-bit/8-bit, ``quantized.py``): a packed
weight is dequantized where a product needs it, in forward and again in backward, and only the packed handle
is kept, so a quantized base costs its packed bytes and one transient dense matrix per product.
"""
from __future__ import annotations

import torch

from .bases import LayerBases
from .functional import coefficient_grads, matmul_flops, scaled_basis
from .quantized import dense_weight


def _backward_costs(layer: LayerBases, tokens: int, same_input: bool, needs_input_grad: bool,
                    needs_coefficients: bool, through_bases: bool, dtype=None) -> tuple[float, float]:
    """Costs of the adapter's backward, (merged, factored); ``g @ W`` is common to both and left out."""
    c = matmul_flops(layer, tokens, dtype)
    rec, dense, f_big, f_small = c["reconstruct"], c["dense"], c["factored_D"], c["factored_d"]
    input_merged = rec + (0 if same_input else dense)
    if layer.transposed:
        input_factored = f_small + f_big
        if through_bases:
            coef_merged = coef_factored = f_small
        else:
            coef_merged, coef_factored = dense + rec, f_big + f_small
    else:
        # g @ B serves both the input gradient and the coefficient gradients
        input_factored = f_small + (0 if needs_coefficients else f_big)
        coef_merged, coef_factored = dense + rec, f_big + f_small
    merged = (input_merged if needs_input_grad else 0) + (coef_merged if needs_coefficients else 0)
    factored = (input_factored if needs_input_grad else 0) + (coef_factored if needs_coefficients else 0)
    return merged, factored


def _forward_merged(layer: LayerBases, tokens: int, same_input: bool, needs_input_grad: bool = False,
                    needs_coefficients: bool = False, dtype=None) -> bool:
    c = matmul_flops(layer, tokens, dtype)
    merged = c["reconstruct"] + (0 if same_input else c["dense"])
    factored = c["factored_D"] + c["factored_d"]
    if layer.transposed and needs_coefficients:
        # only the factored forward leaves x_a @ B for the backward
        merged += min(_backward_costs(layer, tokens, same_input, needs_input_grad, True, False, dtype))
        factored += min(_backward_costs(layer, tokens, same_input, needs_input_grad, True, True, dtype))
    return merged < factored


def _backward_merged(layer: LayerBases, tokens: int, same_input: bool, needs_input_grad: bool,
                     needs_coefficients: bool = True, through_bases: bool = False, dtype=None) -> bool:
    merged, factored = _backward_costs(layer, tokens, same_input, needs_input_grad, needs_coefficients,
                                       through_bases, dtype)
    return merged < factored


def _canonical_delta(layer: LayerBases, basis: torch.Tensor) -> torch.Tensor:
    """``B @ basis`` (``D x d``): ``dW`` itself, or its transpose when ``in > out``."""
    return layer.b_matmul(basis)


def _merged_weight(weight, layer: LayerBases, basis: torch.Tensor) -> torch.Tensor:
    dense = dense_weight(weight, basis.dtype)
    if layer.transposed:
        return layer.b_matmul(basis, add_to=dense.T).T
    return layer.b_matmul(basis, add_to=dense)


def _linear_into(y: torch.Tensor, x: torch.Tensor, weight, bias) -> torch.Tensor:
    weight = dense_weight(weight, x.dtype)
    if bias is None:
        return torch.mm(x, weight.T, out=y)
    return torch.addmm(bias, x, weight.T, out=y)


def _add_pending(total, pending: tuple, layer: LayerBases):
    """``total + left @ right`` (in place; ``total`` None: the product alone), ``right`` None meaning ``B^T``."""
    left, right = pending
    if right is None:
        return layer.matmul_bt(left, accumulate=total)
    return left @ right if total is None else total.addmm_(left, right)


class RandLoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + x_a dW(lambda, gamma)^T`` with ``W`` ``out x in`` and ``dW`` scaled by ``scale``.

    ``x_adapter`` (``x_a``) is the adapter's (dropped-out) input; pass ``x`` itself when there is no
    dropout, which lets the merged order fold the update into the base weight.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lam, gam, layer: LayerBases, scale: float):
        same_input = x_adapter is x
        needs_x, needs_xa, needs_w, _, needs_lam, needs_gam = ctx.needs_input_grad[:6]
        needs_input = needs_xa or (same_input and needs_x)
        needs_coefficients = needs_lam or needs_gam
        x2 = x.reshape(-1, layer.in_features)
        xa2 = x2 if same_input else x_adapter.reshape(-1, layer.in_features)
        tokens = x2.shape[0]
        # the scale rides on lambda so no tokens-sized tensor is rescaled
        basis = scaled_basis(layer.A, lam * scale, gam)
        through_bases = None
        # the output must not be a view (callers may modify it in place), so products write into it
        out = x2.new_empty(x.shape[:-1] + (layer.out_features,))
        y = out.view(tokens, layer.out_features)
        if _forward_merged(layer, tokens, same_input, needs_input, needs_coefficients, x2.dtype):
            if same_input:
                _linear_into(y, x2, _merged_weight(weight, layer, basis), bias)
            else:
                delta = _canonical_delta(layer, basis)
                _linear_into(y, x2, weight, bias).addmm_(xa2, delta if layer.transposed else delta.T)
        else:
            _linear_into(y, x2, weight, bias)
            if layer.transposed:
                through_bases = layer.matmul_b(xa2)
                y.addmm_(through_bases, basis)
            else:
                layer.matmul_bt(xa2 @ basis.T, accumulate=y)
        keep_through_bases = needs_coefficients and through_bases is not None
        adapter_saved = (through_bases if keep_through_bases else xa2) if needs_coefficients else None
        ctx.layer, ctx.scale, ctx.same_input = layer, scale, same_input
        ctx.has_bias, ctx.through_bases = bias is not None, keep_through_bases
        # a packed weight is a handle, not a tensor: it rides on ctx (its bytes are the layer's anyway)
        packed = not isinstance(weight, torch.Tensor)
        ctx.packed_weight = weight if packed and needs_x else None
        ctx.save_for_backward(x2 if needs_w else None, adapter_saved, weight if needs_x and not packed else None,
                              lam, gam)
        return out

    @staticmethod
    def backward(ctx, grad_y):
        x2, adapter_saved, weight, lam, gam = ctx.saved_tensors
        weight = ctx.packed_weight if ctx.packed_weight is not None else weight
        layer, scale, same_input, through_bases = ctx.layer, ctx.scale, ctx.same_input, ctx.through_bases
        needs_x, needs_xa, needs_w, needs_b, needs_lam, needs_gam = ctx.needs_input_grad[:6]
        needs_input = needs_xa or (same_input and needs_x)
        needs_coefficients = needs_lam or needs_gam
        g = grad_y.reshape(-1, layer.out_features)
        tokens = g.shape[0]
        lam_scaled = lam * scale
        basis = scaled_basis(layer.A, lam_scaled, gam)
        grad_x = grad_xa = grad_w = grad_b = grad_lam = grad_gam = grad_basis = None

        if needs_input or needs_coefficients:
            if _backward_merged(layer, tokens, same_input, needs_input, needs_coefficients, through_bases, g.dtype):
                if needs_input and same_input:
                    grad_x = g @ _merged_weight(weight, layer, basis)
                elif needs_input:
                    delta = _canonical_delta(layer, basis)
                    grad_xa = g @ (delta.T if layer.transposed else delta)
                if needs_coefficients and through_bases:
                    grad_basis = adapter_saved.T @ g
                elif needs_coefficients:
                    # B.T @ (weight gradient, canonical D x d); transient, never saved
                    grad_basis = layer.bt_matmul(adapter_saved.T @ g if layer.transposed else g.T @ adapter_saved)
            elif layer.transposed:
                if needs_coefficients:
                    tb = adapter_saved if through_bases else layer.matmul_b(adapter_saved)
                    grad_basis = tb.T @ g
                if needs_input:
                    grad_xa = (g @ basis.T, None)
            else:
                gB = layer.matmul_b(g)
                if needs_coefficients:
                    grad_basis = gB.T @ adapter_saved
                if needs_input:
                    grad_xa = (gB, basis)
        if needs_x and grad_x is None:
            grad_x = g @ dense_weight(weight, g.dtype)
            if same_input:
                _add_pending(grad_x, grad_xa, layer)
                grad_xa = None
        if isinstance(grad_xa, tuple):
            grad_xa = _add_pending(None, grad_xa, layer)
        if grad_basis is not None:
            grad_lam, grad_gam = coefficient_grads(grad_basis, layer.A, lam_scaled, gam)
            grad_lam = grad_lam.mul_(scale) if needs_lam else None
            grad_gam = grad_gam if needs_gam else None
        if grad_x is not None:
            grad_x = grad_x.view(grad_y.shape[:-1] + (layer.in_features,))
        if grad_xa is not None:
            grad_xa = grad_xa.reshape(grad_y.shape[:-1] + (layer.in_features,))
        if needs_w:
            grad_w = g.T @ x2
        if needs_b and ctx.has_bias:
            grad_b = g.sum(0)
        return grad_x, grad_xa, grad_w, grad_b, grad_lam, grad_gam, None, None


def randlora_linear(x, weight, bias, lam, gam, layer: LayerBases, scale: float, x_adapter=None):
    """Functional RandLoRA linear layer (``weight`` is ``out x in``); ``x_adapter`` defaults to ``x``."""
    return RandLoRALinearFunction.apply(x, x if x_adapter is None else x_adapter, weight, bias, lam, gam, layer, scale)
