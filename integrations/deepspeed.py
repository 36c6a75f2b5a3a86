"""DeepSpeed: randopt's optimizers as client optimizers under ZeRO 1/2/3, and a config plugin.

Two ways to train with DeepSpeed (both work under ZeRO 1, 2 and 3, fp32 or ``"bf16": {"enabled": true}``,
with gradient accumulation and gradient clipping):

1. A ``"randopt"`` block in the DeepSpeed config, and this module's ``initialize`` instead of
   ``deepspeed.initialize``::

       cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
              "randopt": {"optimizer": "RandLoRAAdamW", "params": {"lr": 1e-4, "rank": 32},
                          "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"]}}
       engine, optimizer, _, _ = randopt.integrations.deepspeed.initialize(model=model, config=cfg)

   For ``LoRAProAdamW`` the model is a LoRA model (PEFT's or one with explicit pairs) and the block has no
   ``target_modules``: the optimizer finds the (A, B, scaling) pairs itself, e.g.
   ``{"optimizer": "LoRAProAdamW", "params": {"lr": 2e-5, "mode": "full"}}``.
   The block is checked (optimizer name, its parameters against the optimizer's signature, that
   ``target_modules`` matches trainable layers) before DeepSpeed starts, turned into parameter groups with
   ``randopt.param_groups`` (the block's ``modules_to_save``, ``train_rest`` and ``plain_lr`` go there: outside
   the targets only what they name trains), removed from the config, and the optimizer is handed to ``deepspeed.initialize``
   as a client optimizer. ``engine.basic_optimizer`` is the randopt optimizer.
2. Build the optimizer yourself and pass it: ``deepspeed.initialize(model=model, optimizer=opt, config=cfg)``;
   under ZeRO the config needs ``"zero_allow_untested_optimizer": true``.

DeepSpeed's ``optimizer.type`` cannot name a class outside its fixed list, so a ``"randopt"`` block is the way
to name ours in a config. ``engine.save_checkpoint`` / ``load_checkpoint`` carry the optimizer's state (each
rank saves its own copy of the replicated coefficients); elastic checkpoints and ZeRO-Offload of the
optimizer are refused (DeepSpeed would not call the optimizer's ``state_dict`` / would step on CPU copies).

transformers ``Trainer`` with ``TrainingArguments(deepspeed=...)`` silently drops ``optimizers=(opt, None)``
(it builds AdamW instead). ``check_trainer_optimizer(trainer)`` raises in that situation, before training.
"""
from __future__ import annotations

import copy
import importlib
import json
import os

from torch import nn

from randopt.optim.groups import param_groups
from randopt.trainable import TRAINABLE_SET_KEYS
from randopt.validation import keyword_arguments, target_modules

CONFIG_KEY = "randopt"
BLOCK_KEYS = ("optimizer", "params", "target_modules", *TRAINABLE_SET_KEYS)
OPTIMIZERS = {"RandLoRAAdamW": "randopt.optim.randlora_adamw:RandLoRAAdamW",
              "LoRAProAdamW": "randopt.optim.lorapro_adamw:LoRAProAdamW"}
"""Optimizers the plugin builds, by name."""
TARGETED = ("RandLoRAAdamW",)
"""Optimizers whose block names the layers to train (``target_modules``); LoRAProAdamW finds LoRA pairs itself."""
NOT_UNDER_DEEPSPEED = {
    "fused_backward": "DeepSpeed owns the gradients (it reduces and partitions them during backward)",
    "data_parallel": "under DeepSpeed the optimizer communicates by itself (one coefficient all-reduce per step)",
}


