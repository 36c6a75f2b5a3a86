"""transformers ``Trainer`` integration: a one-line optimizer hook-up and a callback.

    from randopt.integrations.transformers import RandoptCallback, randopt_optimizer

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=randopt_optimizer("RandLoRAAdamW", target_modules=["q_proj", "v_proj"],
                                                                 rank=32, lr=1e-4))
    RandoptCallback.attach(trainer)

``optimizer_cls_and_kwargs`` (not ``optimizers=(opt, None)``) is the route that also works with
``TrainingArguments(deepspeed=...)``: transformers drops ``optimizers=`` silently under DeepSpeed. The
Trainer builds our optimizer from the model through a factory, so target modules are resolved by name.
transformers does not pass its arguments to an optimizer built this way, so ``randopt_optimizer(..., args=args)``
reads them itself: ``learning_rate``, ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon`` (a keyword given here
overrides), and with ``fused_backward=True`` ``max_grad_norm`` (see ``randopt_optimizer``).
"""
from __future__ import annotations

import math
import warnings
import weakref
from pathlib import PurePath

import torch
from transformers import TrainerCallback

import randopt
from randopt import validation
from randopt.integrations.squeeze_trainer import SqueezeCallback  # noqa: F401  (re-exported)
from randopt.optim.lorapro_adamw import LoRAProAdamW
from randopt.optim.randlora_adamw import RandLoRAAdamW
from randopt.randlora.functional import reconstruct, scaled_basis
from randopt.trainable import TRAINABLE_SET_KEYS

OPTIMIZERS = {"RandLoRAAdamW": RandLoRAAdamW, "LoRAProAdamW": LoRAProAdamW}


class RandoptOptimizerFactory:
    """transformers calls ``Factory()(model, **kwargs)`` for any optimizer class that is not a
    ``torch.optim.Optimizer``: this is how we get the model, to resolve target modules by name."""

    def __call__(self, model, optimizer: str = "RandLoRAAdamW", target_modules=None, **kwargs):
        built = build_optimizer(model, optimizer, target_modules=target_modules, **kwargs)
        built._randopt_default_lr = "lr" not in kwargs  # read by RandoptCallback: the lr nobody chose
        return built


def check_optimizer_arguments(optimizer: str, target_modules=None, **kwargs) -> None:
    """Everything ``build_optimizer`` checks that does not need the model: the name, ``target_modules`` and the
    optimizer's keyword arguments (names and values), as its constructor checks them."""
    validation.choice("optimizer", optimizer, sorted(OPTIMIZERS))
    if optimizer == "RandLoRAAdamW":
        if target_modules is None:
            raise ValueError("RandLoRAAdamW needs target_modules (names of the linear layers to train through "
                             "RandLoRA), got None")
        validation.target_modules(target_modules)
        kwargs = {k: v for k, v in kwargs.items() if k not in TRAINABLE_SET_KEYS}
    elif target_modules is not None:
        raise ValueError("LoRAProAdamW finds the LoRA pairs itself; target_modules must be None, "
                         f"got {target_modules!r}")
    OPTIMIZERS[optimizer].check_arguments(**kwargs)


def build_optimizer(model, optimizer: str, target_modules=None, **kwargs) -> torch.optim.Optimizer:
    """Build a randopt optimizer for ``model`` by name: RandLoRAAdamW over ``target_modules`` (required)
    with plain AdamW for the other trainable parameters, or LoRAProAdamW over the model's LoRA pairs."""
    check_optimizer_arguments(optimizer, target_modules, **kwargs)
    if optimizer == "RandLoRAAdamW":
        group_keys = ("rank", "alpha", "seed", "basis_kind", *TRAINABLE_SET_KEYS)
        group_options = {k: kwargs.pop(k) for k in group_keys if k in kwargs}
        return RandLoRAAdamW(randopt.param_groups(model, target_modules, **group_options), **kwargs)
    return LoRAProAdamW(model, **kwargs)


def _from_training_arguments(args) -> dict:
    names = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm")
    if any(not hasattr(args, name) for name in names):
        raise ValueError(f"args must be the Trainer's transformers.TrainingArguments (with {', '.join(names)}), got "
                         f"{type(args).__name__}")
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay, "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon}


