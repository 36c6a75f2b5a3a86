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
    assert "machine:" in text and "Load average" in text
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
    assert learned[suite.SQUEEZED_TUNED] == learned[suite.SQUEEZED]
    assert learned["RandLoRAAdamW r32"] == learned["module route r32 (AdamW)"] < learned[suite.LORA8]
    # 8-bit moments take less room than fp32 ones (the tiny model's LoRA-Pro full moments are above the threshold)
    state = {name: float(cells[3]) for name, cells in rows.items()}
    assert state["LoRA-Pro full r8 8-bit"] < state["LoRA-Pro full r8"]
    assert "## 8-bit moments" in text and "| synthetic first-letter task | LoRA-Pro full r8 8-bit |" in text
    pytest.importorskip("matplotlib")
    for plot in ("suite_loss.png", "suite_accuracy_vs_params.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_method_is_reported_not_fatal(tmp_path, no_data_packages, monkeypatch):
    def broken(make_base, lr):
        raise RuntimeError("this method is broken")

    monkeypatch.setitem(suite.METHODS, "broken method", suite.Method(broken, 1e-3, "test"))
    suite.main(["--quick", "--out", str(tmp_path), "--methods", "broken method,PEFT LoRA r8 (AdamW)"])
    text = (tmp_path / "suite.md").read_text()
    assert "| broken method | failed |" in text
    assert "RuntimeError: this method is broken" in text and "## Failures" in text
    assert "| PEFT LoRA r8 (AdamW) | " in text and "| PEFT LoRA r8 (AdamW) | failed" not in text


def test_child_process_job_reports_peak_memory():
    """The default (non-quick) route: one job in a fresh interpreter, results back as JSON."""
    derived = [suite.SQUEEZED, suite.SQUEEZED_TUNED]
    spec = {"task": "synthetic", "method": suite.LORA64, "seeds": [0, 1], "steps": 2, "batch_size": 4,
            "model": "tiny", "examples": 32, "threads": 1, "lr": None, "derived": derived, "validation": False}
    rows = suite.run_job_in_child(spec)
    assert [r.get("error") for r in rows] == [None] * 6, rows
    assert [(r["method"], r["seed"]) for r in rows] == [(name, seed) for seed in (0, 1)
                                                       for name in [suite.LORA64, *derived]]
    for row in rows:
        tuned = row["method"] == suite.SQUEEZED_TUNED
        assert len(row["losses"]) == 2 + tuned * suite.SQUEEZE_TUNE_STEPS
        assert row["peak_mb"] is not None and row["peak_mb"] >= 0
    json.dumps(rows)


def test_sweep_uses_a_validation_split(tmp_path, no_data_packages, capsys):
    suite.main(["--quick", "--sweep", "--methods", "PEFT LoRA r8 (AdamW)", "--out", str(tmp_path)])
    text = (tmp_path / "suite_sweep.md").read_text()
    assert "validation split" in text
    lrs = [line.split("|")[3].strip() for line in text.splitlines() if line.startswith("| PEFT LoRA r8")]
    assert [float(x) for x in lrs] == suite.SWEEP_GRID[suite.LORA8]
    full = suite.load_task("synthetic")
    validation = suite.load_task("synthetic", validation=True)
    assert not set(validation.test) & set(full.test) and not set(validation.test) & set(validation.train)
    assert set(validation.train) | set(validation.test) == set(full.train)


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
