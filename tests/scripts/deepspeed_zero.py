"""Run under torchrun with 2 ranks (gloo, DS_ACCELERATOR=cpu): RandLoRAAdamW and LoRAProAdamW under DeepSpeed
ZeRO 1, 2 and 3 in ONE launch (re-initialising DeepSpeed per case), against a single-process run of the same
optimizer on the global batch that rank 0 runs. Writes ``<out_dir>/results.pt``: per case the losses, final fp32 weights, fragment addresses and
communication counts of the DeepSpeed run, the reference's losses and weights, and for the checkpoint case the
losses and weights of a run resumed with ``engine.load_checkpoint``."""
import math
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

import randopt
from distributed import finish_distributed, start_distributed
from randopt.integrations import deepspeed as randopt_deepspeed

STEPS, RESUME_AT, SEQ, GLOBAL_BATCH = 5, 3, 8, 4
OPTIONS = dict(lr=1e-2, weight_decay=0.1, rank=3, alpha=5.0)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]


def llama(seed=0):
    """One layer (two equal layers would put the ZeRO 1/2 boundary between them) and an odd MLP width, so that
    partition boundaries fall inside a targeted matrix, and inside one of its rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=37,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                        max_position_embeddings=32))


def gpt2(seed=0):
    """Conv1D weights, stored in x out (fan_in_fan_out groups); one layer and an odd MLP width, as above."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_inner=37, vocab_size=50, n_positions=32,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    # the key part of c_attn's bias has an exactly zero gradient (softmax ignores a per-query constant): AdamW turns
    # its rounding noise into lr-sized steps that differ between any two summation orders. Frozen, it also tests
    # that frozen parameters stay out of the way.
    model.transformer.h[0].attn.c_attn.bias.requires_grad_(False)
    return model


