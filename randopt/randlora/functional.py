"""RandLoRA as pure functions over tensors: reconstruction, projection and their costs.

Conventions: a weight is ``out x in``; ``d = min(out, in)``, ``D = max(out, in)``. In canonical
orientation the update is ``s * B @ Ahat`` (``D x d``), transposed back when ``in > out``.
``Ahat[k*N + n, j] = lambda[k, n] * A[k, j] * gamma[n, j]`` (PEFT's pairing, kept for interoperability).
Everything here is linear in the gradient and a sum over the weight's rows, so it works on blocks.
Not guarded: arguments are taken as given (shapes, dtypes and finiteness are the caller's business; the
optimizers and modules validate them), and nothing here can tell whether it already ran.
"""
from __future__ import annotations

import torch

from ..validation import rank as check_rank
from .bases import LayerBases, RandLoRABases, num_bases

DEFAULT_RANK = 32
"""The rank used when none is given (``RandLoRAAdamW(model)``, ``param_groups``, ``inject_randlora``)."""
DEFAULT_SCALE = 20.0


def default_alpha(rank: int) -> float:
    """The one default alpha of every RandLoRA route: ``20 * rank``, i.e. scale ``alpha / rank = 20`` at any rank
    (PEFT's RandLora default, 640, at its default rank 32). The coefficients' learning rate goes with this scale:
    an update ``s * dCoefficients`` is ``s`` times larger than a plain parameter's at the same lr, which is why
    ``param_groups(..., plain_lr=...)`` gives plain parameters (e.g. a new head) a learning rate of their own."""
    return DEFAULT_SCALE * check_rank(rank)


def coefficient_shapes(out_features: int, in_features: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``lambda`` ``(r, N)`` and ``gamma`` ``(N, d)`` for one layer."""
    n = num_bases(out_features, in_features, rank)
    return (rank, n), (n, min(out_features, in_features))


def init_coefficients(out_features: int, in_features: int, rank: int, dtype=torch.float32, device=None):
    """PEFT's init: ``lambda = 0`` (so the update starts at zero) and ``gamma = 1 / max(N, d)``."""
    lam_shape, gam_shape = coefficient_shapes(out_features, in_features, rank)
    lam = torch.zeros(lam_shape, dtype=dtype, device=device)
    gam = torch.full(gam_shape, 1.0 / max(gam_shape), dtype=dtype, device=device)
    return lam, gam


def _layer(bases, shape) -> LayerBases:
    return bases.layer(*shape) if isinstance(bases, RandLoRABases) else bases


def scaled_basis(A: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    """``Ahat`` flattened to ``(r*N, d)``; ``A`` is ``(r, 1, d)``."""
    return (lam[:, :, None] * A * gam[None]).flatten(end_dim=1)


def canonical_block(layer: LayerBases, rows: slice, cols: slice) -> tuple[slice, slice]:
    """Map a block of the ``out x in`` weight to (B-row, basis-column) slices of the canonical ``D x d`` form."""
    return (cols, rows) if layer.transposed else (rows, cols)


def reconstruct(layer: LayerBases, basis: torch.Tensor, scale: float,
                rows: slice = slice(None), cols: slice = slice(None),
                layout_of: torch.Tensor | None = None) -> torch.Tensor:
    """``s * B @ basis`` oriented as the ``out x in`` weight (or the block ``[rows, cols]`` of it).

    Linear in ``basis``: pass a difference of scaled bases to get the change of the update. ``layout_of``: the
    tensor the result will be added to; the result then has its memory layout (row- or column-major), so that the
    addition runs over both contiguously: a row-major update added to a weight stored ``in x out`` (transformers'
    ``Conv1D``, seen through a transposed view) costs several times the addition itself.
    """
    p, q = canonical_block(layer, rows, cols)
    target = None if layout_of is None else layout_of.T if layer.transposed else layout_of
    column_major = target is not None and not target.is_contiguous() and target.T.is_contiguous()
    block = layer.b_matmul(basis[:, q], rows=p, column_major=column_major).mul_(scale)
    return block.T if layer.transposed else block


def delta_weight(bases, lam: torch.Tensor, gam: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """The RandLoRA update ``dW`` (``out x in``) for coefficients ``(lambda, gamma)``."""
    layer = _layer(bases, shape)
    return reconstruct(layer, scaled_basis(layer.A, lam, gam), scale)


def coefficient_grads(grad_basis: torch.Tensor, A: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor):
    """Chain rule from ``dL/dAhat`` (``r*N x d'``) to ``(dL/dlambda, dL/dgamma)``.

    ``A`` and ``gam`` may be column blocks (``d' <= d``): ``dL/dlambda`` is then a partial sum and
    ``dL/dgamma`` covers only those columns.
    """
    r, n = lam.shape
    weighted = grad_basis.view(r, n, -1) * A
    grad_lam = (weighted * gam).sum(-1)
    # a broadcast product and a sum over k: einsum lowers this to a batched mat-vec that is ~10x slower on CPU
    grad_gam = (weighted * lam[:, :, None]).sum(0)
    return grad_lam, grad_gam


def project(G: torch.Tensor, bases, lam: torch.Tensor, gam: torch.Tensor, scale: float,
            shape=None, row_start: int = 0, col_start: int = 0):
    """Gradients of the loss w.r.t. ``(lambda, gamma)`` given ``G = dL/dW``.

    ``G`` may be the block of the full gradient starting at ``(row_start, col_start)`` of a weight of
    ``shape`` (default: ``G.shape``). Results of disjoint blocks are partial sums that add up to the
    full projection. ``G`` is ``out x in``, whatever the layout the weight is stored in.
    """
    shape = tuple(G.shape) if shape is None else tuple(shape)
    layer = _layer(bases, shape)
    rows = slice(row_start, row_start + G.shape[0])
    cols = slice(col_start, col_start + G.shape[1])
    p, q = canonical_block(layer, rows, cols)
    Gc = G.T if layer.transposed else G
    grad_basis = layer.bt_matmul(Gc, rows=p).mul_(scale)
    grad_lam, grad_gam_block = coefficient_grads(grad_basis, layer.A[:, :, q], lam, gam[:, q])
    if grad_gam_block.shape == gam.shape:
        return grad_lam, grad_gam_block
    grad_gam = torch.zeros_like(gam)
    grad_gam[:, q] = grad_gam_block
    return grad_lam, grad_gam


def matmul_flops(layer: LayerBases, tokens: int, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Costs of the contraction orders in multiply-adds of a dense ``mm``, used to pick the cheaper one per call.

    ``reconstruct``: forming ``dW`` (or projecting a full ``G``): ``D * rN * d`` with ``B``.
    ``dense``: one ``tokens x D x d`` product with a full-size matrix.
    ``factored_D``: one ``tokens x rN x D`` product with ``B``; ``factored_d``: ``tokens x rN x d`` with ``Ahat``.
    Products with a compact ``B`` (in ``dtype``, default the bases' own) are weighted by ``LayerBases.b_cost``.
    """
    d, D = sorted((layer.out_features, layer.in_features))
    rn = layer.stored_B.shape[1]
    b_cost = layer.b_cost(layer.A.dtype if dtype is None else dtype)
    return {"reconstruct": D * rn * d * b_cost, "dense": tokens * D * d, "factored_D": tokens * rn * D * b_cost,
            "factored_d": tokens * rn * d}
