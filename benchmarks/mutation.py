"""Mutation testing of ``randopt/`` and ``integrations/``, on demand (not in CI).

    python -m benchmarks.mutation --sample 450                    # a stratified random sample (about an hour)
    python -m benchmarks.mutation --modules randopt/optim/state.py  # every mutant of some modules
    python -m benchmarks.mutation --rerun-survivors                # after adding tests that should kill them
    python -m benchmarks.mutation --report                         # rewrite mutation.md from the cache

Each mutant is one small deliberate bug (a comparison, arithmetic or boolean operator swapped, a constant
changed, a ``not`` dropped, a call statement or a returned value removed) in a scratch copy of the checkout,
where ``randopt.integrations`` sits inside ``randopt`` so the mutated copy is what imports.

Which tests run on a mutant comes from coverage: the fast suite (``-m "not slow and not distributed"``) runs once
with a line tracer that records, per test, the lines of ``randopt/`` and ``integrations/`` it executes (cached in
``.cache/mutation_coverage.json`` per test file, keyed by the hashes of the sources, ``conftest.py`` and that test
file, so only a changed test file is traced again). A mutant runs the tests that execute its line (the tests that
killed other mutants of the module first, then the fastest), with ``pytest -x``: it is killed when they fail (or
run past the time limit), survives when they pass, and is ``uncovered`` when no fast test executes its line
(counted as not killed, without running). A line executed only at import (a module constant) runs every test that
executes the module. Tests run in a child forked from a process that has already imported torch, transformers and
peft, so a mutant costs its tests, not the imports.

Results are cached per mutant in ``benchmarks/results/mutation.json``, keyed by module, line text and mutation:
runs resume and add up, and the results of unchanged lines carry over to a new version of a module (``--fresh``
forgets them). ``benchmarks/results/mutation.md`` is rewritten from the cache: the score with its confidence
interval, per module, and every survivor with the reason it is equivalent (``EQUIVALENT``) or marked as a gap.

Own AST mutator and tracer rather than mutmut/cosmic-ray/coverage.py: none is installed here.
"""
from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE, REPORT = RESULTS / "mutation.json", RESULTS / "mutation.md"
COVERAGE = REPO / ".cache" / "mutation_coverage.json"
SOURCES = ("randopt", "integrations")
FAST = "not slow and not distributed"
IMPORT_CONTEXT = "<import>"  # lines executed while modules import (collection), outside any test
# third-party packages the tests import, loaded once before forking (never randopt: the child imports the mutant)
PRELOAD = ("torch", "numpy", "pytest", "hypothesis", "safetensors", "transformers", "peft", "accelerate",
           "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2", "transformers.trainer",
           "peft.tuners.lora", "peft.tuners.randlora")
