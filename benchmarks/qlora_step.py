"""A QLoRA-style training step: peak memory and step time of adapters over a 4-bit (bitsandbytes nf4) base, next to
the same methods over the full-precision base.

    python -m benchmarks.qlora_step [--size 134M] [--tokens 512] [--steps 3] [--threads 1]

Methods (rank 32, the 7 projection matrices of every layer, nothing else trained): PEFT LoRA r32 and PEFT RandLora
r32 with torch AdamW, our RandLoRA module route r32 (``inject_randlora`` + torch AdamW), and ``LoRAProAdamW``
(efficient and full mode) over the PEFT LoRA r32 model. Base: the Llama-style config of ``benchmarks.scaling``
(random init) with its projections either ``bitsandbytes.nn.Linear4bit`` (nf4, fp32 compute; the issue's QLoRA
setting) or fp32 ``nn.Linear``.

Each (method, base) runs in a fresh process: build and quantize the base, reset the peak-RSS mark, wrap it for the
method, run one warm-up step and ``--steps`` timed steps. Peak: growth of the process's peak RSS (``VmHWM``) over
the built base during those steps (adapters, activations, gradients, optimizer state; not the base weights). Time:
median CPU seconds of the timed steps (one intra-op thread; CPU time leaves out the time other processes on a
shared machine hold the core, which wall time does not). Finished runs are cached in ``results/qlora_step.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .common import MIB, machine_line, markdown_table, write_result
from .optimizer_speed import CHILD_ENV, quiet, reset_peak_rss, rss_kib, state_bytes
from .scaling import SEQ, SIZES, TARGETS, make_model

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "qlora_step.json"
RANK, LR = 32, 1e-4
BASES = ("nf4", "fp32")
LORA, PEFT_RANDLORA, OURS = "PEFT LoRA r32", "PEFT RandLora r32", "ours module route r32"
LORAPRO_EFFICIENT, LORAPRO_FULL = "LoRAProAdamW efficient r32", "LoRAProAdamW full r32"
METHODS = [LORA, PEFT_RANDLORA, OURS, LORAPRO_EFFICIENT, LORAPRO_FULL]


def quantize_projections(model: nn.Module) -> nn.Module:
    """Every projection becomes a ``Linear4bit`` (nf4, fp32 compute), quantized on CPU; the fp32 copy is dropped."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    model.is_loaded_in_4bit = True  # what transformers sets for a 4-bit model; PEFT picks its bnb layers by it
    return model


