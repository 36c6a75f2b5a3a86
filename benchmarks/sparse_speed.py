"""Sparse ternary bases as sparse work: kernels, RandLoRAAdamW's step, the module route, step time against tokens.

Run from the repository root: ``python -m benchmarks.sparse_speed [--quick] [--threads N] [--part NAME ...]``.
Writes ``benchmarks/results/sparse_speed.md`` (kernels, optimizer, module route, bases memory, profiles) and
``benchmarks/results/step_time_vs_tokens.md`` + ``.png``, and puts a "Sparse bases" section (between markers)
into ``optimizer_speed.md`` and ``layer_speed.md``. Everything is measured side by side in one process,
methods interleaved (``benchmarks.common.time_round_robin``); CPU time of this process, one intra-op thread.
"""
from __future__ import annotations

import copy
import json
import re
import time

import torch
from torch import nn

from randopt import RandLoRAAdamW, param_groups
from randopt.randlora import inject_randlora, make_bases
from randopt.randlora.sparse import SPARSE_COST

from .common import (MIB, RESULTS_DIR, machine_line, markdown_table, median, ratio_spread, step_benchmark_args,
                     time_round_robin, training_steps, write_result)
from .layer_speed import OneLinear

RANK = 32
KINDS = ("dense", "sparse", "very_sparse")
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LAYER_SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (out, in)
TOKEN_COUNTS = [128, 256, 512, 1024, 2048, 4096, 8192]
PARTS = ("kernels", "optimizer", "module", "profiles", "tokens")
SECTION = re.compile(r"\n<!-- sparse-bases -->.*<!-- /sparse-bases -->\n", re.S)
CACHE = RESULTS_DIR / "sparse_speed.json"


def cpu_ms(f, repeats: int) -> float:
    f()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        f()
        best = min(best, time.process_time() - start)
    return best * 1e3


# ----- kernels ----------------------------------------------------------------------------------------------------
def kernels(repeats: int) -> dict:
    """Throughput of a dense ``mm`` and of ``torch.sparse`` CSR x dense for the products RandLoRA makes."""
    layer = make_bases((3072, 768), RANK, kind="very_sparse").layer(3072, 768)
    compact = layer.stored_B
    dense_B = layer.B
    basis, grad = torch.randn(768, 768), torch.randn(3072, 768)
    rows = []
    for name, dense_call, sparse_call in [
            ("B @ Ahat (3072x768 @ 768x768)", lambda: dense_B @ basis, lambda: compact.matmul(basis)),
            ("B^T @ G (768x3072 @ 3072x768)", lambda: dense_B.T @ grad, lambda: compact.t_matmul(grad))]:
        dense_ms, sparse_ms = cpu_ms(dense_call, repeats), cpu_ms(sparse_call, repeats)
        dense_rate = 3072 * 768 * 768 / dense_ms / 1e6
        sparse_rate = compact.nnz * 768 / sparse_ms / 1e6
        rows.append([name, f"{compact.nnz / (3072 * 768):.4f}", f"{dense_ms:.1f}", f"{sparse_ms:.1f}",
                     f"{dense_rate:.1f}", f"{sparse_rate:.1f}", f"{dense_rate / sparse_rate:.1f}"])
    return {"rows": rows}


# ----- RandLoRAAdamW on a 2-layer GPT-2 ---------------------------------------------------------------------------
def gpt2(vocab: int = 8192):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.transformer.wte.requires_grad_(False)
    model.transformer.wpe.requires_grad_(False)
    return model


def optimizer_runs(kinds) -> dict:
    runs = {}
    model = gpt2()
    runs["torch AdamW (full FT)"] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                              lr=1e-4))
    for kind in kinds:
        model = gpt2()
        runs[f"RandLoRAAdamW {kind}"] = (model, RandLoRAAdamW(param_groups(model, GPT2_TARGETS, rank=RANK,
                                                                          basis_kind=kind, train_rest=True), lr=1e-4))
    return runs


