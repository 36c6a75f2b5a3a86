"""LoRA-Squeeze as pure functions over tensors: exact factored SVD, randomised SVD, truncation, rank choice.

Conventions: a LoRA update is ``dW = s * B @ A`` with ``B`` ``m x r`` and ``A`` ``r x n``; ``s`` is
PEFT's scale, ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). An SVD is ``(U, S, V)`` with
``dW = U diag(S) V^T``, singular values descending. Truncation splits ``S`` evenly between the new
factors so that ``B'`` and ``A'`` have equal norms (what a balanced LoRA looks like, and what keeps the
next training steps well conditioned), then divides both by ``sqrt(s_t)`` so ``s_t B' A'`` is the
best rank-``r_t`` approximation whatever target scale is chosen.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..randlora.bases import LayerBases
from ..randlora.functional import scaled_basis

ALPHA_POLICIES = ("keep_scale", "keep_alpha")


class SVD(NamedTuple):
    """A thin SVD ``U diag(S) V^T``; ``U`` ``m x c``, ``S`` ``c``, ``V`` ``n x c``."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


@dataclass(frozen=True)
class FactoredSVD:
    """The exact SVD of ``scale * B @ A`` and the pieces it was built from.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR); ``scale * R_B R_A^T = core_U diag(S) core_V^T``.
    So ``U = Q_B core_U`` and ``V = Q_A core_V``. The QR factors and the core rotation are kept because
    moving anything expressed in the old factors' coordinates (e.g. optimizer moments of ``B`` and
    ``A``) into the new factors' coordinates needs them, not only the final ``U`` and ``V``.
    """

    Q_B: torch.Tensor
    R_B: torch.Tensor
    Q_A: torch.Tensor
    R_A: torch.Tensor
    core_U: torch.Tensor
    S: torch.Tensor
    core_V: torch.Tensor

    @property
    def U(self) -> torch.Tensor:
        return self.Q_B @ self.core_U

    @property
    def V(self) -> torch.Tensor:
        return self.Q_A @ self.core_V

    def svd(self) -> SVD:
        return SVD(self.U, self.S, self.V)


@dataclass(frozen=True)
class Squeezed:
    """Factors at the target rank and the config values that make ``scale * B @ A`` the truncated update.

    ``alpha`` is what must be written to the adapter config; ``scale`` was computed from it with PEFT's
    formula, so a loader that recomputes the scale from ``alpha`` and ``rank`` gets the same number.
    """

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    alpha: float
    scale: float
    energy: float
    svd: SVD | FactoredSVD


# ----------------------------------------------------------------------------------------------- checks


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rank(rank, what: str = "rank") -> int:
    if not _is_int(rank) or rank <= 0:
        raise ValueError(f"{what} must be a positive integer, got {rank!r} of type {type(rank).__name__}")
    return rank


def check_target_rank(rank, source_rank: int, what: str = "rank") -> int:
    """A compression target: an integer with ``0 < rank < source_rank``."""
    check_rank(rank, what)
    if not rank < source_rank:
        raise ValueError(f"{what} must satisfy 0 < rank < {source_rank} (the source rank) to compress, got {rank}")
    return rank


