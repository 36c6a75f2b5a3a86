"""Where the optimizers' steps spend their time: ``torch.profiler`` top ops of one step, this tree against a baseline.

Cases (fp32, one intra-op thread, gradients of one backward kept and restored before every step, so only
``optimizer.step()`` runs): ``RandLoRAAdamW`` r32 with dense and with very_sparse bases on the 2-layer GPT-2 of
``sparse_speed`` (1,024 tokens), and ``LoRAProAdamW`` full mode on the GPT-2 of ``lorapro_speed`` (PEFT LoRA r8 on
every linear layer). Each case runs in a child process per revision: this tree, and ``--baseline REV`` (its
``randopt`` package exported with ``git archive``; the case code is this file's), alternating for ``--rounds``
rounds so that both see the same machine load; per round the median CPU time of ``--repeats`` unprofiled steps,
then one profiled step. Writes a section (between markers) into ``optimizer_speed.md`` (RandLoRAAdamW) and
``lorapro_speed.md`` (LoRA-Pro). Run from the repository root: ``python -m benchmarks.step_profile --baseline REV``.
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS_DIR, machine_line, markdown_table, step_benchmark_args, write_result

ROOT = Path(__file__).resolve().parent.parent
CASES = {"RandLoRAAdamW dense": "optimizer_speed.md", "RandLoRAAdamW very_sparse": "optimizer_speed.md",
         "LoRAProAdamW full": "lorapro_speed.md"}
TOP = 8
SECTION = re.compile(r"\n<!-- step-profile -->.*<!-- /step-profile -->\n", re.S)


def build_step(case: str):
    """``(restore, optimizer.step)`` of ``case``: ``restore`` puts back the gradients of one backward."""
    import torch

    if case.startswith("RandLoRAAdamW"):
        from randopt import RandLoRAAdamW, param_groups

        from .sparse_speed import GPT2_TARGETS, RANK, gpt2

        model = gpt2()
        optimizer = RandLoRAAdamW(param_groups(model, GPT2_TARGETS, rank=RANK, basis_kind=case.split()[-1]), lr=1e-4)
        ids = torch.randint(0, 8192, (8, 128), generator=torch.Generator().manual_seed(1))
    else:
        from .lorapro_speed import BATCH, SEQ, make_model, make_optimizer

        model, config = make_model()
        optimizer = make_optimizer(case, model)
        ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # state exists, and LoRA-Pro's factors leave PEFT's B = 0 init
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}

    def restore():
        for p, grad in grads.items():
            p.grad = grad.clone()

    return restore, optimizer.step


def child(case: str, repeats: int) -> dict:
    """Median CPU ms of ``repeats`` steps, then the top ops (self CPU time) of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    restore, step = build_step(case)
    seconds = []
    for _ in range(repeats):
        restore()
        start = time.process_time()
        step()
        seconds.append(time.process_time() - start)
    restore()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    top = [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1), f"{100 * e.self_cpu_time_total / total:.0f}%"]
           for e in events[:TOP]]
    return {"cpu_ms": statistics.median(seconds) * 1e3, "profiled_ms": total / 1e3, "top": top,
            "calls": sum(e.count for e in events)}


def run_child(case: str, repeats: int, threads: int, tree: Path | None) -> dict:
    """``child`` in a fresh process importing ``randopt`` from ``tree`` (None: this repository)."""
    path = [str(tree)] if tree else []
    code = (f"import sys, json; sys.path[:0] = {path + [str(ROOT)]!r}; import torch; torch.set_num_threads({threads}); "
            "import warnings; warnings.filterwarnings('ignore'); import randopt; "
            f"assert randopt.__file__.startswith({str(tree or ROOT)!r}), randopt.__file__; "
            f"from benchmarks.step_profile import child; print(json.dumps(child({case!r}, {repeats})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{case} ({tree or 'this tree'}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", revision, "randopt"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def section(case: str, rounds: list, baseline: str, machine: str) -> str:
    before, after = rounds[-1]["baseline"], rounds[-1]["this"]
    ratios = [r["this"]["cpu_ms"] / r["baseline"]["cpu_ms"] for r in rounds]
    medians = {name: statistics.median(r[name]["cpu_ms"] for r in rounds) for name in ("baseline", "this")}
    rows = [[f"before ({baseline})"] + op for op in before["top"]] + [["after (this tree)"] + op for op in after["top"]]
    return (f"### {case}\n\n"
            f"`optimizer.step()` CPU time, median of the per-round medians: before {medians['baseline']:.1f} ms, after "
            f"{medians['this']:.1f} ms; after / before per round: {', '.join(f'{r:.2f}' for r in ratios)}. "
            f"aten ops a step: {before['calls']} before, {after['calls']} after. One profiled step (self CPU time of "
            f"the aten ops: {before['profiled_ms']:.0f} ms before, {after['profiled_ms']:.0f} ms after; the profiler "
            "adds its own overhead per op), top ops:\n\n"
            + markdown_table(["version", "op", "calls", "self CPU ms", "share"], rows) + "\n")


def put_section(name: str, text: str) -> None:
    block = f"\n<!-- step-profile -->\n{text}<!-- /step-profile -->\n"
    path = RESULTS_DIR / name
    old = path.read_text()
    new = SECTION.sub(lambda _: block, old) if SECTION.search(old) else old.rstrip("\n") + "\n" + block
    write_result(name, new, show=False)


def main(argv=None) -> None:
    def add(parser):
        parser.add_argument("--baseline", required=True, help="git revision to compare with (e.g. the commit before "
                                                              "a change)")
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))

    args = step_benchmark_args(__doc__.splitlines()[0], argv, quick_repeats=2, repeats=5, add_arguments=add)
    revision = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    machine = machine_line(args.threads)
    texts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        baseline_tree = export(revision, Path(tmp))
        for case in args.case:
            rounds = []
            for _ in range(args.rounds):
                rounds.append({"baseline": run_child(case, args.repeats, args.threads, baseline_tree),
                               "this": run_child(case, args.repeats, args.threads, None)})
            print(f"{case}: " + ", ".join(f"{r['baseline']['cpu_ms']:.1f} -> {r['this']['cpu_ms']:.1f} ms"
                                          for r in rounds), flush=True)
            texts.setdefault(CASES[case], []).append(section(case, rounds, revision, machine))
    if args.quick:
        print("\n".join(t for ts in texts.values() for t in ts))
        return
    for name, parts in texts.items():
        put_section(name, f"## Profile of `optimizer.step()` before and after the step work of issue 16 "
                          f"(`python -m benchmarks.step_profile --baseline {revision}`)\n\n"
                          f"Each revision in its own process, alternating ({args.rounds} rounds of {args.repeats} "
                          f"steps); {machine}. The machine is shared: compare the per-round ratios.\n\n"
                    + "\n".join(parts))


if __name__ == "__main__":
    main()
