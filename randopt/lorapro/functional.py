"""LoRA-Pro as pure functions over tensors: the equivalent gradient and its optimal adjustment.

Conventions (PEFT's): ``W = W0 + s * B @ A`` with ``B: m x r``, ``A: r x n`` and ``W`` in ``out x in``
layout. ``gA_lora = s B^T g`` and ``gB_lora = s g A^T`` are what autograd gives for a full gradient
``g = dL/dW``. LoRA-Pro replaces them by

    gA = (1/s^2) (B^T B)^+ gA_lora + X A
    gB = (1/s^2) [I - P_B] gB_lora (A A^T)^+ - B X

whose equivalent gradient ``s (B gA + gB A) = P_B g + (I - P_B) g P_A`` is the orthogonal projection
of ``g`` onto the tangent space ``{B Y + Z A}`` whatever ``X`` is (``P_B = B (B^T B)^+ B^T``,
``P_A = A^T (A A^T)^+ A``). Nothing ``m x m`` or ``n x n`` is formed, and nothing ``m x n`` but the
equivalent gradient itself: the projections are applied through ``r x r`` products.
Not guarded: arguments are taken as given (a tiny ``s`` overflows ``1/s^2``; LoRAProAdamW checks the results
and skips such a step), and nothing here can tell whether it already ran.

Inverses are pseudo-inverses from eigendecompositions of the two symmetric ``r x r`` Gram matrices
(in fp64: they are tiny and their small eigenvalues decide what is inverted), with eigenvalues at or
below ``rcond * max eigenvalue`` treated as zero. With those, ``P_B``/``P_A`` are the orthogonal
projectors onto the numerical column space of ``B`` / row space of ``A``, so the projection stays
exact and optimal for rank-deficient factors. At ``B = 0`` (PEFT's init) ``(B^T B)^+ = 0`` and
``P_B = 0``: ``gA = X A`` with ``X = 0`` (the Sylvester right-hand side vanishes), and
``gB = gB_lora (A A^T)^+ / s^2``, whose equivalent gradient is ``g P_A``: all that a step of B can
express.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

X_MODES = ("sylvester", "zero")


class Gram(NamedTuple):
    """Eigendecomposition of a symmetric PSD ``r x r`` Gram matrix, cut at a relative threshold.

    ``eigenvalues`` and ``eigenvectors`` are fp64 with the cut eigenvalues set to exactly 0;
    ``pinv`` is the pseudo-inverse and ``range`` the projector onto its range (``G G^+``), both in
    the working dtype."""
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    pinv: torch.Tensor
    range: torch.Tensor


class Grams(NamedTuple):
    b: Gram  # B^T B
    a: Gram  # A A^T


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Never below fp32 (the adjustment divides by Gram eigenvalues); fp64 factors stay fp64."""
    return torch.promote_types(dtype, torch.float32)


def default_rcond(rank: int, dtype: torch.dtype) -> float:
    """Relative eigenvalue cutoff: below ``r * eps`` of the working dtype, products with the factors
    carry more rounding error than signal once divided by the eigenvalue."""
    return max(rank, 1) * torch.finfo(working_dtype(dtype)).eps


def cut_eigh(gram_matrices: torch.Tensor, rcond: float, dtype: torch.dtype) -> list[Gram]:
    """Cut eigendecompositions of a stack of symmetric PSD matrices (decomposed together, in fp64)."""
    values, vectors = torch.linalg.eigh(gram_matrices.double())
    keep = values > rcond * values[..., -1:].clamp_min(0.0)  # eigh sorts ascending
    values = values * keep
    inverse = torch.where(keep, values, torch.inf).reciprocal()  # 1/inf = 0 for the cut ones
    pinv = ((vectors * inverse.unsqueeze(-2)) @ vectors.mT).to(dtype)
    in_range = ((vectors * keep.unsqueeze(-2)) @ vectors.mT).to(dtype)
    return [Gram(*parts) for parts in zip(values, vectors, pinv, in_range)]


def factor_grams(A: torch.Tensor, B: torch.Tensor, rcond: float | None = None) -> Grams:
    """``B^T B`` and ``A A^T`` decomposed: O((m + n) r^2 + r^3), done once per step and pair.

    The Grams are formed in fp64 (cheap at ``r x r``): their small eigenvalues decide what is inverted.
    """
    dtype = working_dtype(A.dtype)
    rcond = default_rcond(A.shape[0], A.dtype) if rcond is None else rcond
    A64, B64 = A.double(), B.double()
    return Grams(*cut_eigh(torch.stack((B64.T @ B64, A64 @ A64.T)), rcond, dtype))


def _closed_form(A, B, gA_lora, gB_lora, scale, grams):
    """The X-independent part ``(a0, b0)`` of the adjusted gradients, and ``B^T gB_lora``."""
    inv_s2 = 1.0 / (scale * scale)
    a0 = (grams.b.pinv @ gA_lora).mul_(inv_s2)
    BtgB = B.T @ gB_lora
    # [I - B (B^T B)^+ B^T] gB_lora (A A^T)^+ without the m x m projector
    b0 = torch.addmm(gB_lora, B, grams.b.pinv @ BtgB, alpha=-1.0) @ (grams.a.pinv * inv_s2)
    return a0, b0, BtgB


