"""Where an optimizer finds, and writes, the part of each parameter this process owns.

randopt's optimizers keep their per-matrix math apart from storage. A *locator* answers, for an ORIGINAL
parameter (the tensor the user handed to the optimizer):

- ``shape(p)``: its full shape (ZeRO-3 empties ``p`` itself);
- ``span(p)``: the contiguous run of its row-major elements this process updates, as a ``Span`` of views
  into the master weight and its gradient (1-D, or shaped where the run is a whole tensor or shard), or None
  when this process owns none of it;
- ``blocks(p)``: the same span as at most three rectangles of ``p`` viewed as ``shape[0] x rest``
  (a partial first row, whole rows, a partial last row);
- ``refresh(p)``: make the low-precision copy match after the span's weight was written outside the
  ``step()`` call that carried it;
- ``process_group(p)``: the process group whose members own the other parts of ``p``;
- ``carried(groups, params_of)``: which original parameters the current ``step()`` call carries.

Four storages:

``WholeTensors``
    Plain training: ``p.data`` and ``p.grad``, whole.
``FlatPartitions``
    DeepSpeed ZeRO 1/2 and its BF16 optimizer. Each group's ``params`` is ``[flat fp32 partition]``; each
    original parameter has ``_hp_mapping`` (None when this rank owns none of it) whose
    ``lp_fragment_address.start`` is the span's offset in the parameter and ``hp_fragment_address`` its place
    in the flat partition. The partition's ``.grad`` holds the data-parallel average, unscaled and clipped.
``ZeRO3Partitions``
    DeepSpeed ZeRO-3. Each call carries one flat fp32 sub-group partition; ``safe_get_local_fp32_param(p)``
    is a view into it, and rank ``k`` owns elements ``[k * pn, (k + 1) * pn)`` of every parameter
    (``pn = p.partition_numel()``, the last rank's tail is padding).

``DTensorShards``
    torch FSDP2 (``torch.distributed.fsdp.fully_shard``). Parameters are DTensors sharded on dim 0 over a 1-D
    device mesh; rank ``k`` owns rows ``[k * c, (k + 1) * c)`` (``c = ceil(rows / world)``, the last ranks fewer
    or none), so a span is whole rows: one block. Gradients are the data-parallel average, reduce-scattered
    the same way. One ``step()`` call is one real step. State shaped like a sharded parameter is kept as a
    DTensor of the same sharding (``shard_like``), so ``torch.distributed.checkpoint`` saves and reshards it.

DeepSpeed calls ``step()`` once per group (ZeRO 1/2) or per sub-group (ZeRO-3). ``RealStep`` tells the calls
of one real step apart: a real step is complete once every trainable parameter was carried by a call. An
optimizer that needs every part at once (a coefficient all-reduce, a LoRA pair) collects per call and acts on
the last one, writing into spans of earlier calls and refreshing them.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor as _DTensor, Shard as _Shard
except ImportError:  # torch built without distributed support
    _DTensor = _Shard = None

ParamsOf = Callable[[dict], list]


@dataclass
class Span:
    """A contiguous run ``[start, start + numel)`` of a parameter's row-major elements. ``sharded`` is the DTensor
    the span is the local shard of (FSDP2): state shaped like the span is then kept in its sharding."""
    start: int
    weight: torch.Tensor
    grad: torch.Tensor | None
    sharded: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def state_like(self) -> torch.Tensor:
        """What per-element state of the span is shaped like: the span, or the DTensor it shards."""
        return self.weight if self.sharded is None else self.sharded


@dataclass
class Block:
    """A rectangle of a parameter viewed as ``shape[0] x rest``: 2-D views of the weight and its gradient."""
    row_start: int
    col_start: int
    weight: torch.Tensor
    grad: torch.Tensor | None


def as_2d(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dim() == 2 else tensor.view(tensor.shape[0], -1)


def span_rectangles(start: int, numel: int, cols: int) -> list[tuple[int, int, int, int, int]]:
    """``(offset in span, row, col, rows, cols)`` of the <= 3 rectangles covering elements ``[start, start+numel)``
    of a row-major matrix with ``cols`` columns."""
    pieces, offset = [], 0
    row, col = divmod(start, cols)
    if col and numel:
        width = min(cols - col, numel)
        pieces.append((0, row, col, 1, width))
        offset, row = width, row + 1
    whole_rows = (numel - offset) // cols
    if whole_rows:
        pieces.append((offset, row, 0, whole_rows, cols))
        offset, row = offset + whole_rows * cols, row + whole_rows
    if numel - offset:
        pieces.append((offset, row, 0, 1, numel - offset))
    return pieces


def span_blocks(span: Span, shape) -> list[Block]:
    cols = 1
    for size in shape[1:]:
        cols *= size
    blocks = []
    for offset, row, col, rows, width in span_rectangles(span.start, span.numel, cols):
        n = rows * width
        weight = span.weight.narrow(0, offset, n).view(rows, width)
        grad = None if span.grad is None else span.grad.narrow(0, offset, n).view(rows, width)
        blocks.append(Block(row, col, weight, grad))
    return blocks


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3 (which replaces ``p`` by an empty placeholder)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def is_dtensor(tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (sharing its storage), else the tensor."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def shard_like(local: torch.Tensor, like: torch.Tensor, shape=None) -> torch.Tensor:
    """``local`` as the local shard of a DTensor sharded like ``like`` (whose global shape is ``shape``, by default
    ``like``'s own): how state of a sharded parameter is kept, so that DCP checkpoints see every rank's part."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return _DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class WholeTensors:
    """Plain training: every parameter is whole in this process."""
    distributed = False

    def shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def carried(self, groups: list[dict], params_of: ParamsOf) -> list[tuple[dict, list]]:
        return [(group, list(group["params"])) for group in groups]

    def span(self, p: torch.Tensor) -> Span | None:
        """Whole tensors in their own shape (elementwise updates do not care)."""
        return Span(0, p.data, p.grad)

    def blocks(self, p: torch.Tensor) -> list[Block]:
        return [Block(0, 0, as_2d(p.data), None if p.grad is None else as_2d(p.grad))]

    def refresh(self, p: torch.Tensor) -> None:
        pass

    def process_group(self, p: torch.Tensor):
        return None


class _Partitions:
    """Shared by the DeepSpeed locators: spans come from a flat fp32 partition carried by the current call."""
    distributed = True

    def __init__(self):
        self._where: dict[int, tuple[torch.Tensor, int]] = {}  # id(p) -> (flat partition, offset of p's span)

    def shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return logical_shape(p)

    def _span_range(self, p: torch.Tensor) -> tuple[int, int] | None:
        raise NotImplementedError

    def span(self, p: torch.Tensor) -> Span | None:
        """The span of ``p`` in the partition carried by the current call (call ``carried`` first)."""
        where = self._where.get(id(p))
        extent = self._span_range(p)
        if where is None or extent is None:
            return None
        flat, offset = where
        start, numel = extent
        grad = None if flat.grad is None else flat.grad.narrow(0, offset, numel)
        return Span(start, flat.narrow(0, offset, numel), grad)

    def blocks(self, p: torch.Tensor) -> list[Block]:
        span = self.span(p)
        return [] if span is None else span_blocks(span, self.shape(p))


class FlatPartitions(_Partitions):
    """DeepSpeed ZeRO 1/2 (and its BF16 optimizer): one flat fp32 partition per group, ``_hp_mapping`` per param."""

    def carried(self, groups: list[dict], params_of: ParamsOf) -> list[tuple[dict, list]]:
        carried = []
        for group in groups:
            originals = params_of(group)
            if not group["params"] or not originals:
                continue
            if len(group["params"]) != 1 or group["params"][0].dim() != 1:
                raise RuntimeError("expected DeepSpeed to hand this optimizer one flat partition per parameter group, "
                                   f"got {len(group['params'])} tensors")
            flat = group["params"][0]
            for p in originals:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    self._where.pop(id(p), None)
                    continue
                address = mapping.get_hp_fragment_address()
                if address.start + address.numel > flat.numel():
                    raise RuntimeError("a parameter's _hp_mapping points outside the partition DeepSpeed stepped")
                self._where[id(p)] = (flat, address.start)
            carried.append((group, originals))
        return carried

    def _span_range(self, p: torch.Tensor) -> tuple[int, int] | None:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def refresh(self, p: torch.Tensor) -> None:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            mapping.update_lp()

    def process_group(self, p: torch.Tensor):
        return getattr(p, "_dp_group", None)


class ZeRO3Partitions(_Partitions):
    """DeepSpeed ZeRO-3: each call carries one flat fp32 sub-group partition holding whole per-parameter parts."""

    def __init__(self):
        super().__init__()
        self._members: dict[tuple[int, int], list[tuple[torch.Tensor, int]]] = {}

    def _members_of(self, flat: torch.Tensor, originals: list) -> list[tuple[torch.Tensor, int]]:
        key = (id(flat), flat.data_ptr())
        members = self._members.get(key)
        if members is None:
            from deepspeed.utils import safe_get_local_fp32_param

            members = []
            first, end = flat.storage_offset(), flat.storage_offset() + flat.numel()
            for p in originals:
                if not p.requires_grad:
                    continue
                local = safe_get_local_fp32_param(p)
                if local is not None and _same_storage(local, flat) and first <= local.storage_offset() < end:
                    members.append((p, local.storage_offset() - first))
            self._members[key] = members
        return members

    def carried(self, groups: list[dict], params_of: ParamsOf) -> list[tuple[dict, list]]:
        carried = []
        for group in groups:
            originals = params_of(group)
            for flat in group["params"]:
                members = self._members_of(flat, originals)
                if not members:
                    raise RuntimeError("DeepSpeed ZeRO-3 stepped a partition that holds none of this group's "
                                       "parameters (is the optimizer's state offloaded? that is not supported)")
                for p, offset in members:
                    self._where[id(p)] = (flat, offset)
                carried.append((group, [p for p, _ in members]))
        return carried

    def _span_range(self, p: torch.Tensor) -> tuple[int, int] | None:
        per_rank = p.partition_numel()
        start = dist.get_rank(group=p.ds_process_group) * per_rank
        numel = min(per_rank, p.ds_numel - start)
        return (start, numel) if numel > 0 else None

    def refresh(self, p: torch.Tensor) -> None:
        span = self.span(p)
        if span is not None:
            p.ds_tensor.data.view(-1).narrow(0, 0, span.numel).copy_(span.weight)

    def process_group(self, p: torch.Tensor):
        return p.ds_process_group


class DTensorShards:
    """torch FSDP2 (``fully_shard``): each parameter a DTensor sharded on dim 0 over a 1-D mesh (see above)."""
    distributed = True

    def shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def carried(self, groups: list[dict], params_of: ParamsOf) -> list[tuple[dict, list]]:
        return [(group, list(params_of(group))) for group in groups]

    @staticmethod
    def check(p: torch.Tensor) -> None:
        """Refuse what is not FSDP2's dim-0 sharding over one mesh dimension (HSDP, tensor parallel, ...)."""
        if not is_dtensor(p):
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} is a plain tensor while others are DTensors: "
                               "shard every parameter the optimizer holds with fully_shard")
        if p.device_mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != _Shard(0):
            raise RuntimeError(f"a DTensor parameter of shape {tuple(p.shape)} has placements {p.placements} on a "
                               f"{p.device_mesh.ndim}-D mesh; randopt supports FSDP2's sharding on dim 0 over a "
                               "1-D mesh (fully_shard without HSDP or tensor parallelism)")

    @staticmethod
    def row_start(p: torch.Tensor) -> int:
        """The first row of ``p`` this rank holds (``torch.chunk``'s split of dim 0, as FSDP2 shards)."""
        rows, world = p.shape[0], p.device_mesh.size()
        chunk = -(-rows // world)
        start = min(p.device_mesh.get_local_rank() * chunk, rows)
        held = p._local_tensor.shape[0]
        if held != min(chunk, rows - start):
            raise RuntimeError(f"a DTensor parameter of shape {tuple(p.shape)} holds {held} rows on this rank, but "
                               f"an even dim-0 split over {world} ranks gives {min(chunk, rows - start)}")
        return start

    def rows(self, p: torch.Tensor) -> slice:
        """The rows of ``p`` this rank holds (maybe none)."""
        start = self.row_start(p)
        return slice(start, start + p._local_tensor.shape[0])

    def span(self, p: torch.Tensor) -> Span | None:
        """The local shard, in the parameter's own shape (elementwise updates do not care); also an empty one, so
        that every rank keeps state for every parameter, as DCP checkpoints expect."""
        local = p._local_tensor
        grad = None if p.grad is None else local_part(p.grad)
        return Span(self.row_start(p) * math.prod(p.shape[1:]), local, grad, sharded=p)

    def blocks(self, p: torch.Tensor) -> list[Block]:
        local = p._local_tensor
        if local.numel() == 0:
            return []
        grad = None if p.grad is None else as_2d(local_part(p.grad))
        return [Block(self.row_start(p), 0, as_2d(local), grad)]

    def refresh(self, p: torch.Tensor) -> None:
        pass  # FSDP2 gathers (and casts) from the sharded parameter at every forward

    def process_group(self, p: torch.Tensor):
        return p.device_mesh.get_group()


def _check_not_fsdp1(params) -> None:
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise RuntimeError("this optimizer's parameters were flattened by FSDP1 (FullyShardedDataParallel): their "
                           "matrix shapes are gone, so RandLoRA/LoRA-Pro cannot work on them. Shard the model with "
                           "FSDP2 (torch.distributed.fsdp.fully_shard, or fsdp_version=2 in accelerate / the "
                           "Trainer's fsdp_config) instead")


def locator_for(groups: list[dict], params_of: ParamsOf, previous=None):
    """The locator matching how ``groups`` hold their parameters now: whole tensors unless DeepSpeed replaced them.

    FSDP2's DTensors are located by ``DTensorShards``; FSDP1's flattened parameters are refused.
    ``previous`` (the locator of the last call) is returned when it is of the right kind: a DeepSpeed locator
    remembers where the spans of earlier calls of the real step live, which the last call writes and refreshes."""
    replaced = False
    originals = []
    for group in groups:
        mine = params_of(group)
        originals.extend(mine)
        current = group["params"]
        if len(current) != len(mine) or any(a is not b for a, b in zip(current, mine)):
            replaced = True
    current = [p for group in groups for p in group["params"]]
    _check_not_fsdp1(current)
    if any(is_dtensor(p) for p in current):
        if replaced:
            raise RuntimeError("this optimizer's parameter groups hold DTensors other than the parameters it was "
                               "given: the optimizer was not told about the swap")
        for p in current:
            DTensorShards.check(p)
        kind = DTensorShards
    elif not replaced:
        kind = WholeTensors
    elif any(hasattr(p, "ds_id") for p in originals):
        kind = ZeRO3Partitions
    elif any(hasattr(p, "_hp_mapping") for p in originals):
        kind = FlatPartitions
    else:
        raise RuntimeError("this optimizer's parameter groups no longer hold the parameters it was given, and they are "
                           "not DeepSpeed ZeRO partitions it knows how to locate")
    return previous if type(previous) is kind else kind()


class RealStep:
    """Tells apart the ``step()`` calls of one real optimizer step (DeepSpeed steps per group or sub-group).

    ``carry`` records which call carried each parameter; the real step is complete once every expected parameter
    was carried. A parameter carried twice before that means the calls do not add up to one real step: an error,
    never a silent skip.
    """

    def __init__(self):
        self.call = -1
        self.carried_in: dict[int, int] = {}

    def start_call(self) -> int:
        self.call += 1
        return self.call

    def carry(self, p: torch.Tensor) -> None:
        if id(p) in self.carried_in:
            raise RuntimeError("a parameter was stepped twice before every parameter was stepped once: the step() "
                               "calls DeepSpeed made do not add up to one real step (are some parameters frozen but "
                               "still in the optimizer, or is the optimizer state offloaded?)")
        self.carried_in[id(p)] = self.call

    def complete(self, expected) -> bool:
        return all(id(p) in self.carried_in for p in expected)

    def earlier_call(self, p: torch.Tensor) -> bool:
        """Whether ``p`` was carried by an earlier call than the current one (its low-precision copy was made)."""
        return self.carried_in[id(p)] < self.call

    def reset(self) -> None:
        self.call = -1
        self.carried_in.clear()
