"""LoRA-Squeeze speed: exact factored SVD vs dense SVDs of ``B @ A``, compressing rank 64 to 16.

Methods, per square ``n x n`` layer (fp32, ``alpha = 128``):

- ours (factored): ``randopt.lorasqueeze.functional.squeeze_factors`` (QR of both factors, SVD of the 64 x 64 core);
- dense SVD: form ``s * B @ A`` and ``torch.linalg.svd(full_matrices=False)``, truncate;
- PEFT convert: ``peft.tuners.lora.conversion._convert_module_to_lora`` on a PEFT LoRA layer (what
  ``convert_to_lora`` runs per layer: ``get_delta_weight`` + dense SVD);
- PEFT merge-SVD: ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` (what
  ``add_weighted_adapter(combination_type="svd")`` runs per layer; ``full_matrices=True``).

Errors are ``||dW - dW_16||_F / ||dW||_F`` against the fp64 dense update; the optimum is the fp64 tail of
its singular values. Run from the repository root: ``python -m benchmarks.squeeze_speed [--quick]``.
Writes ``benchmarks/results/squeeze_speed.md``.
"""
from __future__ import annotations

import argparse
import logging
import warnings

import torch
from torch import nn

from randopt.lorasqueeze.functional import lora_scale, squeeze_factors

from .common import add_thread_args, machine_line, markdown_table, median, set_threads, time_round_robin, write_result

SOURCE_RANK, TARGET_RANK, ALPHA = 64, 16, 128.0
SPEED_TARGET = 20.0
DECAY = 0.93
METHODS = ["ours (factored)", "dense SVD", "PEFT convert", "PEFT merge-SVD"]


def make_layer(n: int, seed: int = 0):
    """A PEFT LoRA layer ``n x n`` and its model (PEFT's merge-SVD is a model method).

    Random fp32 factors with ``B``'s columns scaled by ``DECAY ** i``: a decaying spectrum, as trained
    updates have, so the errors compared are not all dominated by a flat tail.
    """
    import peft

    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(n, n, bias=False))
    config = peft.LoraConfig(r=SOURCE_RANK, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(SOURCE_RANK, n, generator=generator) / n ** 0.5)
        decay = DECAY ** torch.arange(SOURCE_RANK, dtype=torch.float32)
        layer.lora_B["default"].weight.copy_(torch.randn(n, SOURCE_RANK, generator=generator) * decay)
    return model, layer


def methods(model, layer):
    """Each method as a zero-argument callable returning ``(B', A', scale)`` of the rank-16 update."""
    from peft.tuners.lora.conversion import _convert_module_to_lora

    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    scale = lora_scale(ALPHA, SOURCE_RANK)

    def ours():
        squeezed = squeeze_factors(B, A, ALPHA, rank=TARGET_RANK)
        return squeezed.B, squeezed.A, squeezed.scale

    def dense():
        U, S, Vh = torch.linalg.svd((B @ A) * scale, full_matrices=False)
        return U[:, :TARGET_RANK] * S[:TARGET_RANK], Vh[:TARGET_RANK], 1.0

    def peft_convert():
        lora_A, lora_B, _ = _convert_module_to_lora(layer, TARGET_RANK)
        return lora_B, lora_A, 1.0

    def peft_merge_svd():
        lora_A, lora_B = model.base_model._svd_generalized_task_arithmetic_weighted_adapter(
            "svd", ["default"], [1.0], TARGET_RANK, layer, None, None, None, None)
        return lora_B, lora_A, 1.0

    return dict(zip(METHODS, (ours, dense, peft_convert, peft_merge_svd)))


