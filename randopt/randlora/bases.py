"""Seeded random bases shared by every RandLoRA layer, in PEFT's layout.

One set is sized for the largest targeted shape and sliced per layer:
``A`` is ``(r, 1, d_max)`` (one A for all bases, on the smaller side) and ``B`` is
``(D_max, N_max, r)``. Bases are generated in fp32 on a CPU generator, so a seed gives
the same bases on every machine and device; a fingerprint identifies them in checkpoints.

``B`` is stored dense, or, for ternary bases sparse enough that sparse products are faster
(``very_sparse``), in the compact form of ``randopt.randlora.sparse``; ``.B`` gives the dense values
either way, and products with ``B`` go through ``LayerBases.b_matmul`` and its siblings.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from .. import validation
from .sparse import SPARSE_COST, TernaryMatrix, sparse_supported, worth_compacting

BASIS_KINDS = ("dense", "sparse", "very_sparse")


def num_bases(out_features: int, in_features: int, rank: int) -> int:
    """Number of rank-``r`` bases a layer needs for a full-rank update: ceil(min(out, in) / r)."""
    return -(-min(out_features, in_features) // rank)


def check_rank(rank) -> int:
    return validation.rank(rank)


@dataclass(frozen=True)
class LayerBases:
    """The slice of the shared bases one ``out x in`` layer uses.

    ``A``: ``(r, 1, d)``; ``B``: ``(D, r*N)`` with column ``n*r + k`` holding base ``n``'s column ``k``,
    held as ``stored_B`` (a dense tensor or a ``TernaryMatrix``).
    ``transposed`` is True when ``in > out``: the update is then ``(B @ Ahat)^T``.
    """

    A: torch.Tensor
    stored_B: torch.Tensor | TernaryMatrix
    out_features: int
    in_features: int
    _dense: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def B(self) -> torch.Tensor:
        """``B`` as a dense ``D x rN`` tensor (made anew on each access when stored compact)."""
        return self.stored_B.dense() if isinstance(self.stored_B, TernaryMatrix) else self.stored_B

    @property
    def transposed(self) -> bool:
        return self.in_features > self.out_features

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def num_bases(self) -> int:
        return self.stored_B.shape[1] // self.rank

    def _compact_for(self, dtype: torch.dtype) -> TernaryMatrix | None:
        """The compact ``B`` when products in ``dtype`` can use it."""
        compact = self.stored_B
        if isinstance(compact, TernaryMatrix) and compact.dtype == dtype and sparse_supported(dtype, compact.device):
            return compact
        return None

    def _dense_B(self, dtype: torch.dtype) -> torch.Tensor:
        """Dense ``B`` for products the sparse kernels cannot do (e.g. bf16), kept per dtype once made."""
        if not isinstance(self.stored_B, TernaryMatrix):
            return self.stored_B
        dense = self._dense.get(dtype)
        if dense is None:
            dense = self._dense[dtype] = self.stored_B.dense().to(dtype)
        return dense

    def b_cost(self, dtype: torch.dtype) -> float:
        """Cost of a product with ``B`` in multiply-adds of a dense ``mm``, per multiply-add of the dense product."""
        compact = self._compact_for(dtype)
        return 1.0 if compact is None else compact.nnz * SPARSE_COST / (compact.rows * compact.cols)

    def b_matmul(self, other: torch.Tensor, rows: slice = slice(None), add_to: torch.Tensor | None = None,
                 column_major: bool = False):
        """``B[rows] @ other`` (plus ``add_to``), in column-major memory when ``column_major``."""
        compact = self._compact_for(other.dtype)
        if compact is None:
            B = self._dense_B(other.dtype)[rows]
            if not column_major:
                return B @ other if add_to is None else torch.addmm(add_to, B, other)
            product = (other.T @ B.T).T  # the same product, which BLAS writes row-major as its transpose: no copy
        else:
            product = compact.matmul(other, rows)
            if column_major:  # torch's CSR product writes row-major only: one transposing copy
                product = product.T.contiguous().T
        return product if add_to is None else product.add_(add_to)

    def bt_matmul(self, other: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``B[rows]^T @ other``."""
        compact = self._compact_for(other.dtype)
        if compact is None:
            return self._dense_B(other.dtype)[rows].T @ other
        return compact.t_matmul(other, rows)

    def matmul_b(self, other: torch.Tensor) -> torch.Tensor:
        """``other @ B``."""
        if self._compact_for(other.dtype) is None:
            return other @ self._dense_B(other.dtype)
        return self.bt_matmul(other.T).T

    def matmul_bt(self, other: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        """``other @ B^T``, added in place to ``accumulate`` when given (and returned)."""
        if self._compact_for(other.dtype) is None:
            B = self._dense_B(other.dtype)
            return other @ B.T if accumulate is None else accumulate.addmm_(other, B.T)
        product = self.b_matmul(other.T).T
        return product if accumulate is None else accumulate.add_(product)


@dataclass(frozen=True)
class RandLoRABases:
    A: torch.Tensor
    stored_B: torch.Tensor | TernaryMatrix
    kind: str = "dense"
    seed: int = 0
    fingerprint: str = ""
    _layers: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def B(self) -> torch.Tensor:
        """``(D_max, N_max, r)``, dense (made anew on each access when stored compact)."""
        return self.stored_B.dense() if isinstance(self.stored_B, TernaryMatrix) else self.stored_B

    @property
    def nbytes(self) -> int:
        """Bytes of the storages these bases and their layer slices hold (compact forms, their transposed copies
        and any dense copies made for products included; shared storages counted once)."""
        tensors = [self.A] + _held(self.stored_B)
        for layer in self._layers.values():
            tensors += [layer.A] + _held(layer.stored_B) + list(layer._dense.values())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def max_shape(self) -> tuple[int, int]:
        """(min side, max side) these bases cover."""
        return self.A.shape[-1], self.stored_B.shape[0]

    def covers(self, out_features: int, in_features: int) -> bool:
        d, D = sorted((out_features, in_features))
        return (d <= self.A.shape[-1] and D <= self.stored_B.shape[0]
                and num_bases(d, d, self.rank) <= self.stored_B.shape[1])

    def layer(self, out_features: int, in_features: int) -> LayerBases:
        """Slice for one layer; cached per shape so the flattened B is made once."""
        key = (out_features, in_features)
        cached = self._layers.get(key)
        if cached is not None:
            return cached
        if not self.covers(out_features, in_features):
            raise ValueError(
                f"bases of rank {self.rank} cover shapes up to min side {self.A.shape[-1]} and max side "
                f"{self.stored_B.shape[0]}, but a layer of shape (out={out_features}, in={in_features}) was asked for"
            )
        d, D = sorted((out_features, in_features))
        n = num_bases(out_features, in_features, self.rank)
        A = self.A[:, :, :d]
        if isinstance(self.stored_B, TernaryMatrix):
            B = self.stored_B.top_left(D, n * self.rank)
        else:
            B = self.stored_B[:D, :n, :].reshape(D, n * self.rank)
        layer = LayerBases(A, B, out_features, in_features)
        self._layers[key] = layer
        return layer

    def to(self, device=None, dtype=None) -> "RandLoRABases":
        return RandLoRABases(
            self.A.to(device=device, dtype=dtype), self.stored_B.to(device=device, dtype=dtype), self.kind, self.seed,
            self.fingerprint,
        )

    def fingerprint_tensor(self) -> torch.Tensor:
        """The fingerprint as an int64 tensor, for tensor-only state dicts."""
        return fingerprint_to_tensor(self.fingerprint)

    def check_fingerprint(self, expected, what: str = "checkpoint") -> None:
        if isinstance(expected, torch.Tensor):
            expected = tensor_to_fingerprint(expected)
        if expected != self.fingerprint:
            raise ValueError(
                f"RandLoRA bases fingerprint mismatch: the {what} was made with bases {expected!r}, "
                f"but these bases are {self.fingerprint!r} (seed={self.seed}, kind={self.kind!r}, "
                f"rank={self.rank}, max_shape={self.max_shape}); use the same seed, kind, rank and target modules"
            )


def _held(stored_B) -> list[torch.Tensor]:
    return stored_B.tensors() if isinstance(stored_B, TernaryMatrix) else [stored_B]


def compute_fingerprint(A: torch.Tensor, B: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in (A, B):
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:32]


def fingerprint_to_tensor(fingerprint: str) -> torch.Tensor:
    return torch.tensor([int(fingerprint[i : i + 8], 16) for i in range(0, 32, 8)], dtype=torch.int64)


def tensor_to_fingerprint(t: torch.Tensor) -> str:
    return "".join(f"{int(v):08x}" for v in t.tolist())


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Entries -1/0/+1 with P(-1) = P(+1) = 1/(2*sparsity), as in Achlioptas' sparse projections."""
    out = torch.zeros_like(uniform)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out


def make_bases(max_shape, rank: int, seed: int = 0, kind: str = "dense") -> RandLoRABases:
    """Generate the shared bases for layers up to ``max_shape = (out, in)`` (elementwise max over layers).

    Generation order follows PEFT (A first, then B); values are fp32 from a CPU generator so they do
    not depend on the machine, then normalised by their standard deviation.
    """
    check_rank(rank)
    validation.choice("kind", kind, BASIS_KINDS)
    validation.seed("seed", seed)
    out_features, in_features = (int(s) for s in max_shape)
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"max_shape must be two positive sizes (out, in), got {tuple(max_shape)}")
    d, D = sorted((out_features, in_features))
    n = num_bases(d, d, rank)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "dense":
        bound_A, bound_B = 1 / math.sqrt(d), 1 / math.sqrt(rank)
        A = (torch.rand((rank, 1, d), generator=generator, dtype=torch.float32) * 2 - 1) * bound_A
        B = torch.cat(
            [(torch.rand((D, 1, rank), generator=generator, dtype=torch.float32) * 2 - 1) * bound_B for _ in range(n)],
            dim=1,
        )
    else:
        sparsity = 3.0 if kind == "sparse" else math.sqrt(d)
        A = _ternary(torch.rand((rank, 1, d), generator=generator, dtype=torch.float32), sparsity)
        B = _ternary(torch.rand((D, n, rank), generator=generator, dtype=torch.float32), sparsity)
    A, B = _unit_std(A), _unit_std(B)
    return RandLoRABases(A, _storage(B, kind), kind, seed, compute_fingerprint(A, B))


