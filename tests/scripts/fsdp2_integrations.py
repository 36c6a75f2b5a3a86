"""FSDP2 through accelerate and the transformers Trainer, on 2 CPU ranks (imported by ``fsdp2.py``, same launch).

accelerate turns FSDP on only for accelerator devices: on CPU it would silently train an unsharded model (its
``MULTI_CPU`` type), so these TEST-ONLY runs present the CPU process group as ``MULTI_GPU`` while accelerate decides
its distributed type (``fsdp_on_cpu``). On GPUs nothing of this is needed.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist

from conftest import LLAMA_TARGETS, tiny_llama

SEQ = 8


@contextmanager
def fsdp_on_cpu():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(True)
    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.MULTI_GPU
    try:
        yield
        if AcceleratorState().distributed_type != DistributedType.FSDP:
            raise RuntimeError("accelerate did not switch to FSDP")
    finally:
        state.distributed_type = DistributedType.MULTI_CPU


def dataset(n=16):
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (n, SEQ), generator=generator)]


def lora_llama():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(torch.float32), LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS,
                                                                init_lora_weights=False))


def make_trainer(out_dir, optimizer_kwargs, model, **overrides):
    from transformers import Trainer, TrainingArguments

    from randopt.integrations.transformers import RandoptCallback, randopt_optimizer

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_strategy="steps",
        save_steps=2, report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", learning_rate=1e-2, dataloader_num_workers=0, fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                     "state_dict_type": "SHARDED_STATE_DICT"}, **overrides)
    args.device  # noqa: B018  (sets up accelerate's process state, which fsdp_on_cpu adjusts)
    with fsdp_on_cpu():
        trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                          optimizer_cls_and_kwargs=randopt_optimizer(**optimizer_kwargs))
    RandoptCallback.attach(trainer)
    return trainer


def losses(trainer) -> dict:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def trainer_case(out_dir, optimizer_kwargs, lora: bool) -> dict:
    """4 steps, sharded checkpoint at step 2; a fresh Trainer resumes from it and must log the same losses."""
    from randopt.integrations.transformers import unwrap_optimizer

    model = lora_llama() if lora else tiny_llama(torch.float32)
    trainer = make_trainer(out_dir, optimizer_kwargs, model)
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    result = {"optimizer": type(optimizer).__name__, "losses": losses(trainer),
              "sharded": all(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
              "communicated": dict(optimizer.communicated),
              "logged_metrics": sorted({k for h in trainer.state.log_history for k in h if "/" in k}),
              "weights": full_weights(trainer.model),
              "adapter_exported": (out_dir / "checkpoint-2" / "randopt_adapter" / "adapter_config.json").is_file()}
    resumed = make_trainer(out_dir, optimizer_kwargs, lora_llama() if lora else tiny_llama(torch.float32))
    resumed.train(resume_from_checkpoint=str(out_dir / "checkpoint-2"))
    result["resumed_losses"], result["resumed_weights"] = losses(resumed), full_weights(resumed.model)
    return result


def full_weights(model) -> dict:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def accelerate_case() -> dict:
    """An accelerate script: LoRAProAdamW (full mode, weight decay on W0) built before ``accelerator.prepare``, which
    shards the model and swaps the optimizer's parameters; the optimizer must train the model's DTensors."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    import randopt

    model = lora_llama()
    optimizer = randopt.LoRAProAdamW(model, lr=1e-2, mode="full", weight_decay=0.1, decay_base_weight=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            auto_wrap_policy="transformer_based_wrap")
    with fsdp_on_cpu():
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    model, optimizer = accelerator.prepare(model, optimizer)
    name = next(n for n, _ in model.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    before = dict(model.named_parameters())[name].full_tensor().clone()
    data = dataset(8)
    rank = dist.get_rank()
    for i in range(2):
        batch = data[4 * i + 2 * rank: 4 * i + 2 * rank + 2]
        ids = torch.stack([b["input_ids"] for b in batch])
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())[name].full_tensor()
    return {"sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "base_weight_decay": (after / before).mean().item(), "steps": int(optimizer.optimizer.state[
                next(p for g in optimizer.optimizer.param_groups if g["lora_scale"] for p in g["params"])]["step"])}
