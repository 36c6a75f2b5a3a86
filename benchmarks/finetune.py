"""The README's main job: fine-tune the offline MiniLM on a real task with randopt's optimizers and
their peers, and print/write a table of accuracy, time and optimizer-state memory.

    python -m benchmarks.finetune [--task polarity|gender] [--steps N] [--methods a,b,...] [--seeds 0,1,2] [--out F]

The table goes to ``runs/finetune/<task>-<UTC time>.md`` (untracked); ``--out benchmarks/results/finetune.md``
refreshes the committed results file on purpose.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from benchmarks.tasks import TASKS, Task, minilm_dir

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "finetune"
TARGETS = ["query", "key", "value", "dense"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def load_model(num_labels: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)


def learned_parameters(optimizer: torch.optim.Optimizer) -> int:
    """Values the optimizer learns: its parameters' sizes, except that a matrix RandLoRAAdamW trains through
    RandLoRA coefficients counts as those coefficients (lambda, gamma). Call after a step (state exists)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            total += state["lambda"].numel() + state["gamma"].numel() if "lambda" in state else p.numel()
    return total


# ----- methods: each builds (model, optimizer) from ``make_base``, a function returning a fresh base model ----
def full_ft(make_base, lr):
    model = make_base()
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def lora_model(make_base, rank=8):
    import peft

    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return peft.get_peft_model(make_base(), config)


def peft_lora(make_base, lr, rank=8):
    model = lora_model(make_base, rank)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def lorapro(make_base, lr, rank=8, mode="full", **options):
    import randopt

    model = lora_model(make_base, rank)
    return model, randopt.LoRAProAdamW(model, lr=lr, mode=mode, **options)


def randlora_adamw(make_base, lr, rank=32, **options):
    import randopt

    model = make_base()
    groups = randopt.param_groups(model, TARGETS, rank=rank, modules_to_save=["classifier"])
    return model, randopt.RandLoRAAdamW(groups, lr=lr, **options)


@dataclass
class Method:
    build: Callable
    lr: float
    note: str = ""
    kwargs: dict = field(default_factory=dict)


LEARNING_RATES = {"full FT": 5e-5, "LoRA": 1e-3, "RandLoRA": 2e-4, "LoRA-Pro full": 5e-5, "LoRA-Pro efficient": 3e-4}
"""The best of each method family's grid in the benchmark suite's sweep (``python -m benchmarks.suite --sweep``,
validation split; ``results/suite_sweep.md``); the main job and the suite both use them."""
METHODS: dict[str, Method] = {
    "full_ft_adamw": Method(full_ft, LEARNING_RATES["full FT"], "torch AdamW, all 22.7M parameters"),
    "peft_lora_r8": Method(peft_lora, LEARNING_RATES["LoRA"], "PEFT LoRA r8 + torch AdamW; q,k,v,dense + head"),
    "randlora_adamw_r32": Method(randlora_adamw, LEARNING_RATES["RandLoRA"],
                                 "RandLoRAAdamW r32; q,k,v,dense + head; plain model"),
    "lorapro_full_r8": Method(lorapro, LEARNING_RATES["LoRA-Pro full"],
                              "LoRAProAdamW full r8; PEFT LoRA r8 model (q,k,v,dense + head)", {"mode": "full"}),
}
"""Method names are identifiers: the table's rows, accepted back by ``--methods``."""


def batches(task: Task, tokenizer, batch_size: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(task.train), generator=generator)
                       for _ in range(math.ceil(steps * batch_size / len(task.train)))])
    for step in range(steps):
        chunk = [task.train[i] for i in order[step * batch_size:(step + 1) * batch_size].tolist()]
        yield encode(tokenizer, chunk)


def encode(tokenizer, examples):
    inputs = tokenizer([text for text, _ in examples], padding=True, return_tensors="pt")
    inputs["labels"] = torch.tensor([label for _, label in examples])
    return inputs


