"""Shared benchmark helpers: interleaved timing, saved-for-backward bytes, machine description, markdown."""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20

SAVED_BYTES_RULE = (
    "saved-for-backward bytes: every tensor autograd packs during one forward (caught with "
    "`torch.autograd.graph.saved_tensors_hooks`), deduplicated by storage, counting whole storages, and "
    "excluding storages of the model's parameters and buffers (they exist anyway); the input counts"
)


def add_thread_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable numbers on a shared machine)")


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def step_benchmark_args(description: str, argv, quick_repeats: int, repeats: int,
                        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Arguments of the step-time benchmarks (``--quick``, ``--repeats``, ``--threads``, and a benchmark's own from
    ``add_arguments``), applied: threads set, library warnings silenced; ``args.repeats`` is filled in."""
    import logging
    import warnings

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    add_thread_args(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.repeats = args.repeats or (quick_repeats if args.quick else repeats)
    return args


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` this process holds (a DTensor's local shard)."""
    from randopt.optim.locators import local_part

    return sum(local_part(t).numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def training_steps(runs: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], input_ids: torch.Tensor):
    """``(steps, optimizer_cpu)``: per run a language-model training step (zero_grad, forward, backward,
    optimizer.step) for ``time_round_robin``, and the list each step appends its ``optimizer.step`` CPU seconds to."""
    steps, optimizer_cpu = {}, {}
    for name, (model, optimizer) in runs.items():
        optimizer_cpu[name] = []

        def step(model=model, optimizer=optimizer, record=optimizer_cpu[name]):
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            start = time.process_time()
            optimizer.step()
            record.append(time.process_time() - start)

        steps[name] = step
    return steps, optimizer_cpu


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return str(t.device), s.data_ptr()


def resident_storages(*objects) -> set[tuple[str, int]]:
    """Storage keys of the parameters and buffers of modules, and of plain tensors, among ``objects``."""
    keys = set()
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        elif isinstance(obj, torch.Tensor):
            tensors = [obj]
        else:
            tensors = list(obj)
        keys.update(storage_key(t) for t in tensors if t.device.type != "meta")
    return keys


@dataclass
class SavedTensors:
    """Storages autograd packed for backward: ``by_storage`` maps a storage key to its byte size."""

    by_storage: dict
    shapes: list

    @property
    def bytes(self) -> int:
        return sum(self.by_storage.values())


def saved_for_backward(forward: Callable[[], object], exclude: Iterable = ()) -> tuple[object, SavedTensors]:
    """Run ``forward`` and record what autograd saves for backward.

    Storages are deduplicated (views and repeated saves of one tensor count once, at the storage's full
    size) and those in ``exclude`` (see ``resident_storages``) are left out. Returns forward's result,
    whose graph holds the saved tensors until it is freed.
    """
    excluded = resident_storages(*exclude) if exclude else set()
    by_storage, shapes = {}, []

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            key = storage_key(t)
            shapes.append(tuple(t.shape))
            if key not in excluded:
                by_storage[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return result, SavedTensors(by_storage, shapes)


class Timings(dict):
    """Seconds per call of each step: the mapping (also ``.wall``) holds wall-clock times, ``.cpu`` the
    CPU time of this process (all its threads).

    On a shared machine CPU time leaves out the time other processes hold the cores; with one
    intra-op thread it is the cleaner measure of work, wall time the one users wait for.
    """

    def __init__(self, wall: dict, cpu: dict):
        super().__init__(wall)
        self.cpu = cpu

    @property
    def wall(self) -> dict:
        return self


def time_round_robin(steps: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     inner: int = 1) -> Timings:
    """Time each step, interleaving methods so that all see the same machine load.

    Each round calls every step ``inner`` times in turn (the order rotates between rounds); the first
    ``warmup`` rounds are dropped.
    """
    names = list(steps)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                steps[name]()
            wall, cpu = (time.perf_counter() - wall) / inner, (time.process_time() - cpu) / inner
            if round_index >= warmup:
                timings.wall[name].append(wall)
                timings.cpu[name].append(cpu)
    return timings


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ratio_spread(times: Mapping[str, list[float]], name: str, reference: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of the per-round ratio ``name / reference`` (same-round pairs)."""
    ratios = [a / b for a, b in zip(times[name], times[reference])]
    return statistics.median(ratios), min(ratios), max(ratios)


COLLECTIVES = {  # name: which argument holds the whole tensor (index, or keyword)
    "all_reduce": (0, "tensor"), "reduce": (0, "tensor"), "broadcast": (0, "tensor"),
    "reduce_scatter_tensor": (1, "input"), "all_gather_into_tensor": (0, "output_tensor"),
    "reduce_scatter": (1, "input_list"), "all_gather": (0, "tensor_list"), "all_to_all_single": (1, "input"),
    "reduce_scatter_single": (1, "input"), "all_gather_single": (0, "output_tensor"),  # FSDP2's
}


def count_collectives() -> dict:
    """Wrap torch.distributed's collectives to add up the bytes they move, by name."""
    import torch.distributed as dist

    counts = {}

    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(nbytes(v) for v in value) if isinstance(value, (list, tuple)) else 0

    for name, (position, keyword) in COLLECTIVES.items():
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, _position=position, _keyword=keyword, **kwargs):
            value = args[_position] if len(args) > _position else kwargs.get(_keyword)
            entry = counts.setdefault(_name, [0, 0])
            entry[0] += 1
            entry[1] += nbytes(value)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


class CollectiveWindow:
    """Collectives counted over a benchmark's measured steps only (``count_collectives`` installed at creation,
    before the framework starts): ``start(optimizer)`` at the first measured step, ``per_step(optimizer, steps)``
    after the last. An optimizer without a ``communicated`` counter (torch's) adds nothing of its own."""

    def __init__(self):
        self.counts = count_collectives()
        self._before = {"all_reduces": 0, "bytes": 0}

    def start(self, optimizer) -> None:
        self.counts.clear()
        self._before = dict(getattr(optimizer, "communicated", {"all_reduces": 0, "bytes": 0}))

    def per_step(self, optimizer, steps: int) -> dict:
        """``collectives`` (name: [calls, bytes]) and the optimizer's own ``optimizer_bytes``/``optimizer_calls``,
        each per measured step."""
        after = getattr(optimizer, "communicated", None)
        own = {key: 0 if after is None else (after[key] - self._before[key]) / steps for key in ("bytes", "all_reduces")}
        return {"collectives": {k: [v[0] / steps, v[1] / steps] for k, v in self.counts.items()},
                "optimizer_bytes": own["bytes"], "optimizer_calls": own["all_reduces"]}


def launch_two_ranks(module: str, child_args: list[str], env: Mapping[str, str], timeout: float | None = None):
    """Run ``python -m <module> --child <report.json> <child_args>`` under torchrun on two local processes (a free
    port, the repository root as working directory, ``OMP_NUM_THREADS=1`` plus ``env``); the report it wrote."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        result = subprocess.run([torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                                 "-m", module, "--child", str(out), *child_args],
                                cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(result.stdout[-3000:] + result.stderr[-5000:])
        return json.loads(out.read_text())


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.2f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average at start {load:.2f}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread{'s' if threads != 1 else ''}); "
            f"python {platform.python_version()}")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str, show: bool = True) -> Path:
    """Write ``benchmarks/results/<name>`` atomically (a crash leaves the old file whole) and, with ``show``,
    print the text and where it went."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    if show:
        print(text)
        print(f"wrote {path}")
    return path


def matmul_flops(step: Callable[[], object]) -> int:
    """Floating-point operations of the matrix products (mm, addmm, bmm, ...) that one call of ``step`` runs,
    backward included, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    def accumulate_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        batch = a_shape[0] if len(a_shape) == 3 else 1
        return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]

    aten = torch.ops.aten
    # the counter knows only out-of-place products; in-place accumulation does the same work
    in_place = {aten.addmm_: accumulate_flops, aten.baddbmm_: accumulate_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        step()
    return counter.get_total_flops()
