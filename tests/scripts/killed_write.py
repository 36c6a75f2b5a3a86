"""Run by tests/test_atomic_writes.py and killed with SIGKILL while it writes an adapter directory.

``killed_write.py squeeze SRC OUT PAUSE``: ``randopt squeeze SRC --rank 2 --out OUT --overwrite``;
``killed_write.py export OUT PAUSE``: train a tiny model one step, export its RandLoRA adapter to OUT, keep a copy
of that (old) adapter in ``OUT.before``, train one more step and export again (the write that gets killed);
``killed_write.py loop SRC OUT``: squeeze to rank 2 and 3 alternately into OUT until killed.

PAUSE is where the write prints ``PAUSED`` and waits to be killed: ``mid-file`` (one file half-written), ``written``
(our files written, before the rest of OUT is carried over), ``swap`` (everything fsynced, before the swap),
``aside`` (the fallback without an atomic exchange: old OUT moved aside, new one not yet in place), ``none``."""
import os
import shutil
import sys
import time

import torch

from randopt import _atomic, cli
from randopt.lorasqueeze import adapters


def pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(3600)


def pause_before(module, name: str) -> None:
    real = getattr(module, name)

    def paused(*args, **kwargs):
        pause()
        return real(*args, **kwargs)

    setattr(module, name, paused)


def install_pause(where: str) -> None:
    if where == "mid-file":
        def half_then_pause(path, data):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                pause()

        adapters._write_file = half_then_pause
    elif where == "written":
        pause_before(_atomic, "_carry_over")
    elif where == "swap":
        pause_before(_atomic, "_exchange")
    elif where == "aside":
        _atomic._exchange = lambda a, b: False
        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:
                pause()
            real_replace(src, dst)

        os.replace = replace
    elif where != "none":
        raise ValueError(f"unknown pause {where!r}")


def squeeze(source, out, rank=2) -> None:
    if cli.main(["squeeze", source, "--rank", str(rank), "--out", out, "--overwrite"]) != 0:
        raise SystemExit("squeeze failed")


def export(out, where) -> None:
    import randopt
    from conftest import LLAMA_TARGETS, tiny_llama
    from randopt.integrations.peft import export_randlora_adapter

    torch.set_num_threads(1)
    model = tiny_llama()
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=3, alpha=5.0), lr=1e-2)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    for step in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            shutil.copytree(out, out + ".before", dirs_exist_ok=True)
            install_pause(where)
        export_randlora_adapter(model, opt, out)


def main(mode, *args):
    if mode == "squeeze":
        source, out, where = args
        install_pause(where)
        squeeze(source, out)
    elif mode == "export":
        export(*args)
    elif mode == "loop":
        source, out = args
        print("PAUSED", flush=True)  # ready: the parent kills at a moment of its choosing
        sys.stdout = open(os.devnull, "w")  # the reports would fill the pipe nobody reads
        for i in range(10_000):
            squeeze(source, out, rank=2 + i % 2)


if __name__ == "__main__":
    main(*sys.argv[1:])
