"""transformers Trainer integration: the optimizer factory, the callback's metrics, exact resume."""
import warnings

import pytest
import torch

from conftest import LLAMA_TARGETS, tiny_llama

transformers = pytest.importorskip("transformers")
from randopt.integrations.transformers import RandoptCallback, randopt_optimizer  # noqa: E402
from randopt.optim.randlora_adamw import RandLoRAAdamW  # noqa: E402


def dataset(n=12):
    generator = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 50, (8,), generator=generator) for _ in range(3)]
    return [{"input_ids": pool[i % 3], "labels": pool[i % 3]} for i in range(n)]


def make_trainer(tmp_path, max_steps=6, adapt=lambda model: model, **overrides):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        learning_rate=1e-2, lr_scheduler_type="constant", dataloader_num_workers=0)
    kwargs = {"optimizer_cls_and_kwargs": randopt_optimizer("RandLoRAAdamW", target_modules=LLAMA_TARGETS, rank=3,
                                                            alpha=5.0, lr=1e-2)}
    kwargs.update(overrides)
    model = adapt(tiny_llama(torch.float32))
    model.train()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), **kwargs)
    return trainer


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_factory_builds_randlora_adamw_and_callback_logs_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    RandoptCallback.attach(trainer, export_adapter=False)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      RandLoRAAdamW)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    assert all({"randopt/lambda_norm", "randopt/update_norm", "randopt/nonfinite_skips"} <= h.keys() for h in logged)
    assert logged[-1]["randopt/update_norm"] > logged[0]["randopt/update_norm"] > 0
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_lorapro_factory_logs_the_adjustment(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS)
    trainer = make_trainer(tmp_path, max_steps=3, adapt=lambda model: peft.get_peft_model(model, lora),
                           optimizer_cls_and_kwargs=randopt_optimizer("LoRAProAdamW", lr=1e-2, mode="efficient"))
    RandoptCallback.attach(trainer, export_adapter=False)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        assert h["randopt/nonfinite_skips"] == 0
        # LoRA-Pro rescales through (B^T B)^-1 and (A A^T)^-1: the adjusted gradients move far from LoRA's own
        assert h["randopt/lorapro/adjustment_distance"] > 0 and h["randopt/lorapro/relative_adjustment"] > 0


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    uninterrupted = make_trainer(tmp_path / "a")
    uninterrupted.train()
    first = make_trainer(tmp_path / "b", max_steps=6)
    first.args.max_steps = 3  # stop after the first checkpoint, as a crash would
    first.train()
    resumed = make_trainer(tmp_path / "b", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    expected = losses(uninterrupted)
    got = {**losses(first), **losses(resumed)}
    assert got == expected


def test_unknown_optimizer_name_fails_before_training():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        randopt_optimizer("RandLoraAdam")


def test_callback_warns_when_the_optimizer_is_not_ours(tmp_path):
    model = tiny_llama(torch.float32)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                          disable_tqdm=True, per_device_train_batch_size=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(4))
    RandoptCallback.attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("not a randopt optimizer" in str(w.message) for w in caught)


def trainer_with(tmp_path, **factory_options):
    """A Trainer whose optimizer factory is given the TrainingArguments (lr 1e-2, weight decay 0.05)."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        disable_tqdm=True, learning_rate=1e-2, weight_decay=0.05, adam_beta2=0.99, lr_scheduler_type="constant",
        save_strategy="no", max_grad_norm=0.5)
    factory = randopt_optimizer("RandLoRAAdamW", args, target_modules=LLAMA_TARGETS, rank=3, **factory_options)
    trainer = transformers.Trainer(model=tiny_llama(torch.float32), args=args, train_dataset=dataset(4),
                                   optimizer_cls_and_kwargs=factory)
    RandoptCallback.attach(trainer, export_adapter=False)
    return trainer


def test_factory_takes_the_training_arguments_and_the_callback_stays_quiet(tmp_path):
    trainer = trainer_with(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "RandoptCallback" in str(w.message)]
    group = trainer.optimizer.optimizer.param_groups[0] if hasattr(trainer.optimizer, "optimizer") else \
        trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-2, 0.05, (0.9, 0.99))
    assert trainer.args.max_grad_norm == 0.5, "without fused backward the Trainer clips, as usual"
    overridden = trainer_with(tmp_path / "o", lr=3e-3)
    overridden.create_optimizer()
    assert overridden.optimizer.param_groups[0]["lr"] == 3e-3


def test_fused_backward_moves_the_clipping_into_the_optimizer(tmp_path):
    trainer = trainer_with(tmp_path, fused_backward=True)
    trainer.train()
    ours = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert ours.max_grad_norm == 0.5 and trainer.args.max_grad_norm == 0.0
    assert ours.last_grad_norm is not None and ours.last_grad_norm > 0
    logged = [h for h in trainer.state.log_history if "randopt/grad_norm" in h]
    assert logged


def test_callback_warns_about_a_learning_rate_nobody_chose(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, optimizer_cls_and_kwargs=randopt_optimizer(
        "RandLoRAAdamW", target_modules=LLAMA_TARGETS, rank=3))
    RandoptCallback.attach(trainer, export_adapter=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("default learning rate" in str(w.message) for w in caught)


@pytest.mark.parametrize("arguments", [{"export_adapter": "no"}, {"export_adapter": 1}, {"adapter_subdir": ""},
                                       {"adapter_subdir": "."}, {"adapter_subdir": "../elsewhere"},
                                       {"adapter_subdir": "/tmp/adapter"}, {"adapter_subdir": "a/../../b"},
                                       {"adapter_subdir": None}])
def test_callback_arguments_are_checked_when_it_is_made(arguments):
    """Not at the first save, mid-training: an empty or '.' subdirectory would export over the checkpoint itself,
    '..' or an absolute path outside it; a string flag would export although it says 'no'."""
    with pytest.raises(ValueError, match=next(iter(arguments))):
        RandoptCallback(**arguments)
