"""mkdocs hook: publish the benchmark result files (tables and plots) with the site, from where the benchmarks
write them (``benchmarks/results``), so the results page shows the committed numbers and plots, never a copy."""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    for path in sorted((ROOT / "benchmarks" / "results").glob("*")):
        if path.suffix in (".png", ".md"):
            files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files
