"""LoRA-Squeeze modes as benchmark-suite methods, all on the suite's budget (the same steps, the same data order):

- Cont-Squeeze: LoRA r64 for a fraction of the steps, squeezed to r8 in place, the rest at r8 with a fresh AdamW;
- In-Squeeze: LoRA r64 annealed 64 -> 32 -> 16 -> 8 within the budget (``RankSchedule.geometric``, equal stages),
  the optimizer's moments projected into the new factors or reset (torch AdamW or LoRAProAdamW);
- post hoc (uniform rank, or per-layer ranks from one energy threshold at a mean rank): applied to a trained
  LoRA r64 model, no training of their own (``squeeze_after``).

Each training mode is an ``after_step`` hook of ``benchmarks.finetune.train`` that records the steps spent at
each rank and the wall time of its squeezes (``summary()``).
"""
from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from benchmarks.finetune import lora_model, lorapro


def mean_rank(model) -> float:
    from randopt.lorasqueeze.training import lora_ranks

    return statistics.fmean(lora_ranks(model).values())


class RankPlan:
    """Base of the squeeze hooks: counts each step at the model's (mean) rank during that step and sums the wall
    seconds of the squeezes (``squeeze`` runs one and times it)."""

    def __init__(self):
        self.steps_at_rank: Counter = Counter()
        self.squeeze_seconds = 0.0

    def count_step(self, model) -> None:
        rank = mean_rank(model)
        self.steps_at_rank[int(rank) if rank == int(rank) else round(rank, 1)] += 1

    def squeeze(self, function, *args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        self.squeeze_seconds += time.perf_counter() - start
        return out

    def summary(self) -> dict:
        return {"steps_at_rank": {str(rank): n for rank, n in sorted(self.steps_at_rank.items(), reverse=True)},
                "squeeze_seconds": self.squeeze_seconds}


class ContSqueeze(RankPlan):
    """After ``round(high_fraction * steps)`` steps: squeeze every LoRA pair to ``rank`` (exact factored SVD, in
    place, scale kept) and continue with a fresh ``torch.optim.AdamW`` at ``lr`` (new moments and step counts, as
    a new training run at the target rank would start)."""

    def __init__(self, high_fraction: float, rank: int, lr: float):
        super().__init__()
        self.high_fraction, self.rank, self.lr = high_fraction, rank, lr

    def split(self, steps: int) -> int:
        return min(steps - 1, max(1, round(self.high_fraction * steps)))

    def __call__(self, step, steps, model, optimizer):
        from randopt.lorasqueeze import squeeze_in_training

        self.count_step(model)
        if step != self.split(steps):
            return optimizer
        self.squeeze(squeeze_in_training, model, None, rank=self.rank)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr)


class InSqueeze(RankPlan):
    """``maybe_squeeze`` after every step with ``RankSchedule.geometric(start, end, steps, stages)`` (the budget
    in equal stages, ranks halving), moments ``"project"``-ed or ``"reset"``."""

    def __init__(self, start: int, end: int, stages: int, moments: str):
        super().__init__()
        self.start, self.end, self.stages, self.moments = start, end, stages, moments

    def __call__(self, step, steps, model, optimizer):
        from randopt.lorasqueeze import RankSchedule, maybe_squeeze

        self.count_step(model)
        schedule = RankSchedule.geometric(self.start, self.end, steps, self.stages)
        self.squeeze(maybe_squeeze, model, optimizer, schedule, moments=self.moments)
        return optimizer


def cont_squeeze(make_base, lr, rank=64, target=8, high_fraction=2 / 3, target_lr=1e-3):
    model = lora_model(make_base, rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, optimizer, ContSqueeze(high_fraction, target, target_lr)


def in_squeeze(make_base, lr, rank=64, target=8, stages=4, moments="project", optimizer="AdamW", **options):
    """``optimizer``: ``"AdamW"`` (torch) or ``"LoRAProAdamW"`` (``options`` go to it, e.g. ``mode``)."""
    if optimizer == "LoRAProAdamW":
        model, opt = lorapro(make_base, lr, rank=rank, **options)
    else:
        model = lora_model(make_base, rank)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, opt, InSqueeze(rank, target, stages, moments)


def energy_for_mean_rank(model, mean: float, iterations: int = 30):
    """The largest energy threshold (``randopt.squeeze(model, energy=e)``) whose per-layer ranks average at most
    ``mean``, by bisection; returns the squeeze result at that threshold."""
    import randopt

    def ranks_at(energy):
        result = randopt.squeeze(model, energy=energy)
        return result, statistics.fmean(layer.rank for layer in result.layers)

    low, high = 0.0, 1.0
    best = None
    for _ in range(iterations):
        middle = (low + high) / 2
        result, average = ranks_at(middle)
        if average <= mean:
            low, best = middle, (middle, result)
        else:
            high = middle
    if best is None:
        raise ValueError(f"no energy threshold gives a mean rank <= {mean}")
    return best
