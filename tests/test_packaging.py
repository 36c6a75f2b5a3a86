"""The built wheel installs and imports without the repository: ``randopt.integrations`` is mapped by the packaging."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# build from a clean copy so that concurrent builds never share the repository's build/ and egg-info folders
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache",
                                     ".hypothesis", "runs", "results")

CHECK = """
import sys
target, repo = sys.argv[1], sys.argv[2]
assert not any(p and p.rstrip('/') == repo for p in sys.path), sys.path
import randopt.integrations, randopt.randlora, randopt.randlora.autograd
for module in (randopt, randopt.integrations, randopt.randlora):
    assert module.__file__.startswith(target), (module.__name__, module.__file__)
print(randopt.__version__)
"""


def run(*args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_and_imports_without_the_repository(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("randopt-*.whl")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel))
    # -S: no site processing, so the editable install's path hook never runs; torch comes from site-packages, or from
    # where this interpreter found it (a virtual environment layered over another one reaches it through a .pth file)
    import torch

    dependencies = [sysconfig.get_paths()["purelib"], str(Path(torch.__file__).parents[1])]
    code = f"import sys; sys.path[:0] = [{str(target)!r}]; sys.path.extend({dependencies!r})\n"
    out = run(sys.executable, "-S", "-c", code + CHECK, str(target), str(REPO), cwd=tmp_path)
    assert out.strip()
