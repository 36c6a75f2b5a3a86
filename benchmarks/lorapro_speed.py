"""LoRA-Pro speed: a full training step (forward, backward, optimizer) and optimizer-state bytes.

A 2-layer GPT-2 (hidden 768, 12 heads, GPT-2's vocabulary), batch 8 x 128 tokens, fp32, PEFT LoRA
r=8 (alpha 16) on every linear layer (``c_attn``, ``c_proj``, ``c_fc``; Conv1D, ``fan_in_fan_out``).
Optimizers: ``torch.optim.AdamW`` on the LoRA factors (the baseline), ``LoRAProAdamW`` in ``full``
mode (the paper: ``m x n`` Adam moments per layer) and in ``efficient`` mode (LoRA-sized moments).
Step times are medians over interleaved rounds; ratios are per-round ratios to AdamW, so every ratio
compares steps taken under the same machine load. Run from the repository root:
``python -m benchmarks.lorapro_speed [--quick]``. Writes ``benchmarks/results/lorapro_speed.md``.
"""
from __future__ import annotations

import copy

import torch

from randopt.lorapro import LoRAProAdamW

from .common import (MIB, machine_line, markdown_table, median, ratio_spread, state_bytes, step_benchmark_args,
                     time_round_robin, training_steps, write_result)

BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16.0
TARGETS = ["c_attn", "c_proj", "c_fc"]
LIMITS = {"LoRAProAdamW efficient": 1.15, "LoRAProAdamW full": 1.3}
METHODS = ["torch AdamW", "LoRAProAdamW efficient", "LoRAProAdamW full", "LoRAProAdamW full 8bit"]
WARMUP = 2  # rounds; they also take the factors away from PEFT's B = 0 init, where real training is


def make_model():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, fan_in_fan_out=True)
    return peft.get_peft_model(GPT2LMHeadModel(config).train(), lora), config


def make_optimizer(method, model):
    if method == "torch AdamW":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mode = method.split()[1]
    return LoRAProAdamW(model, lr=1e-4, mode=mode, state_dtype="8bit" if method.endswith("8bit") else "fp32")


def main(argv=None):
    args = step_benchmark_args(__doc__.splitlines()[0], argv, quick_repeats=3, repeats=15)
    repeats = args.repeats
    base, config = make_model()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    runs = {}
    for method in METHODS:
        model = copy.deepcopy(base)
        runs[method] = model, make_optimizer(method, model)
    optimizers = {method: optimizer for method, (_, optimizer) in runs.items()}
    steps, optimizer_cpu = training_steps(runs, ids)
    times = time_round_robin(steps, repeats=repeats, warmup=WARMUP)
    cpu = times.cpu

    pairs = [g for g in optimizers["LoRAProAdamW full"].param_groups if g["lora_scale"] is not None]
    lora_params = sum(p.numel() for g in pairs for p in g["params"])
    full_size = sum(g["params"][1].shape[0] * g["params"][0].shape[1] for g in pairs)
    rows, verdicts = [], []
    adamw_step = median(cpu["torch AdamW"])
    adamw_opt = median(optimizer_cpu["torch AdamW"][WARMUP:])
    for method in METHODS:
        wall_ratio, cpu_ratio = ratio_spread(times, method, "torch AdamW"), ratio_spread(cpu, method, "torch AdamW")
        opt_seconds = median(optimizer_cpu[method][WARMUP:])
        # only the optimizer call differs between rows: its extra time over AdamW's, added to AdamW's step,
        # is the ratio without the forward/backward noise
        implied = 1 + (opt_seconds - adamw_opt) / adamw_step
        spread = [f"{r[0]:.3f} ({r[1]:.2f}-{r[2]:.2f})" for r in (wall_ratio, cpu_ratio)]
        rows.append([method, round(median(times[method]) * 1e3), spread[0], round(median(cpu[method]) * 1e3), spread[1],
                     round(opt_seconds * 1e3, 1), f"{implied:.3f}", f"{state_bytes(optimizers[method]):,}",
                     round(state_bytes(optimizers[method]) / MIB, 1)])
        if method in LIMITS:
            worst = max(wall_ratio[0], cpu_ratio[0], implied)
            verdicts.append(f"- {method}: {cpu_ratio[0]:.3f}x torch AdamW's step CPU time, {wall_ratio[0]:.3f}x wall, "
                            f"{implied:.3f}x from the optimizer call; target <= {LIMITS[method]}x: "
                            f"{'met' if worst <= LIMITS[method] else 'NOT met'}")
    table = markdown_table(["optimizer", "step wall ms", "wall vs AdamW", "step CPU ms", "CPU vs AdamW",
                            "optimizer.step CPU ms", "vs AdamW from optimizer.step", "state bytes", "state MiB"], rows)
    text = "\n".join([
        "# LoRA-Pro: training-step time and optimizer state",
        "",
        f"{'Quick run. ' if args.quick else ''}2-layer GPT-2 (hidden 768, vocabulary {config.vocab_size}), batch "
        f"{BATCH} x {SEQ} = {BATCH * SEQ:,} tokens, fp32, PEFT LoRA r={RANK} alpha={ALPHA:g} on {', '.join(TARGETS)} "
        f"({len(pairs)} pairs, {lora_params:,} LoRA parameters, {full_size:,} entries in the adapted weights). "
        f"A step is zero_grad + forward + cross-entropy + backward + optimizer.step; {repeats} interleaved rounds "
        f"after {WARMUP} warm-up rounds: median step time (wall clock and this process's CPU time; with one thread "
        "CPU time leaves out the time other processes hold the cores) and the median (min-max) over rounds of the "
        "per-round ratio to torch AdamW. `optimizer.step CPU ms` is the optimizer call alone; `vs AdamW from "
        "optimizer.step` is `1 + (its optimizer.step - AdamW's) / AdamW's step CPU time`: only the optimizer call "
        "differs between the rows, so this ratio is free of the forward/backward noise.",
        "",
        machine_line(args.threads),
        "",
        table,
        "",
        *verdicts,
        "",
        "State bytes are every tensor in the optimizer state (moments, 8-bit scales and step counters). Full mode "
        f"keeps fp32 Adam moments of the `m x n` equivalent gradient of every adapted layer: 2 x 4 x {full_size:,} "
        "bytes, the Adam state of full fine-tuning of those layers; efficient mode keeps moments of A and B only, "
        "as AdamW does. `full 8bit` (no target) stores those moments block-wise in 8 bits (`state_dtype=\"8bit\"`, "
        "bitsandbytes); its time on this CPU is mostly bitsandbytes' CPU (de)quantisation.",
        "",
    ])
    write_result("lorapro_speed.md", text)


if __name__ == "__main__":
    main()