def solve_sylvester(grams: Grams, rhs: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """Minimum-norm X of ``(B^T B) X + X (A A^T) = rhs``, exactly, in the eigenbases of both Grams.

    In those bases the operator is diagonal with entries ``lambda_B[i] + lambda_A[j]``; entries at or
    below ``rcond`` times the largest are the singular part (both factors rank-deficient in matching
    directions, or ``B = 0`` where ``A`` is deficient) and get 0, as a pseudo-inverse does.
    """
    lb, ub = grams.b.eigenvalues, grams.b.eigenvectors
    la, ua = grams.a.eigenvalues, grams.a.eigenvectors
    rcond = default_rcond(lb.numel(), rhs.dtype) if rcond is None else rcond
    denominator = lb[:, None] + la[None, :]
    keep = denominator > rcond * denominator.max().clamp_min(0.0)
    rotated = ub.T @ rhs.double() @ ua
    y = torch.where(keep, rotated / torch.where(keep, denominator, 1.0), 0.0)
    return (ub @ y @ ua.T).to(rhs.dtype)


def sylvester_rhs(A, B, gA_lora, gB_lora, scale, grams) -> torch.Tensor:
    """Right-hand side of the normal equations of ``min_X |gA(X) - gA_lora|^2 + |gB(X) - gB_lora|^2``.

    It is ``(gA_lora - a0) A^T + B^T (b0 - gB_lora)``; for gradients of one full gradient
    (``gA_lora A^T = B^T gB_lora``) and full-rank B this is the paper's ``-(1/s^2) (B^T B)^-1 gA_lora A^T``,
    and it stays the exact minimiser for any input. ``B^T b0 = (I - G G^+) B^T gB_lora (A A^T)^+ / s^2``
    is computed in ``r x r`` (zero up to rounding when B has full rank).
    """
    a0, b0, BtgB = _closed_form(A, B, gA_lora, gB_lora, scale, grams)
    return _rhs(A, gA_lora, a0, BtgB, scale, grams)


def _rhs(A, gA_lora, a0, BtgB, scale, grams):
    Bt_b0 = torch.addmm(BtgB, grams.b.range, BtgB, alpha=-1.0) @ (grams.a.pinv * (1.0 / (scale * scale)))
    return torch.addmm(Bt_b0.sub_(BtgB), gA_lora - a0, A.T)


def adjust_gradients(A: torch.Tensor, B: torch.Tensor, gA_lora: torch.Tensor, gB_lora: torch.Tensor,
                     scale: float, x_mode: str = "sylvester", grams: Grams | None = None,
                     rcond: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted ``(gA, gB)`` for the LoRA gradients ``(gA_lora, gB_lora)``.

    ``x_mode="sylvester"``: X keeps ``(gA, gB)`` closest to ``(gA_lora, gB_lora)``; ``"zero"``: X = 0.
    Both give the same equivalent gradient. Linear in the gradients for fixed ``(A, B)``.
    Cost O((m + n) r^2 + r^3). ``grams`` may be passed to reuse one decomposition.
    At ``B = 0``: ``gA = 0`` (``gA_lora = 0`` and X = 0) and ``gB = gB_lora (A A^T)^+ / s^2``.
    """
    check_x_mode(x_mode)
    grams = factor_grams(A, B, rcond) if grams is None else grams
    a0, b0, BtgB = _closed_form(A, B, gA_lora, gB_lora, scale, grams)
    if x_mode == "zero":
        return a0, b0
    X = solve_sylvester(grams, _rhs(A, gA_lora, a0, BtgB, scale, grams), rcond)
    return torch.addmm(a0, X, A), torch.addmm(b0, B, X, alpha=-1.0)


def solve_x(A, B, gA_lora, gB_lora, scale, grams: Grams | None = None, rcond: float | None = None):
    """The Sylvester-optimal X on its own (what ``adjust_gradients`` uses)."""
    grams = factor_grams(A, B, rcond) if grams is None else grams
    return solve_sylvester(grams, sylvester_rhs(A, B, gA_lora, gB_lora, scale, grams), rcond)


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``s (B gA + gB A)`` (``m x n``): how W moves under an SGD step of the factors. One matmul."""
    return torch.cat((B * scale, gB * scale), 1) @ torch.cat((gA, A), 0)


def projected_gradient(A: torch.Tensor, B: torch.Tensor, gA_lora: torch.Tensor, gB_lora: torch.Tensor,
                       scale: float, grams: Grams | None = None, rcond: float | None = None,
                       rows: slice = slice(None)) -> torch.Tensor:
    """``P_B g + (I - P_B) g P_A`` from the LoRA gradients alone (X = 0: X cancels in it); only its ``rows`` (of
    ``m``) when asked, at ``rows x n`` cost: row ``i`` needs row ``i`` of ``B`` and of the adjusted ``gB``."""
    grams = factor_grams(A, B, rcond) if grams is None else grams
    a0, b0, _ = _closed_form(A, B, gA_lora, gB_lora, scale, grams)
    return equivalent_gradient(A, B[rows], a0, b0[rows], scale)


def lora_gradients(A: torch.Tensor, B: torch.Tensor, full_grad: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What autograd gives the factors for a full gradient ``g`` (``m x n``): ``(s B^T g, s g A^T)``."""
    return (B.T @ full_grad).mul_(scale), (full_grad @ A.T).mul_(scale)


def check_x_mode(x_mode) -> str:
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
    return x_mode
