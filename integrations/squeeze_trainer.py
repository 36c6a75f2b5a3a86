"""transformers ``Trainer`` callback for In-Squeeze: anneal a PEFT LoRA model's rank during training.

    from randopt.lorasqueeze import RankSchedule
    from randopt.integrations.squeeze_trainer import SqueezeCallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    SqueezeCallback.attach(trainer, RankSchedule.geometric(64, 8, total_steps=800, stages=4))

The Trainer's order per optimizer step is clip -> ``on_pre_optimizer_step`` -> ``optimizer.step()`` ->
``on_optimizer_step`` -> scheduler -> ``model.zero_grad()``. The callback squeezes in ``on_optimizer_step``
(``randopt.lorasqueeze.maybe_squeeze``: driven by the optimizer's own step count, so a resumed run squeezes at
the same steps and nothing twice). The new factors are swapped into the optimizer (accelerate's wrapper is
looked through), the learning rate and its scheduler are left alone. Every log gets ``squeeze/rank_min``,
``squeeze/rank_max``, ``squeeze/rank_mean`` (current ranks) and, after the first squeeze,
``squeeze/energy_kept_mean``/``_min`` and ``squeeze/step`` of the last one.

Resuming from a checkpoint taken after a squeeze: the checkpoint's ``adapter_config.json`` holds the squeezed
ranks; call ``randopt.lorasqueeze.restore_ranks(peft_model, checkpoint_dir)`` before
``trainer.train(resume_from_checkpoint=checkpoint_dir)`` so its weights and optimizer state fit.
Not for DeepSpeed ZeRO / FSDP / DDP runs (see ``randopt.lorasqueeze.training``).
"""
from __future__ import annotations

from transformers import TrainerCallback

from randopt.lorasqueeze.functional import check_alpha_policy
from randopt.lorasqueeze.training import (MOMENT_MODES, InSqueezeReport, RankSchedule, lora_ranks, maybe_squeeze,
                                          rank_metrics, unwrap_optimizer)

__all__ = ["SqueezeCallback"]


class SqueezeCallback(TrainerCallback):
    """Squeeze the active LoRA adapter(s) to ``schedule.rank_at(optimizer step count)`` after each optimizer
    step. ``moments``: ``"project"`` (default) or ``"reset"``; ``alpha``: as in ``squeeze_in_training``.
    ``reports`` keeps every squeeze's ``InSqueezeReport``; ``last_report`` the latest."""

    def __init__(self, schedule: RankSchedule, moments: str = "project", alpha="keep_scale", adapter_names=None):
        if not isinstance(schedule, RankSchedule):
            raise ValueError(f"schedule must be a RankSchedule, got {type(schedule).__name__}")
        if moments not in MOMENT_MODES:
            raise ValueError(f"moments must be one of {MOMENT_MODES}, got {moments!r}")
        check_alpha_policy(alpha)
        self.schedule, self.moments, self.alpha, self.adapter_names = schedule, moments, alpha, adapter_names
        self.reports: list[InSqueezeReport] = []
        self.last_report: InSqueezeReport | None = None
        self._ranks: dict[str, int] = {}

    @classmethod
    def attach(cls, trainer, schedule: RankSchedule, **kwargs) -> "SqueezeCallback":
        """Add the callback FIRST, so reporting integrations (TensorBoard, W&B, the printer) see its keys."""
        callback = cls(schedule, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._ranks = lora_ranks(model, self.adapter_names)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            return
        report = maybe_squeeze(model, unwrap_optimizer(optimizer), self.schedule, moments=self.moments,
                               alpha=self.alpha, adapter_names=self.adapter_names)
        if report is not None:
            self.reports.append(report)
            self.last_report = report
            self._ranks = report.ranks

    def metrics(self) -> dict[str, float]:
        """What ``on_log`` adds: the current ranks and the last squeeze's numbers."""
        if self.last_report is not None:
            return self.last_report.metrics()
        return rank_metrics(self._ranks)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        metrics = self.metrics()
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)
