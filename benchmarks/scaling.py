"""How memory and time grow with model size: Llama-style models (random init, built from a config) of ~10M to
~350M parameters (and ~1B with ``--sizes ...,1B`` where memory allows), at 1,024 and 4,096 tokens per step, with
fp32 and bf16 weights, for every method next to full fine-tuning.

    python -m benchmarks.scaling [--sizes 10M,30M,134M,350M] [--tokens 1024,4096] [--dtypes fp32,bf16]
                                 [--methods a,b] [--threads 1] [--max-seconds 5400]

Each (method, size, tokens, dtype) runs in a fresh process: build the model, wrap it for the method, run two
training steps (the second is the steady state: optimizer state exists while activations and gradients live) and
report the peak RSS growth over the base model (``VmHWM`` reset after the model is built), the bytes of the
optimizer state, of the bases, of the trained parameters' gradients and of what autograd saved for backward by the
tensors' own accounting, and the CPU time of the second step. Finished runs are kept in ``results/scaling.json``
so that an interrupted sweep resumes where it stopped; ``results/scaling.md`` (tables per setting, the issue's
target from 100M up, what holds the memory, what was not run) and the two plots are rewritten from all finished
runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import MIB, machine_line, markdown_table, saved_for_backward, write_result
from .optimizer_speed import CHILD_ENV, quiet, reset_peak_rss, rss_kib, state_bytes

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "scaling.json"
SIZES = {  # Llama-style: hidden, layers, MLP width, heads, vocabulary
    "10M": dict(hidden=256, layers=4, intermediate=688, heads=4, vocab=12000),
    "30M": dict(hidden=512, layers=6, intermediate=1376, heads=8, vocab=16000),
    "134M": dict(hidden=768, layers=12, intermediate=2048, heads=12, vocab=32000),
    "350M": dict(hidden=1024, layers=24, intermediate=2816, heads=16, vocab=32000),
    "1B": dict(hidden=2048, layers=16, intermediate=5632, heads=16, vocab=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, GALORE_RANK, LR = 32, 128, 1e-4
SEQ = 256
FULL, ADAM8, LORA, PEFT_RANDLORA, GALORE = ("full_ft_adamw", "full_ft_bnb_adamw8bit", "peft_lora_r32",
                                            "peft_randlora_r32", "galore_adamw_r128")
OURS, OURS_SPARSE, FUSED, FUSED_8BIT, FUSED_EXACT = ("randlora_adamw_r32", "randlora_adamw_r32_very_sparse",
                                                     "randlora_adamw_r32_fused", "randlora_adamw_r32_fused_8bit",
                                                     "randlora_adamw_r32_fused_exact")
LORAPRO_FULL, LORAPRO_EFFICIENT = "lorapro_adamw_full_r32", "lorapro_adamw_efficient_r32"
METHODS = [FULL, ADAM8, LORA, PEFT_RANDLORA, GALORE, OURS, OURS_SPARSE, FUSED, FUSED_8BIT, FUSED_EXACT,
           LORAPRO_FULL, LORAPRO_EFFICIENT]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NOT_RUN_REASON = (
    "Not run for lack of CPU time: the sweep runs on one core of a 2-core machine shared by several jobs, where "
    "one 350M step at 4,096 tokens takes minutes; the runs that decide the target (PEFT LoRA r32, fused "
    "RandLoRAAdamW stochastic and exact) were run first at every point, then full fine-tuning and PEFT RandLora "
    "as time allowed. "
    "The 1B size (`--sizes 1B`) was not run: its full fine-tuning in fp32 needs about 16 bytes per parameter "
    "(15 GiB) before activations on a machine whose 23 GiB are shared, and its adapter runs take tens of minutes "
    "per point on one core.")
TARGET_FROM = 100e6  # the target holds at every size from here up
ACCOUNTED = {"saved_for_backward_bytes": "saved for backward", "grad_bytes_after_backward": "gradients",
             "state_bytes": "optimizer state", "bases_bytes": "bases"}


def make_model(size: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                         intermediate_size=cfg["intermediate"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"], max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).train()


def only_targets_trainable(model) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS)


def build(method: str, model):
    """``(model, optimizer)``: full fine-tuning trains everything; every other method trains the 7 projection
    matrices of each layer (through its adapter or its optimizer) and nothing else."""
    import randopt

    if method in (FULL, ADAM8):
        params = list(model.parameters())
        if method == FULL:
            return model, torch.optim.AdamW(params, lr=LR)
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(params, lr=LR)
    if method in (LORA, PEFT_RANDLORA, LORAPRO_FULL, LORAPRO_EFFICIENT):
        import peft

        config = (peft.RandLoraConfig(r=RANK, target_modules=TARGETS, randlora_dropout=0.0)
                  if method == PEFT_RANDLORA else
                  peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0))
        model = peft.get_peft_model(model, config)
        if method in (LORAPRO_FULL, LORAPRO_EFFICIENT):
            return model, randopt.LoRAProAdamW(model, lr=LR, mode="full" if method == LORAPRO_FULL else "efficient")
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    only_targets_trainable(model)
    matrices = [p for p in model.parameters() if p.requires_grad]
    if method == GALORE:
        from galore_torch import GaLoreAdamW

        return model, GaLoreAdamW([{"params": matrices, "rank": GALORE_RANK, "update_proj_gap": 200, "scale": 0.25,
                                    "proj_type": "std"}], lr=LR, no_deprecation_warning=True)
    options = dict(rank=RANK, lr=LR, fused_backward=method.startswith(FUSED),
                   basis_kind="very_sparse" if method == OURS_SPARSE else "dense",
                   state_dtype="8bit" if method == FUSED_8BIT else "fp32",
                   weight_update="exact" if method == FUSED_EXACT else "stochastic")
    return model, randopt.RandLoRAAdamW(matrices, **options)


def bases_bytes(optimizer) -> int:
    bases = list(getattr(optimizer, "_bases", {}).values()) + list(getattr(optimizer, "_bases_on", {}).values())
    seen, total = set(), 0
    for b in bases:
        for t in (b.A, b.B):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def child(method: str, size: str, tokens: int, dtype: str, threads: int) -> dict:
    """One run in this (fresh) process; see the module docstring."""
    import galore_torch  # noqa: F401  every library imported before the baseline, whatever the method
    import peft  # noqa: F401

    import randopt  # noqa: F401

    torch.set_num_threads(threads)
    model = make_model(size, DTYPES[dtype])
    parameters = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, SIZES[size]["vocab"], (tokens // SEQ, SEQ), generator=torch.Generator().manual_seed(1))
    reset_peak_rss()
    baseline = rss_kib("VmRSS")
    model, optimizer = build(method, model)
    cpu = []
    grad_bytes = 0
    for _ in range(2):
        start = time.process_time()
        loss, saved = saved_for_backward(lambda: model(input_ids=ids, labels=ids).loss, exclude=[model])
        loss.backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - start)
    total_state, moments = state_bytes(optimizer)
    return {"method": method, "size": size, "tokens": tokens, "dtype": dtype,
            "parameters": parameters,
            "model_bytes": model_bytes, "peak_bytes": (rss_kib("VmHWM") - baseline) * 1024,
            "state_bytes": total_state, "moment_bytes": moments, "grad_bytes_after_backward": grad_bytes,
            "saved_for_backward_bytes": saved.bytes,
            "bases_bytes": bases_bytes(optimizer), "step_cpu_s": cpu[-1], "threads": threads}


def run_child(method, size, tokens, dtype, threads, timeout) -> dict:
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "benchmarks.scaling", "--child", method, size, str(tokens), dtype,
               "--threads", str(threads)]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **CHILD_ENV})
    except subprocess.TimeoutExpired:
        return {"method": method, "size": size, "tokens": tokens, "dtype": dtype, "error": f"over {timeout} s"}
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1][:200]
        return {"method": method, "size": size, "tokens": tokens, "dtype": dtype, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def key(run: dict) -> str:
    return f"{run['method']}|{run['size']}|{run['tokens']}|{run['dtype']}"


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def save_cache(cache: dict) -> None:
    tmp = CACHE.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(CACHE)


def plot(runs: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for field, label, name in (("peak_bytes", "peak memory over the model (MiB)", "scaling_memory.png"),
                               ("step_cpu_s", "CPU seconds per step", "scaling_time.png")):
        settings = sorted({(r["tokens"], r["dtype"]) for r in runs})
        fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.5), squeeze=False, sharex=True)
        lines = {}
        for ax, (tokens, dtype) in zip(axes[0], settings):
            for method in METHODS:
                points = sorted((r["parameters"], r[field]) for r in runs
                                if r["method"] == method and r["tokens"] == tokens and r["dtype"] == dtype)
                if points:
                    xs, ys = zip(*points)
                    ys = [y / MIB for y in ys] if field == "peak_bytes" else ys
                    lines[method], = ax.plot(xs, ys, marker="o", color=plt.cm.tab20(METHODS.index(method)),
                                             linestyle="-" if method.startswith(OURS) else "--")
            ax.set(xscale="log", yscale="log", xlabel="model parameters", ylabel=label,
                   title=f"{tokens} tokens/step, {dtype} weights")
            ax.grid(True, which="both", alpha=0.3)
        shown = [m for m in METHODS if m in lines]  # one colour per method in every panel, one legend for all
        axes[0][-1].legend([lines[m] for m in shown], shown, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def target_rows(runs: list[dict]) -> list[list]:
    """The issue's target per measured point of at least ``TARGET_FROM`` parameters: fused stochastic
    RandLoRAAdamW's peak at most PEFT LoRA r32's; and what exact mode adds over stochastic."""
    by_key = {key(r): r for r in runs}
    rows = []
    for lora in sorted((r for r in runs if r["method"] == LORA and r["parameters"] >= TARGET_FROM),
                       key=lambda r: (r["parameters"], r["tokens"], r["dtype"])):
        point = key(lora).split("|", 1)[1]
        fused, exact = by_key.get(f"{FUSED}|{point}"), by_key.get(f"{FUSED_EXACT}|{point}")
        row = [lora["size"], lora["tokens"], lora["dtype"], f"{lora['peak_bytes'] / MIB:.0f}"]
        if fused is None:
            row += ["-", "-", "not run"]
        else:
            ratio = fused["peak_bytes"] / lora["peak_bytes"]
            row += [f"{fused['peak_bytes'] / MIB:.0f}", f"{ratio:.2f}x", "met" if ratio <= 1 else "missed"]
        if exact is None or fused is None:
            row += ["-", "-", "-"]
        else:
            row += [f"{exact['peak_bytes'] / MIB:.0f} ({exact['peak_bytes'] / lora['peak_bytes']:.2f}x)",
                    f"{(exact['peak_bytes'] - fused['peak_bytes']) / MIB:+.0f}",
                    f"{(exact['state_bytes'] - fused['state_bytes']) / MIB:.0f}"]
        rows.append(row)
    return rows


def accounting_rows(runs: list[dict]) -> list[list]:
    """Peak RSS next to the tensors' own accounting, for the runs of at least ``TARGET_FROM`` parameters that
    recorded what autograd saved."""
    rows = []
    for r in sorted((r for r in runs if "saved_for_backward_bytes" in r and r["parameters"] >= TARGET_FROM),
                    key=lambda r: (r["parameters"], r["tokens"], r["dtype"], METHODS.index(r["method"]))):
        accounted = sum(r[field] for field in ACCOUNTED)
        rows.append([r["method"], r["size"], r["tokens"], r["dtype"], f"{r['peak_bytes'] / MIB:.0f}"]
                    + [f"{r[field] / MIB:.0f}" for field in ACCOUNTED]
                    + [f"{(r['peak_bytes'] - accounted) / MIB:.0f}"])
    return rows


def not_run(runs: list[dict]) -> list[str]:
    """Per measured (size, tokens, dtype) point, the methods without a finished run."""
    points = sorted({(r["parameters"], r["size"], r["tokens"], r["dtype"]) for r in runs})
    done = {key(r) for r in runs}
    lines = []
    for _, size, tokens, dtype in points:
        missing = [m for m in METHODS if f"{m}|{size}|{tokens}|{dtype}" not in done]
        if missing:
            lines.append(f"- {size}, {tokens} tokens, {dtype}: " + ", ".join(f"`{m}`" for m in missing))
    return lines


def report(cache: dict, args, skipped: list[str]) -> str:
    runs = [r for r in cache.values() if "error" not in r]
    failed = [r for r in cache.values() if "error" in r]
    threads = sorted({r.get("threads") for r in runs} - {None})
    earlier = sum("threads" not in r for r in runs)
    lines = ["# Scaling: memory and time against model size\n",
             f"{machine_line(args.threads)}; measured while other jobs shared the 2 cores, so CPU seconds are "
             "indicative (memory is not affected by load). Command: `python -m benchmarks.scaling` (finished runs "
             f"are cached in `scaling.json`). Threads per run: {', '.join(map(str, threads)) or '-'} for the "
             f"{len(runs) - earlier} runs that record it; {earlier} runs from earlier sweeps (10M-134M at 1,024 "
             "tokens) used 1 or 2 threads, which changes their CPU seconds a little and their memory not "
             "measurably.\n",
             "Llama-style models from a config (random init, untied embeddings, sequence length "
             f"{SEQ}); every method except full fine-tuning trains the 7 projection matrices of each layer (rank 32; "
             "GaLore rank 128) and nothing else. Peak: growth of the process's peak RSS over the built base model "
             "during two training steps (so the weights themselves are not in it). State: every tensor in "
             "`optimizer.state` (RandLoRAAdamW: coefficients, moments and, in exact mode, the W0 copy). Bases: "
             "RandLoRA's shared random bases held by the optimizer.\n"]
    for tokens in sorted({r["tokens"] for r in runs}):
        for dtype in sorted({r["dtype"] for r in runs}):
            subset = [r for r in runs if r["tokens"] == tokens and r["dtype"] == dtype]
            if not subset:
                continue
            sizes = sorted({(r["parameters"], r["size"]) for r in subset})
            lora = {r["size"]: r for r in subset if r["method"] == LORA}
            rows = []
            for method in METHODS:
                cells = [method]
                for _, size in sizes:
                    r = next((r for r in subset if r["method"] == method and r["size"] == size), None)
                    if r is None:
                        cells.append("-")
                        continue
                    ratio = f" ({r['peak_bytes'] / lora[size]['peak_bytes']:.2f}x LoRA)" if size in lora else ""
                    cells.append(f"{r['peak_bytes'] / MIB:.0f}{ratio} / {r['state_bytes'] / MIB:.1f} / "
                                 f"{r['step_cpu_s']:.2f}")
                rows.append(cells)
            lines += [f"\n## {tokens} tokens per step, {dtype} weights\n",
                      "Each cell: peak MiB (x peft_lora_r32's peak) / optimizer state MiB / CPU s per step.\n",
                      markdown_table(["method"] + [f"{size} ({n / 1e6:.0f}M)" for n, size in sizes], rows)]
    lines += ["\n## Target: fused RandLoRAAdamW (stochastic) at most PEFT LoRA r32's peak from 100M up\n",
              "Peaks in MiB over the built model. Exact mode: `weight_update=\"exact\"` (fused), its peak (x LoRA's), "
              "what it adds to the stochastic mode's peak, and its `W0` copy (exact state minus stochastic state).\n",
              markdown_table(["size", "tokens", "weights", f"`{LORA}`", f"`{FUSED}`", "ratio", "target",
                              f"`{FUSED_EXACT}`", "exact adds (MiB)", "W0 copy (MiB)"], target_rows(runs))]
    accounting = accounting_rows(runs)
    if accounting:
        lines += ["\n## What holds the memory (tensors' own accounting)\n",
                  "MiB. Saved for backward: the storages autograd packed during the second step's forward (the "
                  "model's own parameters excluded); gradients: every `.grad` after backward (fused backward "
                  "projects and frees the matrices' gradients during backward, so they are not held); rest: peak "
                  "RSS minus those terms, i.e. the transients of backward (the logits' gradient, each layer's "
                  "input gradients) and allocator slack.\n",
                  markdown_table(["method", "size", "tokens", "weights", "peak RSS"] + list(ACCOUNTED.values())
                                 + ["rest"], accounting)]
    missing = not_run(runs)
    if missing:
        lines += ["\n## Methods not run at a measured point\n", NOT_RUN_REASON + "\n"] + missing
    if failed:
        lines += ["\n## Runs that failed\n"] + [f"- {key(r)}: {r['error']}" for r in failed]
    if skipped:
        lines += ["\n## Not run in this sweep\n", "; ".join(skipped)]
    if runs:
        lines += ["\n"] + [f"![{name}]({name})" for name in plot(runs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "SIZE", "TOKENS", "DTYPE"))
    parser.add_argument("--sizes", default="10M,30M,134M,350M")
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds for one run")
    parser.add_argument("--max-seconds", type=int, default=5400, help="stop starting runs after this long")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    if args.child:
        method, size, tokens, dtype = args.child
        print(json.dumps(child(method, size, int(tokens), dtype, args.threads)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS] + [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"unknown methods or sizes {unknown}; methods: {METHODS}; sizes: {list(SIZES)}")
    cache, started, skipped = load_cache(), time.monotonic(), []
    jobs = [(m, s, int(t), d) for s in args.sizes.split(",") for t in args.tokens.split(",")
            for d in args.dtypes.split(",") for m in methods]
    for method, size, tokens, dtype in jobs:
        name = key({"method": method, "size": size, "tokens": tokens, "dtype": dtype})
        if name in cache:
            continue
        if time.monotonic() - started > args.max_seconds:
            skipped.append(name)
            continue
        cache[name] = run_child(method, size, tokens, dtype, args.threads, args.timeout)
        save_cache(cache)
        print(name, "->", cache[name].get("error") or f"peak {cache[name]['peak_bytes'] / MIB:.0f} MiB, "
              f"{cache[name]['step_cpu_s']:.2f} s", flush=True)
    write_result("scaling.md", report(cache, args, skipped), show=False)


if __name__ == "__main__":
    main()
