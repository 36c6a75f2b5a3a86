"""Command line: ``randopt squeeze ADAPTER_DIR (--rank R | --energy F) --out OUT_DIR [--alpha A]``."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .lorasqueeze.adapters import LayerReport, squeeze_lora
from .lorasqueeze.functional import ALPHA_POLICIES


def _alpha(text: str):
    if text in ALPHA_POLICIES:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or one of {', '.join(ALPHA_POLICIES)}, "
                                         f"got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="randopt", description="randopt command line tools")
    parser.add_argument("--version", action="version", version=f"randopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    squeeze = commands.add_parser(
        "squeeze", help="compress a PEFT LoRA adapter to a lower rank (LoRA-Squeeze)",
        description="Compress a PEFT LoRA adapter to a lower rank with an exact factored SVD and write a PEFT "
                    "LoRA adapter that PeftModel.from_pretrained loads.")
    squeeze.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT LoRA adapter directory")
    target = squeeze.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="target rank for every layer (below each layer's rank)")
    target.add_argument("--energy", type=float,
                        help="per layer, keep the smallest rank holding this fraction in (0, 1] of ||dW||_F^2")
    squeeze.add_argument("--out", required=True, metavar="OUT_DIR", help="output adapter directory")
    squeeze.add_argument("--alpha", type=_alpha, default="keep_scale",
                         help="alpha at the target rank: keep_scale (default: same scale alpha/r per layer), "
                              "keep_alpha (same alpha), or a number")
    squeeze.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an adapter directory")
    return parser


def _number(x: float) -> str:
    return f"{x:g}"


def format_report(layers: list[LayerReport]) -> str:
    rows = [("layer", "shape", "rank", "alpha", "energy kept")]
    rows += [(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.source_rank} -> {r.rank}",
              f"{_number(r.source_alpha)} -> {_number(r.alpha)}", f"{r.energy:.6f}") for r in layers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _squeeze(args) -> int:
    result = squeeze_lora(args.adapter_dir, rank=args.rank, energy=args.energy, out_dir=args.out, alpha=args.alpha,
                          overwrite=args.overwrite)
    print(format_report(result.layers))
    ranks = [r.rank for r in result.layers]
    worst = min(r.energy for r in result.layers)
    print(f"\n{len(ranks)} layers, ranks {min(ranks)}..{max(ranks)}, lowest energy kept {worst:.6f}; "
          f"wrote {result.out_dir}")
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bad input or I/O error, 2 usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on usage errors and --help; report the code instead
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return _squeeze(args)
    except (ValueError, OSError) as error:
        print(f"randopt {args.command}: error: {error}", file=sys.stderr)
        return 1