def optimizer_class(name: str):
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f'"{CONFIG_KEY}.optimizer" must be one of {sorted(OPTIMIZERS)}, got {name!r}')
    module, _, attribute = OPTIMIZERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_config(config) -> dict:
    """A DeepSpeed config as a new dict: from a dict (deep-copied) or a JSON file path."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            return json.load(handle)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(f"config must be a dict or the path of a JSON file, got {type(config).__name__}")


def _check_block(block) -> tuple[type, dict, object, dict]:
    if not isinstance(block, dict):
        raise ValueError(f'"{CONFIG_KEY}" must be a JSON object, got {type(block).__name__}')
    unknown = sorted(set(block) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in "{CONFIG_KEY}"; allowed: {list(BLOCK_KEYS)}')
    if "optimizer" not in block:
        raise ValueError(f'"{CONFIG_KEY}" needs "optimizer", one of {sorted(OPTIMIZERS)}')
    cls = optimizer_class(block["optimizer"])
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f'"{CONFIG_KEY}.params" must be a JSON object, got {type(params).__name__}')
    allowed = keyword_arguments(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f'unknown parameter(s) {unknown} for {block["optimizer"]} in "{CONFIG_KEY}.params"; '
                         f"it accepts {allowed}")
    try:
        cls.check_arguments(**params)
    except ValueError as error:
        raise ValueError(f'"{CONFIG_KEY}.params": {error}') from None
    for name, why in NOT_UNDER_DEEPSPEED.items():
        if params.get(name):
            raise ValueError(f'"{CONFIG_KEY}.params.{name}" cannot be used under DeepSpeed: {why}')
    if block["optimizer"] not in TARGETED:
        for key in ("target_modules", *TRAINABLE_SET_KEYS):
            if key in block:
                raise ValueError(f'"{CONFIG_KEY}.{key}" is not used by {block["optimizer"]}: it trains the LoRA '
                                 "pairs of the model it is given (choose them when you build the LoRA model)")
        return cls, dict(params), None, {}
    if "target_modules" not in block:
        raise ValueError(f'"{CONFIG_KEY}" needs "target_modules": the names (or a regex) of the layers to train '
                         "through the optimizer")
    return (cls, dict(params), target_modules(block["target_modules"], name=f"{CONFIG_KEY}.target_modules"),
            {k: block[k] for k in TRAINABLE_SET_KEYS if k in block})


def _check_deepspeed_config(config: dict) -> None:
    if "optimizer" in config:
        raise ValueError(f'the config has both an "optimizer" block and a "{CONFIG_KEY}" block: keep one')
    zero = config.get("zero_optimization") or {}
    if zero.get("elastic_checkpoint"):
        raise ValueError("zero_optimization.elastic_checkpoint is not supported: DeepSpeed would save only its own "
                         "flat optimizer state, not the optimizer's")
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in (None, "none"):
        raise ValueError("zero_optimization.offload_optimizer is not supported with randopt's optimizers")


def optimizer_from_config(model: nn.Module, config) -> tuple[object, dict]:
    """``(optimizer, deepspeed_config)`` from a config with a ``"randopt"`` block: every check runs here, before
    any training; the returned config lacks the block and allows the client optimizer under ZeRO."""
    config = load_config(config)
    if CONFIG_KEY not in config:
        raise ValueError(f'the config has no "{CONFIG_KEY}" block')
    cls, params, targets, trainable_set = _check_block(config.pop(CONFIG_KEY))
    _check_deepspeed_config(config)
    if cls.__name__ not in TARGETED:
        optimizer = cls(model, **params)
    else:
        rank = params.get("rank", 32)
        optimizer = cls(param_groups(model, targets, rank=rank, **trainable_set), **{**params, "rank": rank})
    if (config.get("zero_optimization") or {}).get("stage", 0):
        config.setdefault("zero_allow_untested_optimizer", True)
    return optimizer, config


def initialize(model: nn.Module = None, config=None, **kwargs):
    """``deepspeed.initialize`` that reads a ``"randopt"`` block from ``config`` (dict or JSON path) and passes the
    optimizer it describes as the client optimizer. Without the block it is plain ``deepspeed.initialize``.
    Returns DeepSpeed's ``(engine, optimizer, training_dataloader, lr_scheduler)``."""
    import deepspeed

    if model is None:
        raise ValueError("initialize needs model=")
    config = load_config(config) if config is not None else None
    if config is not None and CONFIG_KEY in config:
        if kwargs.get("optimizer") is not None:
            raise ValueError(f'pass either optimizer= or a "{CONFIG_KEY}" block in the config, not both')
        optimizer, config = optimizer_from_config(model, config)
        kwargs["optimizer"] = optimizer
    result = deepspeed.initialize(model=model, config=config, **kwargs)
    track_skipped_steps(result[0])
    return result


def track_skipped_steps(engine) -> None:
    """Let the randopt optimizer inside ``engine`` report the steps DeepSpeed skips as a whole: with a NaN/inf
    gradient the engine skips the step without calling the optimizer, so the optimizer's ``nonfinite_skips`` stays
    0; ``optimizer.engine_skipped_steps`` (and ``RandoptCallback``'s ``randopt/engine_skipped_steps``) reads the
    engine's count. ``initialize`` calls it, and so does ``RandoptCallback`` added with ``RandoptCallback.attach(trainer)``
    (the Trainer route); after a plain ``deepspeed.initialize``, call it yourself. Anything that is not an engine
    running a randopt optimizer is left alone."""
    optimizer = getattr(engine, "basic_optimizer", None)
    if hasattr(optimizer, "engine_skipped_steps"):
        optimizer.engine = engine


def _trainer_deepspeed_config(trainer):
    args = getattr(trainer, "args", None)
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return getattr(hf_config, "config", None)
    source = getattr(args, "deepspeed", None)
    if source is None:
        return None
    try:
        return load_config(source)
    except (OSError, ValueError):
        return None


def check_trainer_optimizer(trainer) -> None:
    """Raise ``ValueError`` where a transformers ``Trainer`` running DeepSpeed would silently replace the optimizer.

    Under ``TrainingArguments(deepspeed=...)``, ``Trainer(optimizers=(opt, None))`` is dropped (transformers builds
    its default AdamW at ``args.learning_rate`` instead), and a ``"randopt"`` block in the DeepSpeed config is not
    read by the Trainer. Call this before ``trainer.train()``. What works: build the optimizer in an overridden
    ``Trainer.create_optimizer`` (transformers calls it from its DeepSpeed setup and passes the result to DeepSpeed as
    a client optimizer), or, outside the Trainer, ``randopt.integrations.deepspeed.initialize``.
    """
    config = _trainer_deepspeed_config(trainer)
    enabled = bool(getattr(trainer, "is_deepspeed_enabled", False) or config is not None)
    if not enabled:
        return
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None and not hasattr(optimizer, "optimizer"):
        raise ValueError(
            f"this Trainer runs DeepSpeed, which drops the optimizer passed as Trainer(optimizers=(opt, ...)) "
            f"({type(optimizer).__name__}) and trains with transformers' default AdamW instead. Build the optimizer "
            "in an overridden Trainer.create_optimizer (set and return self.optimizer), or train with "
            "randopt.integrations.deepspeed.initialize")
    if config is not None and CONFIG_KEY in config:
        raise ValueError(f'the DeepSpeed config has a "{CONFIG_KEY}" block, which the Trainer does not read (it would '
                         "train with its default AdamW). Build the optimizer in an overridden Trainer.create_optimizer, "
                         "or train with randopt.integrations.deepspeed.initialize")
