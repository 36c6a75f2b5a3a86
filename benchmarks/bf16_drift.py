"""bf16 weights without fp32 master weights: how far RandLoRAAdamW's weights drift from the adapter its
coefficients describe, with ``weight_update="stochastic"`` and ``"exact"``, on MiniLM cast to bf16.

    python -m benchmarks.bf16_drift [--task polarity] [--steps 150] [--lr 2e-4] [--every 25]

Per run: drift ``|W - (W0 + dW)|_F / |dW|_F`` over all trained matrices every ``--every`` steps (against the exact
sum and against ``round(W0 + dW)``), test accuracy,
agreement of the trained model's test predictions with the model rebuilt as ``bf16(W0 + dW)`` (what an exported
adapter gives), optimizer state and median step time. LoRAProAdamW full mode on the same bf16 model is the
reference for a method whose model is its adapter by construction.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.finetune import (LEARNING_RATES, TARGETS, accuracy, batches, encode, load_model, lora_model,
                                 optimizer_state_bytes)
from benchmarks.tasks import TASKS, minilm_dir

RESULTS = Path(__file__).parent / "results"


def adapter_deltas(optimizer) -> dict[torch.Tensor, torch.Tensor]:
    """``dW(lambda, gamma)`` in fp32 for every RandLoRA matrix, in the weight's own layout."""
    import randopt

    deltas = {}
    for p, group, lam, gam, layer, scale in optimizer.matrices():
        delta = randopt.delta_weight(layer, lam, gam, scale, optimizer._matrix_shape(p, group))
        deltas[p] = (delta.T if group["fan_in_fan_out"] else delta).reshape(p.shape)
    return deltas


def drift(optimizer, starting: dict) -> tuple[float, float]:
    """``|W - (W0 + dW)| / |dW|`` against the exact sum, and against ``round(W0 + dW)`` in the weight's dtype (the
    model an exported adapter rebuilds); Frobenius norms over all matrices."""
    exact = rounded = reference = 0.0
    for p, delta in adapter_deltas(optimizer).items():
        exact += (p.double() - (starting[p].double() + delta.double())).norm().item() ** 2
        rounded += (p.double() - (starting[p].float() + delta).to(p.dtype).double()).norm().item() ** 2
        reference += delta.double().norm().item() ** 2
    return (exact / reference) ** 0.5, (rounded / reference) ** 0.5


@torch.no_grad()
def predictions(model, tokenizer, examples, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = [model(**{k: v for k, v in encode(tokenizer, examples[i:i + batch_size]).items() if k != "labels"})
           .logits.argmax(-1) for i in range(0, len(examples), batch_size)]
    model.train()
    return torch.cat(out)


def run_randlora(task, tokenizer, mode: str, dtype, steps: int, lr: float, every: int, seed: int) -> dict:
    import randopt

    torch.manual_seed(seed)
    model = load_model(len(task.labels)).to(dtype)
    groups = randopt.param_groups(model, TARGETS, rank=32, modules_to_save=["classifier"])
    starting = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}
    optimizer = randopt.RandLoRAAdamW(groups, lr=lr, weight_update=mode)
    curve, times = [], []
    for step, inputs in enumerate(batches(task, tokenizer, 32, steps, seed), 1):
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        if step % every == 0 or step == steps:
            curve.append((step, drift(optimizer, starting)))
    rebuilt = copy.deepcopy(model)
    by_name = {id(p): n for n, p in model.named_parameters()}
    rebuilt_params = dict(rebuilt.named_parameters())
    with torch.no_grad():
        for p, delta in adapter_deltas(optimizer).items():
            rebuilt_params[by_name[id(p)]].copy_((starting[p].float() + delta).to(dtype))
    agree = (predictions(model, tokenizer, task.test) == predictions(rebuilt, tokenizer, task.test)).float().mean()
    state = optimizer_state_bytes(optimizer)
    base = sum(s["base_weight"].numel() * s["base_weight"].element_size() for s in optimizer.state.values()
               if "base_weight" in s)
    return {"method": f"randlora_adamw_r32_{mode}", "dtype": str(dtype).removeprefix("torch."), "curve": curve,
            "accuracy": accuracy(model, tokenizer, task.test), "agreement": agree.item(),
            "state_mb": state / 2**20, "base_mb": base / 2**20, "step_ms": 1000 * statistics.median(times)}