def check_energy(energy) -> float:
    """An energy fraction in ``(0, 1]``."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r} of type {type(energy).__name__}")
    if not 0.0 < energy <= 1.0:  # also rejects NaN
        raise ValueError(f"energy must be in (0, 1] (the fraction of squared singular values to keep), got {energy}")
    return float(energy)


def check_target(rank, energy) -> None:
    """Exactly one of ``rank`` and ``energy`` names the target."""
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank (a target rank) or energy (a fraction in (0, 1]); "
                         f"got rank={rank!r}, energy={energy!r}")
    if energy is not None:
        check_energy(energy)
    else:
        check_rank(rank)


def _check_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors must be B (m x r) and A (r x n) with the same r; "
                         f"got B={tuple(B.shape)} and A={tuple(A.shape)}")


# ------------------------------------------------------------------------------------------- scale/alpha


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. The same float operations as PEFT,
    so a loaded adapter's scale is bit-identical to the one used to build its factors."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def target_alpha(policy, source_alpha: float, source_rank: int, rank: int, rslora: bool = False) -> float:
    """The alpha to write at the target rank.

    ``"keep_scale"``: the alpha that keeps the source scale ``s`` (``alpha_s * r_t / r_s``, or
    ``* sqrt(r_t / r_s)`` with rsLoRA), so factor magnitudes and the learning rate tuned for the source
    run stay calibrated when training continues at the target rank. ``"keep_alpha"``: the source alpha
    (the scale grows as the rank shrinks, as for an adapter trained directly at the target rank with the
    same config). A number: that alpha. The truncated update itself does not depend on this choice.
    """
    policy = check_alpha_policy(policy)
    if policy == "keep_alpha":
        return float(source_alpha)
    if policy == "keep_scale":
        alpha = lora_scale(source_alpha, source_rank, rslora) * (math.sqrt(rank) if rslora else rank)
        # Snap rounding noise (e.g. 16 / sqrt(64) * sqrt(16)) so configs show 8, not 7.999999999999999.
        return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha
    return policy


def check_alpha_policy(policy):
    """``"keep_scale"``, ``"keep_alpha"`` or a positive finite number."""
    if isinstance(policy, str):
        if policy not in ALPHA_POLICIES:
            raise ValueError(f"alpha must be a positive number or one of {ALPHA_POLICIES}, got {policy!r}")
        return policy
    return check_alpha(policy)


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a positive finite number or one of {ALPHA_POLICIES}, got {alpha!r}")
    return float(alpha)


# ---------------------------------------------------------------------------------------------- energy


def select_rank(S: torch.Tensor, energy: float) -> int:
    """Smallest ``k >= 1`` with ``sum(S[:k]^2) >= energy * sum(S^2)`` (``S`` descending)."""
    check_energy(energy)
    if S.numel() == 0:
        return 1
    cumulative = torch.cumsum(S.double().square(), 0)
    # The total is the last partial sum (not a separately rounded sum), so energy = 1 is reachable.
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    return min(max(k, 1), S.numel())


def energy_kept(S: torch.Tensor, rank: int) -> float:
    """Fraction of squared singular values in the first ``rank``; 1 for a zero update (nothing lost)."""
    squares = S.double().square()
    total = float(squares.sum())
    return 1.0 if total == 0.0 else float(squares[:rank].sum()) / total


# ---------------------------------------------------------------------------------------- factored SVD


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> FactoredSVD:
    """Exact thin SVD of ``scale * B @ A`` without forming it.

    Cost ``O((m + n) r^2 + r^3)`` instead of a dense ``m x n`` SVD. Works when ``r`` exceeds a side: the
    reduced QR then has ``min(m, r)`` columns and the SVD has ``min(m, n, r)`` values.
    """
    _check_factors(B, A)
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    core_U, S, core_Vh = torch.linalg.svd((R_B @ R_A.T) * scale, full_matrices=False)
    return FactoredSVD(Q_B, R_B, Q_A, R_A, core_U, S, core_Vh.T)


# ------------------------------------------------------------------------------------------ truncation


def split_factors(svd: SVD | FactoredSVD, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` with ``scale * B' @ A'`` the rank-``rank`` truncation of ``svd``.

    Asking for more columns than there are singular values (a LoRA rank above a layer's smaller side)
    pads with zero columns: the product is unchanged and the factors have the shape the config says.
    """
    if not scale > 0 or math.isinf(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    U, S, V = svd.U, svd.S, svd.V
    k = min(rank, S.numel())
    root = (S[:k] / scale).sqrt()
    B = U[:, :k] * root
    A = root[:, None] * V[:, :k].T
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)
    return B.contiguous(), A.contiguous()


