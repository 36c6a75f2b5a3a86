"""Adapter directories are written atomically (randopt._atomic), tested with real SIGKILLs: a process killed at
any point of ``randopt squeeze --overwrite`` or ``export_randlora_adapter`` leaves OUT as it was or as the write
would have made it, complete, with the other files in it intact; the next write leaves no hidden leftovers."""
import os
import signal
import subprocess
import sys

import peft
import pytest
from safetensors import safe_open

from conftest import LLAMA_TARGETS, tiny_llama
from distributed import CHECKOUT, SCRIPTS, TESTS
from randopt import _atomic
from randopt.lorasqueeze import squeeze_lora

README = "README.md"


def tree(path) -> dict:
    """Every file under ``path``: relative name -> bytes, or for safetensors files (metadata, tensors), whose
    header order varies between processes."""
    files = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            if name.endswith(".safetensors"):
                with safe_open(full, framework="pt") as f:
                    files[os.path.relpath(full, path)] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
            else:
                files[os.path.relpath(full, path)] = open(full, "rb").read()
    return files


def current(out) -> dict:
    """OUT's files, or, where a killed fallback write left OUT moved aside, the files of that one old copy (which
    the next write puts back)."""
    if os.path.exists(out):
        return tree(out)
    aside = [n for n in hidden(out.parent) if n.startswith(f".{out.name}.old-")]
    assert len(aside) == 1, f"OUT is missing and there is no single copy to restore: {hidden(out.parent)}"
    return tree(out.parent / aside[0])


def hidden(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture
def source(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    path = tmp_path / "src"
    peft.get_peft_model(tiny_llama(), config).save_pretrained(path)
    return str(path)


@pytest.fixture
def old_and_new(tmp_path, source):
    """OUT: a rank-3 squeeze plus files of the user's; the rank-2 squeeze the killed write makes, for comparison."""
    out, reference = tmp_path / "work" / "out", tmp_path / "reference"
    squeeze_lora(source, rank=3, out_dir=out)
    (out / README).write_text("the user's notes")
    (out / "logs").mkdir()
    (out / "logs" / "args.json").write_text("{}")
    squeeze_lora(source, rank=2, out_dir=reference)
    old = tree(out)
    new = {**old, **tree(reference)}
    return out, old, new


def start(*args) -> subprocess.Popen:
    python_path = os.pathsep.join([str(CHECKOUT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(SCRIPTS / "killed_write.py"), *map(str, args)],
                            env={**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_paused(process: subprocess.Popen, delay: float = 0.0) -> None:
    line = process.stdout.readline()
    if line.strip() != "PAUSED":
        process.kill()
        raise AssertionError(f"the writer did not reach its pause point: {line!r}\n{process.communicate()[1][-3000:]}")
    if delay:
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-3000:]


@pytest.mark.parametrize("where", ["mid-file", "written", "swap", "aside"])
def test_squeeze_killed_mid_write_leaves_old_or_new(source, old_and_new, where):
    out, old, new = old_and_new
    kill_when_paused(start("squeeze", source, out, where))
    assert hidden(out.parent), "the killed write left its temporary directory (what this test is about)"
    assert current(out) in (old, new)
    assert os.path.exists(out) or where == "aside", "only the fallback without an atomic exchange moves OUT aside"
    # the next run restores a moved-aside OUT, removes the leftovers, and replaces only our files
    squeeze_lora(source, rank=2, out_dir=out, overwrite=True)
    assert tree(out) == new and hidden(out.parent) == []


def test_randlora_export_killed_mid_write_leaves_old_or_new(tmp_path):
    """The writer exports after one step (OUT.before keeps a copy) and is killed exporting after the second."""
    out = tmp_path / "adapter"
    kill_when_paused(start("export", out, "swap"))
    assert tree(out) == tree(f"{out}.before") and hidden(tmp_path)
    (out / README).write_text("the user's notes")
    kill_when_paused(start("export", out, "aside"))
    killed = current(out)
    finished = start("export", out, "none")
    assert finished.wait(timeout=600) == 0, finished.stderr.read()[-3000:]
    new = tree(out)
    assert new[README] == b"the user's notes" and hidden(tmp_path) == []
    assert killed in (tree(f"{out}.before"), new)


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.5])
def test_squeeze_loop_killed_at_an_arbitrary_moment(source, old_and_new, delay):
    """Writes rank 2 and 3 alternately until killed after ``delay`` seconds: OUT is one complete adapter."""
    out, old, new = old_and_new
    kill_when_paused(start("loop", source, out), delay)
    assert current(out) in (old, new)
    squeeze_lora(source, rank=2, out_dir=out, overwrite=True)
    assert tree(out) == new and hidden(out.parent) == []


def test_leftovers_of_a_running_writer_are_not_touched(tmp_path):
    """A hidden directory whose writer is still alive (another process writing the same OUT) is theirs."""
    parent = tmp_path / "work"
    parent.mkdir()
    alive = parent / f".out.tmp-{os.getppid()}-0123abcd"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = parent / f".out.tmp-{dead_pid}-4567cdef"
    alive.mkdir()
    dead.mkdir()
    _atomic.write_directory(parent / "out", lambda d: open(os.path.join(d, "a"), "w").close(), overwrite=False,
                            owner_file="a")
    assert sorted(os.listdir(parent)) == [alive.name, "out"]