def run_lorapro(task, tokenizer, dtype, steps: int, lr: float, seed: int) -> dict:
    import randopt

    torch.manual_seed(seed)
    model = lora_model(lambda: load_model(len(task.labels)).to(dtype))
    factor_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
    optimizer = randopt.LoRAProAdamW(model, lr=lr, mode="full")
    times = []
    for inputs in batches(task, tokenizer, 32, steps, seed):
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"method": "lorapro_adamw_full_r8", "dtype": f"{str(dtype).removeprefix('torch.')} base, "
            f"{str(factor_dtype).removeprefix('torch.')} factors", "curve": [],
            "accuracy": accuracy(model, tokenizer, task.test), "agreement": 1.0,
            "state_mb": optimizer_state_bytes(optimizer) / 2**20, "base_mb": 0.0,
            "step_ms": 1000 * statistics.median(times)}


def report(results: list[dict], args, task) -> str:
    lines = [f"# bf16 weights: drift of the model from its adapter\n",
             f"MiniLM-L6 on {task.name}, {args.steps} steps of batch 32, lr {args.lr:g} (RandLoRA) / "
             f"{LEARNING_RATES['LoRA-Pro full']:g} (LoRA-Pro), seed {args.seed}; {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; measured while other jobs shared the "
             f"2 cores (step times are indicative only). Command: `python -m benchmarks.bf16_drift --task {args.task} "
             f"--steps {args.steps} --lr {args.lr:g}`.\n",
             "Drift: `|W - (W0 + dW)|_F / |dW|_F` over all trained matrices, `dW` from the optimizer's coefficients, "
             "against the exact sum (the issue's measure: a bf16 weight cannot be closer than one rounding of "
             "`W0 + dW`, which is large against a small `dW`) and against `round(W0 + dW)` in the weight's dtype "
             "(the model an exported adapter rebuilds: 0 means the model IS its adapter). Agreement: share of test predictions equal to those of the model rebuilt as `round(W0 + dW)` "
             "(what exporting the adapter gives).\n",
             "| method | weights | final drift vs W0 + dW | final drift vs round(W0 + dW) | test accuracy (%) | agreement with adapter (%) | "
             "optimizer state (MiB) | of which W0 copy (MiB) | median step (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        final = (" | ".join(f"{x:.2e}" for x in r["curve"][-1][1]) if r["curve"]
                 else "0 (the factors are the adapter) | 0")
        lines.append(f"| {r['method']} | {r['dtype']} | {final} | {100 * r['accuracy']:.1f} | "
                     f"{100 * r['agreement']:.1f} | {r['state_mb']:.2f} | {r['base_mb']:.2f} | {r['step_ms']:.0f} |")
    curves = [r for r in results if r["curve"]]
    lines += ["\nDrift against steps (vs `W0 + dW` / vs `round(W0 + dW)`):\n",
              "| step | " + " | ".join(f"{r['method']} ({r['dtype']})" for r in curves) + " |",
              "|---|" + "---|" * len(curves)]
    for i, (step, _) in enumerate(curves[0]["curve"]):
        lines.append(f"| {step} | " + " | ".join("{:.2e} / {:.2e}".format(*r["curve"][i][1]) for r in curves) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="polarity")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=LEARNING_RATES["RandLoRA"])
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_drift.md")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    task = TASKS[args.task]()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    results = []
    for mode, dtype in (("stochastic", torch.bfloat16), ("exact", torch.bfloat16), ("stochastic", torch.float32)):
        results.append(run_randlora(task, tokenizer, mode, dtype, args.steps, args.lr, args.every, args.seed))
        print(results[-1]["method"], results[-1]["dtype"], results[-1]["curve"][-1], flush=True)
    results.append(run_lorapro(task, tokenizer, torch.bfloat16, args.steps, LEARNING_RATES["LoRA-Pro full"],
                               args.seed))
    text = report(results, args, task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