def truncate(svd: SVD | FactoredSVD, rank: int, alpha: float, rslora: bool = False) -> Squeezed:
    """The rank-``rank`` factors for target ``alpha`` (the scale follows from it, never the reverse)."""
    check_rank(rank)
    scale = lora_scale(alpha, rank, rslora)
    B, A = split_factors(svd, rank, scale)
    return Squeezed(B, A, rank, alpha, scale, energy_kept(svd.S, rank), svd)


def squeeze_factors(B: torch.Tensor, A: torch.Tensor, alpha: float, *, rank: int | None = None,
                    energy: float | None = None, target_alpha_policy="keep_scale",
                    rslora: bool = False) -> Squeezed:
    """Compress the LoRA update ``lora_scale(alpha, r) * B @ A`` to a target ``rank`` or ``energy``.

    ``target_alpha_policy`` chooses the alpha written at the target rank (see ``target_alpha``); the
    returned factors satisfy ``Squeezed.scale * B' @ A' == truncation`` for that alpha.
    """
    _check_factors(B, A)
    check_target(rank, energy)
    check_alpha(alpha)
    source_rank = A.shape[0]
    svd = factored_svd(B, A, lora_scale(alpha, source_rank, rslora))
    if energy is not None:
        rank = select_rank(svd.S, energy)
    else:
        check_target_rank(rank, source_rank)
    alpha_t = target_alpha(target_alpha_policy, alpha, source_rank, rank, rslora)
    return truncate(svd, rank, alpha_t, rslora)


# ------------------------------------------------------------------------------------ operators, rSVD


@dataclass(frozen=True)
class LinearOperator:
    """An ``m x n`` matrix known only through ``matmul(X) = M @ X`` and ``rmatmul(Y) = M^T @ Y``."""

    shape: tuple[int, int]
    matmul: Callable[[torch.Tensor], torch.Tensor]
    rmatmul: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype
    device: torch.device


def dense_operator(W: torch.Tensor) -> LinearOperator:
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    return LinearOperator(tuple(W.shape), lambda X: W @ X, lambda Y: W.T @ Y, W.dtype, W.device)