@torch.no_grad()
def accuracy(model, tokenizer, examples, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        inputs = encode(tokenizer, examples[start:start + batch_size])
        labels = inputs.pop("labels")
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(examples)


def train(model, optimizer, task: Task, tokenizer, steps: int, batch_size: int, seed: int, desc: str = "",
          position: int = 0, progress: bool = True, after_step: Callable | None = None) -> dict:
    """``steps`` optimizer steps on the seed's data order; per-step losses, wall and CPU seconds, and the
    optimizer in use at the end. ``after_step(step, steps, model, optimizer)`` (1-based ``step``) runs after each
    step, outside the timed part, and returns the optimizer for the next steps (the same one, or a new one)."""
    model.train()
    losses, step_times, cpu_times = [], [], []
    bar = tqdm(batches(task, tokenizer, batch_size, steps, seed), total=steps, desc=desc, position=position,
               leave=True, dynamic_ncols=True, disable=not progress)
    for inputs in bar:
        start, cpu = time.perf_counter(), time.process_time()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
        if after_step is not None:
            optimizer = after_step(len(losses), steps, model, optimizer)
    return {"losses": losses, "step_times": step_times, "cpu_times": cpu_times, "optimizer": optimizer}


def run(name: str, method: Method, task: Task, tokenizer, steps: int, batch_size: int, seed: int,
        position: int = 0, make_base: Callable | None = None, progress: bool = True, keep_model: bool = False) -> dict:
    """Build ``method`` on a fresh base model (MiniLM unless ``make_base`` is given), train and evaluate it.
    With ``keep_model`` the trained model is in ``result["model"]``.

    ``method.build`` returns ``(model, optimizer)`` or ``(model, optimizer, after_step)`` (see ``train``); an
    ``after_step`` with a ``summary()`` method adds its entries to the result."""
    if make_base is None:
        def make_base():
            return load_model(len(task.labels))
    torch.manual_seed(seed)
    model, optimizer, *hook = method.build(make_base, method.lr, **method.kwargs)
    after_step = hook[0] if hook else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log = train(model, optimizer, task, tokenizer, steps, batch_size, seed, f"{name} (seed {seed})", position,
                progress, after_step)
    optimizer = log["optimizer"]
    result = {"method": name, "seed": seed, "accuracy": accuracy(model, tokenizer, task.test),
              "losses": log["losses"], "train_seconds": sum(log["step_times"]),
              "step_ms": 1000 * statistics.median(log["step_times"]),
              "step_cpu_ms": 1000 * statistics.median(log["cpu_times"]),
              "state_bytes": optimizer_state_bytes(optimizer), "trainable": trainable,
              "learned": learned_parameters(optimizer), "note": method.note, "lr": method.lr}
    if hasattr(after_step, "summary"):
        result.update(after_step.summary())
    if keep_model:
        result["model"] = model
    return result


OPTIONAL_MEANS = ("step_cpu_ms", "peak_mb")


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == name]
        accs = [100 * r["accuracy"] for r in runs]
        rows.append({"method": name, "accuracy": statistics.fmean(accs),
                     "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(runs),
                     "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
                     "step_ms": statistics.fmean(r["step_ms"] for r in runs),
                     "state_mb": runs[0]["state_bytes"] / 2**20, "trainable": runs[0]["trainable"],
                     "note": runs[0]["note"]})
        for key in OPTIONAL_MEANS:  # measured by some callers only (the suite)
            values = [r[key] for r in runs if r.get(key) is not None]
            rows[-1][key] = statistics.fmean(values) if values else None
        for key in ("learned", "lr"):
            rows[-1][key] = runs[0].get(key)
    return rows


def markdown_table(rows: list[dict], baseline_accuracy: float) -> str:
    lines = ["| method | test accuracy (%) | train time (s) | median step (ms) | optimizer state (MiB) | "
             "learned parameters | lr | setup |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        acc = f"{row['accuracy']:.1f}" + (f" ± {row['accuracy_std']:.1f}" if row["seeds"] > 1 else "")
        lines.append(f"| {row['method']} | {acc} | {row['train_seconds']:.1f} | {row['step_ms']:.0f} | "
                     f"{row['state_mb']:.2f} | {row['learned'] / 1e6:.3f}M | {row['lr']:g} | {row['note']} |")
    lines.append(f"\nMajority-class accuracy on the test split: {100 * baseline_accuracy:.1f}%. Learned parameters: "
                 "the values the optimizer learns (RandLoRAAdamW: the lambda/gamma coefficients of each matrix, not "
                 "the weights it writes into). Optimizer state: every tensor in `optimizer.state` (RandLoRAAdamW: its "
                 "coefficients too; LoRA-Pro full mode: Adam moments of each adapted layer's full-size equivalent "
                 "gradient).")
    return "\n".join(lines)


def run_file(task: str) -> Path:
    """The untracked file a run's table goes to by default."""
    return RUNS / f"{task}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.md"


def quiet_third_party() -> None:
    """Keep optional dependencies' start-up chatter (bitsandbytes probing CPU kernels when PEFT imports it,
    transformers' deprecation FutureWarnings) out of the main job's output: it looks like our errors."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="polarity")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the table (default: runs/finetune/<task>-<UTC time>.md, untracked)")
    args = parser.parse_args(argv)
    quiet_third_party()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    from transformers import AutoTokenizer

    task = TASKS[args.task]()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    results = [run(name, METHODS[name], task, tokenizer, args.steps, args.batch_size, seed)
               for seed in seeds for name in names]
    majority = max(sum(l == k for _, l in task.test) for k in range(len(task.labels))) / len(task.test)
    table = markdown_table(summarise(results), majority)
    minutes = (time.perf_counter() - started) / 60
    header = (f"# Fine-tuning MiniLM-L6 on {task.name}\n\n{len(task.train)} train / {len(task.test)} test examples, "
              f"{args.steps} steps of batch {args.batch_size}, seeds {seeds}; {platform.processor() or platform.machine()}"
              f", {torch.get_num_threads()} threads, torch {torch.__version__}. Command: "
              f"`python -m benchmarks.finetune --task {args.task} --steps {args.steps} --seeds {args.seeds}`. "
              f"Training and evaluating all methods took {minutes:.1f} min of wall time (model loading included; "
              f"installation not).\n\n")
    if args.out is None:
        args.out = run_file(args.task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(header + table + "\n")
    tmp.replace(args.out)
    print("\n" + table)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
