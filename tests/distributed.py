"""The one way tests run code on several processes: ``run_distributed`` (in the test) launches a script from
``tests/scripts`` with torchrun on loopback; ``start_distributed``/``finish_distributed`` (in the script) check
that the checkout under test is what runs, join the process group and leave it cleanly.

- Ports: torchrun's ``--standalone`` rendezvous binds port 0 in the launcher itself and hands the port to its
  workers, so the port is free by construction (no probe-then-bind race). The fixed port 29517 used before was the
  cause of the rare "rank 1 aborted (SIGABRT, terminate called without an active exception)": reproduced by
  starting a second run on the same port while the first was finishing (10 pairs, second run started 3..30 s
  later: 8 second runs failed with EADDRINUSE, once the first run's rank 1 aborted so, 1 pair did not overlap),
  never with distinct ports (20 of 20 under the same load). Several people running the suite on one machine
  collide like this. With this launcher: 20 runs of the data-parallel test, two at a time, load average 35-40 on
  2 cores: 20 passed.
- Every launch has a timeout; a failure or timeout reports the tail of each rank's own stdout/stderr.
- PYTHONPATH gets the checkout and ``tests/`` prepended (kept otherwise), and the script verifies that
  ``randopt`` and ``randopt.integrations`` were imported from this checkout, not from another installed copy.
- Leaving: ``finish_distributed`` waits for every rank and destroys the process group while the interpreter is
  fully alive: a rank that exits with gloo still set up can also die with SIGABRT in interpreter teardown.
"""
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


def start_distributed(backend: str = "gloo") -> tuple[int, int]:
    """Check the checkout, join the default process group; return (rank, world size)."""
    import torch.distributed as dist

    check_checkout()
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Wait for every rank, then destroy the process group (see the module docstring for why)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
