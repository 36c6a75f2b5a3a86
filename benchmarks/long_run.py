"""Long-run stability with bf16 weights: thousands of steps per method on MiniLM (gender task), side by side with
torch AdamW full fine-tuning.

    python -m benchmarks.long_run [--steps 3000] [--batch 16] [--every 250] [--methods a,b]

Every method trains the same bf16 MiniLM-L6 with a constant learning rate (no schedule hides a divergence) on the
same data order. Recorded per run: the training loss at every step (reported as means over windows of ``--every``
steps), the test accuracy every ``--every`` steps, the optimizer's non-finite counter, and for RandLoRAAdamW the
drift ``|W - round(W0 + dW)| / |dW|`` of the weights from the adapter the coefficients describe. Each method runs in
its own process, side by side; finished runs are kept in ``results/long_run.json`` so an interrupted sweep resumes, and
``results/long_run.md`` / ``long_run.png`` are rewritten from all finished runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "long_run.json"
RANDLORA_RANK, LORA_RANK = 32, 8
METHODS = ["full_ft_adamw", "randlora_adamw_stochastic", "randlora_adamw_exact", "lorapro_full"]


def build(method: str, num_labels: int):
    """``(model, optimizer, learning rate)`` with bf16 weights; the learning rates are the suite's sweep results."""
    import randopt
    from benchmarks.finetune import LEARNING_RATES, TARGETS, load_model, lora_model

    def base():
        return load_model(num_labels).to(torch.bfloat16)

    if method == "full_ft_adamw":
        model = base()
        return model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATES["full FT"])
    if method.startswith("randlora_adamw_"):
        model = base()
        groups = randopt.param_groups(model, TARGETS, rank=RANDLORA_RANK, modules_to_save=["classifier"])
        return model, randopt.RandLoRAAdamW(groups, lr=LEARNING_RATES["RandLoRA"],
                                            weight_update=method.removeprefix("randlora_adamw_"))
    if method == "lorapro_full":
        model = lora_model(base, LORA_RANK)
        return model, randopt.LoRAProAdamW(model, lr=LEARNING_RATES["LoRA-Pro full"], mode="full")
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def adapter_drift(optimizer, starting: dict) -> float:
    """``|W - round(W0 + dW)|_F / |dW|_F`` over all RandLoRA matrices: 0 when the model is its adapter."""
    from benchmarks.bf16_drift import adapter_deltas

    gap = reference = 0.0
    for p, delta in adapter_deltas(optimizer).items():
        gap += (p.double() - (starting[p].float() + delta).to(p.dtype).double()).norm().item() ** 2
        reference += delta.double().norm().item() ** 2
    return (gap / reference) ** 0.5 if reference else 0.0


def nonfinite_count(optimizer) -> int:
    return int(getattr(optimizer, "nonfinite_skips", 0))


def run(method: str, steps: int, batch: int, every: int, seed: int) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.finetune import accuracy, batches
    from benchmarks.tasks import TASKS, minilm_dir

    torch.manual_seed(seed)
    task = TASKS["gender"]()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model, optimizer = build(method, len(task.labels))
    tracks_drift = method.startswith("randlora_adamw_")
    starting = {p: p.detach().clone() for p in model.parameters() if p.requires_grad} if tracks_drift else {}
    losses, checkpoints = [], []
    started = time.process_time()
    for step, inputs in enumerate(batches(task, tokenizer, batch, steps, seed), 1):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            checkpoints.append({"step": step, "accuracy": accuracy(model, tokenizer, task.test),
                                "drift": adapter_drift(optimizer, starting) if tracks_drift else None,
                                "nonfinite": nonfinite_count(optimizer)})
            print(method, checkpoints[-1], file=sys.stderr, flush=True)
    return {"method": method, "steps": steps, "batch": batch, "every": every, "seed": seed, "losses": losses,
            "checkpoints": checkpoints, "cpu_s": time.process_time() - started,
            "nonfinite_losses": sum(not torch.isfinite(torch.tensor(x)).item() for x in losses)}


def window_means(losses: list[float], every: int) -> list[float]:
    return [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)]


