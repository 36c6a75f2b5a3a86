"""Smoke test of the benchmark suite script (``python -m benchmarks.suite --quick``): a tiny random BERT, a synthetic
task, a few steps, no network and no data package. It checks the script, not the numbers."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import suite, tasks  # noqa: E402

ALL_METHODS = list(suite.METHODS) + list(suite.DERIVED)


@pytest.fixture
def no_data_packages(monkeypatch):
    """The quick path must not touch the offline model or data packages (CI does not install them)."""
    def refuse(name):
        raise AssertionError(f"--quick tried to load package {name!r}")

    monkeypatch.setattr(tasks, "package_dir", refuse)


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ALL_METHODS:
            rows[cells[0]] = cells
    return rows


def test_quick_run_writes_table_and_plots(tmp_path, no_data_packages, capsys):
    suite.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "suite.md").read_text()
    assert "Command: `python -m benchmarks.suite --quick --out" in text
    assert "machine:" in text and "Load average" in text and "SMOKE TEST" in text
    rows = table_rows(text)
    assert set(rows) == set(ALL_METHODS), "every method, the squeezed one included, has a row"
    failed = {name: cells[-1] for name, cells in rows.items() if cells[1] == "failed"}
    assert not failed, f"methods failed in the quick run: {failed}"
    for name, cells in rows.items():
        accuracy = float(cells[1].split()[0])
        assert 0 <= accuracy <= 100
        assert float(cells[2].rstrip("M")) > 0  # learned parameters
    # the learned-parameter counts order as the methods do: LoRA r64 > LoRA r8 = squeezed r8 > RandLoRA (r64 exceeds
    # the tiny model's width, so it is not below full FT here as it is on MiniLM)
    learned = {name: float(cells[2].rstrip("M")) for name, cells in rows.items()}
    assert learned[suite.FULL] > learned[suite.LORA8]
    assert learned[suite.LORA64] > learned[suite.LORA8] == learned[suite.SQUEEZED]
    for name in (suite.CONT_SQUEEZE, suite.IN_SQUEEZE, suite.IN_SQUEEZE_RESET, suite.IN_SQUEEZE_LORAPRO):
        assert learned[name] == learned[suite.LORA8], f"{name} ends as an r8 adapter and the head"
    assert learned[suite.RANDLORA] == learned[suite.MODULE_ROUTE] < learned[suite.LORA8]
    # 8-bit moments take less room than fp32 ones (the tiny model's LoRA-Pro full moments are above the threshold)
    state = {name: float(cells[3]) for name, cells in rows.items()}
    assert state[suite.LORAPRO_8BIT] < state[suite.LORAPRO_FULL]
    assert "## 8-bit moments" in text and f"| synthetic first-letter task | {suite.LORAPRO_8BIT} |" in text
    pytest.importorskip("matplotlib")
    for plot in ("suite_loss.png", "suite_accuracy_vs_params.png", "suite_ranks.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_method_is_reported_not_fatal(tmp_path, no_data_packages, monkeypatch):
    def broken(make_base, lr):
        raise RuntimeError("this method is broken")

    monkeypatch.setitem(suite.METHODS, "broken_method", suite.Method(broken, 1e-3, "test"))
    suite.main(["--quick", "--out", str(tmp_path), "--methods", f"broken_method,{suite.LORA8}"])
    text = (tmp_path / "suite.md").read_text()
    assert "| broken_method | failed |" in text
    assert "RuntimeError: this method is broken" in text and "## Failures" in text
    assert f"| {suite.LORA8} | " in text and f"| {suite.LORA8} | failed" not in text


def test_child_process_job_reports_peak_memory():
    """The default (non-quick) route: one job in a fresh interpreter, results back as JSON."""
    derived = [suite.SQUEEZED, suite.ENERGY_SQUEEZED]
    spec = {"task": "synthetic", "method": suite.LORA64, "seeds": [0, 1], "steps": 2, "batch_size": 4,
            "model": "tiny", "examples": 32, "threads": 1, "setting": None, "derived": derived, "validation": False}
    rows = suite.run_job_in_child(spec)
    assert [r.get("error") for r in rows] == [None] * 6, rows
    assert [(r["method"], r["seed"]) for r in rows] == [(name, seed) for seed in (0, 1)
                                                       for name in [suite.LORA64, *derived]]
    for row in rows:
        assert len(row["losses"]) == 2
        assert row["peak_mb"] is not None and row["peak_mb"] >= 0
        if row["method"] in derived:
            assert row["squeeze_seconds"] > 0 and row["steps_at_rank"] == {"64": 2}
    json.dumps(rows)


def squeeze_job(method, steps=8, setting=None):
    spec = {"task": "synthetic", "method": method, "seeds": [0], "steps": steps, "batch_size": 4, "model": "tiny",
            "examples": 48, "threads": 1, "setting": setting, "derived": [], "validation": False}
    [row] = suite.run_job(spec)
    assert "error" not in row, row.get("traceback")
    return row


def test_squeeze_rows_keep_the_budget_and_the_data_order(no_data_packages):
    """Every squeeze mode takes the same steps on the same batches as LoRA r64 (at the squeeze modes' rate): until
    its first squeeze its losses are LoRA r64's, step for step; the steps at each rank add up to the budget."""
    reference = squeeze_job(suite.LORA64, setting={"lr": suite.SQUEEZE_HIGH_LR})
    cont = squeeze_job(suite.CONT_SQUEEZE, setting={"high_fraction": 0.25})
    assert cont["steps_at_rank"] == {"64": 2, "8": 6} and cont["squeeze_seconds"] > 0
    assert cont["losses"][:2] == reference["losses"][:2] and cont["losses"][2:] != reference["losses"][2:]
    project, reset = squeeze_job(suite.IN_SQUEEZE), squeeze_job(suite.IN_SQUEEZE_RESET)
    for row in (project, reset):
        assert row["steps_at_rank"] == {"64": 2, "32": 2, "16": 2, "8": 2} and len(row["losses"]) == 8
        assert row["losses"][:2] == reference["losses"][:2] and row["losses"][2:] != reference["losses"][2:]
    # the first squeeze (after step 2) gives both the same model; the moments differ from step 3's update on
    assert project["losses"][:3] == reset["losses"][:3] and project["losses"][3:] != reset["losses"][3:]


def test_cache_reuses_finished_jobs(tmp_path, no_data_packages, monkeypatch):
    args = ["--quick", "--methods", suite.LORA8, "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    suite.main(args)
    [kept] = list((tmp_path / "cache").iterdir())
    first = (tmp_path / "suite.md").read_text()

    def refuse(job):
        raise AssertionError(f"job {job['method']} ran again")

    monkeypatch.setattr(suite, "run_job", refuse)
    suite.main(args)
    again = (tmp_path / "suite.md").read_text()
    assert again.split("| method |")[1] == first.split("| method |")[1] and "came from `--cache`" in again
    suite.main(args + ["--cache-only", "--methods", f"{suite.LORA8},{suite.LORA64}"])
    text = (tmp_path / "suite.md").read_text()
    assert f"| {suite.LORA64} | not run |" in text and "## Failures" not in text  # not in the cache: not run
    monkeypatch.setitem(suite.METHODS, suite.LORA8, suite.Method(suite.peft_lora, 5e-4))  # a changed method runs
    with pytest.raises(AssertionError, match="ran again"):
        suite.main(args)


def test_sweep_uses_a_validation_split(tmp_path, no_data_packages, capsys):
    suite.main(["--quick", "--sweep", "--methods", suite.LORA8, "--out", str(tmp_path)])
    text = (tmp_path / "suite_sweep.md").read_text()
    assert "validation split" in text
    lrs = [line.split("|")[3].strip() for line in text.splitlines() if line.startswith(f"| {suite.LORA8} |")]
    assert [float(x) for x in lrs] == suite.SWEEP_GRID[suite.LORA8]
    full = suite.load_task("synthetic")
    validation = suite.load_task("synthetic", validation=True)
    assert not set(validation.test) & set(full.test) and not set(validation.test) & set(validation.train)
    assert set(validation.train) | set(validation.test) == set(full.train)


def test_randlora_sweep_reaches_alpha_and_lr(no_data_packages, monkeypatch):
    """The sweep tries RandLoRA's alpha as well as its rate, and a setting's alpha reaches the optimizer's groups."""
    import randopt

    alphas = {setting["alpha"] for setting in map(suite.setting_of, suite.SWEEP_GRID[suite.RANDLORA])}
    assert alphas == {640, 64}
    made, real = [], randopt.RandLoRAAdamW

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(randopt, "RandLoRAAdamW", recorded)
    row = squeeze_job(suite.RANDLORA, steps=1, setting={"alpha": 64, "lr": 2e-3})
    [optimizer] = made
    assert row["lr"] == 2e-3 and row["setting"] == {"alpha": 64, "lr": 2e-3}
    assert {(g["alpha"], g["lr"]) for g in optimizer.param_groups if g["rank"] is not None} == {(64, 2e-3)}


def test_method_names_are_identifiers_that_methods_accepts_back():
    """Every row name is an identifier (no spaces, as results files print it) and ``--methods`` takes it back."""
    assert all(name.isidentifier() for name in ALL_METHODS), [n for n in ALL_METHODS if not n.isidentifier()]
    assert len(set(ALL_METHODS)) == len(ALL_METHODS)
    assert suite.parse_args(["--methods", ",".join(ALL_METHODS)]).names == ALL_METHODS
    for name in ALL_METHODS:
        assert suite.parse_args(["--methods", name]).names == [name]


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        suite.parse_args(["--methods", "no such method"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--tasks", "polarity,nope"])
    args = suite.parse_args(["--quick"])
    assert (args.model, args.tasks, args.seeds, args.in_process) == ("tiny", ["synthetic"], [0], True)
    args = suite.parse_args([])
    assert (args.model, args.tasks, args.seeds, args.steps) == ("minilm", ["polarity", "gender"], [0, 1, 2], 150)
    assert args.out == suite.RESULTS and not args.in_process
    assert os.fspath(suite.parse_args(["--quick"]).out) != os.fspath(suite.RESULTS)
