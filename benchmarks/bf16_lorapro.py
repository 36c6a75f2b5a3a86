"""LoRAProAdamW full mode on bf16 LoRA factors: what rounding each written factor to bf16 costs, on MiniLM cast to
bf16, against PEFT's default fp32 factors on the same bf16 base.

    python -m benchmarks.bf16_lorapro [--task polarity] [--steps 150] [--lr 5e-5]

With LoRA the factors are the adapter, so the model cannot drift from what ``save_pretrained`` writes (the question
``bf16_drift.py`` asks of RandLoRAAdamW); with the base's weight decay off (the default) nothing else is written.
What can go wrong is that bf16 factors, written back rounded to nearest, lose the updates smaller than half a bf16
step. Per run: train loss, test accuracy, the share of factor entries a step left bit-identical, whether any base
weight moved, agreement of the trained model's test predictions with the adapter saved by ``save_pretrained`` and
loaded onto a fresh bf16 base, optimizer state and median step time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bf16_drift import predictions
from benchmarks.common import add_thread_args, markdown_table, set_threads, write_result
from benchmarks.finetune import LEARNING_RATES, TARGETS, accuracy, batches, load_model, optimizer_state_bytes
from benchmarks.tasks import TASKS, minilm_dir

RANK = 8
LOSS_WINDOW = 25  # train loss reported as the mean over the last steps
FACTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(task, tokenizer, factor_dtype: torch.dtype, steps: int, lr: float, seed: int) -> dict:
    """LoRAProAdamW full mode on a bf16 base with LoRA factors in ``factor_dtype``: fp32 is PEFT's default
    (``autocast_adapter_dtype=True``), bf16 keeps the base's dtype (``autocast_adapter_dtype=False``)."""
    import peft

    import randopt

    torch.manual_seed(seed)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    keep_dtype = dict(autocast_adapter_dtype=factor_dtype == torch.float32)
    model = peft.get_peft_model(load_model(len(task.labels)).to(torch.bfloat16), config, **keep_dtype)
    factors = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    if {p.dtype for p in factors} != {factor_dtype}:
        raise RuntimeError(f"PEFT made factors of {({p.dtype for p in factors})}, expected {factor_dtype}")
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    optimizer = randopt.LoRAProAdamW(model, lr=lr, mode="full")
    times, losses, unchanged = [], [], []
    for inputs in batches(task, tokenizer, 32, steps, seed):
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        before = [p.detach().clone() for p in factors]
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        unchanged.append(sum((p == b).sum().item() for p, b in zip(factors, before)) / sum(p.numel() for p in factors))
    base_moved = any(not torch.equal(p, bases[n]) for n, p in model.named_parameters() if "base_layer" in n)
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        exported = peft.PeftModel.from_pretrained(load_model(len(task.labels)).to(torch.bfloat16), saved, **keep_dtype)
        agree = (predictions(model, tokenizer, task.test) == predictions(exported, tokenizer, task.test)).float().mean()
    return {"factors": str(factor_dtype).removeprefix("torch."), "loss": statistics.mean(losses[-LOSS_WINDOW:]),
            "first_loss": statistics.mean(losses[:LOSS_WINDOW]), "accuracy": accuracy(model, tokenizer, task.test),
            "unchanged": statistics.median(unchanged), "unchanged_last": statistics.mean(unchanged[-LOSS_WINDOW:]),
            "base_moved": base_moved, "agreement": agree.item(), "state_mb": optimizer_state_bytes(optimizer) / 2**20,
            "step_ms": 1000 * statistics.median(times)}


def report(results: list[dict], args, task) -> str:
    rows = [[f"lorapro_adamw_full_r{RANK}", "bfloat16", r["factors"], f"{r['first_loss']:.4f}", f"{r['loss']:.4f}",
             f"{100 * r['accuracy']:.1f}", f"{100 * r['unchanged']:.1f} / {100 * r['unchanged_last']:.1f}",
             "yes" if r["base_moved"] else "no", f"{100 * r['agreement']:.1f}", f"{r['state_mb']:.2f}",
             f"{r['step_ms']:.0f}"] for r in results]
    return "\n".join([
        "# LoRAProAdamW full mode on bf16 LoRA factors\n",
        f"MiniLM-L6 cast to bf16 on {task.name}, LoRA r{RANK} on {', '.join(TARGETS)} + head, {args.steps} steps of "
        f"batch 32, lr {args.lr:g}, seed {args.seed}; {platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; measured while other jobs shared the 2 cores (step times are indicative only). "
        f"Command: `python -m benchmarks.bf16_lorapro --task {args.task} --steps {args.steps} --lr {args.lr:g}`.\n",
        "Factors fp32: PEFT's default on a bf16 base (`autocast_adapter_dtype=True`); bf16: "
        "`get_peft_model(..., autocast_adapter_dtype=False)`. LoRAProAdamW computes in fp32 and rounds to nearest "
        f"when it writes a bf16 factor. Train loss: mean of the first / last {LOSS_WINDOW} steps. Unchanged: share "
        f"of factor entries a step left bit-identical (median over all steps / mean over the last {LOSS_WINDOW}). "
        "Agreement: test predictions of the trained model against the adapter written by `save_pretrained` and "
        "loaded onto a fresh bf16 base (with the same `autocast_adapter_dtype`).\n",
        markdown_table(["method", "base", "factors", "train loss, first", "train loss, last", "test accuracy (%)",
                        "factor entries unchanged per step (%)", "base weights moved",
                        "agreement with exported adapter (%)", "optimizer state (MiB)", "median step (ms)"], rows),
    ]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="polarity")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=LEARNING_RATES["LoRA-Pro full"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factors", default="fp32,bf16", help="comma-separated: " + ", ".join(FACTOR_DTYPES))
    parser.add_argument("--out", default="bf16_lorapro.md", help="file name under benchmarks/results")
    add_thread_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from transformers import AutoTokenizer

    task = TASKS[args.task]()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    results = []
    for name in args.factors.split(","):
        results.append(run(task, tokenizer, FACTOR_DTYPES[name], args.steps, args.lr, args.seed))
        print(results[-1], flush=True)
    write_result(args.out, report(results, args, task))


if __name__ == "__main__":
    main()