def lora_llama(seed=0, factor_seed=None):
    """A PEFT LoRA model (r=3) on the one-layer llama: each pair is its own parameter group, and with 2 ranks the
    boundary of down_proj's group (A 3 x 37, B 16 x 3) falls inside A, mid-row. B starts nonzero (from
    ``factor_seed``) so that the whole adjustment runs from the first step; the final norm is a trainable plain
    parameter."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(seed), LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    generator = torch.Generator().manual_seed(seed if factor_seed is None else factor_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    return model


MODELS = {"llama": (llama, LLAMA_TARGETS), "gpt2": (gpt2, GPT2_TARGETS), "lora_llama": (lora_llama, None)}
LORAPRO_OPTIONS = dict(lr=1e-2, weight_decay=0.1, decay_base_weight=True)  # the W0 decay is under test too
CASES = [
    # name, model, zero config, gradient accumulation, clipping, how the optimizer reaches DeepSpeed, extra config
    dict(name="zero1", model="llama", zero={"stage": 1}, gas=1, clip=0.0, route="client"),
    dict(name="zero2", model="gpt2", zero={"stage": 2}, gas=2, clip=0.5, route="plugin"),
    dict(name="zero3", model="llama", gas=1, clip=0.0, route="client", checkpoint=True, weight_update="exact",
         zero={"stage": 3, "sub_group_size": 400, "stage3_param_persistence_threshold": 0}),
    dict(name="zero1_bf16", model="llama", zero={"stage": 1}, gas=1, clip=0.0, route="plugin",
         extra={"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}),
    dict(name="zero3_bf16", model="gpt2", gas=2, clip=0.5, route="client", extra={"bf16": {"enabled": True}},
         zero={"stage": 3, "sub_group_size": 400, "stage3_param_persistence_threshold": 0}),
    # LoRAProAdamW (client optimizer): full mode with a checkpoint in ZeRO-1, efficient mode with accumulation and
    # clipping in ZeRO-2, full mode (W0 decayed on its ZeRO-3 partition) in ZeRO-3
    dict(name="lorapro_zero1_full", model="lora_llama", optimizer="lorapro", mode="full", zero={"stage": 1}, gas=1,
         clip=0.0, route="client", checkpoint=True),
    dict(name="lorapro_zero2_efficient", model="lora_llama", optimizer="lorapro", mode="efficient",
         zero={"stage": 2}, gas=2, clip=0.5, route="client"),
    dict(name="lorapro_zero3_full", model="lora_llama", optimizer="lorapro", mode="full", gas=1, clip=0.0,
         route="client", zero={"stage": 3, "sub_group_size": 400, "stage3_param_persistence_threshold": 0}),
]


def ds_config(case, with_block: bool) -> dict:
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // 2 // case["gas"],
              "gradient_accumulation_steps": case["gas"], "gradient_clipping": case["clip"],
              "zero_optimization": dict(case["zero"]), "steps_per_print": 10 ** 9, **case.get("extra", {})}
    if with_block:
        params = {k: v for k, v in OPTIONS.items()}
        config["randopt"] = {"optimizer": "RandLoRAAdamW", "params": params,
                             "target_modules": MODELS[case["model"]][1], "train_rest": True}
    else:
        config["zero_allow_untested_optimizer"] = True
    return config


def make_engine(case, seed=0):
    make, targets = MODELS[case["model"]]
    if case.get("optimizer") == "lorapro":
        # a resumed run keeps the base model (frozen W0 must come back from the checkpoint too: full mode decays it)
        # but starts from other LoRA factors, which the checkpoint must overwrite
        model = make(0, factor_seed=None if seed == 0 else 100 + seed)
        optimizer = randopt.LoRAProAdamW(model, mode=case["mode"], **LORAPRO_OPTIONS)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case, False))
        return engine
    model = make(seed)
    if case["route"] == "plugin":
        engine, *_ = randopt_deepspeed.initialize(model=model, config=ds_config(case, True))
    else:
        rank = OPTIONS["rank"]
        options = {k: v for k, v in OPTIONS.items() if k != "rank"}
        optimizer = randopt.RandLoRAAdamW(randopt.param_groups(model, targets, rank=rank, train_rest=True), rank=rank,
                                          weight_update=case.get("weight_update", "stochastic"), **options)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case, False))
    return engine


def micro_batches(batch, case, rank):
    mine = batch[rank * GLOBAL_BATCH // 2: (rank + 1) * GLOBAL_BATCH // 2]
    size = mine.shape[0] // case["gas"]
    return [mine[i * size: (i + 1) * size] for i in range(case["gas"])]


def train(engine, batches, case):
    losses = []
    for batch in batches:
        total = 0.0
        for micro in micro_batches(batch, case, dist.get_rank()):
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            total += loss.item() / case["gas"]
        mean = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    return losses


def full_weights(engine) -> dict:
    """Every trainable parameter's fp32 master weight, whole, and every LoRA base weight (frozen: LoRA-Pro's full
    mode decays it) gathered (collectives: all ranks call it)."""
    weights = {name: safe_get_full_fp32_param(p).detach().clone() for name, p in engine.module.named_parameters()
               if p.requires_grad}
    bases = [(name, p) for name, p in engine.module.named_parameters() if name.endswith("base_layer.weight")]
    with deepspeed.zero.GatheredParameters([p for _, p in bases]):
        weights.update({name: p.detach().clone() for name, p in bases})
    return weights


def tracked_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad or n.endswith("base_layer.weight")}


def low_precision_matches_master(engine) -> bool:
    """Whether the model's (low-precision) weights are the rounding of the fp32 master weights: a matrix updated
    after DeepSpeed copied its partition must have been re-synced."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    masters = [safe_get_full_fp32_param(p) for p in params]
    with deepspeed.zero.GatheredParameters(params):
        return all(torch.equal(p.detach(), m.to(p.dtype).view_as(p)) for p, m in zip(params, masters))