def lora_operator(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LinearOperator:
    _check_factors(B, A)
    return LinearOperator((B.shape[0], A.shape[1]), lambda X: (B @ (A @ X)) * scale,
                          lambda Y: (A.T @ (B.T @ Y)) * scale, B.dtype, B.device)


def randlora_operator(layer: LayerBases, lam: torch.Tensor, gam: torch.Tensor, scale: float) -> LinearOperator:
    """The RandLoRA update ``dW`` (``out x in``) as an operator, applied through its bases.

    In canonical orientation ``dW = s * B @ Ahat`` (``D x d``), transposed when ``in > out``. Each product
    costs ``(D + d) * rN`` per column instead of the ``D * rN * d`` of forming ``dW``; ``Ahat`` is formed
    once (``rN x d``, an elementwise product of the coefficients with the shared ``A``).
    """
    expected = ((layer.rank, layer.num_bases), (layer.num_bases, layer.A.shape[-1]))
    if (tuple(lam.shape), tuple(gam.shape)) != expected:
        raise ValueError(f"lambda and gamma must have shapes {expected[0]} and {expected[1]} for this layer, "
                         f"got {tuple(lam.shape)} and {tuple(gam.shape)}")
    basis = scaled_basis(layer.A, lam, gam)
    Bf = layer.B

    def canonical(X):  # (s B Ahat) X
        return (Bf @ (basis @ X)) * scale

    def canonical_t(Y):  # (s B Ahat)^T Y
        return (basis.T @ (Bf.T @ Y)) * scale

    forward, backward = (canonical_t, canonical) if layer.transposed else (canonical, canonical_t)
    return LinearOperator((layer.out_features, layer.in_features), forward, backward, basis.dtype, basis.device)


def _orthonormal(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def randomized_svd(op: LinearOperator, rank: int, *, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0) -> SVD:
    """Top-``rank`` SVD of an operator from ``2 * (power_iters + 1)`` products with blocks of ``rank +
    oversample`` columns (Halko, Martinsson and Tropp 2011, Algorithms 4.4 and 5.1).

    Every half power step is re-orthonormalised, otherwise the small singular directions drown in
    rounding. The test matrix is drawn on a seeded CPU generator, so a seed gives the same result on
    every device.
    """
    m, n = op.shape
    if not _is_int(rank) or not 0 < rank <= min(m, n):  # the sketch cannot find more directions than that
        raise ValueError(f"rank must be an integer in [1, {min(m, n)}] for a {m} x {n} operator, got {rank!r}")
    if not _is_int(oversample) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative integer, got {oversample!r}")
    if not _is_int(power_iters) or power_iters < 0:
        raise ValueError(f"power_iters must be a non-negative integer, got {power_iters!r}")
    width = min(rank + oversample, m, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((n, width), generator=generator, dtype=torch.float64).to(op.device, op.dtype)
    Q = _orthonormal(op.matmul(omega))
    for _ in range(power_iters):
        Q = _orthonormal(op.matmul(_orthonormal(op.rmatmul(Q))))
    # Q^T M = (M^T Q)^T: its SVD rotates the sketch's basis into the singular vectors.
    small_U, S, small_Vh = torch.linalg.svd(op.rmatmul(Q).T, full_matrices=False)
    return SVD((Q @ small_U)[:, :rank], S[:rank], small_Vh[:rank].T)


def squeeze_operator(op: LinearOperator, rank: int, alpha: float | None = None, rslora: bool = False, *,
                     oversample: int = 10, power_iters: int = 2, seed: int = 0,
                     total_energy: float | None = None) -> Squeezed:
    """Rank-``rank`` LoRA factors approximating an operator (e.g. a full-rank RandLoRA update).

    ``alpha`` defaults to ``rank`` (scale 1 without rsLoRA). The kept energy needs ``||dW||_F^2``, which an
    operator does not give cheaply: pass it as ``total_energy`` if known, else ``Squeezed.energy`` is NaN.
    """
    svd = randomized_svd(op, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    alpha = float(rank) if alpha is None else check_alpha(alpha)
    squeezed = truncate(svd, rank, alpha, rslora)
    kept = float(svd.S.double().square().sum())
    energy = math.nan if total_energy is None else (1.0 if total_energy == 0 else kept / total_energy)
    return dataclasses.replace(squeezed, energy=energy)


# ------------------------------------------------------------------------- in-training: coordinate maps


@dataclass(frozen=True)
class FactorMaps:
    """Linear maps from a LoRA pair's coordinates at rank ``r`` to the squeezed pair's at rank ``r_t``.

    With ``B = Q_B R_B``, ``A^T = Q_A R_A``, ``s R_B R_A^T = U_c S V_c^T`` (``FactoredSVD``), kept singular
    values ``S_t`` and target scale ``s_t``, the squeezed factors are ``B' = Q_B U_ct S_t^(1/2) / sqrt(s_t)`` and
    ``A' = S_t^(1/2) V_ct^T Q_A^T / sqrt(s_t)``. Eliminating ``Q_A`` with ``Q_A^T = V_c S^-1 U_c^T s R_B A``
    (from the core SVD) and ``Q_B`` likewise gives maps that need no inverse of ``R_A`` or ``R_B``:

    - parameters (``A' = A_map @ A``, ``B' = B @ B_map``), and anything that moves like them (updates, LoRA-Pro's
      adjusted gradients, which are directions in the factors' space)::

          A_map = s / sqrt(s_t) * S_t^(-1/2) U_ct^T R_B        (r_t x r)
          B_map = s / sqrt(s_t) * R_A^T V_ct S_t^(-1/2)        (r x r_t)

    - gradients of the loss, which are covectors: for the same ``G = dL/dW``, ``dL/dA' = s_t B'^T G =
      (s_t / s) B_map^T (s B^T G)`` and ``dL/dB' = s_t G A'^T = (dL/dB) (s_t / s) A_map^T``::

          grad_A_map = (s_t / s) B_map^T = sqrt(s_t) S_t^(-1/2) V_ct^T R_A      (dL/dA' = grad_A_map @ dL/dA)
          grad_B_map = (s_t / s) A_map^T = sqrt(s_t) R_B^T U_ct S_t^(-1/2)      (dL/dB' = dL/dB @ grad_B_map)

    Without truncation (``r_t = r``, invertible factors) ``grad_A_map = A_map^-T``: the contragredient map, as
    it must be. ``live[i]`` is False for a kept direction with ``S_i`` at rounding level (the update has lower
    rank than ``r_t``): the maps have zero rows/columns there, because the truncated update does not use it.
    """

    A_map: torch.Tensor
    B_map: torch.Tensor
    grad_A_map: torch.Tensor
    grad_B_map: torch.Tensor
    live: torch.Tensor


@dataclass(frozen=True)
class TrainingSqueeze(Squeezed):
    """``Squeezed`` plus the coordinate maps that carry optimizer state into the new factors.

    Dead directions (``maps.live`` False, within the first ``min(r_t, rank of the core)``) are revived for training:
    ``B'`` keeps a zero column there (the update is the truncation either way) and ``A'`` gets the unit right
    singular direction ``Q_A V_c[:, i]`` scaled to the RMS row norm of the old ``A``, so the pair can still learn
    that direction, as a PEFT pair does from its init. A plain truncation would leave both zero, a saddle that
    gradient descent never leaves.
    """

    maps: FactorMaps


def factor_maps(svd: FactoredSVD, rank: int, scale: float, target_scale: float,
                rcond: float | None = None) -> FactorMaps:
    """The maps of ``FactorMaps`` for truncating ``svd`` (of ``scale * B @ A``) to ``rank`` at ``target_scale``.

    A kept singular value at or below ``rcond * S[0]`` counts as zero (default ``rcond``: ``max(m, n, r) * eps``
    of the dtype); the maps are zero there instead of dividing by it. Columns beyond the rank of the core
    (``rank > min(m, n, r)``) are zero as well.
    """
    check_rank(rank)
    if not scale > 0 or not target_scale > 0 or math.isinf(scale) or math.isinf(target_scale):
        raise ValueError(f"scales must be positive finite numbers, got scale={scale!r}, target_scale={target_scale!r}")
    S = svd.S
    k = min(rank, S.numel())
    if rcond is None:
        rcond = max(svd.Q_B.shape[0], svd.Q_A.shape[0], svd.R_B.shape[1]) * torch.finfo(S.dtype).eps
    threshold = rcond * (float(S[0]) if S.numel() else 0.0)
    S_t = S[:k]
    live = S_t > threshold
    inv_root = torch.where(live, S_t.clamp_min(torch.finfo(S.dtype).tiny).rsqrt(), torch.zeros_like(S_t))
    U_ct, V_ct = svd.core_U[:, :k], svd.core_V[:, :k]
    root_t = math.sqrt(target_scale)
    A_map = (scale / root_t) * inv_root[:, None] * (U_ct.T @ svd.R_B)
    B_map = (scale / root_t) * (svd.R_A.T @ V_ct) * inv_root[None, :]
    grad_A_map = root_t * inv_root[:, None] * (V_ct.T @ svd.R_A)
    grad_B_map = root_t * (svd.R_B.T @ U_ct) * inv_root[None, :]
    if k < rank:  # zero-padded columns of split_factors: nothing maps there
        pad = rank - k
        A_map, grad_A_map = (torch.cat([M, M.new_zeros(pad, M.shape[1])], 0) for M in (A_map, grad_A_map))
        B_map, grad_B_map = (torch.cat([M, M.new_zeros(M.shape[0], pad)], 1) for M in (B_map, grad_B_map))
        live = torch.cat([live, live.new_zeros(pad)])
    return FactorMaps(A_map, B_map, grad_A_map, grad_B_map, live)


def squeeze_for_training(B: torch.Tensor, A: torch.Tensor, alpha: float, *, rank: int | None = None,
                         energy: float | None = None, target_alpha_policy="keep_scale", rslora: bool = False,
                         rcond: float | None = None) -> TrainingSqueeze:
    """``squeeze_factors`` for a pair that goes on training: the truncated factors (dead directions revived, see
    ``TrainingSqueeze``) and the ``FactorMaps`` that move optimizer moments into the new coordinates.

    With ``energy`` the rank may come out equal to the source rank (nothing to cut): the caller decides whether
    to keep the pair as it is.
    """
    _check_factors(B, A)
    check_target(rank, energy)
    check_alpha(alpha)
    source_rank = A.shape[0]
    source_scale = lora_scale(alpha, source_rank, rslora)
    svd = factored_svd(B, A, source_scale)
    if energy is not None:
        rank = select_rank(svd.S, energy)
    else:
        check_target_rank(rank, source_rank)
    alpha_t = target_alpha(target_alpha_policy, alpha, source_rank, rank, rslora)
    squeezed = truncate(svd, rank, alpha_t, rslora)
    maps = factor_maps(svd, rank, source_scale, squeezed.scale, rcond)
    A_new = squeezed.A
    k = min(rank, svd.S.numel())
    dead = (~maps.live[:k]).nonzero().flatten()
    if dead.numel():
        rms_row = A.norm() / math.sqrt(source_rank)
        A_new = A_new.clone()
        A_new[dead] = rms_row * svd.V[:, dead].T
    return TrainingSqueeze(squeezed.B, A_new, squeezed.rank, squeezed.alpha, squeezed.scale, squeezed.energy,
                           svd, maps)


MOMENT_SIDES = ("left", "right")


def project_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, matrix: torch.Tensor, side: str, *,
                    step: int, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments of a quantity ``g`` carried to ``g' = matrix @ g`` (``side="left"``) or ``g @ matrix``
    (``"right"``).

    First moment: ``m' = matrix m``, exact (an EMA is linear). Second moment: ``E[g'^2]`` needs the cross terms
    ``E[g_j g_k]``, which Adam does not keep. Model each coordinate as mean plus independent noise, with the
    bias-corrected moments as estimates: ``mu = m / (1 - b1^t)``, ``var = max(v / (1 - b2^t) - mu^2, 0)``; then
    ``E[g'^2] = (matrix mu)^2 + (matrix^2) var`` (entrywise square), stored back with the ``(1 - b2^t)`` factor.
    This is exact when the noise is uncorrelated, reduces to the squared-entries map when the mean is zero, and
    keeps ``m'^2 <= v'`` (bias-corrected), so the first steps after a squeeze respect Adam's usual step bound
    ``|update| <~ lr``. The plain squared-entries map ``(matrix^2) v`` can break that bound by up to
    ``sqrt(r)`` when the mean dominates (a consistent gradient direction summed over r coordinates).
    """
    if side not in MOMENT_SIDES:
        raise ValueError(f"side must be one of {MOMENT_SIDES}, got {side!r}")

    def apply(X, M):
        return M @ X if side == "left" else X @ M

    dtype = torch.promote_types(matrix.dtype, torch.float64 if exp_avg.dtype == torch.float64 else torch.float32)
    M, m, v = matrix.to(dtype), exp_avg.to(dtype), exp_avg_sq.to(dtype)
    m_new = apply(m, M)
    beta1, beta2 = betas
    if step <= 0:  # no gradient seen: the moments are zero
        return m_new, apply(v, M.square())
    c1, c2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    mean = m / c1
    var = (v / c2 - mean.square()).clamp_min(0.0)
    v_new = (apply(mean, M).square() + apply(var, M.square())) * c2
    return m_new, v_new
