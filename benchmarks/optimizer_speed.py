"""Optimizer benchmark (issue 3): full training-step time, optimizer-state bytes and peak memory on a GPT-2.

A 2-layer GPT-2 (``GPT2Config``: hidden 768, 12 heads, vocabulary 8,192 so that the tied LM head does
not dominate the step; random init, fp32, no dropout) at two token counts a step, for:
torch AdamW (full fine-tuning), PEFT LoRA r32 + AdamW, PEFT RandLora r32 + AdamW, galore-torch
``GaLoreAdamW`` rank 128, and ``RandLoRAAdamW`` r32 (plain and ``fused_backward=True``). Targets are the
Conv1D weights of ``c_attn``, ``c_proj`` (attention and MLP) and ``c_fc``. Every method trains the same
non-target parameters (biases and LayerNorms, plain AdamW) and freezes the same ones (token and position
embeddings, hence the tied LM head).

Run from the repository root: ``python -m benchmarks.optimizer_speed [--quick] [--threads N]``.
Writes ``benchmarks/results/optimizer_speed.md``. Peak memory is measured in one fresh subprocess per
method and token count (``--peak-child``, internal).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings

import torch

from .common import (MIB, add_thread_args, machine_line, markdown_table, matmul_flops, median, ratio_spread,
                     set_threads, time_round_robin, write_result)

LAYERS = 2
CONFIGS = {  # hidden, heads, vocabulary, (batch, sequence) per token count
    "default": dict(hidden=768, heads=12, vocab=8192, sizes=[(8, 128), (32, 128)], repeats=[4, 3]),
    "quick": dict(hidden=256, heads=4, vocab=2048, sizes=[(2, 64), (8, 64)], repeats=[2, 2]),
}
TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, GALORE_RANK = 32, 128
LR, WEIGHT_DECAY = 1e-4, 0.01
METHODS = ["torch AdamW (full FT)", "PEFT LoRA r32 + AdamW", "PEFT RandLora r32 + AdamW", "GaLoreAdamW r128",
           "RandLoRAAdamW r32", "RandLoRAAdamW r32 fused"]
FULL, PEFT_RANDLORA, OURS, FUSED, GALORE = METHODS[0], METHODS[2], METHODS[4], METHODS[5], METHODS[3]
QUICK_PEAK_METHODS = [FULL, OURS, FUSED]
STATE_TARGET, FULL_TIME_TARGET, PEFT_TIME_TARGET = 0.05, 1.25, 0.7
PEAK_STEPS = 2  # the second step is the steady state: optimizer state exists while activations and gradients live
# a fixed mmap threshold: every allocation above 64 KiB gets its own mapping and goes back to the OS when freed,
# so RSS follows the live tensors instead of what glibc's heap keeps after a free
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def make_base_model(cfg: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=LAYERS, n_embd=cfg["hidden"], n_head=cfg["heads"], vocab_size=cfg["vocab"],
                        n_positions=max(seq for _, seq in cfg["sizes"]), bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).train()


def is_target_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and (parts[-2] in TARGETS or (parts[-2] == "base_layer" and parts[-3] in TARGETS))


def is_shared_trainable(name: str) -> bool:
    """Biases and LayerNorm parameters: trained by every method (plain AdamW)."""
    return ("lora_" not in name and "randlora_" not in name
            and (name.endswith(".bias") or ".ln_" in name or "ln_f." in name))


def set_trainable(model, train_targets: bool) -> None:
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT's adapter parameters (lora_A/B, randlora_lambda/gamma): PEFT decides
            continue
        p.requires_grad_(is_shared_trainable(name) or (train_targets and is_target_weight(name)))


def target_weights(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if is_target_weight(name)]


def build(method: str, model):
    """``(model, optimizer)`` for ``method``; ``model`` (a plain GPT-2) is wrapped in place for PEFT."""
    import randopt

    if method.startswith("PEFT"):
        import peft

        if "RandLora" in method:
            config = peft.RandLoraConfig(r=RANK, target_modules=TARGETS, fan_in_fan_out=True, randlora_dropout=0.0)
        else:
            config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, fan_in_fan_out=True,
                                     lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    set_trainable(model, train_targets=not method.startswith("PEFT"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == FULL or method.startswith("PEFT"):
        return model, torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    if method == GALORE:
        from galore_torch import GaLoreAdamW

        galore = {id(p) for p in target_weights(model)}
        groups = [{"params": [p for p in trainable if id(p) not in galore]},
                  {"params": target_weights(model), "rank": GALORE_RANK, "update_proj_gap": 200, "scale": 0.25,
                   "proj_type": "std"}]
        return model, GaLoreAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, no_deprecation_warning=True)
    # train_rest: the biases and LayerNorms set_trainable left trainable go to a plain AdamW group, as in every method
    groups = randopt.param_groups(model, TARGETS, rank=RANK, train_rest=True)
    return model, randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, fused_backward=method == FUSED)


def make_step(model, optimizer, ids, record=None):
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        start = time.process_time()
        optimizer.step()
        if record is not None:
            record.append(time.process_time() - start)
        optimizer.zero_grad(set_to_none=True)

    return step


def tensors_in(value):
    """Tensors held by an optimizer-state entry: a tensor, or an object holding tensors (GaLore's projector)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "__dict__"):
        return [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
    return []


def state_bytes(optimizer) -> tuple[int, int]:
    """``(all, moments)``: bytes of every tensor in ``optimizer.state`` and of the Adam moments among them."""
    total = moments = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            size = sum(t.numel() * t.element_size() for t in tensors_in(value))
            total += size
            moments += size if "exp_avg" in key else 0
    return total, moments


def ids_for(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


# ----- peak memory: one fresh process per method and size ---------------------------------------------------
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_child(mode: str, method: str, batch: int, seq: int, threads: int) -> dict:
    """In a fresh process: peak RSS growth over ``PEAK_STEPS`` steps, and the RSS growth after the last backward."""
    import resource

    import galore_torch  # noqa: F401  every library imported before the baseline, whatever the method
    import peft  # noqa: F401

    import randopt  # noqa: F401

    set_threads(threads)
    cfg = CONFIGS[mode]
    model, ids = make_base_model(cfg), ids_for(cfg["vocab"], batch, seq)
    gc.collect()
    was_reset = reset_peak_rss()
    baseline = rss_kib("VmRSS") if was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, optimizer = build(method, model)
    after_backward = 0
    for _ in range(PEAK_STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        after_backward = rss_kib("VmRSS")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = rss_kib("VmHWM") if was_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak": (peak - baseline) * 1024, "after_backward": (after_backward - baseline) * 1024,
            "hwm_reset": was_reset}


def measure_peaks(mode: str, jobs: list[tuple[str, int, int]], threads: int, workers: int) -> dict:
    """``{(method, tokens): result}`` of ``peak_child`` run in fresh processes, ``workers`` at a time (only
    memory is measured there, so running side by side does not change the numbers)."""
    from concurrent.futures import ThreadPoolExecutor

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(job):
        method, batch, seq = job
        command = [sys.executable, "-m", "benchmarks.optimizer_speed", "--peak-child", method, "--batch", str(batch),
                   "--seq", str(seq), "--threads", str(threads)] + (["--quick"] if mode == "quick" else [])
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
        if done.returncode:
            raise RuntimeError(f"peak-memory child for {method} failed:\n{done.stderr[-2000:]}")
        return (method, batch * seq), json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(run, jobs))


# ----- matrix products of RandLoRAAdamW's step -----------------------------------------------------------------
def counted_step(model, optimizer, ids) -> tuple[int, int]:
    """One training step with its matrix-product flops counted: ``(forward + backward, optimizer.step)``."""
    backward = matmul_flops(lambda: model(input_ids=ids, labels=ids).loss.backward())
    step = matmul_flops(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return backward, step


def counting_step(model, optimizer, ids) -> tuple[dict, int, int]:
    """One plain ``RandLoRAAdamW`` step whose matrix products are counted: first for each block-0 target matrix
    alone (the other gradients set to None), then for the whole step.
    Returns ``({name: (shape, flops)}, step total, forward + backward)``."""
    backward = matmul_flops(lambda: model(input_ids=ids, labels=ids).loss.backward())
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    per_matrix = {}
    for name, p in model.named_parameters():
        if is_target_weight(name) and name.startswith("transformer.h.0."):
            for q in grads:
                q.grad = grads[q] if q is p else None
            per_matrix[name.removeprefix("transformer.h.0.")] = (tuple(p.shape), matmul_flops(optimizer.step))
    for q in grads:
        q.grad = grads[q]
    total = matmul_flops(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return per_matrix, total, backward


def expected_flops(shape, rank: int = RANK) -> int:
    """Two products of ``d x rN x D`` (projection ``B^T G`` and write-back ``B @ dAhat``), 2 flops a multiply-add."""
    d, D = sorted(shape)
    return 2 * 2 * d * rank * math.ceil(d / rank) * D


# ----- profile of opt.step() -------------------------------------------------------------------------------------
def profile_step(model, optimizer, ids, rows: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    model(input_ids=ids, labels=ids).loss.backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("Optimizer.")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    table = [[e.key, str(e.input_shapes[:2]).replace("|", "/"), e.count, round(e.self_cpu_time_total / 1e3, 1),
              f"{100 * e.self_cpu_time_total / total:.0f}%"] for e in events[:rows]]
    products = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return (f"total self CPU time of the ops: {total / 1e3:.0f} ms, of which matrix products "
            f"{100 * products / total:.0f}%\n\n"
            + markdown_table(["op", "input shapes", "calls", "self ms", "share"], table))


# ----- the run -----------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="hidden 256, 128 and 512 tokens, 2 rounds (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per token count")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--peak-all-sizes", action="store_true",
                        help="peak memory at every token count (default: the smaller one only)")
    parser.add_argument("--peak-workers", type=int, default=2, help="peak-memory subprocesses run side by side")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    add_thread_args(parser)
    args = parser.parse_args(argv)
    quiet()
    mode = "quick" if args.quick else "default"
    cfg = CONFIGS[mode]
    if args.peak_child:
        print(json.dumps(peak_child(mode, args.peak_child, args.batch, args.seq, args.threads)))
        return
    set_threads(args.threads)
    started = time.perf_counter()
    machine = machine_line(args.threads)
    repeats = [args.repeats] * len(cfg["sizes"]) if args.repeats else cfg["repeats"]

    base = make_base_model(cfg)
    models, optimizers = {}, {}
    for method in METHODS:
        models[method], optimizers[method] = build(method, copy.deepcopy(base))
    times, opt_seconds, first_step, flops, method_flops = {}, {}, {}, {}, {}
    for size_index, ((batch, seq), reps) in enumerate(zip(cfg["sizes"], repeats)):
        tokens = batch * seq
        ids = ids_for(cfg["vocab"], batch, seq)
        steps = {}
        for method in METHODS:
            opt_seconds[method, tokens] = []
            steps[method] = make_step(models[method], optimizers[method], ids, opt_seconds[method, tokens])
        # untimed steps. At the first size one per method, the warm-up: optimizer state is created, GaLore computes
        # its projections (an SVD per matrix, repeated every 200 steps) and every method's matrix products are
        # counted. At every size RandLoRAAdamW's step is counted matrix by matrix.
        for method in METHODS:
            if size_index and method != OURS:
                continue
            start = time.perf_counter()
            if method == OURS:
                per_matrix, step_flops, backward = counting_step(models[method], optimizers[method], ids)
                flops[tokens] = per_matrix, step_flops
                method_flops.setdefault(method, (backward, step_flops))
            else:
                method_flops[method] = counted_step(models[method], optimizers[method], ids)
            first_step.setdefault(method, time.perf_counter() - start)
        times[tokens] = time_round_robin(steps, repeats=reps, warmup=0)
        print(f"timed {tokens} tokens: " + ", ".join(f"{m} {median(t) * 1e3:.0f} ms"
                                                      for m, t in times[tokens].wall.items()), flush=True)
    states = {method: state_bytes(optimizers[method]) for method in METHODS}
    profile_text = profile_step(models[OURS], optimizers[OURS], ids_for(cfg["vocab"], *cfg["sizes"][0]))
    del models, optimizers
    gc.collect()

    peaks = {}
    if not args.no_peak:
        sizes = cfg["sizes"] if args.peak_all_sizes else cfg["sizes"][:1]
        methods = QUICK_PEAK_METHODS if args.quick else METHODS  # each fresh process costs its imports
        peaks = measure_peaks(mode, [(m, b, s) for b, s in sizes for m in methods], args.threads, args.peak_workers)
        print("peak memory measured", flush=True)

    text = report(args, cfg, machine, repeats, times, opt_seconds, first_step, states, peaks, flops, method_flops,
                  base, profile_text, time.perf_counter() - started)
    write_result("optimizer_speed.md", text)


def ratio_text(times, method, reference) -> str:
    mid, low, high = ratio_spread(times, method, reference)
    return f"{mid:.2f} ({low:.2f}-{high:.2f})"


def report(args, cfg, machine, repeats, times, opt_seconds, first_step, states, peaks, flops, method_flops, base,
           profile_text, elapsed) -> str:
    token_counts = list(times)
    small, big = token_counts[0], token_counts[-1]
    full_state = states[FULL][0]
    targets = target_weights(base)
    target_numel = sum(p.numel() for p in targets)
    shared_numel = sum(p.numel() for n, p in base.named_parameters() if is_shared_trainable(n))
    grad_bytes = target_numel * 4
    opt_ms = {key: median(values) * 1e3 for key, values in opt_seconds.items()}

    time_tables = []
    for tokens in token_counts:
        t = times[tokens]
        rows = [[method, round(median(t.wall[method]) * 1e3), round(median(t.cpu[method]) * 1e3),
                 round(opt_ms[method, tokens], 1), ratio_text(t.cpu, method, FULL), ratio_text(t.wall, method, FULL),
                 ratio_text(t.cpu, method, PEFT_RANDLORA), ratio_text(t.wall, method, PEFT_RANDLORA)]
                for method in METHODS]
        time_tables += [f"{tokens:,} tokens a step:", "",
                        markdown_table(["method", "wall ms", "CPU ms", "opt.step CPU ms", "x full FT (CPU)",
                                        "x full FT (wall)", "x PEFT RandLora (CPU)", "x PEFT RandLora (wall)"], rows),
                        ""]

    peak_tokens = sorted({tokens for _, tokens in peaks})
    memory_headers = ["method", "state bytes (all tensors)", "of which moments", "% of full-FT AdamW"]
    for tokens in peak_tokens:
        memory_headers += [f"{tokens:,} tok: peak MiB", "below full FT", "after backward MiB"]
    memory_rows = []
    for method in METHODS:
        total, moments = states[method]
        row = [method, f"{total:,}", f"{moments:,}", f"{100 * total / full_state:.2f}%"]
        for tokens in peak_tokens:
            if (method, tokens) not in peaks:
                row += ["-", "-", "-"]
                continue
            result, full = peaks[method, tokens], peaks[FULL, tokens]
            row += [round(result["peak"] / MIB, 1), round((full["peak"] - result["peak"]) / MIB, 1),
                    round(result["after_backward"] / MIB, 1)]
        memory_rows.append(row)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    verdicts = []
    for method in (OURS, FUSED):
        share = states[method][0] / full_state
        verdicts.append(f"- optimizer state <= {STATE_TARGET:.0%} of AdamW's, {method}: {share:.2%} -> "
                        f"{verdict(share <= STATE_TARGET)}")
    def time_verdict(what, tokens, method, reference, limit):
        cpu, wall = (ratio_spread(getattr(times[tokens], kind), method, reference)[0] for kind in ("cpu", "wall"))
        ok = {cpu <= limit, wall <= limit}
        result = verdict(True) if ok == {True} else verdict(False) if ok == {False} else "met on CPU time only" \
            if cpu <= limit else "met on wall time only"
        return (f"- step time <= {limit}x {what} at {tokens:,} tokens, {method}: {cpu:.2f}x CPU, {wall:.2f}x wall "
                f"-> {result}")

    for method in (OURS, FUSED):
        verdicts.append(time_verdict("full-FT AdamW's", big, method, FULL, FULL_TIME_TARGET))
    for method in (OURS, FUSED):
        for tokens in token_counts:
            verdicts.append(time_verdict("PEFT RandLora's", tokens, method, PEFT_RANDLORA, PEFT_TIME_TARGET))
    for tokens in token_counts:
        cpu = ratio_spread(times[tokens].cpu, FULL, PEFT_RANDLORA)[0]
        verdicts.append(f"- for scale, full FT itself (autograd's weight gradients, no projection) at {tokens:,} "
                        f"tokens: {cpu:.2f}x PEFT RandLora's CPU time; RandLoRAAdamW adds its two products per matrix "
                        f"({method_flops[OURS][1] / 1e9:.1f} GFLOP a step) on top of full FT's forward and backward")
    for tokens in peak_tokens:
        below = peaks[FULL, tokens]["peak"] - peaks[FUSED, tokens]["peak"]
        verdicts.append(f"- fused_backward peak below full FT's by >= the weight gradients "
                        f"({grad_bytes / MIB:.1f} MiB) at {tokens:,} tokens: {below / MIB:.1f} MiB below -> "
                        f"{verdict(below >= grad_bytes)}")
        saved = peaks[OURS, tokens]["after_backward"] - peaks[FUSED, tokens]["after_backward"]
        below_plain = peaks[OURS, tokens]["peak"] - peaks[FUSED, tokens]["peak"]
        verdicts.append(f"  (fused vs plain RandLoRAAdamW at {tokens:,} tokens: peak {below_plain / MIB:.1f} MiB "
                        f"lower; after backward, where the weight gradients live, {saved / MIB:.1f} MiB less)")

    # matrix products of whole steps; forward + backward is linear in the batch (same sequence length)
    scale = big // small
    flop_rows = []
    peft_total = {tokens: method_flops[PEFT_RANDLORA][0] * tokens // small + method_flops[PEFT_RANDLORA][1]
                  for tokens in token_counts}
    projection = method_flops[OURS][1] - method_flops[FUSED][1]  # counted in the fused mode's backward
    for method in METHODS:
        backward, step = method_flops[method]
        fixed = projection if method == FUSED else 0
        row = [method, round(backward / 1e9, 1), round(step / 1e9, 1)]
        for tokens in token_counts:
            total = (backward - fixed) * tokens // small + fixed + step
            row += [round(total / 1e9, 1), f"{total / peft_total[tokens]:.2f}"]
        flop_rows.append(row)
    step_flop_headers = ["method", f"fwd+bwd GFLOP at {small:,} tok", "opt.step GFLOP"]
    for tokens in token_counts:
        step_flop_headers += [f"step GFLOP at {tokens:,} tok", "x PEFT RandLora"]

    expected_total = sum(expected_flops(tuple(p.shape)) for p in targets)
    flop_headers = ["matrix (block 0)", "stored shape", "d", "D", "rN", "expected: 2 x 2*d*rN*D"]
    flop_headers += [f"measured at {tokens:,} tok" for tokens in token_counts]
    matrix_rows = []
    for name, (shape, _) in flops[small][0].items():
        d, D = sorted(shape)
        matrix_rows.append([name, f"{shape[0]}x{shape[1]}", d, D, RANK * math.ceil(d / RANK),
                          f"{expected_flops(shape):,}"] + [f"{flops[t][0][name][1]:,}" for t in token_counts])
    matrix_rows.append([f"whole step ({len(targets)} matrices)", "", "", "", "", f"{expected_total:,}"]
                     + [f"{flops[t][1]:,}" for t in token_counts])

    (batch0, seq0), (batch1, seq1) = cfg["sizes"][0], cfg["sizes"][-1]
    vocab, hidden = cfg["vocab"], cfg["hidden"]
    galore_extra = first_step[GALORE] - median(times[small].wall[GALORE])
    lines = [
        "# Optimizers on a 2-layer GPT-2: step time, optimizer state, peak memory",
        "",
        f"{'QUICK RUN (smoke test on a smaller model; not the benchmark). ' if args.quick else ''}"
        f"`GPT2Config(n_layer={LAYERS}, n_embd={hidden}, n_head={cfg['heads']}, vocab_size={vocab:,})`, random init, "
        f"fp32, no dropout. The vocabulary is {vocab:,} rather than GPT-2's 50,257 so that the tied {vocab:,}x{hidden} "
        f"LM head does not dominate the step. Tokens a step: {batch0}x{seq0} = {batch0 * seq0:,} and {batch1}x{seq1} "
        f"= {batch1 * seq1:,} (same sequence length, so attention's share stays the same and the token count scales "
        "the linear layers).",
        "",
        f"Targets: the Conv1D weights of {', '.join(TARGETS)} (attention and MLP `c_proj`), {len(targets)} matrices, "
        f"{target_numel:,} entries ({grad_bytes / MIB:.1f} MiB of fp32 weight gradients). Every method also trains "
        f"the same {shared_numel:,} biases and LayerNorm parameters with plain AdamW, and freezes the token and "
        "position embeddings (so the tied LM head too). lr 1e-4, weight decay 0.01 everywhere. "
        "Full FT: `torch.optim.AdamW` (defaults) on targets + biases + LayerNorms. "
        "PEFT LoRA: r 32, alpha 64; PEFT RandLora: r 32, PEFT's defaults (alpha 640, bases as PEFT creates them); "
        f"both with `torch.optim.AdamW`. GaLoreAdamW (galore-torch): rank {GALORE_RANK}, update_proj_gap 200, "
        "scale 0.25, 'std' projection on the target weights, the other parameters in a plain group, as galore-torch's "
        "README shows. RandLoRAAdamW: `randopt.param_groups(model, targets, rank=32, train_rest=True)` (alpha 640; the biases and LayerNorms in a plain AdamW group), plain model.",
        "",
        "Step = forward + cross-entropy + backward + `optimizer.step()` + `zero_grad(set_to_none=True)`. After one "
        f"untimed step per method (the warm-up, at {small:,} tokens), {' and '.join(str(r) for r in repeats)} timed "
        "rounds per token count that interleave the "
        "methods in a rotating order (`benchmarks.common.time_round_robin`). Step ms: median; ratios: median "
        "(min-max) over rounds of same-round ratios, so both sides of a ratio saw the same machine load. Wall: "
        "`time.perf_counter`; CPU: `time.process_time` of this process, which leaves out the time other processes "
        "hold the cores (the cleaner measure of work on this shared machine with one intra-op thread). "
        "`opt.step CPU ms`: the optimizer call alone, median CPU time (with `fused_backward` the projection runs "
        "inside backward).",
        "",
        machine + f"; run took {elapsed:.0f} s",
        "",
        "## Step time",
        "",
        *time_tables,
        "GaLore's first step (an SVD of every target gradient, repeated every 200 steps) took "
        f"{first_step[GALORE]:.1f} s, {galore_extra:.1f} s more than its median step at {small:,} tokens: about "
        f"{galore_extra / 200 * 1e3:.0f} ms a step amortised, not included above.",
        "",
        "Matrix-product flops of one step (`benchmarks.common.matmul_flops`, counted in the untimed step at "
        f"{small:,} tokens; at {big:,} tokens forward + backward is {scale} x that, as the batch is {scale} x larger "
        "at the same sequence length, and the optimizer's products do not change, nor do the fused mode's "
        "projections in backward). GaLore's SVD is not a matrix product and is not counted. With `fused_backward` "
        "the projection is counted in backward. The flop ratio is what the time ratio would be if every product ran "
        "at the same speed and nothing else cost time:",
        "",
        markdown_table(step_flop_headers, flop_rows),
        "",
        "## Optimizer state and peak memory",
        "",
        markdown_table(memory_headers, memory_rows),
        "",
        "State bytes: every tensor in `optimizer.state` (GaLore: also its projector's orthogonal matrices; "
        "RandLoRAAdamW: the coefficients lambda and gamma, their moments, counters and the bases' fingerprint). "
        "RandLoRAAdamW's shared random bases are held by the optimizer outside its state (regenerated from a seed, "
        "never saved); PEFT's adapter weights and bases live in the model. Both count in the memory columns.",
        "",
        "Memory columns: for each method and size a fresh Python process imports every library, builds the plain "
        "GPT-2 and the batch, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` = 5) and takes the current "
        f"RSS as the baseline, then builds the method (PEFT wrapping, optimizer, bases) and runs {PEAK_STEPS} steps. "
        "Peak: `VmHWM` minus the baseline (`ru_maxrss` minus the baseline where the mark cannot be reset). "
        f"After backward: RSS minus the baseline right after the last step's backward, before `opt.step()` "
        "(gradients and optimizer state alive, activations freed). The processes run with "
        f"`{' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())}` so that every tensor has its own mapping and "
        "freed memory leaves the RSS (otherwise glibc's heap keeps it and the numbers depend on allocation "
        f"history); up to {args.peak_workers} run side by side (memory only is measured there). Every column "
        "includes a few tens of MiB that the first forward adds in any method (lazy imports, kernel caches); "
        "compare columns. " + ("Measured at every token count." if args.peak_all_sizes else
                               f"Measured at {small:,} tokens (`--peak-all-sizes` for every token count)")
        + (f"; the quick run measures {', '.join(QUICK_PEAK_METHODS)} only." if args.quick else "."),
        "",
        "## Targets",
        "",
        *verdicts,
        "",
        "## RandLoRAAdamW's extra matrix products",
        "",
        "Matrix-product flops (`benchmarks.common.matmul_flops`: `FlopCounterMode`, 2 flops a multiply-add) of "
        "one plain `RandLoRAAdamW.step()` with only that matrix's gradient present (the others None), after a "
        "backward at each token count; last row: the whole step. Expected per matrix: the projection `B^T G` and "
        "the write-back `B @ (Ahat_new - Ahat_old)`, each a `D x rN x d` product, `rN = r * ceil(d / r)` "
        "(= d here, so each is a d x d x D product); nothing in the step depends on the token count. "
        "With `fused_backward` the projection moves into backward's hooks and the write-back stays in the step: "
        "the same two products.",
        "",
        markdown_table(flop_headers, matrix_rows),
        "",
        "## Where `RandLoRAAdamW.step()` spends its time",
        "",
        f"`opt.step()` median CPU time: {opt_ms[OURS, small]:.0f} ms at {small:,} tokens and "
        f"{opt_ms[OURS, big]:.0f} ms at {big:,} tokens (fused: {opt_ms[FUSED, small]:.0f} / "
        f"{opt_ms[FUSED, big]:.0f} ms; torch AdamW: {opt_ms[FULL, small]:.0f} / {opt_ms[FULL, big]:.0f} ms). "
        "One profiled plain step (`torch.profiler`, CPU, "
        f"after a backward at {small:,} tokens), top ops by self time:",
        "",
        profile_text,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