def report(runs: list[dict]) -> str:
    first = runs[0]
    every = first["every"]
    lines = ["# Long-run stability with bf16 weights\n",
             f"MiniLM-L6 cast to bf16 on name -> gender, {first['steps']} steps of batch {first['batch']} (about "
             f"{first['steps'] * first['batch'] / 6400:.1f} epochs), constant learning rate (the suite's sweep "
             f"results), seed {first['seed']}, the same data order for every method; {platform.machine()}, "
             f"torch {torch.__version__}; measured while other jobs shared the 2 cores. Command: "
             f"`python -m benchmarks.long_run --steps {first['steps']} --batch {first['batch']}`.\n",
             "Methods: `full_ft_adamw` (torch AdamW on every bf16 parameter), `randlora_adamw_stochastic` / "
             f"`randlora_adamw_exact` (RandLoRAAdamW r{RANDLORA_RANK} on q, k, v, dense + head, "
             "`weight_update=...`), `lorapro_full` (LoRAProAdamW full mode on a PEFT LoRA "
             f"r{LORA_RANK} model over the bf16 base).\n",
             "## Summary\n",
             "| method | first-window loss | last-window loss | worst window after the first | final test accuracy (%) | "
             "best test accuracy (%) | non-finite losses | optimizer's non-finite counter | final drift from adapter | "
             "CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        means = window_means(r["losses"], every)
        accs = [c["accuracy"] for c in r["checkpoints"]]
        drift = r["checkpoints"][-1]["drift"]
        lines.append(f"| {r['method']} | {means[0]:.4f} | {means[-1]:.4f} | {max(means[1:] or means):.4f} | "
                     f"{100 * accs[-1]:.1f} | {100 * max(accs):.1f} | {r['nonfinite_losses']} | "
                     f"{r['checkpoints'][-1]['nonfinite']} | {'n/a' if drift is None else f'{drift:.2e}'} | "
                     f"{r['cpu_s']:.0f} |")
    lines += [f"\n## Training loss, mean over each window of {every} steps\n",
              "| steps | " + " | ".join(r["method"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    table = [window_means(r["losses"], every) for r in runs]
    for i in range(max(len(t) for t in table)):
        lines.append(f"| {i * every + 1}-{(i + 1) * every} | "
                     + " | ".join(f"{t[i]:.4f}" if i < len(t) else "" for t in table) + " |")
    lines += ["\n## Test accuracy (%) / drift from the adapter, every checkpoint\n",
              "| step | " + " | ".join(r["method"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for i, step in enumerate(c["step"] for c in max((r["checkpoints"] for r in runs), key=len)):
        cells = []
        for r in runs:
            if i >= len(r["checkpoints"]):
                cells.append("")
                continue
            c = r["checkpoints"][i]
            cells.append(f"{100 * c['accuracy']:.1f}" + ("" if c["drift"] is None else f" / {c['drift']:.2e}"))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("\n![long_run.png](long_run.png)")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        every = r["every"]
        means = window_means(r["losses"], every)
        loss_ax.plot([(i + 1) * every for i in range(len(means))], means, label=r["method"])
        acc_ax.plot([c["step"] for c in r["checkpoints"]], [100 * c["accuracy"] for c in r["checkpoints"]],
                    label=r["method"])
    loss_ax.set(xlabel="step", ylabel=f"training loss (mean of {runs[0]['every']} steps)", yscale="log")
    acc_ax.set(xlabel="step", ylabel="test accuracy (%)")
    acc_ax.legend(fontsize=8)
    fig.suptitle("bf16 MiniLM, name -> gender: long-run stability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args.steps, args.batch, args.every, args.seed)), flush=True)
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {METHODS}")
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    key = f"{args.steps}/{args.batch}/{args.seed}"
    # methods run side by side: each is single-threaded and the runs are long
    children = {method: subprocess.Popen([sys.executable, "-m", "benchmarks.long_run", "--child", method,
                                          "--steps", str(args.steps), "--batch", str(args.batch), "--every",
                                          str(args.every), "--seed", str(args.seed), "--threads", str(args.threads)],
                                         stdout=subprocess.PIPE, text=True)
                for method in methods if f"{key}/{method}" not in cache}
    for method, child in children.items():
        output, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"{method} failed with exit code {child.returncode}")
        result = next(line for line in output.splitlines() if line.startswith("RESULT "))
        cache[f"{key}/{method}"] = json.loads(result.removeprefix("RESULT "))
        RESULTS.mkdir(exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(CACHE)
    runs = [cache[f"{key}/{m}"] for m in METHODS if f"{key}/{m}" in cache]
    plot(runs, RESULTS / "long_run.png")
    text = report(runs)
    tmp = (RESULTS / "long_run.md").with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS / "long_run.md")
    print(text)


if __name__ == "__main__":
    main()
