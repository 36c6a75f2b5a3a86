"""A newcomer's first hour (issue 17): honest output, the command line, the main job's files."""
import subprocess
import sys
from pathlib import Path

import pytest

import randopt
from randopt import cli

REPO = Path(__file__).resolve().parent.parent


def test_version_flag(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"randopt {randopt.__version__}"


def test_main_job_method_names_are_identifiers_accepted_back():
    from benchmarks import finetune

    assert all(name.isidentifier() for name in finetune.METHODS)
    with pytest.raises(SystemExit):
        finetune.main(["--methods", "full FT (torch AdamW)"])


def test_main_job_writes_its_table_to_an_untracked_file():
    from benchmarks import finetune

    path = finetune.run_file("polarity")
    assert path.parent == REPO / "runs" / "finetune" and path.name.startswith("polarity-")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 0, f"{path} must be ignored by git"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_and_main_job_imports_are_quiet():
    cli_run = run_python("import sys; from randopt.cli import main; sys.exit(main(['--version']))")
    assert cli_run.returncode == 0 and cli_run.stderr == "", cli_run.stderr
    main_job = run_python("from benchmarks.finetune import quiet_third_party; quiet_third_party(); import peft, "
                          "randopt, transformers")
    assert main_job.returncode == 0 and main_job.stderr == "", main_job.stderr


@pytest.mark.parametrize("package", ["randopt", "randopt.lorasqueeze", "randopt.optim", "randopt.randlora",
                                     "randopt.lorapro"])
def test_packages_export_only_their_public_names(package):
    import importlib
    import inspect

    module = importlib.import_module(package)
    exported = {name for name, value in vars(module).items()
                if not name.startswith("_") and not inspect.ismodule(value)}
    exported |= set(getattr(module, "_OPTIMIZER_NAMES", ()))  # randopt.lorapro's lazy names
    assert exported == set(module.__all__) - {"__version__"} - {n for n in module.__all__
                                                                if inspect.ismodule(getattr(module, n))}
    for name in module.__all__:
        value = getattr(module, name)
        if callable(value) and not inspect.ismodule(value):
            assert (value.__doc__ or "").strip(), f"{package}.{name} is public and needs a docstring"
