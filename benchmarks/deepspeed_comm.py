"""DeepSpeed benchmark (issue 7): bytes communicated per step and ZeRO-2 step time, RandLoRAAdamW vs torch AdamW.

A 2-layer GPT-2 (hidden 768, 12 heads, vocabulary 8,192, random init, fp32, no dropout; the same model as
``optimizer_speed``): targets are the Conv1D weights of ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``;
biases and LayerNorms are trained with plain AdamW by both optimizers; token and position embeddings (hence the
tied LM head) are frozen. Two processes on loopback (gloo, ``DS_ACCELERATOR=cpu``), ZeRO stage 2, one intra-op
thread each, the optimizer handed to ``deepspeed.initialize`` as a client optimizer: torch ``AdamW`` (full
fine-tuning of the targets) and ``RandLoRAAdamW`` r32 (alpha 640). Rounds alternate the two optimizers.

Bytes: every collective either optimizer's run makes is counted by wrapping ``torch.distributed``'s functions
(DeepSpeed's CPU backend calls them) before DeepSpeed starts; a collective counts the size of the whole tensor it
reduces or gathers (``all_reduce``: the tensor; ``reduce_scatter``: the input; ``all_gather``: the output).

Run from the repository root: ``python -m benchmarks.deepspeed_comm [--quick]``. Writes
``benchmarks/results/deepspeed_comm.md`` (``--quick`` writes nothing unless ``--write``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .common import CollectiveWindow, launch_two_ranks, machine_line, markdown_table, median, mib, write_result

LAYERS = 2
CONFIGS = {
    "default": dict(hidden=768, heads=12, vocab=8192, batch=4, seq=128, warmup=2, steps=4, rounds=4),
    "quick": dict(hidden=128, heads=4, vocab=1024, batch=2, seq=32, warmup=1, steps=2, rounds=1),
}
TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA, LR, WEIGHT_DECAY = 32, 640.0, 1e-4, 0.01
OPTIMIZERS = ["torch AdamW", "RandLoRAAdamW r32"]


# ----- the child (one per rank, under torchrun) ----------------------------------------------------------------
def make_model(cfg: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=cfg["hidden"], n_head=cfg["heads"],
                                       vocab_size=cfg["vocab"], n_positions=cfg["seq"], bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.endswith("wte.weight") or name.endswith("wpe.weight")))
    return model


def make_optimizer(name: str, model):
    import randopt

    if name == OPTIMIZERS[0]:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    groups = randopt.param_groups(model, TARGETS, rank=RANK, alpha=ALPHA)
    return randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, rank=RANK, alpha=ALPHA)


def child(out_path: str, mode: str) -> None:
    import deepspeed
    import torch.distributed as dist

    cfg = CONFIGS[mode]
    torch.set_num_threads(1)
    window = CollectiveWindow()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=generator)
    report = {"world": world, "tokens_per_step": world * cfg["batch"] * cfg["seq"], "runs": {n: [] for n in OPTIMIZERS}}
    for round_ in range(cfg["rounds"]):
        for name in OPTIMIZERS if round_ % 2 == 0 else OPTIMIZERS[::-1]:
            model = make_model(cfg)
            optimizer = make_optimizer(name, model)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            run = {"fwd_bwd": [], "engine_step": []}
            for step in range(cfg["warmup"] + cfg["steps"]):
                if step == cfg["warmup"]:
                    window.start(optimizer)
                dist.barrier()
                start = time.perf_counter()
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                middle = time.perf_counter()
                engine.step()
                end = time.perf_counter()
                if step >= cfg["warmup"]:
                    run["fwd_bwd"].append(middle - start)
                    run["engine_step"].append(end - middle)
            run.update(window.per_step(optimizer, cfg["steps"]))
            if name != OPTIMIZERS[0]:
                run["coefficients"] = sum(s[k].numel() for s in optimizer.state.values() for k in ("lambda", "gamma")
                                          if k in s)
            report["runs"][name].append(run)
            engine.destroy()
            dist.barrier()
    model = make_model(cfg)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    report["trainable_numel"] = sum(p.numel() for _, p in trainable)
    report["target_numel"] = sum(p.numel() for n, p in trainable if n.split(".")[-2] in TARGETS and p.dim() == 2)
    if rank == 0:
        Path(out_path).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


# ----- the parent --------------------------------------------------------------------------------------------
def launch(mode: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions"))}
    return launch_two_ranks("benchmarks.deepspeed_comm", ["--mode", mode], env)


def render(report: dict, mode: str, machine: str, seconds: float) -> str:
    cfg = CONFIGS[mode]
    adamw, ours = (report["runs"][n] for n in OPTIMIZERS)
    ddp_bytes = 4 * report["trainable_numel"]
    coefficient_bytes = 4 * ours[0]["coefficients"]
    measured = median([r["optimizer_bytes"] for r in ours])
    own_dp_bytes = coefficient_bytes + 4 * (report["trainable_numel"] - report["target_numel"])
    names = sorted({k for runs in report["runs"].values() for r in runs for k in r["collectives"]})

    def per_step(runs, name, index):
        return median([r["collectives"].get(name, [0, 0])[index] for r in runs])

    lines = [
        "# DeepSpeed ZeRO-2: bytes communicated per step and step time, RandLoRAAdamW vs torch AdamW",
        "",
        f"{LAYERS}-layer GPT-2 (hidden {cfg['hidden']}, {cfg['heads']} heads, vocabulary {cfg['vocab']:,}), fp32; "
        f"targets: the Conv1D weights of {', '.join(TARGETS)} ({report['target_numel']:,} entries); "
        f"{report['trainable_numel']:,} trainable parameters (targets, biases, LayerNorms; embeddings and the tied LM "
        f"head frozen). {report['world']} processes on loopback (gloo, DS_ACCELERATOR=cpu), ZeRO stage 2, micro-batch "
        f"{cfg['batch']} x {cfg['seq']} tokens per process ({report['tokens_per_step']:,} tokens a step), one "
        f"intra-op thread per process. RandLoRAAdamW r{RANK} alpha {ALPHA:g}; torch AdamW trains the targets fully. "
        f"lr {LR:g}, weight decay {WEIGHT_DECAY:g}. {cfg['rounds']} round(s), each running both optimizers (in "
        f"alternating order) for {cfg['warmup']} warm-up + {cfg['steps']} timed steps; medians over all timed steps, "
        "and the range of the per-round medians.",
        "",
        machine + f"; deepspeed {_deepspeed_version()}; the whole run took {seconds:.0f} s, load average at the end "
        f"{os.getloadavg()[0]:.2f} (the machine is shared: step times are noisy, the per-round range shows how much)",
        "",
        "## Bytes per step (per process)",
        "",
        markdown_table(["what", "MiB per step", "vs the DDP gradient all-reduce"], [
            ["plain data parallel (DDP): all-reduce of every trainable gradient, fp32", mib(ddp_bytes), "1"],
            ["RandLoRAAdamW's optimizer path under ZeRO: one all-reduce of the coefficient gradients "
             "(lambda, gamma of every target matrix), measured",
             mib(measured), f"{measured / ddp_bytes:.4f}"],
            ["the same, computed: 4 bytes x coefficients", mib(coefficient_bytes), f"{coefficient_bytes / ddp_bytes:.4f}"],
            ["RandLoRAAdamW(data_parallel=True) without DeepSpeed, computed: coefficient gradients + the gradients "
             "of the plain (non-target) trainable parameters", mib(own_dp_bytes), f"{own_dp_bytes / ddp_bytes:.4f}"],
        ]),
        "",
        "Every collective of a ZeRO-2 step, as counted. DeepSpeed's own gradient reduction (on this CPU/gloo setup an "
        "all-reduce of the flat gradient buckets) and the all-gather of the updated weights are there whatever the "
        "optimizer, and carry full-size gradients and weights: under ZeRO, RandLoRAAdamW adds its small coefficient "
        "all-reduce (counted inside `all_reduce`) and saves nothing on DeepSpeed's traffic. Its communication "
        "saving is in its own data-parallel mode without DeepSpeed (row 4 above).",
        "",
        markdown_table(["collective", "calls (AdamW)", "MiB (AdamW)", "calls (RandLoRAAdamW)", "MiB (RandLoRAAdamW)"],
                       [[n, f"{per_step(adamw, n, 0):g}", mib(per_step(adamw, n, 1)), f"{per_step(ours, n, 0):g}",
                         mib(per_step(ours, n, 1))] for n in names]),
        "",
        "## ZeRO-2 step time (2 processes, CPU)",
        "",
    ]
    def totals(run):
        return [f + e for f, e in zip(run["fwd_bwd"], run["engine_step"])]

    rows = []
    base = median([t for r in adamw for t in totals(r)])
    for name in OPTIMIZERS:
        runs = report["runs"][name]
        total = median([t for r in runs for t in totals(r)])
        per_round = [median(totals(r)) for r in runs]
        rows.append([name, f"{1e3 * total:.0f}", f"{1e3 * min(per_round):.0f}-{1e3 * max(per_round):.0f}",
                     f"{1e3 * median([t for r in runs for t in r['fwd_bwd']]):.0f}",
                     f"{1e3 * median([t for r in runs for t in r['engine_step']]):.0f}", f"{total / base:.2f}"])
    lines += [markdown_table(["optimizer", "step ms", "per-round medians ms", "forward + backward ms",
                              "engine.step() ms", "step vs AdamW"], rows), ""]
    lines += [
        "`engine.step()` is DeepSpeed's step at the accumulation boundary: the client optimizer's step() calls (one per "
        "parameter group) plus DeepSpeed's own partition bookkeeping and the all-gather of the updated weights. "
        "RandLoRAAdamW projects only the gradient fragment each rank owns, all-reduces the coefficient gradients "
        "once per step, and writes the update into its own fragment.",
        "",
        "Wire traffic: with ring algorithms an all-reduce of S bytes sends about 2(n-1)/n S per process, a "
        "reduce-scatter or an all-gather (n-1)/n S. The coefficient all-reduce is "
        f"{measured / ddp_bytes:.2%} of a DDP gradient all-reduce of the trainable parameters.",
    ]
    return "\n".join(lines) + "\n"


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "not installed"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, one round (a smoke run)")
    parser.add_argument("--write", action="store_true", help="with --quick: write the results file anyway")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.mode)
        return
    mode = "quick" if args.quick else "default"
    torch.set_num_threads(1)  # as each benchmark process runs
    machine = machine_line(1)
    started = time.perf_counter()
    report = launch(mode)
    text = render(report, mode, machine, time.perf_counter() - started)
    print(text)
    if mode == "default" or args.write:
        print(f"wrote {write_result('deepspeed_comm.md', text)}")


if __name__ == "__main__":
    main()