def count_calls(optimizer) -> list:
    """Count the optimizer's step() calls (DeepSpeed makes one per group or sub-group)."""
    calls, step = [], optimizer.step

    def counted(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    optimizer.step = counted
    return calls


def fragments(engine) -> list:
    """``(name, numel, columns, start, count)`` of the part of each RandLoRA matrix (LoRA factor for LoRA-Pro) this
    rank owns, read from DeepSpeed's own fragment addresses (``_hp_mapping`` for ZeRO 1/2, the ZeRO-3 partition
    otherwise)."""
    optimizer = engine.basic_optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    found = []
    for group in optimizer._all_groups:
        if group.get("rank", group.get("lora_scale")) is None:
            continue
        for p in optimizer._params_of(group):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            numel, cols = shape[0] * shape[1], shape[1]
            if hasattr(p, "ds_id"):
                per_rank = p.partition_numel()
                start = dist.get_rank(group=p.ds_process_group) * per_rank
                count = max(0, min(per_rank, numel - start))
            elif p._hp_mapping is not None:
                start, count = p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel
            else:
                start, count = 0, 0
            found.append((names[id(p)], numel, cols, start, count))
    return found


def reference(case, batches):
    """Single process, no DeepSpeed, the whole global batch per step (clipped like DeepSpeed clips)."""
    make, targets = MODELS[case["model"]]
    model = make(0)
    options = {k: v for k, v in OPTIONS.items() if k != "rank"}
    if case.get("optimizer") == "lorapro":
        optimizer = randopt.LoRAProAdamW(model, mode=case["mode"], **LORAPRO_OPTIONS)
    else:
        optimizer = randopt.RandLoRAAdamW(randopt.param_groups(model, targets, rank=OPTIONS["rank"], train_rest=True),
                                          rank=OPTIONS["rank"], weight_update=case.get("weight_update", "stochastic"),
                                          **options)
    losses, norms = [], []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if case["clip"]:
            trainable = [p for p in model.parameters() if p.requires_grad]
            norms.append(torch.nn.utils.clip_grad_norm_(trainable, case["clip"]).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, tracked_weights(model), norms


def run_case(case, batches, out_dir):
    result = {}
    engine = make_engine(case)
    optimizer = engine.basic_optimizer
    calls = count_calls(optimizer)
    result["optimizer_class"] = type(optimizer).__name__
    result["fragments"] = [None] * dist.get_world_size()
    dist.all_gather_object(result["fragments"], fragments(engine))
    if case.get("checkpoint"):
        losses = train(engine, batches[:RESUME_AT], case)
        engine.save_checkpoint(out_dir, tag=case["name"])
        saved_state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
        losses += train(engine, batches[RESUME_AT:], case)
    else:
        losses = train(engine, batches, case)
    result["losses"], result["weights"] = losses, full_weights(engine)
    result["communicated"] = dict(optimizer.communicated)
    result["coefficient_bytes"] = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values()
                                      for k in ("lambda", "gamma") if k in s)
    if case.get("optimizer") == "lorapro":
        pairs = [g for g in optimizer._all_groups if g["lora_scale"] is not None]
        result["factor_bytes"] = sum(4 * math.prod(getattr(p, "ds_shape", p.shape))
                                     for g in pairs for p in optimizer._params_of(g))
        mine = sorted(g["name"] for g in pairs if "w_exp_avg" in optimizer.state.get(optimizer._params_of(g)[0], {}))
        result["full_moments_of"] = [None] * dist.get_world_size()
        dist.all_gather_object(result["full_moments_of"], mine)
        result["pair_names"] = sorted(g["name"] for g in pairs)
        result["skipped"] = optimizer.nonfinite_skips
    result["step_calls"] = len(calls)
    result["low_precision_matches_master"] = low_precision_matches_master(engine)
    engine.destroy()
    if case.get("checkpoint"):
        resumed = make_engine(case, seed=1)
        resumed.load_checkpoint(out_dir, tag=case["name"])
        loaded_state = resumed.basic_optimizer.state_dict()
        result["state_restored"] = saved_state.keys() == loaded_state["state"].keys() and all(
            torch.equal(value, loaded_state["state"][i][k]) for i, s in saved_state.items() for k, value in s.items())
        result["resumed_losses"] = train(resumed, batches[RESUME_AT:], case)
        result["resumed_weights"] = full_weights(resumed)
        resumed.destroy()
    if dist.get_rank() == 0:
        result["reference_losses"], result["reference_weights"], result["reference_grad_norms"] = reference(case,
                                                                                                            batches)
    return result


def factory_training(out_dir) -> dict:
    """Train 3 steps with ``Trainer(optimizer_cls_and_kwargs=randopt_optimizer(...))`` under
    ``TrainingArguments(deepspeed=...)`` (ZeRO-2): the optimizer DeepSpeed steps must be ours. The second step's
    loss is NaN on every rank: the engine skips that step, and the attached ``RandoptCallback`` logs it."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from randopt.integrations.transformers import RandoptCallback, randopt_optimizer, unwrap_optimizer

    AcceleratorState._reset_state(True)
    model = llama(0)
    forwards = [0]

    def nan_at_second_step(module, inputs, output):
        forwards[0] += 1
        return output * float("nan") if forwards[0] == 2 else output
    model.lm_head.register_forward_hook(nan_at_second_step)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("q_proj.weight")}
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (8, SEQ), generator=torch.Generator()
                                                                          .manual_seed(3))]
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True}
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, report_to=[], max_steps=3,
                             per_device_train_batch_size=2, deepspeed=config, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=randopt_optimizer("RandLoRAAdamW", target_modules=LLAMA_TARGETS,
                                                                 rank=3, lr=1e-2))
    randopt_deepspeed.check_trainer_optimizer(trainer)
    RandoptCallback.attach(trainer, export_adapter=False)
    trainer.train()
    engine = trainer.model_wrapped
    after = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()
             if n in before}
    optimizer = unwrap_optimizer(trainer.optimizer)
    return {"optimizer": type(optimizer).__name__, "deepspeed_optimizer": type(engine.basic_optimizer).__name__,
            "steps": int(trainer.state.global_step), "changed": all(not torch.equal(before[n], after[n]) for n in before),
            "coefficient_all_reduces": optimizer.communicated["all_reduces"] if optimizer is not None else 0,
            "engine_skipped_steps": engine.skipped_steps,
            "logged": [{k: v for k, v in h.items() if k.startswith("randopt/")} for h in trainer.state.log_history
                       if "loss" in h]}


def trainer_checks(out_dir) -> dict:
    """``check_trainer_optimizer`` on real transformers Trainers running DeepSpeed: one given optimizers=(opt, None)
    (which transformers would drop), one building the optimizer in create_optimizer (which works)."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    class RandLoRATrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = randopt.RandLoRAAdamW(randopt.param_groups(self.model, LLAMA_TARGETS, rank=3), rank=3)
            return self.optimizer

    def optimizers_argument(args):
        model = llama(0)
        optimizer = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=3), rank=3)
        return Trainer(model=model, args=args, optimizers=(optimizer, None))

    outcomes = {"factory_training": factory_training(out_dir)}
    for name, make in (("optimizers_argument", optimizers_argument),
                       ("create_optimizer", lambda args: RandLoRATrainer(model=llama(0), args=args))):
        AcceleratorState._reset_state(True)  # one DeepSpeed Trainer per Accelerator state
        args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=2,
                                 deepspeed={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
        try:
            randopt_deepspeed.check_trainer_optimizer(make(args))
            outcomes[name] = None
        except ValueError as error:
            outcomes[name] = str(error)
    return outcomes


def main(out_dir):
    start_distributed(join=lambda backend: deepspeed.init_distributed(dist_backend=backend))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]
    only = os.environ.get("RANDOPT_DS_CASES")
    results = {}
    for case in CASES:
        if only and case["name"] not in only.split(","):
            continue
        results[case["name"]] = run_case(case, batches, out_dir)
        dist.barrier()
    if not only or "trainer" in only.split(","):
        results["trainer"] = trainer_checks(out_dir)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
