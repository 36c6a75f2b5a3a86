"""benchmarks/mutation.py generates real mutants: each one compiles, differs from the original in one place, and
the operators it claims to apply are the ones applied."""
import ast
import difflib

from benchmarks import mutation


def test_every_mutant_of_a_module_compiles_and_changes_one_line():
    module = "randopt/optim/state.py"
    original = ast.unparse(ast.parse((mutation.REPO / module).read_text())).splitlines()
    mutants = mutation.mutants_of(module)
    kinds = {m.mutation.split(" ")[0] for m in mutants}
    assert {"return", "drop", "NotIn", "GtE", "And"} <= kinds
    for mutant in mutants:
        source = mutation.mutated_source(module, mutant.index)
        compile(source, module, "exec")
        changed = [line for line in difflib.unified_diff(original, source.splitlines(), n=0, lineterm="")
                   if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))]
        assert 2 <= len(changed) <= 4, (mutant, changed)  # one statement: a line (or a wrapped one) out, one in


def test_docstrings_and_messages_are_not_mutated():
    module = "randopt/optim/state.py"
    lines = {m.line for m in mutation.mutants_of(module)}
    source = (mutation.REPO / module).read_text().splitlines()
    assert not any(source[line - 1].strip().startswith(("raise ValueError(f", '"""')) for line in lines)


def test_report_scores_killed_over_non_equivalent(tmp_path, monkeypatch):
    monkeypatch.setattr(mutation, "REPORT", tmp_path / "mutation.md")
    line = "return state_dtype"
    results = {str(i): {"module": "m.py", "index": i, "line": i, "mutation": "return None", "source_line": line,
                        "outcome": outcome, "seconds": 1.0, "hash": "h"}
               for i, outcome in enumerate(["killed", "killed", "timeout", "survived"])}
    results["4"] = {**results["3"], "index": 4, "source_line": "x = 1"}
    monkeypatch.setitem(mutation.EQUIVALENT, ("m.py", line, "return None"), "unused")
    mutation.write_report({"modules": {"m.py": {"hash": "h", "mutants": 9}}, "results": results})
    report = (tmp_path / "mutation.md").read_text()
    assert "| `m.py` | 9 | 5 | 3 | 2 (1) | 75.0% |" in report
    assert "equivalent: unused" in report and "**not killed: a test gap**" in report