def _storage(B: torch.Tensor, kind: str) -> torch.Tensor | TernaryMatrix:
    """``B`` compact when it is ternary and sparse enough for sparse products to pay off, else as it is."""
    if kind == "dense" or B.numel() == 0:
        return B
    nonzero = B[B != 0]
    if nonzero.numel() and not bool((nonzero.abs() == nonzero[0].abs()).all()):
        return B  # not ternary (e.g. an edited adapter): multiply it densely
    return TernaryMatrix.from_dense(B) if worth_compacting(nonzero.numel() / B.numel()) else B


def _unit_std(t: torch.Tensor) -> torch.Tensor:
    """Divide by the standard deviation; a single entry (rank 1, d = 1) or an all-zero sparse draw has
    none, so it falls back to the largest magnitude (or leaves zeros as they are)."""
    spread = t.std() if t.numel() > 1 else t.abs().max()
    if not spread > 0:
        spread = t.abs().max()
    return t / spread if spread > 0 else t


def bases_from_tensors(A: torch.Tensor, B: torch.Tensor, kind: str = "dense", seed: int = -1) -> RandLoRABases:
    """Wrap existing bases (e.g. loaded from a PEFT adapter) in PEFT's layout ``(r,1,d)`` / ``(D,N,r)``."""
    if A.dim() != 3 or A.shape[1] != 1 or B.dim() != 3 or B.shape[2] != A.shape[0]:
        raise ValueError(
            f"bases must have shapes A=(r, 1, d) and B=(D, N, r); got A={tuple(A.shape)} B={tuple(B.shape)}"
        )
    return RandLoRABases(A, _storage(B, kind), kind, seed, compute_fingerprint(A, B))