# (module, original line stripped, mutation) -> why no test can tell the mutant from the original
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("randopt/optim/state.py", "return state_dtype", "return None"):
        "every caller uses check_state_dtype only to raise; none reads what it returns",
    ("randopt/optim/randlora_adamw.py", "matrix = tensor if tensor.dim() == 2 else tensor.view(tensor.shape[0], -1)",
     "0 -> 1"): "dead code: matrix_view had no caller (since a63ffa3); removed from the library",
    ("randopt/randlora/sparse.py", "SPARSE_COST = 4.5", "4.5 -> 5.5"):
        "a cost-model weight (measured by benchmarks/sparse_speed.py): it picks between routes that compute the same "
        "products (tests/test_sparse_bases.py checks they agree); only the speed changes",
    ("randopt/lorapro/functional.py", "return max(rank, 1) * torch.finfo(working_dtype(dtype)).eps", "1 -> 2"):
        "changes the cut only for rank 1, from 1 to 2 machine epsilons of the largest eigenvalue: a 1 x 1 Gram has "
        "one eigenvalue, the largest, which is never cut",
    ("randopt/randlora/bases.py", "bound_A, bound_B = 1 / math.sqrt(d), 1 / math.sqrt(rank)", "1 -> 2"):
        "doubles either bound (bound_A or bound_B, two mutants of one line): that draw is scaled by exactly 2 (a power "
        "of two, so every rounding scales with it) and _unit_std divides that out again; the bases and their "
        "fingerprints are bit-identical (checked for 1 <= rank <= 16 and shapes up to 7 x 300)",
    ("randopt/randlora/bases.py", "_dense: dict = field(default_factory=dict, compare=False, repr=False)",
     "False -> True"): "options of a per-dtype cache field: LayerBases are never compared (their tensor fields make "
                       "== raise) and repr would only show the cache",
    ("integrations/peft.py", 'seed=metadata.get("seed", -1) if metadata else config.get("projection_prng_key", -1))',
     "1 -> 2"): "a fallback for keys both writers always write (randopt's metadata seed, PEFT's projection_prng_key); "
                "the bases come from the file either way and the seed is only recorded",
    ("randopt/randlora/layer.py", "check_rank(rank)", "drop call"):
        "a repeated check: make_bases and RandLoRALinear check the rank with the same message before any layer is "
        "replaced (with bases given, the bases-rank comparison refuses it first)",
    ("randopt/optim/randlora_adamw.py", "if self._shapes.pop(old, None) is not None:  # the new shape: In-Squeeze gives "
     "smaller factors", "IsNot -> Is"):
        "leaves a replaced parameter's shape unrecorded instead of recording logical_shape(new): _shape falls back to "
        "logical_shape(p) for an unrecorded parameter, so both read the new parameter's logical shape",
    ("randopt/optim/randlora_adamw.py", "return shape if shape is not None else logical_shape(p)", "IsNot -> Is"):
        "returns logical_shape(p) for a recorded parameter (None for an unrecorded one): _shape is only asked about "
        "the parameters of the groups, each recorded as logical_shape(p) when its group was added or when it "
        "replaced one (In-Squeeze, FSDP2), and ZeRO-3's placeholders keep that shape in ds_shape",
    ("randopt/optim/randlora_adamw.py", "old = required.get(key, (0, 0))", "0 -> 1"):
        "the running maximum of the sides starts at 0; starting at 1 differs only for a matrix with a zero-length "
        "side, which _validate_group refuses first (its rank exceeds the smaller side, 0)",
    ("randopt/optim/lorapro_adamw.py", "if not locator.distributed or self._real_step.call < 0:  # a new real step",
     "drop not"): "resets the adjustment metric at every call of a sharded real step instead of its first only: on "
                  "the sharded route every pair is adjusted in the real step's last call (_finish_real_step), after "
                  "either reset, so metrics() reads the same (checked bit for bit: LoRAProRun zero/fsdp2/whole, both "
                  "modes, 3 steps)",
    ("randopt/optim/locators.py", "return Span(0, p.data, p.grad)", "return None"):
        "never called: the optimizers ask a locator for spans only on the sharded route (locator.distributed); whole "
        "tensors take the plain step. WholeTensors.span completes the locator interface",
    ("randopt/optim/locators.py", "self._where.pop(id(p), None)", "drop call"):
        "the stale location is never read: span() returns None for a parameter without _hp_mapping before it uses "
        "_where, and the call that maps the parameter again overwrites the entry",
    ("randopt/optim/locators.py", "return self.carried_in[id(p)] < self.call", "Lt -> LtE"):
        "also refreshes the low-precision copies of the parameters the current call carried: DeepSpeed copies those "
        "itself right after step() returns (ZeRO 1/2: bit16_partitions[...].copy_(fp32_partition) per group; ZeRO-3: "
        "_reassign_or_swap_out_partitioned_parameters; BF16: update_lp_params), from the same master values, so the "
        "copy is redundant, not different",
    ("randopt/optim/randlora_adamw.py",
     'check_options({k: group[k] for k in GROUP_OPTIONS if k != "rank" and k != "basis_kind"})', "And -> Or"):
        "also hands rank and basis_kind to check_options, which passes keys it does not know (neither is in "
        "validation.OPTIONS) through unchecked; _check_group_options discards its result and checks both itself",
    ("randopt/_atomic.py", "return False", "return None"):
        "a `return False` of _running (the writer is gone) or _exchange (no atomic exchange here): their only callers "
        "read the answer as a truth value (`not _running(pid)`, `if _exchange(new, out_dir)`), and None is as false "
        "as False",
    ("randopt/randlora/autograd.py", "needs_coefficients: bool = False, dtype=None) -> bool:", "False -> True"):
        "a default no library code uses: the only caller, RandLoRALinearFunction.forward, passes needs_coefficients "
        "(tests and benchmarks/layer_speed.py call the cost model directly); the route it picks computes the same "
        "product either way, only its cost differs",
    ("randopt/randlora/autograd.py",
     "needs_coefficients: bool = True, through_bases: bool = False, dtype=None) -> bool:", "True -> False"):
        "a default nothing uses: every caller of _backward_merged (RandLoRALinearFunction.backward, "
        "tests/test_randlora_core.py, benchmarks/layer_speed.py) passes needs_coefficients",
    ("randopt/optim/lorapro_adamw.py", 'other = _MOMENTS[0] if group["mode"] == "full" else _FULL_MOMENTS[0]', "0 -> 1"):
        "looks for the other mode's second moment instead of its first (either of the two mutants of the line): a "
        "mode's two moments are always there together, in the same encoding (made together; a loaded state holds "
        "all of a mode's moments or none, check_saved_state)",
    ("randopt/optim/lorapro_adamw.py", 'if weight.data.numel() == getattr(weight, "ds_numel", -1):', "1 -> 2"):
        "the default stands for a W0 without ds_numel (never equal to a tensor's numel); numel() is never negative, "
        "so -2 is never equal to it either",
    ("randopt/optim/lorapro_adamw.py", "device = factors[0].device", "0 -> 1"):
        "factors[0] and factors[1] are the first pair's A and B, which the optimizer requires to share a device "
        "(refused at construction otherwise)",
    ("randopt/optim/lorapro_adamw.py", 'if group["mode"] == "full" and not _all_finite(gA_lora, gB_lora):',
     "Eq -> NotEq"): "moves the early skip of a non-finite pair from full to efficient mode: in full mode a non-finite "
                     "gradient makes the updated factors non-finite, which the check after the update catches (the "
                     "pair's step copy is rebuilt from the stored state and the skip counted, on every rank alike); in "
                     "efficient mode the adjustment skips and counts the pair itself. Same skips, same state "
                     "(test_under_zero_a_pair_with_a_nonfinite_gradient_is_skipped_and_counted passes on it); only "
                     "the wasted work differs",
}

