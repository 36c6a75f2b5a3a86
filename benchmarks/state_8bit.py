"""Optimizer-state precision: state bytes and step time of every randopt optimizer with fp32, bf16 (first moment)
and 8-bit (block-wise, bitsandbytes) moments.

The shared GPT-2-style config (2 layers, hidden 768, GPT-2's vocabulary), batch 8 x 128 tokens, fp32 weights.
RandLoRAAdamW r32 trains the Conv1D weights of ``c_attn``, ``c_proj``, ``c_fc`` on the plain model through
their RandLoRA coefficients; LoRAProAdamW (full and efficient) trains PEFT LoRA r8 factors on the same
layers. Every optimizer also carries plain AdamW for the trainable biases and LayerNorms under the same
``state_dtype`` (the embeddings, and so the tied LM head, are frozen everywhere). Accuracy on the real task is in the
benchmark suite (``suite.md``, section "8-bit moments"). Run from the repository root:
``python -m benchmarks.state_8bit [--quick]``; writes ``benchmarks/results/state_8bit.md``.
"""
from __future__ import annotations

import copy

import torch

import randopt
from randopt.optim.state import MIN_8BIT_SIZE, state_summary

from .common import (MIB, machine_line, markdown_table, median, state_bytes, step_benchmark_args, time_round_robin,
                     training_steps, write_result)
from .lorapro_speed import make_model as lora_model

BATCH, SEQ, RANDLORA_RANK = 8, 128, 32
TARGETS = ["c_attn", "c_proj", "c_fc"]
OPTIMIZERS = ["RandLoRAAdamW r32", "LoRAProAdamW full", "LoRAProAdamW efficient"]
STATE_DTYPES = ["fp32", "bf16", "8bit"]
TARGET_RATIO = {"LoRAProAdamW full": 0.27}
WARMUP = 2


def plain_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).train()


def build(name: str, state_dtype: str, plain, lora):
    if name.startswith("RandLoRAAdamW"):
        model = copy.deepcopy(plain)
        for embedding in (model.transformer.wte, model.transformer.wpe):  # frozen, as LoRA leaves them
            embedding.weight.requires_grad_(False)
        # train_rest: the biases and LayerNorms stay trainable (a plain AdamW group), as the docstring says and as
        # LoRA-Pro's rows train them
        groups = randopt.param_groups(model, TARGETS, rank=RANDLORA_RANK, train_rest=True)
        return model, randopt.RandLoRAAdamW(groups, lr=1e-4, rank=RANDLORA_RANK, state_dtype=state_dtype)
    model = copy.deepcopy(lora)
    return model, randopt.LoRAProAdamW(model, lr=1e-4, mode=name.split()[1], state_dtype=state_dtype)


def main(argv=None):
    args = step_benchmark_args(__doc__.splitlines()[0], argv, quick_repeats=2, repeats=6)
    repeats = args.repeats
    plain, (lora, config) = plain_model(), lora_model()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    runs = {f"{name} {state_dtype}": build(name, state_dtype, plain, lora)
            for name in OPTIMIZERS for state_dtype in STATE_DTYPES}
    optimizers = {key: optimizer for key, (_, optimizer) in runs.items()}
    steps, optimizer_cpu = training_steps(runs, ids)
    times = time_round_robin(steps, repeats=repeats, warmup=WARMUP)

    rows, verdicts = [], []
    for name in OPTIMIZERS:
        reference = f"{name} fp32"
        for state_dtype in STATE_DTYPES:
            key = f"{name} {state_dtype}"
            total, fp32_total = state_bytes(optimizers[key]), state_bytes(optimizers[reference])
            formats = ", ".join(f"{fmt}: {entry['moments']} ({entry['bytes'] / MIB:.2f} MiB)"
                                for fmt, entry in sorted(state_summary(optimizers[key]).items()))
            rows.append([name, state_dtype, f"{total:,}", f"{total / MIB:.2f}", f"{total / fp32_total:.3f}",
                         round(median(optimizer_cpu[key][WARMUP:]) * 1e3, 1), round(median(times.cpu[key]) * 1e3),
                         formats])
            if state_dtype == "8bit" and name in TARGET_RATIO:
                ratio = total / fp32_total
                verdicts.append(f"- {name}: 8-bit state {ratio:.3f}x fp32's ({total / MIB:.1f} vs "
                                f"{fp32_total / MIB:.1f} MiB); target <= {TARGET_RATIO[name]}x: "
                                f"{'met' if ratio <= TARGET_RATIO[name] else 'NOT met'}")
    table = markdown_table(["optimizer", "state_dtype", "state bytes", "state MiB", "x fp32", "optimizer.step CPU ms",
                            "step CPU ms", "moments by storage (count, MiB)"], rows)
    text = "\n".join([
        "# Optimizer state in fp32, bf16 and 8 bits",
        "",
        f"{'Quick run. ' if args.quick else ''}2-layer GPT-2 (hidden 768, vocabulary {config.vocab_size}), batch "
        f"{BATCH} x {SEQ} = {BATCH * SEQ:,} tokens, fp32 weights. RandLoRAAdamW r{RANDLORA_RANK} on the plain "
        f"model's {', '.join(TARGETS)} weights; LoRAProAdamW on PEFT LoRA r8 (alpha 16) factors of the same layers. "
        f"A step is zero_grad + forward + backward + optimizer.step; {repeats} interleaved rounds after {WARMUP} "
        "warm-up rounds, medians of this process's CPU time. State bytes: every tensor in `optimizer.state` "
        "(moments, 8-bit codes and per-block absmax scales, step counters, RandLoRA coefficients and bases "
        f"fingerprints). Moments of tensors under `min_8bit_size` = {MIN_8BIT_SIZE:,} elements stay fp32 (a "
        "documented, changeable threshold; the last column shows where each moment lives, so nothing stays fp32 "
        "silently). bf16 stores the first moment only in bf16 (the second stays fp32: `v *= 0.999` does not move "
        "in bf16).",
        "",
        machine_line(args.threads),
        "",
        table,
        "",
        *verdicts,
        "",
        "The 8-bit step time on this CPU is mostly bitsandbytes' CPU block-wise (de)quantisation of the moments at "
        "each step; on CUDA these kernels are fused and cheap. Accuracy with 8-bit moments on the real task: "
        "[suite.md](suite.md), section \"8-bit moments\".",
        "",
    ])
    write_result("state_8bit.md", text)


if __name__ == "__main__":
    main()