def optimizer_part(repeats: int, tokens: int = 1024) -> dict:
    runs = optimizer_runs(KINDS)
    ids = torch.randint(0, 8192, (tokens // 128, 128), generator=torch.Generator().manual_seed(1))
    steps, step_cpu = training_steps(runs, ids)
    timings = time_round_robin(steps, repeats=repeats, warmup=1)
    for name in step_cpu:
        step_cpu[name] = step_cpu[name][-repeats:]
    bases = {kind: runs[f"RandLoRAAdamW {kind}"][1]._bases[(RANK, 0, kind)] for kind in KINDS}
    dense_bytes = bases["dense"].nbytes
    return {"tokens": tokens, "cpu": timings.cpu, "wall": timings.wall, "step_cpu": step_cpu,
            "bases_bytes": {kind: b.nbytes for kind, b in bases.items()}, "dense_bytes": dense_bytes,
            "storage": {kind: type(b.stored_B).__name__ for kind, b in bases.items()}}


def profile_step(kind: str, tokens: int = 1024, top: int = 8) -> list[list]:
    """Top ops (self CPU time) of one ``RandLoRAAdamW.step()`` after a backward, grouped by op and input shapes."""
    from torch.profiler import ProfilerActivity, profile

    model = gpt2()
    opt = RandLoRAAdamW(param_groups(model, GPT2_TARGETS, rank=RANK, basis_kind=kind), lr=1e-4)
    ids = torch.randint(0, 8192, (tokens // 128, 128), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if _ == 0:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [[e.key, str(e.input_shapes)[:70], e.count, f"{e.self_cpu_time_total / 1e3:.1f}",
             f"{100 * e.self_cpu_time_total / total:.0f}%"] for e in events[:top]]
    return [[f"total self CPU ms of aten ops: {total / 1e3:.0f}", "", "", "", ""]] + rows


# ----- module route on one layer ----------------------------------------------------------------------------------
def peft_randlora(base: nn.Module, bases, very_sparse: bool) -> nn.Module:
    import peft

    config = peft.RandLoraConfig(r=RANK, target_modules=["lin"], init_weights=False, very_sparse=very_sparse)
    model = peft.get_peft_model(base, config).to(torch.float32)
    for module in model.modules():
        if hasattr(module, "randlora_A") and hasattr(module.randlora_A, "keys"):
            for key in module.randlora_A.keys():  # the same bases as ours (PEFT multiplies them densely)
                module.randlora_A[key], module.randlora_B[key] = bases.A.clone(), bases.B.clone()
    return model


def module_part(repeats: int, tokens: int = 1024) -> dict:
    results = {}
    for out_features, in_features in LAYER_SHAPES:
        torch.manual_seed(0)
        base = OneLinear(out_features, in_features)
        x = torch.randn(tokens, in_features, requires_grad=True)
        grad_y = torch.randn(tokens, out_features)
        steps = {}
        for kind in ("dense", "very_sparse"):
            bases = make_bases((out_features, in_features), RANK, kind=kind)
            models = {f"PEFT RandLora {kind}": peft_randlora(copy.deepcopy(base), bases, kind == "very_sparse"),
                      f"ours {kind}": inject_randlora(copy.deepcopy(base), ["lin"], rank=RANK, bases=bases,
                                                      init_weights=False)}
            for name, model in models.items():
                def step(model=model):
                    x.grad = None
                    model(x).backward(grad_y)
                    for p in model.parameters():
                        p.grad = None

                steps[name] = step
        timings = time_round_robin(steps, repeats=repeats, warmup=1)
        results[f"{out_features}x{in_features}"] = {"cpu": timings.cpu, "wall": timings.wall}
    return results


# ----- step time against tokens -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """GPT-2's MLP block (768 -> 3072 -> 768, GELU): one matrix of each orientation."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(768, 3072), nn.Linear(3072, 768)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x)))


TOKEN_METHODS = ["full FT (AdamW)", "PEFT LoRA r32", "PEFT RandLora r32", "RandLoRAAdamW dense",
                 "RandLoRAAdamW very_sparse", "module route dense", "module route very_sparse"]


def token_run(method: str):
    import peft

    torch.manual_seed(0)
    model = MLP()
    targets = ["c_fc", "c_proj"]
    if method.startswith("full FT"):
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)
    if method.startswith("RandLoRAAdamW"):
        kind = method.split()[-1]
        return model, RandLoRAAdamW(param_groups(model, targets, rank=RANK, basis_kind=kind), lr=1e-4)
    if method.startswith("module route"):
        inject_randlora(model, targets, rank=RANK, kind=method.split()[-1], init_weights=False)
    else:
        config = (peft.LoraConfig(r=RANK, lora_alpha=64, target_modules=targets) if "LoRA" in method else
                  peft.RandLoraConfig(r=RANK, target_modules=targets, init_weights=False))
        model = peft.get_peft_model(model, config).to(torch.float32)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def tokens_part(repeats: int, token_counts) -> dict:
    runs = {method: token_run(method) for method in TOKEN_METHODS}
    results = {}
    for tokens in token_counts:
        x = torch.randn(tokens, 768, generator=torch.Generator().manual_seed(tokens))
        opt_cpu = {method: [] for method in runs}
        steps = {}
        for method, (model, opt) in runs.items():
            def step(model=model, opt=opt, record=opt_cpu[method]):
                opt.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                start = time.process_time()
                opt.step()
                record.append(time.process_time() - start)

            steps[method] = step
        # the first token count warms every method up; later ones reuse the warm code paths
        timings = time_round_robin(steps, repeats=repeats, warmup=1 if tokens == token_counts[0] else 0)
        results[tokens] = {"cpu": timings.cpu, "step_cpu": {m: v[-repeats:] for m, v in opt_cpu.items()}}
        print(f"tokens {tokens}: " + ", ".join(f"{m} {median(timings.cpu[m]) * 1e3:.0f} ms" for m in runs), flush=True)
    return results


# ----- reports ----------------------------------------------------------------------------------------------------
def optimizer_table(data: dict) -> tuple[str, dict]:
    cpu, step_cpu = data["cpu"], data["step_cpu"]
    full = "torch AdamW (full FT)"
    rows, check = [], {}
    for name in cpu:
        kind = name.split()[-1] if name.startswith("RandLoRAAdamW") else None
        step_ratio = ratio_spread(step_cpu, name, "RandLoRAAdamW dense") if kind else None
        whole = ratio_spread(cpu, name, full)
        bases = (f"{data['bases_bytes'][kind] / MIB:.2f} ({data['bases_bytes'][kind] / data['dense_bytes']:.1%})"
                 if kind else "")
        rows.append([name, f"{median(cpu[name]) * 1e3:.0f}", f"{median(data['wall'][name]) * 1e3:.0f}",
                     f"{median(step_cpu[name]) * 1e3:.1f}",
                     f"{step_ratio[0]:.2f} ({step_ratio[1]:.2f}-{step_ratio[2]:.2f})" if kind else "",
                     f"{whole[0]:.2f} ({whole[1]:.2f}-{whole[2]:.2f})", bases,
                     data["storage"][kind] if kind else ""])
        if kind:
            check[kind] = {"step": step_ratio[0], "whole": whole[0],
                           "bases": data["bases_bytes"][kind] / data["dense_bytes"]}
    headers = ["method", "step CPU ms", "step wall ms", "opt.step CPU ms", "opt.step x dense bases",
               "step x full FT (CPU)", "bases MiB (of dense fp32)", "B stored as"]
    return markdown_table(headers, rows), check


def module_table(data: dict) -> tuple[str, dict]:
    rows, check = [], {}
    for case, result in data.items():
        cpu = result["cpu"]
        for kind in ("dense", "very_sparse"):
            for name in (f"PEFT RandLora {kind}", f"ours {kind}"):
                mid, low, high = ratio_spread(cpu, name, f"PEFT RandLora {kind}")
                rows.append([case, name, f"{median(cpu[name]) * 1e3:.1f}", f"{median(result['wall'][name]) * 1e3:.1f}",
                             f"{mid:.2f} ({low:.2f}-{high:.2f})"])
        check[case] = ratio_spread(cpu, "ours very_sparse", "PEFT RandLora very_sparse")[0]
    return markdown_table(["layer (out x in)", "method", "CPU ms", "wall ms", "x PEFT RandLora, same bases"],
                          rows), check


def basis_dominated_until(results: dict, method: str) -> int | None:
    """The largest token count at which ``method``'s step is dominated by its basis products. RandLoRAAdamW: its
    ``opt.step()`` (where its products live; nothing there grows with tokens) takes longer than forward + backward.
    Adapter routes (products inside forward and backward): the time over PEFT LoRA r32's step (the same frozen
    products plus a small adapter) is more than half the step."""
    dominated = None
    for tokens, result in sorted(results.items()):
        cpu = median(result["cpu"][method])
        if method.startswith("RandLoRAAdamW"):
            opt = median(result["step_cpu"][method])
            extra = opt / cpu
        else:
            extra = (cpu - median(result["cpu"]["PEFT LoRA r32"])) / cpu
        if extra > 0.5:
            dominated = tokens
    return dominated


def tokens_report(results: dict, machine: str, seconds: float, write_plot: bool = True) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(results)
    rows = [[method] + [f"{median(results[t]['cpu'][method]) * 1e3:.0f}" for t in counts] for method in TOKEN_METHODS]
    ratio_rows = [[method] + [f"{median(results[t]['cpu'][method]) / median(results[t]['cpu']['full FT (AdamW)']):.2f}"
                              for t in counts] for method in TOKEN_METHODS]
    opt_rows = [[method] + [f"{median(results[t]['step_cpu'][method]) * 1e3:.1f}" for t in counts]
                for method in TOKEN_METHODS if method.startswith("RandLoRAAdamW")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in TOKEN_METHODS:
        ax.plot(counts, [median(results[t]["cpu"][method]) * 1e3 for t in counts], marker="o", label=method,
                linestyle="--" if "very_sparse" in method else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("step CPU ms (fwd + bwd + optimizer)")
    ax.set_title("GPT-2 MLP block (768 -> 3072 -> 768), rank 32, fp32, 1 thread")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if write_plot:
        fig.savefig(RESULTS_DIR / "step_time_vs_tokens.png", dpi=120)
    plt.close(fig)

    sentences = []
    for method in ["RandLoRAAdamW dense", "RandLoRAAdamW very_sparse"]:
        until = basis_dominated_until(results, method)
        sentences.append(f"- {method}: its `opt.step()` (the two basis products per matrix) takes longer than the "
                         "forward and backward " + (f"up to {until:,} tokens; above that the token-dependent work "
                                                    "dominates" if until else "at no measured token count"))
    for method in ["module route dense", "module route very_sparse", "PEFT RandLora r32"]:
        until = basis_dominated_until(results, method)
        sentences.append(f"- {method}: its time over PEFT LoRA r32's step (the basis products) is more than half "
                         "the step " + (f"up to {until:,} tokens" + (", and at every measured count" if until ==
                                                                      counts[-1] else "") if until
                                        else "at no measured token count"))
    header = ["method"] + [f"{t:,}" for t in counts]
    return "\n\n".join([
        "# Step time against tokens per step",
        "GPT-2's MLP block (`c_fc` 768->3072, `c_proj` 3072->768, GELU; both adapted/trained, biases too where the "
        "method trains them), fp32, loss = mean square of the output. Methods: full fine-tuning with "
        "`torch.optim.AdamW`; PEFT LoRA r32 (alpha 64) and PEFT RandLora r32 (dense bases, PEFT's defaults) with "
        "AdamW; RandLoRAAdamW r32 (optimizer route) with dense and very_sparse bases; our module route "
        "(`inject_randlora`, r32) with dense and very_sparse bases and AdamW on the coefficients. Step = zero_grad + "
        "forward + backward + `opt.step()`; CPU time of this process (one intra-op thread), median over rounds "
        "that interleave the methods. `python -m benchmarks.sparse_speed --part tokens`.",
        machine + f"; run took {seconds:.0f} s. The machine was shared with other jobs (load average above); CPU "
        "time leaves most of that out, but memory-bandwidth contention remains, so single numbers are noisy.",
        "![step time vs tokens](step_time_vs_tokens.png)",
        "## Step CPU ms", markdown_table(header, rows),
        "## x full FT", markdown_table(header, ratio_rows),
        "## RandLoRAAdamW `opt.step()` CPU ms (the basis products; independent of tokens)",
        markdown_table(header, opt_rows),
        "## Where each route stops being dominated by the basis products", "\n".join(sentences),
    ]) + "\n"


def put_section(name: str, part: str, intro: str, machine: str, table: str) -> None:
    """Put the sparse-bases section (between markers, replacing an earlier one) into results file ``name``."""
    text = (f"\n<!-- sparse-bases -->\n## Sparse bases (`python -m benchmarks.sparse_speed --part {part}`)\n\n"
            f"{intro} (see [sparse_speed.md](sparse_speed.md)). {machine}\n\n{table}\n<!-- /sparse-bases -->\n")
    path = RESULTS_DIR / name
    old = path.read_text()
    new = SECTION.sub(lambda _: text, old) if SECTION.search(old) else old.rstrip("\n") + "\n" + text
    write_result(name, new, show=False)


def report(cache: dict, write: bool = True) -> None:
    """The results files from ``cache``; ``write=False`` (a quick run) prints ``sparse_speed.md`` only. Each part
    states the machine line of the run that measured it (``cache["machines"]``)."""
    machines = cache["machines"]
    parts = []
    targets = []
    if "kernels" in cache:
        parts += ["## Kernels (one thread)",
                  "Multiply-adds counted as the dense product does (`D*rN*d`) for the dense kernel and as `nnz*d` "
                  "for the sparse one; their ratio is the slowdown per multiply-add that `SPARSE_COST` "
                  f"(= {SPARSE_COST}, in `randopt/randlora/sparse.py`) stands for. A product goes sparse when "
                  "`density * SPARSE_COST < 1`: very_sparse (density 1/sqrt(d) = 0.036 at d = 768) does, sparse "
                  "(1/3) does not, so sparse bases stay dense.",
                  markdown_table(["product", "density", "dense ms", "CSR ms", "dense GMAC/s", "CSR GMAC/s",
                                  "slowdown"], cache["kernels"]["rows"])]
    if "optimizer" in cache:
        table, check = optimizer_table(cache["optimizer"])
        parts += ["## RandLoRAAdamW on a 2-layer GPT-2 at 1,024 tokens",
                  "`GPT2Config(n_layer=2, n_embd=768, vocab_size=8192)`, fp32, embeddings frozen; targets c_attn, "
                  "c_proj, c_fc of both blocks (8 matrices), rank 32, alpha 640, lr 1e-4, the biases and LayerNorms in a "
                  "plain AdamW group (`train_rest=True`); full FT: `torch.optim.AdamW` on every trainable parameter. Step = zero_grad + forward + backward + `opt.step()`; `opt.step` CPU "
                  "ms: the optimizer call alone. Ratios: median (min-max) of same-round ratios. Bases memory: "
                  "`RandLoRABases.nbytes` after the steps (every storage the shared bases and their per-shape "
                  "slices hold, compact forms and transposed copies included) against the dense fp32 bases.",
                  table]
        step, whole, bases = check["very_sparse"]["step"], check["very_sparse"]["whole"], check["very_sparse"]["bases"]
        targets += [f"- very_sparse opt.step <= 0.15x the dense-bases step: {step:.2f}x -> "
                    + ("met" if step <= 0.15 else "NOT met"),
                    f"- very_sparse whole step <= 1.05x full FT at 1,024 tokens: {whole:.2f}x -> "
                    + ("met" if whole <= 1.05 else "NOT met"),
                    f"- very_sparse bases memory <= 1/4 of dense fp32: {bases:.1%} -> "
                    + ("met" if bases <= 0.25 else "NOT met"),
                    f"- sparse (reported): opt.step {check['sparse']['step']:.2f}x dense bases, whole step "
                    f"{check['sparse']['whole']:.2f}x full FT, bases {check['sparse']['bases']:.0%} of dense "
                    "(sparse bases are multiplied densely: a CSR product of density 1/3 is slower than the dense one)"]
        if write:
            put_section("optimizer_speed.md", "optimizer", "Measured side by side in one process (a separate run from "
                        "the tables above, same GPT-2 but embeddings frozen)", machines["optimizer"], table)
    if "module" in cache:
        table, check = module_table(cache["module"])
        parts += ["## Module route at 1,024 tokens, same bases for PEFT and ours",
                  "One `nn.Linear`, fp32, input requiring grad, forward + backward; PEFT RandLora r32 given exactly our "
                  "bases (it multiplies them densely, whatever their sparsity), ours `inject_randlora(bases=...)`.",
                  table]
        targets += [f"- module route with very_sparse bases <= 0.6x PEFT RandLora's time, {case}: {ratio:.2f}x -> "
                    + ("met" if ratio <= 0.6 else "NOT met") for case, ratio in check.items()]
        if write:
            put_section("layer_speed.md", "module", "One layer at 1,024 tokens, PEFT RandLora given our bases, "
                        "measured side by side in a separate run", machines["module"], table)
    if "profiles" in cache:
        for kind, rows in cache["profiles"].items():
            parts += [f"## Profile of one `RandLoRAAdamW.step()`, {kind} bases (top ops by self CPU time)",
                      markdown_table(["op", "input shapes", "calls", "self ms", "share"], rows)]
    if "tokens" in cache:
        parts += ["## Step time against tokens", "See [step_time_vs_tokens.md](step_time_vs_tokens.md)."]
    if "profiles" in cache and "optimizer" in cache:
        step = optimizer_table(cache["optimizer"])[1]["very_sparse"]["step"]
        profile = cache["profiles"]["very_sparse"]
        total = float(profile[0][0].split(": ")[1])
        products, copies = (sum(float(row[3]) for row in profile[1:] if row[0] == op) for op in ("aten::addmm",
                                                                                                   "aten::copy_"))
        why = [] if step <= 0.15 else [
            f"Why the opt.step target is missed ({step:.2f}x): with very_sparse bases the two basis products of a "
            "matrix run as CSR products (kernel table: several times fewer multiply-adds, each several times slower "
            f"than a dense one; {products:.0f} of the profiled step's {total:.0f} ms in the top ops above), and what "
            f"is not a product stays ({copies:.0f} ms of copies among the top ops): GPT-2's Conv1D weights are stored "
            "`in x out`, and torch's CSR product reads the other operand row-major only, so for c_attn, c_fc and the "
            "attention c_proj the gradient is copied once before the projection and the update transposed once "
            "before it is added (the addition itself then runs contiguously); the `rN x d` elementwise work of the "
            "coefficients (scaled bases, chain rule) does not shrink with the bases."]
        targets += [""] + why + [
            "The module route's rectangular layers are bounded by the dense token products every method shares "
            "(`x W^T` and the input gradient): for scale, layer_speed.md measured a frozen layer at 0.39-0.42x and "
            "full fine-tuning at 0.60-0.61x PEFT RandLora's time on these shapes."]
    measured = "\n".join(f"- {part}: {machines[part]}" for part in PARTS if part in machines)
    text = "\n\n".join(["# Sparse ternary bases as sparse work", "Machine of the run that measured each part:\n" + measured,
                        "The machine is shared (see the load average): CPU time of this process leaves out the time "
                        "others hold the cores, not the memory-bandwidth contention, so ratios measured in the same "
                        "round are the numbers to read."] + parts + (["## Targets", "\n".join(targets)] if targets else []))
    if write:
        write_result("sparse_speed.md", text + "\n")
    else:
        print(text)


def main(argv=None) -> None:
    def add_parts(parser):
        parser.add_argument("--part", nargs="*", default=list(PARTS), choices=PARTS,
                            help="what to measure (default: all); the others come from the last run's cache")

    args = step_benchmark_args(__doc__.splitlines()[0], argv, quick_repeats=1, repeats=3, add_arguments=add_parts)
    repeats = args.repeats
    cache = json.loads(CACHE.read_text()) if CACHE.exists() and not args.quick else {}
    machine = machine_line(args.threads)
    start = time.time()
    if "kernels" in args.part:
        cache["kernels"] = kernels(repeats)
    if "optimizer" in args.part:
        cache["optimizer"] = optimizer_part(repeats)
    if "module" in args.part:
        cache["module"] = module_part(repeats)
    if "profiles" in args.part:
        cache["profiles"] = {kind: profile_step(kind) for kind in ("dense", "very_sparse")}
    if "tokens" in args.part:
        counts = TOKEN_COUNTS[:3] if args.quick else TOKEN_COUNTS
        results = tokens_part(min(repeats, 2), counts)
        text = tokens_report(results, machine, time.time() - start, write_plot=not args.quick)
        if args.quick:
            print(text)
        else:
            write_result("step_time_vs_tokens.md", text)
    if not args.quick:
        cache["machines"] = {**cache.get("machines", {}), **{part: machine for part in args.part if part != "tokens"}}
        CACHE.write_text(json.dumps(cache))
    if args.quick:
        cache["machines"] = {part: machine for part in args.part}
    report(cache, write=not args.quick)


if __name__ == "__main__":
    main()