# (module, original line stripped, mutation) -> why only a multi-process run can tell the mutant from the original
# (still counted as not killed: the distributed tests are not run per mutant)
DISTRIBUTED_ONLY: dict[tuple[str, str, str], str] = {}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position among the module's mutation points, in ast.walk order (of this version of the source)
    line: int
    mutation: str
    source_line: str
    occurrence: int  # among the module's mutants with the same source line and mutation
    lines: tuple[int, ...] = ()  # the mutated node's lines: a test that executes one of them runs the mutant
    statement: tuple[int, ...] = ()  # the enclosing statement's own lines, when none of ``lines`` is traced
    at_import: bool = False  # outside any function: runs once, when the module imports (in whichever test that is)
    scope: str = ""  # the enclosing class/function, e.g. "FlatPartitions.locate"

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
        self.target, self.how = target, how

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


def _statement_lines(tree: ast.AST) -> tuple[dict[int, tuple[int, ...]], set[int], dict[int, str]]:
    """(id(node) -> the lines of the innermost statement holding it, without the bodies of a compound statement;
    the ids of the nodes outside every function body; id(node) -> its enclosing class/function names)."""
    owner: dict[int, tuple[int, ...]] = {}
    at_import: set[int] = set()
    scopes: dict[int, str] = {}

    def own_lines(statement: ast.stmt) -> tuple[int, ...]:
        bodies = [child for field in ("body", "orelse", "finalbody", "handlers") for child in
                  getattr(statement, field, None) or [] if isinstance(child, ast.AST)]
        end = min([b.lineno - 1 for b in bodies if b.lineno > statement.lineno] + [statement.end_lineno])
        return tuple(range(statement.lineno, max(end, statement.lineno) + 1))

    def visit(node: ast.AST, lines: tuple[int, ...], in_function: bool, scope: str) -> None:
        if isinstance(node, ast.stmt):
            lines = own_lines(node)
        owner[id(node)], scopes[id(node)] = lines, scope
        if not in_function:
            at_import.add(id(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}" if scope else node.name
        for child in ast.iter_child_nodes(node):
            body = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and child in node.body
            visit(child, lines, in_function or body or isinstance(node, ast.Lambda), scope)

    visit(tree, (), False, "")
    return owner, at_import, scopes


def mutants_of(module: str) -> list[Mutant]:
    source = (REPO / module).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    statements, at_import, scopes = _statement_lines(tree)
    seen: dict[tuple[str, str], int] = {}
    mutants = []
    for i, (node, description, _) in enumerate(_points(tree)):
        text = lines[node.lineno - 1].strip()
        occurrence = seen[text, description] = seen.get((text, description), -1) + 1
        span = tuple(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        mutants.append(Mutant(module, i, node.lineno, description, text, occurrence, span, statements[id(node)],
                              id(node) in at_import, scopes[id(node)]))
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


def all_modules() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for d in SOURCES for p in (REPO / d).rglob("*.py"))


# ----- a scratch checkout and forked pytest runs ------------------------------------------------------------------
def _scratch_copy() -> Path:
    """The checkout's tracked files, with ``integrations`` also inside ``randopt`` (as installed)."""
    root = Path(tempfile.mkdtemp(prefix="randopt-mutation-"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "integrations", root / "randopt" / "integrations",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def _installed_path(root: Path, module: str) -> Path:
    return root / "randopt" / module.removeprefix("randopt/") if module.startswith("randopt/") else \
        root / "randopt" / module


def _preload() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import torch

    torch.set_num_threads(1)
    assert "randopt" not in sys.modules, "the parent must not import randopt: each child imports its mutant"


def _forked_pytest(root: Path, args: list[str], timeout: float, plugins=()) -> tuple[int | None, float, float]:
    """pytest.main(args) in a child forked from this process, inside ``root``: (exit code or None on timeout,
    wall seconds, CPU seconds of the child). The child and whatever it starts are killed as a group at the time
    limit."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 99
        try:
            os.setpgid(0, 0)
            log = os.open(root / ".pytest.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(root)
            sys.path[:] = [str(root)] + [p for p in sys.path if p not in ("", str(REPO))]
            for name in [n for n in sys.modules if n == "benchmarks" or n.startswith("benchmarks.")]:
                del sys.modules[name]  # the tests that import benchmarks get the scratch copy's
            os.environ.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
            sys.dont_write_bytecode = True
            code = int(pytest.main(["-q", "-p", "no:cacheprovider", "-m", FAST, *args], plugins=list(plugins)))
        except BaseException:  # noqa: BLE001 - the child reports through its exit code only
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = start + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.perf_counter() > deadline:
            code = None
            break
        time.sleep(0.05)
    try:  # the child's group: its own subprocesses, and the child itself on a timeout
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if code is None:
        usage = os.wait4(pid, 0)[2]
    return code, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


# ----- coverage: which tests execute which lines ----------------------------------------------------------------
class _LineTracer:
    """A pytest plugin recording, per test, the lines of the given files that run (``sys.settrace``: the only
    tracer available here); lines run outside any test (imports during collection) go to ``IMPORT_CONTEXT``."""

    def __init__(self, files: dict[str, str], out: Path):
        self.files, self.out = files, out
        self.hits: dict[str, dict[str, set[int]]] = {}
        self.seconds: dict[str, float] = {}
        self.failed: set[str] = set()
        self._switch(IMPORT_CONTEXT)

    def pytest_configure(self, config):  # in the forked child, before the test modules import
        sys.settrace(self._call)
        threading.settrace(self._call)

    def _switch(self, context: str) -> None:
        self._current = self.hits.setdefault(context, {})

    def _call(self, frame, event, arg):
        module = self.files.get(frame.f_code.co_filename)
        if module is None:
            return None
        self._current.setdefault(module, set()).add(frame.f_lineno)
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self._current.setdefault(self.files[frame.f_code.co_filename], set()).add(frame.f_lineno)
        return self._line

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._switch(item.nodeid)
        start = time.perf_counter()
        yield
        self.seconds[item.nodeid] = time.perf_counter() - start
        self._switch(IMPORT_CONTEXT)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.add(report.nodeid)

    def pytest_sessionfinish(self, session, exitstatus):
        sys.settrace(None)
        threading.settrace(None)
        hits = {context: {module: sorted(lines) for module, lines in modules.items()}
                for context, modules in self.hits.items()}
        self.out.write_text(json.dumps({"seconds": self.seconds, "failed": sorted(self.failed), "hits": hits}))


def _digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _test_files() -> list[Path]:
    return sorted((REPO / "tests").glob("test_*.py"))


class CoverageMap:
    """line -> tests that execute it, per module, from the cached per-test-file traces."""

    def __init__(self, traces: dict[str, dict]):
        self.lines: dict[str, dict[int, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        # lines run while a test file was collected (its imports) -> that file's tests
        self.collected_by: dict[str, dict[int, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        self.seconds: dict[str, float] = {}
        self.failed: list[str] = []
        self.file_keys = {name: trace.get("key") for name, trace in traces.items()}  # change with the test file
        for trace in traces.values():
            self.failed += trace["failed"]
            for context, modules in trace["hits"].items():
                if context != IMPORT_CONTEXT and context in trace["failed"]:
                    continue
                for module, lines in modules.items():
                    if context == IMPORT_CONTEXT:
                        file_tests = {t for t in trace["seconds"] if t not in trace["failed"]}
                        for line in lines:
                            self.collected_by[module][line] |= file_tests
                    else:
                        for line in lines:
                            self.lines[module][line].add(context)
            self.seconds.update({t: s for t, s in trace["seconds"].items() if t not in trace["failed"]})

    def tests_for(self, mutant: Mutant) -> tuple[list[str], str]:
        """(the tests that execute the mutant, how they were chosen: "line", "import" or "uncovered"). Code that runs
        at import (a module constant, a default value) runs in whichever test imports the module first: every test
        that executes the module is chosen for it."""
        executed = self.lines.get(mutant.module, {})
        if mutant.at_import and executed:
            return sorted(set().union(*executed.values())), "import"
        # a function run while test files are collected (e.g. a module __getattr__ behind their imports) can break
        # every test of those files
        collected = self.collected_by.get(mutant.module, {})
        for span in (mutant.lines, mutant.statement):
            tests = set().union(*(executed.get(line, ()) for line in span))
            if tests:
                return sorted(tests.union(*(collected.get(line, ()) for line in span))), "line"
        tests = set().union(*(collected.get(line, ()) for line in mutant.lines + mutant.statement))
        if tests:
            return sorted(tests), "import"
        return [], "uncovered"


def coverage_map(timeout: float = 3600) -> CoverageMap:
    """Traces the test files whose key changed (sources, conftest.py or the file itself), reuses the rest."""
    cached = json.loads(COVERAGE.read_text()) if COVERAGE.exists() else {}
    shared = [*(REPO / m for m in all_modules()), REPO / "tests" / "conftest.py"]
    traces, root = {}, None
    try:
        for test_file in _test_files():
            name, key = str(test_file.relative_to(REPO)), _digest(*shared, test_file)
            if cached.get(name, {}).get("key") == key:
                traces[name] = cached[name]
                continue
            if root is None:
                _preload()
                root = _scratch_copy()
            files = {str(_installed_path(root, m)): m for m in all_modules()}
            out = root / ".trace.json"
            out.unlink(missing_ok=True)
            code, seconds, _ = _forked_pytest(root, ["-p", "no:randomly", name], timeout, [_LineTracer(files, out)])
            trace = json.loads(out.read_text()) if out.exists() else {"seconds": {}, "failed": [], "hits": {}}
            print(f"traced {name}: exit {code}, {len(trace['seconds'])} tests, {len(trace['failed'])} failed, "
                  f"{seconds:.0f}s", flush=True)
            traces[name] = {"key": key, **trace}
            COVERAGE.parent.mkdir(parents=True, exist_ok=True)
            COVERAGE.write_text(json.dumps(traces | {n: t for n, t in cached.items() if n not in traces}))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    return CoverageMap(traces)


# ----- running mutants ------------------------------------------------------------------------------------------
def stratified_sample(modules: list[str], total: int, seed: int, minimum: int = 5) -> list[Mutant]:
    """About ``total`` mutants, each module's share proportional to its mutants and at least ``minimum`` (or all it
    has), drawn with ``seed``. Ordered so that a run stopped early still covers every module: the first ``minimum``
    of each module (shuffled together), then the rest (shuffled)."""
    everything = {module: mutants_of(module) for module in modules}
    count = sum(len(m) for m in everything.values())
    first, rest = [], []
    for module, mutants in everything.items():
        size = min(len(mutants), max(minimum, round(total * len(mutants) / count)))
        drawn = random.Random(f"{seed}:{module}").sample(mutants, size)
        first += drawn[:minimum]
        rest += drawn[minimum:]
    random.Random(seed).shuffle(first)
    random.Random(seed + 1).shuffle(rest)
    return first + rest


def _ordered(tests: list[str], seconds: dict[str, float], killers: collections.Counter) -> list[str]:
    """The tests that killed most mutants of this module first, then the fastest: ``-x`` stops at the first kill."""
    return sorted(tests, key=lambda t: (-killers[t], seconds.get(t, 1e9), t))


class _Select:
    """Keeps the given tests, in the given order (node ids do not always survive a trip through the command line:
    parameter ids with brackets or escapes)."""

    def __init__(self, tests: list[str]):
        self.order = {test: i for i, test in enumerate(tests)}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        items[:] = sorted((item for item in items if item.nodeid in self.order), key=lambda i: self.order[i.nodeid])


def _outcome(code: int | None) -> str:
    if code is None:
        return "timeout"
    if code in (1, 2):  # tests failed, or the mutant broke collection (an import error)
        return "killed"
    return "survived" if code == 0 else f"error {code}"


def run(mutants: list[Mutant], cache: dict, rerun_survivors: bool) -> None:
    results = cache.setdefault("results", {})
    if rerun_survivors:
        todo = [m for m in mutants if results.get(m.key, {}).get("outcome") in ("survived", "uncovered")]
    else:
        todo = [m for m in mutants if m.key not in results]
    coverage = coverage_map()
    cache["failing_unmutated"] = coverage.failed
    if coverage.failed:
        print(f"{len(coverage.failed)} test(s) fail unmutated and are never selected: {coverage.failed}", flush=True)
    print(f"{len(todo)} mutants to run", flush=True)
    _preload()
    root = _scratch_copy()
    killers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    try:
        for n, mutant in enumerate(todo, 1):
            tests, selection = coverage.tests_for(mutant)
            previous = results.get(mutant.key, {})
            if rerun_survivors and _same_selection(previous, tests, selection, coverage.file_keys):
                print(f"[{n}/{len(todo)}] unchanged  {mutant.module}:{mutant.line} {mutant.mutation}: no new test "
                      "executes it", flush=True)
                continue
            tests = _ordered(tests, coverage.seconds, killers[mutant.module])
            expected = sum(coverage.seconds.get(t, 10) for t in tests)
            if not tests:
                outcome, seconds, cpu, killer = "uncovered", 0.0, 0.0, None
            else:
                path = _installed_path(root, mutant.module)
                original = path.read_text()
                path.write_text(mutated_source(mutant))
                try:
                    files = sorted({t.split("::")[0] for t in tests})
                    code, seconds, cpu = _forked_pytest(root, ["-x", "-rf", *files], 120 + 3 * expected,
                                                        [_Select(tests)])
                finally:
                    path.write_text(original)
                outcome = _outcome(code)
                killer = _first_failure(root / ".pytest.log") if outcome == "killed" else None
                if killer:
                    killers[mutant.module][killer] += 1
            results[mutant.key] = {**asdict(mutant), "outcome": outcome, "seconds": round(seconds, 1),
                                   "cpu_seconds": round(cpu, 1), "load": round(os.getloadavg()[0], 1),
                                   "selection": selection, "tests": len(tests),
                                   "selected": _digest_of(tests, coverage.file_keys),
                                   "killer": killer,
                                   "previous": previous.get("outcome"),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
            print(f"[{n}/{len(todo)}] {outcome:9s} {seconds:6.1f}s {len(tests):4d} tests  "
                  f"{mutant.module}:{mutant.line} {mutant.mutation}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _digest_of(tests: list[str], file_keys: dict[str, str]) -> str:
    """The selected tests and the versions of their files: an edited test makes a new selection."""
    files = sorted({test.split("::")[0] for test in tests})
    text = "\n".join(sorted(tests) + [f"{name}:{file_keys.get(name)}" for name in files])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same_selection(previous: dict, tests: list[str], selection: str, file_keys: dict[str, str]) -> bool:
    """Whether a rerun would run the very tests, in the same versions, that the previous run did (results written
    before the digest was kept: the same number of tests chosen the same way)."""
    if previous.get("selected"):
        return previous["selected"] == _digest_of(tests, file_keys)
    return previous.get("tests") == len(tests) and previous.get("selection") == selection


def _first_failure(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ")[1]
    return None


# ----- the report -----------------------------------------------------------------------------------------------
def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if not n:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def _table_key(result: dict) -> tuple[str, str, str]:
    return result["module"], result["source_line"], result["mutation"]


def _equivalent(result: dict) -> str | None:
    number = re.fullmatch(r"(\d+) -> \d+", result["mutation"])
    if number and f"stacklevel={number[1]})" in result["source_line"]:
        return "a warning's stacklevel: only the frame the warning is attributed to changes"
    return EQUIVALENT.get(_table_key(result))


def write_report(cache: dict) -> None:
    modules = cache.get("modules", {})
    current = {key for info in modules.values() for key in info["keys"]}
    results = [r for key, r in cache.get("results", {}).items() if key in current]
    sample = cache.get("sample")
    lines = ["# Mutation testing", "",
             "Generated by `python -m benchmarks.mutation` (its docstring describes the operators and how tests are "
             "chosen). A mutant is one deliberate bug; **killed**: the fast tests that execute its line fail on it "
             "(or run past the time limit); **survived**: they pass; **uncovered**: no fast test executes its line, "
             "so it survives without running. Score = killed / (mutants run or uncovered, less the equivalent ones). "
             "Only mutants of a module's current source count.", ""]
    if sample:
        lines += [f"**This is a sample**, not every mutant: {sample['size']} of the {sample['population']} mutants "
                  f"of `randopt/` and `integrations/`, drawn at random per module (proportional to the module's "
                  f"mutants, at least 5 each; seed {sample['seed']}, source at {sample['commit']}). The interval is "
                  "the 95% Wilson interval of a binomial proportion over the sample: the score of all mutants lies "
                  "in it with about 95% confidence."]
        if len(results) < sample["size"]:
            lines[-1] += (f" {len(results)} of the {sample['size']} drawn have results: the run was stopped early "
                          "(it takes the first 5 of each module first, then the rest in seeded random order, so what "
                          "ran is still a random sample of every module).")
        lines.append("")
    lines += ["| module | mutants | in the results | killed | survived (equivalent) | uncovered | score |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    total = collections.Counter()
    survivors, uncovered, rescued = [], [], []
    for module, info in sorted(modules.items()):
        mine = [r for r in results if r["module"] == module]
        killed = sum(r["outcome"] in ("killed", "timeout") for r in mine)
        alive = [r for r in mine if r["outcome"] in ("survived", "uncovered")]
        equivalent = sum(bool(_equivalent(r)) for r in alive)
        survivors += [r for r in alive if r["outcome"] == "survived"]
        uncovered += [r for r in alive if r["outcome"] == "uncovered"]
        rescued += [r for r in mine if r["outcome"] == "killed" and r.get("previous") in ("survived", "uncovered")]
        scored = killed + len(alive) - equivalent
        counts = dict(mutants=info["mutants"], results=len(mine), killed=killed, alive=len(alive),
                      equivalent=equivalent, uncovered=sum(r["outcome"] == "uncovered" for r in mine), scored=scored)
        total.update(counts)
        score = f"{killed / scored:.1%}" if scored else "-"
        lines.append(f"| `{module}` | {info['mutants']} | {len(mine)} | {killed} | {len(alive)} ({equivalent}) "
                     f"| {counts['uncovered']} | {score} |")
    if total["scored"]:
        low, high = _wilson(total["killed"], total["scored"])
        lines.append(f"| **all** | {total['mutants']} | {total['results']} | {total['killed']} | {total['alive']} "
                     f"({total['equivalent']}) | {total['uncovered']} | **{total['killed'] / total['scored']:.1%}** "
                     f"(95% CI {low:.1%}-{high:.1%}) |")
    errors = [r for r in results if r["outcome"].startswith("error")]
    if errors:
        lines += ["", f"{len(errors)} mutant(s) ended with a pytest error other than a failure (not scored): "
                  + ", ".join(f"`{r['module']}:{r['line']}` ({r['outcome']})" for r in errors)]
    run_ones = [r for r in results if r.get("selection") in ("line", "import")]
    if run_ones:
        seconds = sorted(r["seconds"] for r in run_ones)
        lines += ["", f"{len(run_ones)} mutants ran, {sum(r['tests'] for r in run_ones)} selected tests in all "
                  f"(median {sorted(r['tests'] for r in run_ones)[len(run_ones) // 2]} per mutant; -x stops at the "
                  f"first failure); wall time per mutant median {seconds[len(seconds) // 2]:.1f} s, total "
                  f"{sum(seconds) / 60:.0f} min, on a shared 2-core machine (timings only say what a run costs)."]
        timed = [r for r in run_ones if "cpu_seconds" in r]
        if timed:
            loads = sorted(r["load"] for r in timed)
            lines[-1] += (f" CPU time, recorded for {len(timed)} of them: {sum(r['cpu_seconds'] for r in timed) / 60:.0f} "
                          f"min against {sum(r['seconds'] for r in timed) / 60:.0f} min wall (1-minute load average "
                          f"{loads[0]:.1f}-{loads[-1]:.1f}, median {loads[len(loads) // 2]:.1f}).")
    scopes = {m.key: m.scope for module in modules if (REPO / module).exists() for m in mutants_of(module)}
    for title, rows, empty in (
            ("Survivors", survivors, "None."),
            ("Uncovered (no fast test executes the line)", uncovered, "None."),
            ("Killed on a rerun by tests added for them", rescued, "None.")):
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append(empty)
        for r in sorted(rows, key=lambda r: (r["module"], r["line"])):
            reason, distributed = _equivalent(r), DISTRIBUTED_ONLY.get(_table_key(r))
            verdict = f"equivalent: {reason}" if reason else f"killed by `{r['killer']}`" if r["outcome"] == "killed" \
                else f"not killed, only the distributed tests can tell: {distributed}" if distributed \
                else "**not killed: a test gap**"
            scope = r.get("scope") or scopes.get(f"{r['module']}:{r['source_line']}:{r['mutation']}:{r.get('occurrence')}")
            lines.append(f"- `{r['module']}:{r['line']}` ({scope or 'module level'}) {r['mutation']} in "
                         f"`{r['source_line']}`: {verdict}")
    lines += ["", "## What is not run", "",
              "- Tests marked `slow` or `distributed` (torchrun launches take minutes each): code reached only by "
              "them (the DeepSpeed and FSDP paths of the optimizers) shows up as uncovered or survives here.",
              "- Code run only in a subprocess a test starts (the CLI through `python -m randopt`, the killed writers "
              "of `tests/test_atomic_writes.py`) is not traced; where no in-process test executes it, it counts as "
              "uncovered.",
              "- A fixture shared by several tests is traced in the first test that sets it up: the others are not "
              "selected for mutants of the fixture's lines."]
    if cache.get("failing_unmutated"):
        lines.append("- Tests that fail in the scratch copy without any mutation are never selected: "
                     + ", ".join(f"`{t}`" for t in cache["failing_unmutated"]) + ".")
    REPORT.write_text("\n".join(lines) + "\n")


def _register(cache: dict, modules: list[str]) -> None:
    for module in modules:
        mutants = mutants_of(module)
        cache.setdefault("modules", {})[module] = {"mutants": len(mutants), "keys": [m.key for m in mutants]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=None, help="paths relative to the checkout (default: all)")
    parser.add_argument("--sample", type=int, default=None,
                        help="a stratified random sample of about this many mutants (default: every mutant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="forget cached results")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run only the cached survivors again (after adding tests that should kill them)")
    parser.add_argument("--list", action="store_true", help="only count the mutants per module")
    parser.add_argument("--report", action="store_true", help="only rewrite mutation.md from the cached results")
    args = parser.parse_args(argv)
    modules = args.modules or all_modules()
    if args.list:
        for module in modules:
            print(f"{len(mutants_of(module)):5d} {module}")
        return
    cache = {} if args.fresh or not CACHE.exists() else json.loads(CACHE.read_text())
    if args.sample is not None:
        mutants = stratified_sample(modules, args.sample, args.seed)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        cache["sample"] = {"size": len(mutants), "population": sum(len(mutants_of(m)) for m in modules),
                           "seed": args.seed, "commit": commit}
        cache["modules"] = {}
        _register(cache, modules)
        sampled = {m.key for m in mutants}
        for info in cache["modules"].values():  # the report counts the sample's mutants only
            info["keys"] = [key for key in info["keys"] if key in sampled]
    elif "sample" in cache:  # a rerun or report of the sample: its mutants as they are in today's source
        keys = {key for info in cache["modules"].values() for key in info["keys"]}
        mutants = [m for module in cache["modules"] for m in mutants_of(module) if m.key in keys]
    else:
        _register(cache, modules)
        mutants = [m for module in modules for m in mutants_of(module)]
    if not args.report:
        run(mutants, cache, args.rerun_survivors)
    CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
    write_report(cache)


if __name__ == "__main__":
    main()