@torch.no_grad()
def run_size(n: int, repeats: int, cheap_repeats: int) -> list[dict]:
    model, layer = make_layer(n)
    steps = methods(model, layer)
    A64 = layer.lora_A["default"].weight.detach().double()
    B64 = layer.lora_B["default"].weight.detach().double()
    exact = (B64 @ A64) * lora_scale(ALPHA, SOURCE_RANK)
    U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
    best = (U[:, :TARGET_RANK] * S[:TARGET_RANK]) @ Vh[:TARGET_RANK]
    norm = float(exact.norm())
    optimal = float(S[TARGET_RANK:].norm()) / norm
    results = {}
    for name, step in steps.items():
        Bt, At, s = step()
        approx = s * Bt.double() @ At.double()
        # The residual norm is first-order insensitive to errors in the kept subspace; the distance to the
        # fp64 truncation is not, so it shows the fp32 accuracy of each route.
        results[name] = {"error": float((exact - approx).norm()) / norm,
                         "to_best": float((best - approx).norm()) / norm}
    # The factored route takes milliseconds, the dense ones seconds: time them in separate round robins so
    # the cheap one gets enough rounds for a stable median without multiplying the dense runs.
    times = time_round_robin({k: v for k, v in steps.items() if k != METHODS[0]}, repeats=repeats, warmup=1)
    times.update(time_round_robin({METHODS[0]: steps[METHODS[0]]}, repeats=cheap_repeats, warmup=3))
    rows = []
    for name in METHODS:
        rows.append({"n": n, "method": name, "median_s": median(times[name]), "runs": len(times[name]),
                     "error": results[name]["error"], "to_best": results[name]["to_best"], "optimal": optimal})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 2048, fewer repeats (a smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", help="layer sizes n (default 1024 2048 4096)")
    add_thread_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("peft").setLevel(logging.ERROR)
    sizes = args.sizes or ([512, 1024, 2048] if args.quick else [1024, 2048, 4096])
    repeats, cheap_repeats = (2, 10) if args.quick else (3, 30)
    rows = []
    for n in sizes:
        rows += run_size(n, repeats, cheap_repeats)
        print(f"n={n} done", flush=True)
    text = report(rows, args, repeats, cheap_repeats)
    write_result("squeeze_speed.md", text)


def report(rows, args, repeats, cheap_repeats) -> str:
    by = {(r["n"], r["method"]): r for r in rows}
    table = []
    for r in rows:
        ours = by[(r["n"], METHODS[0])]["median_s"]
        table.append([f"{r['n']}x{r['n']}", r["method"], f"{r['median_s'] * 1e3:.4g}", r["runs"],
                      f"{r['median_s'] / ours:.1f}", f"{r['error']:.7f}", f"{r['error'] / r['optimal']:.7f}",
                      f"{r['to_best']:.1e}"])
    lines = [
        "# LoRA-Squeeze speed: factored SVD vs dense SVD",
        "",
        f"Compress a rank-{SOURCE_RANK} LoRA update `s * B @ A` (alpha {ALPHA:g}) to rank {TARGET_RANK}, fp32, "
        f"square layers; random factors with `B`'s columns scaled by {DECAY}^i (a decaying spectrum). "
        f"{'Quick run. ' if args.quick else ''}Times are medians over rounds "
        f"({repeats} per dense method, interleaved; {cheap_repeats} for ours) after a warm-up round. "
        "Error: `||dW - dW_16||_F / ||dW||_F` against the fp64 update; `x optimal` divides it by the fp64 "
        "Eckart-Young optimum (1 = best possible); `to fp64 best`: `||dW_16 - best_16||_F / ||dW||_F`, the "
        "distance to the fp64 truncation (rounding of each fp32 route).",
        "",
        machine_line(args.threads),
        "",
        "Methods: ours = `randopt.lorasqueeze.functional.squeeze_factors` (QR of both factors + SVD of the 64x64 core); "
        "dense SVD = `torch.linalg.svd(B @ A, full_matrices=False)`; PEFT convert = "
        "`peft.tuners.lora.conversion._convert_module_to_lora` (the per-layer step of `convert_to_lora`); "
        "PEFT merge-SVD = `LoraModel._svd_generalized_task_arithmetic_weighted_adapter` (the per-layer step of "
        "`add_weighted_adapter(combination_type=\"svd\")`, `full_matrices=True`).",
        "",
        markdown_table(["layer", "method", "median ms", "runs", "x ours", "rel. error", "x optimal", "to fp64 best"],
                       table),
        "",
        "## Target",
        "",
    ]
    for n in sorted({r["n"] for r in rows}):
        ours = by[(n, METHODS[0])]
        speedups = {m: by[(n, m)]["median_s"] / ours["median_s"] for m in METHODS[1:]}
        slowest_error = max(abs(by[(n, m)]["error"] / ours["error"] - 1) for m in METHODS[1:])
        dense_best = min(by[(n, m)]["to_best"] for m in METHODS[1:])
        met = min(speedups.values()) >= SPEED_TARGET
        lines.append(f"- {n}x{n}: ours is " + ", ".join(f"{v:.0f}x faster than {m}" for m, v in speedups.items())
                     + f" (target >= {SPEED_TARGET:.0f}x: {'met' if met else 'NOT met'}); errors agree to "
                     f"{slowest_error:.1e} relative; distance to the fp64 truncation {ours['to_best']:.1e} (ours) vs "
                     f"{dense_best:.1e} (best dense)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
