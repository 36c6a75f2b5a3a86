"""benchmarks/mutation.py generates real mutants: each one compiles, differs from the original in one place, and
the operators it claims to apply are the ones applied."""
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
    assert "| `m.py` | 9 | 5 | 3 | 2 (1) | 75.0% |" in report
    assert "equivalent: unused" in report and "**not killed: a test gap**" in report
