"""The multi-process launcher every distributed test uses (tests/distributed.py): the checkout under test runs,
PYTHONPATH is extended rather than replaced, failures and timeouts report each rank's output, nothing is left
running."""
import json
import os
from pathlib import Path

import pytest

import distributed
from distributed import CHECKOUT, run_distributed

pytestmark = pytest.mark.distributed


def test_ranks_run_the_checkout_under_test_with_the_callers_path(tmp_path, monkeypatch):
    kept = tmp_path / "kept-on-the-path"
    kept.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(kept))
    run_distributed("launcher_probe.py", "ok", tmp_path)
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["world"] == 2
    assert Path(probe["randopt"]).resolve() == CHECKOUT / "randopt" / "__init__.py"
    assert CHECKOUT in Path(probe["integrations"]).resolve().parents
    assert str(kept) in probe["sys_path"]
    assert probe["sys_path"].index(str(CHECKOUT)) < probe["sys_path"].index(str(kept))


def test_a_failing_rank_is_reported_with_its_own_output():
    with pytest.raises(AssertionError) as failure:
        run_distributed("launcher_probe.py", "fail")
    report = str(failure.value)
    assert "launcher_probe.py: torchrun exited with status" in report
    assert "rank 1 stderr" in report and "ValueError: deliberate failure on rank 1" in report
    assert "rank 0 stdout" in report and "rank 0 starts" in report


def test_a_hanging_run_is_stopped_at_its_timeout(tmp_path):
    with pytest.raises(AssertionError, match=r"launcher_probe.py: no result after 20 s, stopped"):
        run_distributed("launcher_probe.py", "hang", tmp_path, timeout=20)
    for pid_file in tmp_path.glob("pid*"):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_scripts_refuse_a_randopt_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDOPT_TEST_CHECKOUT", str(tmp_path))
    with pytest.raises(RuntimeError, match="not from the checkout under test"):
        distributed.check_checkout()
