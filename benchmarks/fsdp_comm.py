"""FSDP2 benchmark (issue 14): bytes the optimizer adds to FSDP's own communication, step time and memory per rank.

A 2-layer GPT-2 (hidden 768, 12 heads, vocabulary 8,192, random init, fp32, no dropout; the model of
``deepspeed_comm``) sharded with ``fully_shard`` (each block, then the root) on two processes on loopback (gloo, one
intra-op thread each). Targets: the Conv1D weights of ``c_attn``, ``c_proj`` and ``c_fc``; token and position
embeddings (hence the tied LM head) frozen. Runs:

- ``torch AdamW``: full fine-tuning of every trainable parameter (targets, biases, LayerNorms);
- ``RandLoRAAdamW r32`` (alpha 640) on the same trainable parameters (targets through RandLoRA);
- ``PEFT LoRA r8 + torch AdamW`` and ``LoRAProAdamW full r8`` on a PEFT LoRA model of the same targets (base frozen).

Bytes: every collective is counted by wrapping ``torch.distributed``'s functions before FSDP starts (FSDP2 calls
``all_gather_single``/``reduce_scatter_single``); a collective counts the whole tensor it reduces or gathers (the
reduce-scatter's input, the all-gather's output). The optimizer's own traffic is also read from its
``communicated`` counter. Memory: the optimizer state this rank holds (exact, in bytes) and the process's peak
resident memory (``ru_maxrss``: each run is a fresh pair of processes; on CPU it includes the Python runtime and
libraries). Step time: wall-clock and CPU time per step on a shared machine (noisy: the range over rounds is shown).

Run from the repository root: ``python -m benchmarks.fsdp_comm [--quick]``. Writes ``benchmarks/results/fsdp_comm.md``
(``--quick`` writes nothing unless ``--write``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from .common import (CollectiveWindow, launch_two_ranks, machine_line, markdown_table, median, mib, state_bytes,
                     write_result)

LAYERS = 2
CONFIGS = {
    "default": dict(hidden=768, heads=12, vocab=8192, batch=4, seq=128, warmup=2, steps=4, rounds=2),
    "quick": dict(hidden=128, heads=4, vocab=1024, batch=2, seq=32, warmup=1, steps=2, rounds=1),
}
TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA, LORA_RANK, LR, WEIGHT_DECAY = 32, 640.0, 8, 1e-4, 0.01
RUNS = ["torch AdamW", "RandLoRAAdamW r32", "PEFT LoRA r8 + torch AdamW", "LoRAProAdamW full r8"]
LORA_MODEL_RUNS = RUNS[2:]
ADDED_BYTES_TARGET = 0.02  # RandLoRAAdamW's added bytes, as a fraction of one reduce-scatter of the target gradients


# ----- the child (one per rank, under torchrun) ----------------------------------------------------------------
def make_model(cfg: dict, lora: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=cfg["hidden"], n_head=cfg["heads"],
                                       vocab_size=cfg["vocab"], n_positions=cfg["seq"], bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.endswith("wte.weight") or name.endswith("wpe.weight")))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGETS,
                                                 fan_in_fan_out=True))
    return model


def make_optimizer(name: str, model):
    import randopt

    if name == "RandLoRAAdamW r32":
        groups = randopt.param_groups(model, TARGETS, rank=RANK, alpha=ALPHA)
        return randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    if name == "LoRAProAdamW full r8":
        return randopt.LoRAProAdamW(model, lr=LR, weight_decay=WEIGHT_DECAY, mode="full")
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ == "GPT2Block":
            fully_shard(module)
    fully_shard(model)
    return model


def target_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and n.split(".")[-2] in TARGETS and p.requires_grad)


def child(out_path: str, mode: str, run_name: str) -> None:
    import torch.distributed as dist

    cfg = CONFIGS[mode]
    torch.set_num_threads(1)
    window = CollectiveWindow()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(cfg, lora=run_name in LORA_MODEL_RUNS)
    report = {"world": world, "tokens_per_step": world * cfg["batch"] * cfg["seq"],
              "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "target_numel": target_numel(make_model(cfg, lora=False))}
    model = shard(model)
    optimizer = make_optimizer(run_name, model)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=generator)
    wall, cpu, fwd_bwd = [], [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"]:
            window.start(optimizer)
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        if step >= cfg["warmup"]:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            fwd_bwd.append(middle - start)
    report.update(
        wall=wall, cpu=cpu, fwd_bwd=fwd_bwd, **window.per_step(optimizer, cfg["steps"]), state_bytes=state_bytes(optimizer), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out_path).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


# ----- the parent --------------------------------------------------------------------------------------------
def launch(mode: str, run_name: str) -> list[dict]:
    return launch_two_ranks("benchmarks.fsdp_comm", ["--mode", mode, "--optimizer", run_name], {"HF_HUB_OFFLINE": "1"},
                            timeout=1800)


def render(runs: dict[str, list[list[dict]]], mode: str, machine: str, seconds: float) -> str:
    """``runs[name]`` holds one list of per-rank reports per round."""
    cfg = CONFIGS[mode]
    first = {name: rounds[0][0] for name, rounds in runs.items()}
    target_rs = 4 * first["torch AdamW"]["target_numel"]  # one fp32 reduce-scatter of the target gradients (input)
    names = sorted({k for rounds in runs.values() for ranks in rounds for k in ranks[0]["collectives"]})
    lines = [
        "# FSDP2: bytes the optimizer adds to FSDP's communication, step time and memory per rank",
        "",
        f"{LAYERS}-layer GPT-2 (hidden {cfg['hidden']}, {cfg['heads']} heads, vocabulary {cfg['vocab']:,}), fp32, "
        f"sharded with `fully_shard` (each block, then the root) on {first['torch AdamW']['world']} processes on "
        f"loopback (gloo, CPU, one intra-op thread each); targets: the Conv1D weights of {', '.join(TARGETS)} "
        f"({first['torch AdamW']['target_numel']:,} entries); embeddings and the tied LM head frozen. Micro-batch "
        f"{cfg['batch']} x {cfg['seq']} tokens per process ({first['torch AdamW']['tokens_per_step']:,} tokens a "
        f"step). RandLoRAAdamW r{RANK} alpha {ALPHA:g} and torch AdamW train the same "
        f"{first['torch AdamW']['trainable_numel']:,} parameters; PEFT LoRA r{LORA_RANK} (torch AdamW or "
        f"LoRAProAdamW full mode) trains {first['LoRAProAdamW full r8']['trainable_numel']:,}. lr {LR:g}, weight decay "
        f"{WEIGHT_DECAY:g}. {cfg['rounds']} round(s); each run is a fresh pair of processes ({cfg['warmup']} warm-up + "
        f"{cfg['steps']} timed steps), the order of the runs reversed every other round.",
        "",
        machine + f"; the whole run took {seconds:.0f} s, load average at the end {os.getloadavg()[0]:.2f} (the "
        "machine is shared by several jobs: times are noisy, the per-round range shows how much; bytes and state "
        "sizes are exact)",
        "",
        "## Bytes the optimizer adds per step (per process)",
        "",
    ]
    ours = median([ranks[0]["optimizer_bytes"] for ranks in runs["RandLoRAAdamW r32"]])
    lorapro = median([ranks[0]["optimizer_bytes"] for ranks in runs["LoRAProAdamW full r8"]])
    met = "met" if ours / target_rs <= ADDED_BYTES_TARGET else "MISSED"
    lines += [markdown_table(["what", "MiB per step", "vs one reduce-scatter of the target gradients"], [
        ["one fp32 gradient reduce-scatter of the target weights (FSDP's, input size)", mib(target_rs), "1"],
        ["RandLoRAAdamW r32: one all-reduce of the coefficient gradients", mib(ours), f"{ours / target_rs:.4f}"],
        ["LoRAProAdamW full r8: pairs assembled from shards (factors + gradients), direction gradients",
         mib(lorapro), f"{lorapro / target_rs:.4f}"],
    ]), "",
        f"Target: RandLoRAAdamW adds at most {ADDED_BYTES_TARGET:.0%} of one reduce-scatter of the target gradients: "
        f"{ours / target_rs:.2%}, {met}. Nothing of a weight's size is gathered by either optimizer: FSDP's own "
        "all-gathers and reduce-scatters (below) are the same as under torch AdamW.",
        "",
        "Every collective of a step, as counted (per process, calls and MiB):",
        "",
        markdown_table(["collective"] + [f"{n}: calls / MiB" for n in RUNS],
                       [[c] + [f"{median([r[0]['collectives'].get(c, [0, 0])[0] for r in runs[n]]):g} / "
                                f"{mib(median([r[0]['collectives'].get(c, [0, 0])[1] for r in runs[n]]))}"
                                for n in RUNS] for c in names]),
        "",
        "## Step time and memory per rank",
        "",
    ]
    rows = []
    base_wall = median([t for ranks in runs["torch AdamW"] for r in ranks for t in r["wall"]])
    base_cpu = median([t for ranks in runs["torch AdamW"] for r in ranks for t in r["cpu"]])
    for name in RUNS:
        rounds = runs[name]
        wall = median([t for ranks in rounds for r in ranks for t in r["wall"]])
        cpu = median([t for ranks in rounds for r in ranks for t in r["cpu"]])
        per_round = [median([t for r in ranks for t in r["wall"]]) for ranks in rounds]
        optimizer_ms = median([w - f for ranks in rounds for r in ranks for w, f in zip(r["wall"], r["fwd_bwd"])])
        state = max(r["state_bytes"] for ranks in rounds for r in ranks)
        rss = max(r["peak_rss"] for ranks in rounds for r in ranks)
        rows.append([name, f"{1e3 * wall:.0f}", f"{1e3 * min(per_round):.0f}-{1e3 * max(per_round):.0f}",
                     f"{wall / base_wall:.2f}", f"{1e3 * cpu:.0f}", f"{cpu / base_cpu:.2f}", f"{1e3 * optimizer_ms:.0f}",
                     mib(state), mib(rss)])
    lines += [markdown_table(["run", "step ms (wall)", "per-round medians ms", "vs torch AdamW", "step CPU ms",
                              "CPU vs torch AdamW", "optimizer.step() ms", "optimizer state MiB per rank",
                              "peak RSS MiB per rank"], rows), ""]
    lines += [
        "Step: forward, backward (FSDP's all-gathers and reduce-scatter) and `optimizer.step()`. Optimizer state per "
        "rank: RandLoRAAdamW's coefficients and their moments are replicated (small); the moments of the plain "
        "parameters are sharded like them; LoRAProAdamW full mode keeps the `m x n` moments of every pair sharded by "
        "W's rows (each rank holds its half). Peak RSS is the whole process's high-water mark on CPU (runtime, "
        "libraries, the model before sharding), so it moves less than the state; on GPUs the state column is what "
        "changes device memory.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, one round (a smoke run)")
    parser.add_argument("--write", action="store_true", help="with --quick: write the results file anyway")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.mode, args.optimizer)
        return
    mode = "quick" if args.quick else "default"
    torch.set_num_threads(1)  # as each benchmark process runs
    machine = machine_line(1)
    started = time.perf_counter()
    runs = {name: [] for name in RUNS}
    for round_ in range(CONFIGS[mode]["rounds"]):
        for name in RUNS if round_ % 2 == 0 else RUNS[::-1]:
            runs[name].append(launch(mode, name))
    text = render(runs, mode, machine, time.perf_counter() - started)
    print(text)
    if mode == "default" or args.write:
        print(f"wrote {write_result('fsdp_comm.md', text, show=False)}")


if __name__ == "__main__":
    main()
