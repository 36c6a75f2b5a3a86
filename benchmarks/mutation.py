"""Mutation testing of ``randopt/`` and ``integrations/``, on demand (not in CI).

    python -m benchmarks.mutation                                 # every module, every mutant (hours)
    python -m benchmarks.mutation --modules randopt/optim/state.py integrations/transformers.py --workers 2
    python -m benchmarks.mutation --sample 40                     # at most 40 random mutants per module

Each mutant is one small deliberate bug (a comparison, arithmetic or boolean operator swapped, a constant
changed, a ``not`` dropped, a call statement or a returned value removed) in a scratch copy of the checkout,
where ``randopt.integrations`` sits inside ``randopt`` so the mutated copy is what imports. The module's tests
(``TESTS`` below; the fast suite for modules not listed) run on it with ``pytest -x``: the mutant is killed when
they fail (or exceed the time limit), survives when they pass. Results are cached per mutant in
``benchmarks/results/mutation.json``, keyed by module, line text and mutation: runs resume and add up, and the
results of unchanged lines carry over to a new version of a module (a change elsewhere can still matter:
``--fresh`` forgets the cache). ``benchmarks/results/mutation.md`` is rewritten from the cache each time:
the score per module, and every survivor with the reason it is equivalent (``EQUIVALENT``) or marked as a gap.

Own AST mutator rather than mutmut/cosmic-ray: neither is installed here, and both run the whole suite (or need
coverage contexts) per mutant, too slow on a shared 2-core machine; a per-module test map keeps one mutant to
seconds.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE, REPORT = RESULTS / "mutation.json", RESULTS / "mutation.md"
SOURCES = ("randopt", "integrations")
FAST_SUITE = ["tests"]  # with -m "not slow and not distributed"
# module -> the test files that exercise it (fastest first: pytest -x stops at the first failure)
_KILLS = "tests/test_mutation_kills.py::"
_SQUEEZE_WRITES = [f"tests/test_squeeze.py::{name}" for name in (
    "test_failed_write_leaves_no_output", "test_failed_write_keeps_previous_output",
    "test_failed_rename_restores_previous_output", "test_squeeze_in_place",
    "test_refuses_to_replace_a_directory_that_is_not_an_adapter", "test_cli_end_to_end", "test_cli_errors")]
TESTS = {
    "randopt/_atomic.py": [*_SQUEEZE_WRITES, "tests/test_peft_interop.py::test_export_is_atomic",
                           "tests/test_atomic_writes.py"],
    "randopt/cli.py": [*_SQUEEZE_WRITES, "tests/test_squeeze.py"],
    "randopt/optim/state.py": [_KILLS + "test_a_moment_of_exactly_min_8bit_size_elements_is_8bit",
                               _KILLS + "test_8bit_moments_have_one_scale_per_256_elements_and_the_default_threshold_is_4096",
                               _KILLS + "test_lorapro_stores_moments_as_asked",
                               _KILLS + "test_second_moments_use_the_finer_unsigned_map",
                               _KILLS + "test_dtensor_moments_follow_the_shards_and_only_8bit_is_refused",
                               "tests/test_state_8bit.py"],
    "randopt/optim/precision.py": ["tests/test_weight_update.py", "tests/test_randlora_adamw.py"],
    "randopt/optim/functional.py": ["tests/test_randlora_adamw.py", "tests/test_lorapro.py"],
    "randopt/optim/groups.py": ["tests/test_randlora_adamw.py"],
    "randopt/optim/randlora_adamw.py": ["tests/test_mutation_kills.py", "tests/test_randlora_adamw.py",
                                        "tests/test_weight_update.py", "tests/test_state_8bit.py"],
    "randopt/optim/lorapro_adamw.py": ["tests/test_lorapro.py", "tests/test_state_8bit.py"],
    "randopt/lorasqueeze/adapters.py": ["tests/test_squeeze.py", "tests/test_atomic_writes.py"],
    "randopt/lorasqueeze/functional.py": ["tests/test_squeeze.py"],
    "randopt/lorasqueeze/export.py": ["tests/test_squeeze.py", "tests/test_peft_interop.py"],
    "randopt/lorasqueeze/training.py": ["tests/test_squeeze_training.py"],
    "randopt/randlora/functional.py": ["tests/test_randlora_core.py"],
    "randopt/randlora/bases.py": ["tests/test_randlora_core.py", "tests/test_peft_interop.py"],
    "randopt/randlora/layer.py": ["tests/test_randlora_core.py", "tests/test_peft_parity.py"],
    "randopt/randlora/autograd.py": ["tests/test_randlora_core.py"],
    "integrations/transformers.py": [_KILLS + "test_callback_warns_only_when_the_learning_rates_differ",
                                     _KILLS + "test_callback_exports_the_adapter_into_each_checkpoint",
                                     _KILLS + "test_callback_without_export_writes_no_adapter",
                                     "tests/test_trainer.py"],
    "integrations/peft.py": ["tests/test_peft_interop.py", "tests/test_peft_parity.py"],
    "integrations/squeeze_trainer.py": ["tests/test_squeeze_training.py"],
}
# (module, original line stripped, mutation) -> why no test can tell the mutant from the original
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("randopt/optim/state.py", "return state_dtype", "return None"):
        "every caller uses check_state_dtype only to raise; none reads what it returns",
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position among the module's mutation points, in ast.walk order (of this version of the source)
    line: int
    mutation: str
    source_line: str
    occurrence: int  # among the module's mutants with the same source line and mutation

    @property
    def key(self) -> str:
        """Stable while the line's text is: results of unchanged lines carry over to a new version of a module."""
        return f"{self.module}:{self.source_line}:{self.mutation}:{self.occurrence}"


