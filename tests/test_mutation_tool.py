"""benchmarks/mutation.py generates real mutants: each one compiles, differs from the original in one place, and
the operators it claims to apply are the ones applied; a mutant runs the tests that execute its line; the sample
spans every module and is reproducible."""
import ast
import difflib

import pytest

from benchmarks import mutation


def test_every_mutant_of_a_module_compiles_and_changes_one_line():
    module = "randopt/optim/state.py"
    original = ast.unparse(ast.parse((mutation.REPO / module).read_text())).splitlines()
    mutants = mutation.mutants_of(module)
    kinds = {m.mutation.split(" ")[0] for m in mutants}
    assert {"return", "drop", "NotIn", "GtE", "And"} <= kinds
    for mutant in mutants:
        source = mutation.mutated_source(mutant)
        compile(source, module, "exec")
        changed = [line for line in difflib.unified_diff(original, source.splitlines(), n=0, lineterm="")
                   if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
        assert 2 <= len(changed) <= 4, (mutant, changed)  # one statement: a line (or a wrapped one) out, one in


def test_a_mutant_of_a_changed_source_is_refused(monkeypatch, tmp_path):
    mutant = mutation.mutants_of("randopt/optim/state.py")[5]
    changed = tmp_path / "randopt" / "optim"
    changed.mkdir(parents=True)
    (changed / "state.py").write_text("x = 1 + 2\n" + (mutation.REPO / mutant.module).read_text())
    monkeypatch.setattr(mutation, "REPO", tmp_path)
    with pytest.raises(RuntimeError, match="changed during the run"):
        mutation.mutated_source(mutant)


def test_docstrings_and_messages_are_not_mutated():
    module = "randopt/optim/state.py"
    lines = {m.line for m in mutation.mutants_of(module)}
    source = (mutation.REPO / module).read_text().splitlines()
    assert not any(source[line - 1].strip().startswith(("raise ValueError(f", '"""')) for line in lines)


def test_report_scores_killed_over_non_equivalent(tmp_path, monkeypatch):
    monkeypatch.setattr(mutation, "REPORT", tmp_path / "mutation.md")
    line = "return state_dtype"
    results = {str(i): {"module": "m.py", "index": i, "line": i, "mutation": "return None", "source_line": line,
                        "outcome": outcome, "seconds": 1.0}
               for i, outcome in enumerate(["killed", "killed", "timeout", "survived"])}
    results["4"] = {**results["3"], "index": 4, "source_line": "x = 1"}
    results["stale"] = {**results["4"], "outcome": "killed"}  # a line no longer in the module: not counted
    monkeypatch.setitem(mutation.EQUIVALENT, ("m.py", line, "return None"), "unused")
    mutation.write_report({"modules": {"m.py": {"mutants": 9, "keys": ["0", "1", "2", "3", "4"]}}, "results": results})
    report = (tmp_path / "mutation.md").read_text()
    assert "| `m.py` | 9 | 5 | 3 | 2 (1) | 0 | 75.0% |" in report
    assert "equivalent: unused" in report and "**not killed: a test gap**" in report


def test_a_changed_warning_stacklevel_is_equivalent():
    result = {"module": "m.py", "source_line": '"text", stacklevel=2)', "mutation": "2 -> 3"}
    assert "stacklevel" in mutation._equivalent(result)
    assert mutation._equivalent({**result, "source_line": "x = f(2, stacklevel=3)"}) is None


def _mutant(line, lines, statement=()):
    return mutation.Mutant("m.py", 0, line, "Add -> Sub", "x", 0, tuple(lines), tuple(statement))


def test_a_mutant_runs_the_tests_that_execute_its_line():
    trace = {"failed": ["t::broken"], "seconds": {"t::a": 1.0, "t::b": 2.0, "t::c": 3.0},
             "hits": {mutation.IMPORT_CONTEXT: {"m.py": [1, 2]}, "t::a": {"m.py": [5, 6]}, "t::b": {"m.py": [6, 9]},
                      "t::c": {"m.py": [8]}, "t::broken": {"m.py": [5, 7]}}}
    collected_at_9 = {"failed": [], "seconds": {"u::x": 1.0}, "hits": {mutation.IMPORT_CONTEXT: {"m.py": [9]}}}
    coverage = mutation.CoverageMap({"t": trace, "u": collected_at_9})
    assert coverage.tests_for(_mutant(9, [9])) == (["t::b", "u::x"], "line")  # u's collection runs line 9
    assert coverage.tests_for(_mutant(6, [6])) == (["t::a", "t::b"], "line")
    assert coverage.tests_for(_mutant(5, [5, 6, 7])) == (["t::a", "t::b"], "line")  # a failing test is never chosen
    assert coverage.tests_for(_mutant(4, [4], statement=[3, 4, 5])) == (["t::a"], "line")  # the enclosing statement
    assert coverage.tests_for(_mutant(2, [2])) == (["t::a", "t::b", "t::c"], "import")  # run at collection only
    assert coverage.tests_for(_mutant(7, [7])) == ([], "uncovered")  # only the failing test executes it
    module_constant = mutation.Mutant("m.py", 0, 8, "1 -> 2", "x = 1", 0, (8,), (8,), at_import=True)
    assert coverage.tests_for(module_constant) == (["t::a", "t::b", "t::c"], "import")  # imported inside t::c


def test_a_mutant_in_a_condition_falls_back_to_the_condition_lines_not_the_body(monkeypatch, tmp_path):
    (tmp_path / "m.py").write_text("def f(x):\n    if (x >\n            1):\n        x = x + 2\n    return x\n")
    monkeypatch.setattr(mutation, "REPO", tmp_path)
    found = {m.mutation: (m.lines, m.statement) for m in mutation.mutants_of("m.py")}
    assert found["Gt -> GtE"] == ((2, 3), (2, 3))
    assert found["1 -> 2"] == ((3,), (2, 3))
    assert found["Add -> Sub"] == ((4,), (4,))
    assert found["return None"] == ((5,), (5,))
    assert not any(m.at_import for m in mutation.mutants_of("m.py"))
    (tmp_path / "m.py").write_text("LIMIT = 3\n\n\ndef f(x=4):\n    return x + LIMIT\n")
    at_import = {m.mutation: m.at_import for m in mutation.mutants_of("m.py")}
    assert at_import == {"3 -> 4": True, "4 -> 5": True, "Add -> Sub": False, "return None": False}


def test_the_sample_spans_every_module_in_proportion_and_is_reproducible():
    modules = ["randopt/optim/state.py", "randopt/optim/precision.py", "randopt/validation.py"]
    sizes = {module: len(mutation.mutants_of(module)) for module in modules}
    sample = mutation.stratified_sample(modules, total=60, seed=3)
    assert [m.key for m in sample] == [m.key for m in mutation.stratified_sample(modules, total=60, seed=3)]
    assert [m.key for m in sample] != [m.key for m in mutation.stratified_sample(modules, total=60, seed=4)]
    drawn = {module: sum(m.module == module for m in sample) for module in modules}
    assert all(drawn[module] >= min(5, sizes[module]) for module in modules)
    assert drawn["randopt/validation.py"] > drawn["randopt/optim/state.py"]  # proportional to the mutants
    assert len({m.key for m in sample}) == len(sample)
    head = sample[:5 * len(modules)]  # a run stopped early still has 5 of each
    assert all(sum(m.module == module for m in head) == 5 for module in modules)


def test_the_interval_holds_the_score():
    low, high = mutation._wilson(95, 100)
    assert low < 0.95 < high and 0.88 < low and high < 0.98
    assert mutation._wilson(10, 10)[1] == pytest.approx(1.0)


def test_a_rerun_skips_a_survivor_that_no_new_or_edited_test_executes():
    tests, keys = ["t.py::a", "t.py::b"], {"t.py": "k1", "u.py": "k2"}
    ran = {"selected": mutation._digest_of(tests, keys), "tests": 2, "selection": "line"}
    assert mutation._same_selection(ran, list(reversed(tests)), "line", keys)
    assert mutation._same_selection(ran, tests, "line", {**keys, "u.py": "edited"})  # a file it does not run
    assert not mutation._same_selection(ran, tests, "line", {**keys, "t.py": "edited"})
    assert not mutation._same_selection(ran, tests + ["u.py::new"], "line", keys)
    assert mutation._same_selection({"tests": 0, "selection": "uncovered"}, [], "uncovered", keys)
    assert not mutation._same_selection({"tests": 2, "selection": "line"}, tests, "import", keys)
