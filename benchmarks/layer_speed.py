"""One RandLoRA layer and a 2-layer GPT-2: fwd+bwd time, matrix-product flops and saved-for-backward bytes.

Compares a frozen linear layer, full fine-tuning, PEFT LoRA r32, PEFT RandLora r32 and ours r32.
Run from the repository root: ``python -m benchmarks.layer_speed [--quick] [--threads N]``.
Writes ``benchmarks/results/layer_speed.md``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings

import torch
from torch import nn

from randopt.randlora import inject_randlora, make_bases
from randopt.randlora.autograd import _backward_merged, _forward_merged

from .common import (MIB, SAVED_BYTES_RULE, add_thread_args, machine_line, markdown_table, matmul_flops, median,
                     ratio_spread, saved_for_backward, set_threads, time_round_robin, write_result)

RANK = 32
BATCH, SEQ = 8, 128
LAYER_SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (out, in)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
METHODS = ["frozen", "full-FT", "PEFT LoRA r32", "PEFT RandLora r32", "ours r32"]
REFERENCE = "PEFT RandLora r32"
TIME_TARGET, MEMORY_TARGET = 0.6, 1.10
HEADERS = ["case", "method", "CPU ms", "wall ms", "x PEFT RandLora (min-max)", "x frozen", "matmul GFLOP",
           "saved MiB"]


class OneLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.lin(x)


def adapt(model: nn.Module, method: str, targets, fan_in_fan_out: bool = False) -> nn.Module:
    """``model`` prepared for ``method``: everything frozen except what the method trains."""
    model.requires_grad_(False)
    if method == "frozen":
        return model
    if method == "full-FT":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                module.requires_grad_(True)
        return model
    if method == "ours r32":
        return inject_randlora(model, targets, rank=RANK, init_weights=False)
    import peft

    if method == "PEFT LoRA r32":
        config = peft.LoraConfig(r=RANK, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    else:
        config = peft.RandLoraConfig(r=RANK, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                                     init_weights=False)
    # PEFT makes its RandLora bases in bf16 and would cast them to fp32 on every CPU call; give it fp32 ones
    return peft.get_peft_model(model, config).to(torch.float32)


def measure(base: nn.Module, targets, fan_in_fan_out: bool, make_input, forward_of, backward_of):
    """Per method: a fwd+bwd step, its matrix-product flops and its saved-for-backward bytes."""
    steps, flops, saved = {}, {}, {}
    for method in METHODS:
        model = adapt(copy.deepcopy(base), method, targets, fan_in_fan_out)
        leaf = make_input()
        trained = [p for p in model.parameters() if p.requires_grad] + [leaf]

        def step(model=model, leaf=leaf, trained=trained):
            backward_of(forward_of(model, leaf))
            for p in trained:
                p.grad = None

        out, record = saved_for_backward(lambda model=model, leaf=leaf: forward_of(model, leaf), exclude=(model,))
        del out
        saved[method] = record.bytes
        flops[method] = matmul_flops(step)
        steps[method] = step
    return steps, flops, saved


def layer_case(out_features: int, in_features: int):
    torch.manual_seed(0)
    grad_y = torch.randn(BATCH, SEQ, out_features)

    def make_input():
        return torch.randn(BATCH, SEQ, in_features, generator=torch.Generator().manual_seed(1)).requires_grad_()

    return measure(OneLinear(out_features, in_features), ["lin"], False, make_input, lambda model, x: model(x),
                   lambda y: y.backward(grad_y))


def gpt2_case(lm_head: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = (GPT2LMHeadModel if lm_head else GPT2Model)(config).train()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    embeds = base.get_input_embeddings()(ids).detach()

    def make_input():
        return embeds.clone().requires_grad_()  # gradients flow through every block for every method

    def forward_of(model, x):
        out = model(inputs_embeds=x)
        return out.logits if lm_head else out.last_hidden_state

    return measure(base, GPT2_TARGETS, True, make_input, forward_of, lambda y: y.mean().backward())


def ours_plan(out_features: int, in_features: int) -> str:
    layer = make_bases((out_features, in_features), RANK).layer(out_features, in_features)
    tokens = BATCH * SEQ
    forward = _forward_merged(layer, tokens, True, True, True)
    through_bases = layer.transposed and not forward
    backward = _backward_merged(layer, tokens, True, True, True, through_bases)
    name = {True: "merged", False: "factored"}
    saved = "x @ B" if through_bases else "x"
    return f"forward {name[forward]}, backward {name[backward]}, saves {saved}"


def summarise(name, steps, flops, saved, repeats: int, threads: int):
    timings = time_round_robin(steps, repeats=repeats, warmup=1)
    times = timings.cpu if threads == 1 else timings.wall
    rows = []
    for method in METHODS:
        mid, low, high = ratio_spread(times, method, REFERENCE)
        rows.append([name, method, f"{median(timings.cpu[method]) * 1e3:.1f}",
                     f"{median(timings.wall[method]) * 1e3:.1f}", f"{mid:.2f} ({low:.2f}-{high:.2f})",
                     f"{ratio_spread(times, method, 'frozen')[0]:.2f}", f"{flops[method] / 1e9:.1f}",
                     f"{saved[method] / MIB:.2f}"])
    check = dict(time=ratio_spread(times, "ours r32", REFERENCE)[0],
                 flops=flops["ours r32"] / flops[REFERENCE],
                 memory=saved["ours r32"] / saved["PEFT LoRA r32"])
    return rows, check


def render(rows, checks, plans, args, seconds) -> str:
    lines = [
        "# RandLoRA layer speed and saved-for-backward memory", "",
        f"fp32, {BATCH}x{SEQ} tokens, rank {RANK} (RandLora alpha 640, PEFT LoRA alpha 8), one fwd+bwd step with the "
        "input requiring grad. Layer shapes are out x in. GPT-2: `GPT2Config(n_layer=2)` (hidden 768, 12 heads), "
        "random init, adapters on c_attn, c_proj and c_fc of both blocks (the same layers are trained in full-FT), "
        "loss = mean of the logits (with the tied 50257x768 LM head) or of the last hidden state (blocks only). "
        "PEFT's RandLora bases are cast to fp32.",
        "",
        f"Times are medians over {'a quick run of ' if args.quick else ''}rounds that interleave the methods "
        "(the order rotates each round): CPU time of the process and wall time. Ratios are medians (and min-max) "
        f"of same-round ratios of {'CPU' if args.threads == 1 else 'wall'} time; with one thread CPU time leaves "
        "out the time other processes on this shared machine hold the core, which wall time does not. "
        "matmul GFLOP: the matrix products of one step, counted by `torch.utils.flop_counter.FlopCounterMode` "
        "(elementwise work not included).",
        "", machine_line(args.threads) + f"; run took {seconds:.0f} s", "",
        markdown_table(HEADERS, rows), "", f"Memory rule: {SAVED_BYTES_RULE}.", "",
        "Ours per layer shape (chosen from the shape and token count): "
        + "; ".join(f"{o}x{i}: {plan}" for (o, i), plan in plans.items()) + ".",
        "", "## Targets", "",
        f"Ours <= {TIME_TARGET}x PEFT RandLora's time, and saved bytes <= PEFT LoRA r32's + 10%.", "",
    ]
    for name, c in checks:
        lines.append(f"- {name}: time {c['time']:.2f}x PEFT RandLora ({'met' if c['time'] <= TIME_TARGET else 'NOT met'}; "
                     f"matmul flops {c['flops']:.2f}x); saved bytes {c['memory']:.2f}x PEFT LoRA r32 "
                     f"({'met' if c['memory'] <= MEMORY_TARGET else 'NOT met'})")
    lines += ["", "## Why the time target is out of reach", "", FLOOR_NOTE]
    return "\n".join(lines) + "\n"


FLOOR_NOTE = """\
Count matrix-product multiply-adds per step with T tokens, d = min(out, in), D = max(out, in),
R = r*ceil(d/r) (768 here), and unit M = T*d*D. Frozen does 2M (output, input gradient). PEFT
RandLora adds 2 products through the bases forward and 3 backward: 5M for 768x768, 2.75M for the
rectangular shapes (7M and 4.75M in all). Forming dW = B @ Ahat costs P = D*R*d = (R/T) M = 0.75M.

