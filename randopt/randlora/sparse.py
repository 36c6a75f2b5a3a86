"""Ternary bases in compact form: the ``sparse``/``very_sparse`` ``B`` as CSR column positions and values.

RandLoRA's sparse bases hold ``-c, 0, +c`` only. Kept compact, a product with ``B`` costs ``nnz * k``
multiply-adds instead of ``D * rN * k``, but a sparse kernel runs each multiply-add slower than a dense
``mm``: ``SPARSE_COST`` is that slowdown, measured here (``benchmarks/sparse_speed.py`` reports it). The
compact form is worth keeping when ``density * SPARSE_COST < 1`` (``very_sparse``: density ``1/sqrt(d)``;
``sparse``'s 1/3 is not, so it stays dense), and each product goes sparse or dense by the same rule.

The compact form is made from the dense bases of the same seed and reproduces them exactly, so fingerprints,
adapter files and PEFT parity do not depend on the storage.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

# multiply-adds of a dense mm per multiply-add of torch.sparse.mm (CSR x dense) in the same time, fp32, one
# thread: ~55 vs ~12 GMAC/s measured on this machine's AMD EPYC (benchmarks/results/sparse_speed.md). Only CPU
# throughput has been measured: on other devices products with compact bases run dense.
SPARSE_COST = 4.5
# dtypes torch's CPU CSR kernels multiply (MKL has no bf16/fp16 CSR product)
_SPARSE_DTYPES = (torch.float32, torch.float64)


def worth_compacting(density: float) -> bool:
    return density * SPARSE_COST < 1


def sparse_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products in ``dtype`` on ``device`` run sparse (measured to pay off there)."""
    return device.type == "cpu" and dtype in _SPARSE_DTYPES


class TernaryMatrix:
    """``value * S`` with ``S`` in ``{-1, 0, +1}``, ``rows x cols``, stored as CSR (int32 positions, values in
    the compute dtype). ``shape`` may split ``cols`` (PEFT's ``(D, N, r)`` layout of the flattened ``D x rN``)."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]):
        self.crow, self.col, self.values, self.shape = crow, col, values, tuple(shape)
        self._transposed: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "TernaryMatrix":
        with _quiet():
            csr = dense.reshape(dense.shape[0], -1).to_sparse_csr()
        return cls(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(),
                   tuple(dense.shape))

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held, the transposed copies made for ``t_matmul`` included."""
        return [self.crow, self.col, self.values] + [t for csr in self._transposed.values()
                                                     for t in (csr.crow_indices(), csr.col_indices(), csr.values())]

    def dense(self) -> torch.Tensor:
        """The matrix as a dense tensor of ``shape``."""
        out = torch.zeros((self.rows, self.cols), dtype=self.dtype, device=self.device)
        counts = (self.crow[1:] - self.crow[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.rows, device=self.device), counts)
        out[rows, self.col.long()] = self.values
        return out.view(self.shape)

    def to(self, device=None, dtype=None) -> "TernaryMatrix":
        return TernaryMatrix(self.crow.to(device), self.col.to(device), self.values.to(device=device, dtype=dtype),
                             self.shape)

    def top_left(self, rows: int, cols: int) -> "TernaryMatrix":
        """The ``rows x cols`` top-left block, flat (a layer's slice of the shared bases)."""
        end = int(self.crow[rows])
        crow, col, values = self.crow[: rows + 1], self.col[:end], self.values[:end]
        if cols < self.cols:
            keep = col < cols
            counts = torch.zeros(rows, dtype=torch.int64, device=self.device)
            row_of = torch.repeat_interleave(torch.arange(rows, device=self.device),
                                             (crow[1:] - crow[:-1]).long())
            counts.index_add_(0, row_of[keep], torch.ones_like(row_of[keep]))
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            col, values = col[keep], values[keep]
        return TernaryMatrix(crow, col, values, (rows, cols))

    def _row_block(self, start: int, stop: int) -> torch.Tensor:
        lo, hi = int(self.crow[start]), int(self.crow[stop])
        return torch.sparse_csr_tensor(self.crow[start: stop + 1] - lo, self.col[lo:hi], self.values[lo:hi],
                                       (stop - start, self.cols), check_invariants=False)

    def _row_block_transposed(self, start: int, stop: int) -> torch.Tensor:
        """``S[start:stop]^T`` as CSR, kept: a ZeRO fragment's rows are the same at every step."""
        key = (start, stop)
        csr = self._transposed.get(key)
        if csr is None:
            with _quiet():
                csr = self._row_block(start, stop).to_dense().T.to_sparse_csr()
            csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                          csr.values(), csr.shape, check_invariants=False)
            self._transposed[key] = csr
        return csr

    def row_nnz(self, rows: slice) -> int:
        start, stop, _ = rows.indices(self.rows)
        return int(self.crow[stop]) - int(self.crow[start])

    def matmul(self, other: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``M[rows] @ other``."""
        start, stop, _ = rows.indices(self.rows)
        return _sparse_mm(self._row_block(start, stop), other)

    def t_matmul(self, other: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``M[rows]^T @ other``."""
        start, stop, _ = rows.indices(self.rows)
        return _sparse_mm(self._row_block_transposed(start, stop), other)


@contextlib.contextmanager
def _quiet():
    """Silences torch's "sparse CSR support is in beta" warning: the operations used here are tested."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _sparse_mm(csr: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    # into a fresh row-major output: torch.sparse.mm's own output costs ~3x the product (zero fill + copy)
    out = torch.empty((csr.shape[0], other.shape[1]), dtype=other.dtype, device=other.device)
    with _quiet():
        return torch.addmm(out, csr, other, beta=0, out=out)  # beta=0: out's contents are ignored
