"""The documentation site builds with ``mkdocs build --strict``: a broken link or API reference fails CI."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

for needed in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(needed, reason="the docs site needs mkdocs-material and mkdocstrings[python] (test extra)")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_site_builds_strict_with_api_reference_and_plots(tmp_path):
    done = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "param_groups" in api and "modules_to_save" in api, "the API page is built from the docstrings"
    assert (tmp_path / "site" / "benchmarks" / "results" / "suite_loss.png").exists(), "plots are published"


def test_a_broken_reference_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "site", "__pycache__"))
    (copy / "docs" / "api.md").write_text((copy / "docs" / "api.md").read_text() + "\n::: randopt.no_such_name\n")
    done = build(copy / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and "no_such_name" in done.stderr
