"""The one way tests run code on several processes: ``run_distributed`` (in the test) launches a script from
``tests/scripts`` with torchrun on loopback; ``start_distributed``/``finish_distributed`` (in the script) check
that the checkout under test is what runs, join the process group and leave it cleanly.

- Ports: torchrun's ``--standalone`` rendezvous binds port 0 in the launcher itself and hands the port to its
  workers, so the port is free by construction (no probe-then-bind race). A fixed port (29517 before) made two
  runs on one machine collide (EADDRINUSE).
- Every launch has a timeout; a failure or timeout reports the tail of each rank's own stdout/stderr, and every
  rank has faulthandler on, so a native abort names where each thread was.
- PYTHONPATH gets the checkout and ``tests/`` prepended (kept otherwise), and the script verifies that
  ``randopt`` and ``randopt.integrations`` were imported from this checkout, not from another installed copy.
- Leaving: the rare "rank 1 aborted (SIGABRT, terminate called without an active exception)" was a gloo
  backend that outlived ``destroy_process_group`` and met interpreter finalization. Something may keep the group
  referenced after it is destroyed: ``torch.distributed.nn.functional`` takes ``group=group.WORLD`` as a default
  argument when it is first imported, and building a transformers model after joining imports it (through
  ``torch.distributed.fsdp``); ``fully_shard`` keeps one too. The backend's worker threads then live on, and one
  still releasing a finished all-reduce (tensors with Python objects) needs the GIL during ``Py_FinalizeEx``:
  the thread is made to exit, unwinding through a noexcept destructor, and the process aborts (core dump:
  ``ProcessGroupGloo::AsyncWork::~AsyncWork`` -> ``take_gil`` -> ``pthread_exit`` on a ``pt_gloo_runloop``
  thread while the main thread finalizes; 1 in 77 runs of the data-parallel test at load 2-6). So
  ``finish_distributed`` ends the process: every rank has passed the barrier and written its files, it leaves
  the group, flushes its output and exits with ``os._exit(0)``, without interpreter finalization.
"""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
TESTS = CHECKOUT / "tests"
SCRIPTS = TESTS / "scripts"
_CHECKOUT_VARIABLE = "RANDOPT_TEST_CHECKOUT"
_TAIL_LINES = 40
_TERMINATE_GRACE_S = 20


def run_distributed(script: str, *args, nproc: int = 2, timeout: float = 300, env: dict | None = None) -> str:
    """Run ``tests/scripts/<script> *args`` on ``nproc`` local ranks; return the launcher's output.

    Raises AssertionError naming the script, the exit status or the timeout, with the tail of every rank's output."""
    with tempfile.TemporaryDirectory(prefix="randopt-ranks-") as logs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   f"--log-dir={logs}", "--redirects=3", str(SCRIPTS / script), *map(str, args)]
        python_path = [str(CHECKOUT), str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(python_path),
                       _CHECKOUT_VARIABLE: str(CHECKOUT), **(env or {})}
        launcher = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        try:
            output, _ = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            output = _stop(launcher)
            raise AssertionError(f"{script}: no result after {timeout:.0f} s, stopped\n"
                                 + _report(output, Path(logs))) from None
        if launcher.returncode != 0:
            raise AssertionError(f"{script}: torchrun exited with status {launcher.returncode}\n"
                                 + _report(output, Path(logs)))
        return output


def _stop(launcher: subprocess.Popen) -> str:
    """SIGTERM torchrun (it forwards the signal to the ranks, which run in sessions of their own), then kill
    whatever is left of its process group."""
    launcher.send_signal(signal.SIGTERM)
    try:
        output, _ = launcher.communicate(timeout=_TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
    return output


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def _report(launcher_output: str, logs: Path) -> str:
    parts = []
    for rank_dir in sorted({p.parent for p in logs.rglob("std*.log")}, key=lambda p: (str(p.parent), int(p.name))):
        for stream in ("stdout", "stderr"):
            path = rank_dir / f"{stream}.log"
            if path.exists() and path.stat().st_size:
                parts.append(f"----- rank {rank_dir.name} {stream} (last {_TAIL_LINES} lines) -----\n{_tail(path)}")
    lines = launcher_output.splitlines()[-_TAIL_LINES:]
    parts.append(f"----- torchrun (last {_TAIL_LINES} lines) -----\n" + "\n".join(lines))
    return "\n".join(parts)


# ----- inside the scripts ------------------------------------------------------------------------------------------
def check_checkout() -> None:
    """Refuse to run unless randopt (and its integrations) come from the checkout that launched this script."""
    import randopt
    import randopt.integrations

    checkout = Path(os.environ[_CHECKOUT_VARIABLE])
    for module in (randopt, randopt.integrations):
        if checkout not in Path(module.__file__).resolve().parents:
            raise RuntimeError(f"{module.__name__} was imported from {module.__file__}, not from the checkout "
                               f"under test {checkout}: install it with `pip install -e {checkout}`")


def start_distributed(backend: str = "gloo", join=None) -> tuple[int, int]:
    """Check the checkout, join the default process group (with ``join(backend)`` where given, e.g. DeepSpeed's
    own initialisation); return (rank, world size)."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)
    check_checkout()
    (join or dist.init_process_group)(backend)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Wait for every rank, leave the process group and end the process without interpreter finalization (see
    the module docstring for why): call it last, after every file is written."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def one_rank_group():
    """A 1-rank gloo process group in this process (FSDP2 and DTensors without torchrun); yields its CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