- 768x768: the update must reach the output (>= min(P, 2M) = 0.75M, folded into W), the
  coefficient gradient B^T (g^T x) costs >= min(M + P, 2M) = 1.75M, so even keeping the forward's
  dW for the backward (a d x d tensor, which the issue rules out) gives 2 + 0.75 + 1.75 = 4.5M =
  0.64x PEFT. Without keeping it, the input gradient needs dW again (P) or g @ B (another M):
  5.25M = 0.75x PEFT. Ours runs that 5.25M schedule.
- 3072x768 and 768x3072: base 2M, update forward 0.75M (merged) or 1.25M (factored, which leaves
  x @ B when B is on the input side), coefficient gradient 1.25M via g @ B, or 0.25M from the saved
  x @ B, input gradient 0.25M (sharing g @ B) or P: 4.25M at best = 0.89x PEFT's 4.75M. Ours runs it.

So, for schedules built from products with the bases, the base weight and dense dW or weight
gradients (dense random bases leave no cheaper structure), 0.6x is below the matrix-product floor for
every shape here. The measured ratios sit at or below the flop ratios because PEFT also pays for
elementwise passes over tokens x D tensors (scaling, adding) and a slow einsum backward of its scaled
basis, which ours avoids. In GPT-2 the per-layer floors mix over the c_attn, c_proj and c_fc shapes;
PEFT also copies the B slice of every layer narrower than the shared bases at each call (and keeps it
for backward), and the frozen LM head is a large fixed cost that dilutes every ratio.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2 cases")
    add_thread_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats, gpt2_repeats = (3, 2) if args.quick else (9, 4)
    start = time.perf_counter()

    cases = [(f"layer {o}x{i}", lambda o=o, i=i: layer_case(o, i), repeats) for o, i in LAYER_SHAPES]
    if not args.no_gpt2:
        cases += [("GPT-2 2L blocks", lambda: gpt2_case(False), gpt2_repeats),
                  ("GPT-2 2L + LM head", lambda: gpt2_case(True), gpt2_repeats)]
    rows, checks = [], []
    for name, build, n in cases:
        case_rows, check = summarise(name, *build(), n, args.threads)
        rows += case_rows
        checks.append((name, check))
        print(markdown_table(HEADERS, case_rows), flush=True)
    plans = {shape: ours_plan(*shape) for shape in LAYER_SHAPES}
    text = render(rows, checks, plans, args, time.perf_counter() - start)
    print(f"wrote {write_result('layer_speed.md', text, show=False)}")


if __name__ == "__main__":
    main()