# ----- generating mutants -----------------------------------------------------------------------------------------
_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.Add: ast.Sub,
          ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult, ast.Pow: ast.Mult,
          ast.And: ast.Or, ast.Or: ast.And}


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """Nodes never mutated: docstrings, annotations, and the arguments of warnings/raise messages."""
    skipped = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skipped.update(id(n) for n in ast.walk(body[0]))
        for annotation in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if annotation is not None:
                skipped.update(id(n) for n in ast.walk(annotation))
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def _points(tree: ast.AST) -> list[tuple[ast.AST, str, object]]:
    """(node, description, how) for every mutation of ``tree``; ``how`` is applied by ``_apply``."""
    skipped = _skipped_nodes(tree)
    points = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _SWAPS:
                    points.append((node, f"{type(op).__name__} -> {_SWAPS[type(op)].__name__}", ("compare", i)))
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAPS:
            points.append((node, f"{type(node.op).__name__} -> {_SWAPS[type(node.op)].__name__}", ("op",)))
        elif isinstance(node, ast.BoolOp):
            points.append((node, f"{type(node.op).__name__} -> {_SWAPS[type(node.op)].__name__}", ("op",)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((node, "drop not", ("drop_not",)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append((node, f"{node.value} -> {not node.value}", ("bool",)))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            points.append((node, f"{node.value!r} -> {node.value + 1!r}", ("number",)))
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            points.append((node, "return None", ("return_none",)))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            points.append((node, "drop call", ("drop_call",)))
    return points


class _Apply(ast.NodeTransformer):
    def __init__(self, target: int, how):
        self.target, self.how, self.seen = target, how, 0

    def visit(self, node):
        if getattr(node, "_mutation_index", None) == self.target:
            return self._mutate(node)
        return super().visit(node)

    def _mutate(self, node):
        kind = self.how[0]
        if kind == "compare":
            node.ops[self.how[1]] = _SWAPS[type(node.ops[self.how[1]])]()
        elif kind == "op":
            node.op = _SWAPS[type(node.op)]()
        elif kind == "drop_not":
            return node.operand
        elif kind == "bool":
            node.value = not node.value
        elif kind == "number":
            node.value = node.value + 1
        elif kind == "return_none":
            node.value = ast.Constant(None)
        elif kind == "drop_call":
            return ast.Pass()
        return node


def mutants_of(module: str) -> list[Mutant]:
    source = (REPO / module).read_text()
    lines = source.splitlines()
    seen: dict[tuple[str, str], int] = {}
    mutants = []
    for i, (node, description, _) in enumerate(_points(ast.parse(source))):
        text = lines[node.lineno - 1].strip()
        occurrence = seen[text, description] = seen.get((text, description), -1) + 1
        mutants.append(Mutant(module, i, node.lineno, description, text, occurrence))
    return mutants


def mutated_source(mutant: Mutant) -> str:
    """The module's source with ``mutant`` applied; refuses if the source changed since ``mutant`` was made."""
    tree = ast.parse((REPO / mutant.module).read_text())
    points = _points(tree)
    node, description, how = points[mutant.index] if mutant.index < len(points) else (None, None, None)
    if node is None or (node.lineno, description) != (mutant.line, mutant.mutation):
        raise RuntimeError(f"{mutant.module} changed during the run; start it again")
    node._mutation_index = mutant.index
    return ast.unparse(ast.fix_missing_locations(_Apply(mutant.index, how).visit(tree)))


# ----- running them ---------------------------------------------------------------------------------------------
def _scratch_copy() -> Path:
    """The checkout's sources and tests, with ``integrations`` inside ``randopt`` (as installed)."""
    root = Path(tempfile.mkdtemp(prefix="randopt-mutation-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "randopt", root / "randopt", ignore=ignore)
    shutil.copytree(REPO / "integrations", root / "randopt" / "integrations", ignore=ignore)
    shutil.copytree(REPO / "tests", root / "tests", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _installed_path(root: Path, module: str) -> Path:
    return root / "randopt" / module.removeprefix("randopt/") if module.startswith("randopt/") else \
        root / "randopt" / module


def _pytest(root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m",
               "not slow and not distributed", *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    outcome = {0: "survived", 1: "killed"}.get(result.returncode, f"error {result.returncode}")
    if outcome.startswith("error") and result.returncode in (2, 3):  # a mutant that breaks import/collection
        outcome = "killed"
    return outcome, time.perf_counter() - start


def _run_mutants(mutants: list[Mutant], timeout: float, record) -> None:
    root = _scratch_copy()
    try:
        for mutant in mutants:
            path = _installed_path(root, mutant.module)
            original = path.read_text()
            path.write_text(mutated_source(mutant))
            try:
                outcome, seconds = _pytest(root, TESTS.get(mutant.module, FAST_SUITE), timeout)
            finally:
                path.write_text(original)
            record(mutant, outcome, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def all_modules() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for d in SOURCES for p in (REPO / d).rglob("*.py"))


def run(modules: list[str], sample: int | None, seed: int, workers: int, timeout: float, fresh: bool,
        rerun_survivors: bool = False) -> None:
    cache = {} if fresh else _load_cache()
    todo = []
    for module in modules:
        mutants = mutants_of(module)
        cache.setdefault("modules", {})[module] = {"mutants": len(mutants), "keys": [m.key for m in mutants]}
        results = cache.setdefault("results", {})
        if rerun_survivors:
            pending = [m for m in mutants if results.get(m.key, {}).get("outcome") == "survived"]
        else:
            pending = [m for m in mutants if m.key not in results]
        if sample is not None:
            done = len(mutants) - len(pending)
            pending = random.Random(seed).sample(pending, min(len(pending), max(0, sample - done)))
        todo += pending
    for module in modules:  # the unmutated tests must pass, or every mutant would count as killed
        outcome, seconds = _baseline(module, timeout)
        if outcome != "survived":
            raise SystemExit(f"{module}: its tests fail without any mutation ({outcome}); fix them first")
    print(f"{len(todo)} mutants to run over {len(modules)} modules with {workers} worker(s)", flush=True)

    lock = threading.Lock()

    def record(mutant: Mutant, outcome: str, seconds: float) -> None:
        with lock:
            _record(mutant, outcome, seconds)

    def _record(mutant: Mutant, outcome: str, seconds: float) -> None:
        cache["results"][mutant.key] = {**asdict(mutant), "outcome": outcome, "seconds": round(seconds, 1),
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
        print(f"{outcome:9s} {seconds:6.1f}s {mutant.module}:{mutant.line} {mutant.mutation}", flush=True)
        write_report(cache)

    shares = [todo[i::workers] for i in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_run_mutants, share, timeout, record) for share in shares if share]:
            future.result()
    write_report(cache)


def _baseline(module: str, timeout: float) -> tuple[str, float]:
    root = _scratch_copy()
    try:
        return _pytest(root, TESTS.get(module, FAST_SUITE), timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----- the report -----------------------------------------------------------------------------------------------
def write_report(cache: dict) -> None:
    current = {key for info in cache.get("modules", {}).values() for key in info["keys"]}
    results = [r for key, r in cache.get("results", {}).items() if key in current]
    lines = ["# Mutation testing", "",
             "Generated by `python -m benchmarks.mutation` (see its docstring for the operators and the test map). "
             "Killed: the module's tests fail on the mutant (or run past the time limit); survived: they pass. "
             "Only mutants of a module's current source count; timings are wall-clock on a shared, loaded 2-core "
             "machine and only say how long a run takes.", "",
             "| module | mutants | run | killed | survived (equivalent) | score (killed / non-equivalent run) |",
             "|---|---:|---:|---:|---:|---:|"]
    total = {"mutants": 0, "run": 0, "killed": 0, "survived": 0, "equivalent": 0}
    survivors = []
    for module, info in sorted(cache.get("modules", {}).items()):
        mine = [r for r in results if r["module"] == module]
        if not mine:
            continue
        killed = sum(r["outcome"] in ("killed", "timeout") for r in mine)
        alive = [r for r in mine if r["outcome"] == "survived"]
        equivalent = [r for r in alive if _equivalent(r)]
        survivors += alive
        scored = len(mine) - len(equivalent)
        lines.append(f"| `{module}` | {info['mutants']} | {len(mine)} | {killed} | {len(alive)} ({len(equivalent)}) "
                     f"| {killed / scored:.1%} |" if scored else f"| `{module}` | {info['mutants']} | {len(mine)} | "
                     f"{killed} | {len(alive)} ({len(equivalent)}) | - |")
        for key, value in (("mutants", info["mutants"]), ("run", len(mine)), ("killed", killed),
                           ("survived", len(alive)), ("equivalent", len(equivalent))):
            total[key] += value
    scored = total["run"] - total["equivalent"]
    if scored:
        lines.append(f"| **all run** | {total['mutants']} | {total['run']} | {total['killed']} | {total['survived']} "
                     f"({total['equivalent']}) | {total['killed'] / scored:.1%} |")
    everything = sum(len(mutants_of(module)) for module in all_modules())
    lines += ["", f"Coverage: {total['run']} of the {everything} mutants of `randopt/` and `integrations/` have been run "
              f"({len(cache.get('modules', {}))} module(s); `--list` counts them per module). Distributed tests are "
              "not run per mutant (minutes per launch), so code reached only by them is under-tested here."]
    errors = [r for r in results if r["outcome"].startswith("error")]
    if errors:
        lines += ["", f"{len(errors)} mutant(s) ended with a pytest error other than a failure: "
                  + ", ".join(f"`{r['module']}:{r['line']}`" for r in errors)]
    lines += ["", "## Survivors of the run", "",
              "Each is equivalent (no test can tell it from the original) or a gap in the tests.",
              ""]
    if not survivors:
        lines.append("None.")
    for r in sorted(survivors, key=lambda r: (r["module"], r["line"])):
        reason = _equivalent(r)
        verdict = f"equivalent: {reason}" if reason else "**not killed: a test gap**"
        lines.append(f"- `{r['module']}:{r['line']}` {r['mutation']} in `{r['source_line']}`: {verdict}")
    REPORT.write_text("\n".join(lines) + "\n")


def _equivalent(result: dict) -> str | None:
    return EQUIVALENT.get((result["module"], result["source_line"], result["mutation"]))



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=None, help="paths relative to the checkout (default: all)")
    parser.add_argument("--sample", type=int, default=None, help="at most this many mutants per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as killed")
    parser.add_argument("--fresh", action="store_true", help="forget cached results")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run only the cached survivors again (after adding tests that should kill them)")
    parser.add_argument("--list", action="store_true", help="only count the mutants per module")
    parser.add_argument("--report", action="store_true", help="only rewrite mutation.md from the cached results")
    args = parser.parse_args(argv)
    modules = args.modules or all_modules()
    if args.report:  # against the modules' current source: results of changed lines drop out
        cache = _load_cache()
        for module in cache.get("modules", {}):
            mutants = mutants_of(module)
            cache["modules"][module] = {"mutants": len(mutants), "keys": [m.key for m in mutants]}
        write_report(cache)
        return
    if args.list:
        for module in modules:
            print(f"{len(mutants_of(module)):5d} {module}")
        return
    run(modules, args.sample, args.seed, args.workers, args.timeout, args.fresh, args.rerun_survivors)


if __name__ == "__main__":
    main()