def build(method: str, model: nn.Module):
    """``(model, optimizer)`` training the adapters of the 7 projections of every layer and nothing else."""
    import peft

    import randopt

    model.requires_grad_(False)
    if method == OURS:
        randopt.inject_randlora(model, TARGETS, rank=RANK, alpha=20.0 * RANK)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    config = (peft.RandLoraConfig(r=RANK, randlora_alpha=20 * RANK, target_modules=TARGETS, randlora_dropout=0.0)
              if method == PEFT_RANDLORA else
              peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0))
    model = peft.get_peft_model(model, config)
    if method in (LORAPRO_EFFICIENT, LORAPRO_FULL):
        # no weight decay: full mode cannot decay a quantized W0, and the fp32 runs must do the same work
        return model, randopt.LoRAProAdamW(model, lr=LR, weight_decay=0.0,
                                           mode="full" if method == LORAPRO_FULL else "efficient")
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def child(method: str, base: str, size: str, tokens: int, steps: int, threads: int) -> dict:
    """One run in this (fresh) process; see the module docstring."""
    import bitsandbytes  # noqa: F401  every library imported before the baseline, whatever the method
    import peft  # noqa: F401

    import randopt  # noqa: F401

    torch.set_num_threads(threads)
    model = make_model(size, torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    if base == "nf4":
        model = quantize_projections(model)
    base_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.randint(0, SIZES[size]["vocab"], (tokens // SEQ, SEQ), generator=torch.Generator().manual_seed(1))
    load = os.getloadavg()[0]
    reset_peak_rss()
    baseline = rss_kib("VmRSS")
    model, optimizer = build(method, model)
    model.train()
    cpu, wall = [], []
    for _ in range(1 + steps):
        start, start_wall = time.process_time(), time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - start)
        wall.append(time.perf_counter() - start_wall)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "base": base, "size": size, "tokens": tokens, "parameters": parameters,
            "base_bytes": base_bytes, "trained": trained, "peak_bytes": (rss_kib("VmHWM") - baseline) * 1024,
            "state_bytes": state_bytes(optimizer)[0], "step_cpu_s": statistics.median(cpu[1:]),
            "step_wall_s": statistics.median(wall[1:]), "steps": steps, "load": load}


def run_child(method, base, args) -> dict:
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "benchmarks.qlora_step", "--child", method, base, "--size", args.size,
               "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
        return {"method": method, "base": base, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def key(method: str, base: str, args) -> str:
    return f"{method}|{base}|{args.size}|{args.tokens}"


def _table(table: dict) -> str:
    rows = []
    for base in BASES:
        lora, randlora = table.get((LORA, base)), table.get((PEFT_RANDLORA, base))
        for method in METHODS:
            r = table.get((method, base))
            if r is None:
                continue
            rows.append([base, method, f"{r['trained'] / 1e6:.2f}M", f"{r['peak_bytes'] / MIB:.0f}",
                         f"{r['peak_bytes'] / lora['peak_bytes']:.2f}" if lora else "-",
                         f"{r['peak_bytes'] / randlora['peak_bytes']:.2f}" if randlora else "-",
                         f"{r['state_bytes'] / MIB:.1f}", f"{r['step_cpu_s']:.2f}", f"{r['step_wall_s']:.2f}",
                         f"{r['step_cpu_s'] / randlora['step_cpu_s']:.2f}" if randlora else "-"])
    return markdown_table(["base", "method", "trained", "peak MiB", "x PEFT LoRA", "x PEFT RandLora", "state MiB",
                           "CPU s/step", "wall s/step", "time x PEFT RandLora"], rows)


def _targets(table: dict) -> str:
    """The issue's targets on the 4-bit base, each marked met or missed."""
    ours, lora, randlora = (table.get((m, "nf4")) for m in (OURS, LORA, PEFT_RANDLORA))
    if not (ours and lora and randlora):
        return ""
    checks = [("peak <= PEFT RandLora's", ours["peak_bytes"] <= randlora["peak_bytes"],
               f"{ours['peak_bytes'] / randlora['peak_bytes']:.2f}x"),
              ("peak within 10% of PEFT LoRA r32's", ours["peak_bytes"] <= 1.1 * lora["peak_bytes"],
               f"{ours['peak_bytes'] / lora['peak_bytes']:.2f}x"),
              ("step time <= 0.8x PEFT RandLora's", ours["step_cpu_s"] <= 0.8 * randlora["step_cpu_s"],
               f"{ours['step_cpu_s'] / randlora['step_cpu_s']:.2f}x CPU time")]
    return "\nTargets on the nf4 base (ours): " + "; ".join(
        f"{label}: {'met' if ok else 'MISSED'} ({value})" for label, ok, value in checks) + ".\n"


def report(runs: dict, load: str) -> str:
    done = [r for r in runs.values() if "error" not in r]
    lines = [
        "# QLoRA-style step: adapters over a 4-bit base\n",
        f"{load}. Command: `python -m benchmarks.qlora_step --size SIZE --tokens T --steps S` (one section per "
        "setting below; finished runs are cached in `qlora_step.json`).\n",
        f"Llama-style configs of `benchmarks.scaling` (random init, sequence {SEQ}). Base `nf4`: the 7 projections "
        "of every layer are bitsandbytes `Linear4bit` (nf4, fp32 compute), the rest fp32; base `fp32`: all fp32. "
        "Every method trains adapters on those projections (rank 32) and nothing else; PEFT LoRA, PEFT RandLora "
        "and ours step with torch AdamW, LoRA-Pro with `LoRAProAdamW` over the PEFT LoRA model (weight decay 0).\n",
        "Peak: growth of the process's peak RSS over the built base during one warm-up and the timed steps (each "
        "run in a fresh process; the base weights are not in it). Time: median CPU seconds per step with one "
        "intra-op thread (wall seconds beside it; the machine was shared, so both are indicative).\n",
        "Scope: the issue asks for a few hundred million parameters; on this 2-core machine, shared by several jobs "
        "(load average near 40 throughout), 134M at 512 tokens per step was the largest setting that finished in "
        "the time available (350M would take hours of wall time per method).\n",
        "Why the step-time target is missed: on a quantized base the core does the same products as on a "
        "full-precision one plus a dequantization per product (bitsandbytes does the same for PEFT's layers); "
        "RandLoRA's update is full rank, so per layer the products cost about `d^3` (forming `dW`) or "
        "`tokens * d * (D + d)` (through the bases), and with `tokens` below `d` (512 vs 768 at 134M) neither is "
        "much below PEFT's factored route. The frozen LM head and attention, the same for every method, dilute the "
        "ratio further. Per layer at 1,024 tokens the core reaches 0.73-0.86x PEFT RandLora "
        "([layer_speed.md](layer_speed.md)).\n",
    ]
    for size, tokens in sorted({(r["size"], r["tokens"]) for r in done}, key=lambda st: (SIZES[st[0]]["hidden"], st[1])):
        table = {(r["method"], r["base"]): r for r in done if (r["size"], r["tokens"]) == (size, tokens)}
        sample = next(iter(table.values()))
        bases = {b: next(r["base_bytes"] for r in table.values() if r["base"] == b)
                 for b in BASES if any(r["base"] == b for r in table.values())}
        loads = [r["load"] for r in table.values() if "load" in r]
        lines += [f"\n## {size} ({sample['parameters'] / 1e6:.0f}M parameters), {tokens} tokens per step, "
                  f"{sample['steps']} timed steps\n",
                  "Base weights: " + ", ".join(f"{b} {v / MIB:.0f} MiB" for b, v in bases.items()) + "."
                  + (f" Load average {min(loads):.0f}-{max(loads):.0f} when the runs started." if loads else "")
                  + "\n", _table(table), _targets(table)]
    failed = [f"- {k}: {r['error']}" for k, r in runs.items() if "error" in r]
    if failed:
        lines += ["\nRuns that failed:\n"] + failed
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BASE"))
    parser.add_argument("--size", default="134M", choices=sorted(SIZES))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bases", default=",".join(BASES))
    args = parser.parse_args(argv)
    quiet()
    if args.child:
        print(json.dumps(child(*args.child, args.size, args.tokens, args.steps, args.threads)))
        return
    torch.set_num_threads(args.threads)
    load = machine_line(args.threads)
    runs = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    for base in args.bases.split(","):
        for method in args.methods.split(","):
            name = key(method, base, args)
            if name not in runs:
                runs[name] = run_child(method, base, args)
                CACHE.parent.mkdir(parents=True, exist_ok=True)
                tmp = CACHE.with_suffix(".tmp")
                tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
                tmp.replace(CACHE)
            r = runs[name]
            print(name, "->", r.get("error") or f"peak {r['peak_bytes'] / MIB:.0f} MiB, {r['step_cpu_s']:.2f} s",
                  flush=True)
    write_result("qlora_step.md", report(runs, load), show=False)


if __name__ == "__main__":
    main()