def randopt_optimizer(optimizer: str = "RandLoRAAdamW", args=None, **kwargs) -> tuple[type, dict]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)``. Checks the optimizer name, ``target_modules`` and
    every keyword argument (names and values) now, so a typo fails here rather than when the Trainer builds it.

    ``args``: the ``TrainingArguments`` of the Trainer. Its ``learning_rate``, ``weight_decay``, ``adam_beta1/2``
    and ``adam_epsilon`` become the optimizer's ``lr``, ``weight_decay``, ``betas`` and ``eps`` unless given here
    (transformers does not pass them to a factory-built optimizer). With ``fused_backward=True`` the Trainer's own
    clipping cannot see the gradients the optimizer projected and freed during backward, so a
    ``args.max_grad_norm > 0`` becomes the optimizer's ``max_grad_norm`` (same total norm, see ``RandLoRAAdamW``)
    and ``args.max_grad_norm`` is set to 0 so that the Trainer does not clip the remaining gradients a second time.
    Other keywords: the optimizer's, plus ``target_modules``, ``rank``, ``alpha``, ``seed``, ``basis_kind``,
    ``modules_to_save``, ``train_rest`` and ``plain_lr`` for ``randopt.param_groups`` (RandLoRAAdamW)."""
    if args is not None:
        kwargs = {**_from_training_arguments(args), **kwargs}
    check_optimizer_arguments(optimizer, **kwargs)
    if args is not None and kwargs.get("fused_backward") and args.max_grad_norm and "max_grad_norm" not in kwargs:
        kwargs["max_grad_norm"] = float(args.max_grad_norm)
        args.max_grad_norm = 0.0
    return RandoptOptimizerFactory, {"optimizer": optimizer, **kwargs}


def unwrap_optimizer(optimizer):
    """Our optimizer inside accelerate's or DeepSpeed's wrappers (each keeps it as ``.optimizer``)."""
    seen = set()
    while optimizer is not None and not isinstance(optimizer, tuple(OPTIMIZERS.values())) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, tuple(OPTIMIZERS.values())) else None


def randlora_metrics(optimizer: RandLoRAAdamW) -> dict[str, float]:
    """Norms of the coefficients and of the whole learned update ``dW`` over all RandLoRA matrices
    (computed at log time from the optimizer state: one ``dW`` reconstruction per matrix)."""
    lam_sq = gam_sq = update_sq = 0.0
    for _, _, lam, gam, layer, scale in optimizer.matrices():
        lam_sq += lam.square().sum().item()
        gam_sq += gam.square().sum().item()
        update_sq += reconstruct(layer, scaled_basis(layer.A, lam, gam), scale).square().sum().item()
    return {"randopt/lambda_norm": math.sqrt(lam_sq), "randopt/gamma_norm": math.sqrt(gam_sq),
            "randopt/update_norm": math.sqrt(update_sq)}


def optimizer_metrics(optimizer) -> dict[str, float]:
    """What users of these methods watch, for whichever randopt optimizer is in use."""
    metrics = {"randopt/nonfinite_skips": float(optimizer.nonfinite_skips)}
    if optimizer.engine is not None:
        metrics["randopt/engine_skipped_steps"] = float(optimizer.engine_skipped_steps)
    if getattr(optimizer, "last_grad_norm", None) is not None:
        metrics["randopt/grad_norm"] = optimizer.last_grad_norm
    if isinstance(optimizer, RandLoRAAdamW):
        metrics.update(randlora_metrics(optimizer))
    extra = getattr(optimizer, "metrics", None)
    if callable(extra):
        metrics.update({f"randopt/{k}": float(v) for k, v in extra().items()})
    return metrics


class RandoptCallback(TrainerCallback):
    """Adds randopt's metrics to every Trainer log (``randopt/...`` keys) and, when ``export_adapter`` is
    set, writes the learned RandLoRA update as a PEFT adapter into each checkpoint directory.

    Under DeepSpeed, a callback added with ``attach`` also counts the steps the engine skips as a whole (a NaN/inf
    gradient: DeepSpeed then never calls the optimizer) as ``randopt/engine_skipped_steps``: it hands the Trainer's
    engine to ``track_skipped_steps`` when training begins. Transformers does not show callbacks the engine, so a
    callback given as ``Trainer(callbacks=[...])`` cannot, and says so."""

    def __init__(self, export_adapter: bool = True, adapter_subdir: str = "randopt_adapter"):
        self.export_adapter = validation.flag("export_adapter", export_adapter)
        parts = PurePath(adapter_subdir).parts if isinstance(adapter_subdir, str) else ()
        if not parts or PurePath(adapter_subdir).is_absolute() or any(part in (".", "..") for part in parts):
            # the export replaces that directory: it must be a new one inside each checkpoint, not the checkpoint
            raise ValueError("adapter_subdir must name a directory inside each checkpoint (relative, without '.' or "
                             f"'..' parts), e.g. 'randopt_adapter', got {adapter_subdir!r}")
        self.adapter_subdir = adapter_subdir
        self._trainer = None

    @classmethod
    def attach(cls, trainer, **kwargs) -> "RandoptCallback":
        """Add the callback FIRST, so reporting integrations (TensorBoard, W&B, the printer) see our keys; it keeps a
        weak reference to ``trainer`` to find its DeepSpeed engine."""
        if not hasattr(getattr(trainer, "callback_handler", None), "callbacks"):
            raise ValueError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        callback = cls(**kwargs)
        callback._trainer = weakref.ref(trainer)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def _track_engine(self, args, ours) -> None:
        """Let ``ours`` read the skip count of the DeepSpeed engine the Trainer runs it in (a no-op without one)."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            from randopt.integrations.deepspeed import track_skipped_steps

            track_skipped_steps(getattr(trainer, "model_wrapped", None))
        elif getattr(args, "deepspeed", None) and ours.engine is None:
            warnings.warn("RandoptCallback: this Trainer runs DeepSpeed, whose engine skips a step with a NaN/inf "
                          "gradient without calling the optimizer; a callback given as Trainer(callbacks=[...]) cannot "
                          "see the engine to count those steps (randopt/engine_skipped_steps): add it with "
                          "RandoptCallback.attach(trainer) instead", stacklevel=2)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ours = unwrap_optimizer(optimizer)
        if ours is None:
            warnings.warn("RandoptCallback: the Trainer's optimizer is not a randopt optimizer. Under "
                          "TrainingArguments(deepspeed=...) transformers ignores optimizers=(opt, None); pass "
                          "optimizer_cls_and_kwargs=randopt_optimizer(...) instead.", stacklevel=2)
            return
        self._track_engine(args, ours)
        lrs = {group["lr"] for group in ours.param_groups}
        if getattr(ours, "_randopt_default_lr", False) and args.learning_rate not in lrs:
            warnings.warn(f"RandoptCallback: the optimizer runs at its default learning rate {sorted(lrs)}, not "
                          f"TrainingArguments.learning_rate={args.learning_rate}: pass args=training_args (or lr=) "
                          "to randopt_optimizer", stacklevel=2)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        ours = unwrap_optimizer(optimizer)
        if ours is None or logs is None or not any(k == "loss" or k.startswith("train") for k in logs):
            return
        metrics = optimizer_metrics(ours)
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        ours = unwrap_optimizer(optimizer)
        if getattr(ours, "decay_base_weight", False):
            warnings.warn("RandoptCallback: LoRAProAdamW(decay_base_weight=True) decays the frozen base weights in place: "
                          "the adapter in this checkpoint does not reproduce the trained model without them, and a "
                          "resume from it starts from the undecayed base; save the base weights too", stacklevel=2)
        if not self.export_adapter or not isinstance(ours, RandLoRAAdamW) or not state.is_world_process_zero:
            return
        from randopt.integrations.peft import export_randlora_adapter

        checkpoint = f"{args.output_dir}/checkpoint-{state.global_step}"
        export_randlora_adapter(model, ours, f"{checkpoint}/{self.adapter_subdir}")
