"""Run under torchrun with 2 ranks (gloo, CPU): randopt's optimizers on models sharded with FSDP2 (``fully_shard``).

Every case trains a sharded model on half of each global batch per rank, and (on every rank, in-process) the same
unsharded model on the whole batch with the same optimizer; rank 0 saves losses and gathered weights of both, the
optimizer's own traffic, and the errors of the refused setups, to ``<out>/results.pt``.

Layer sizes are odd so that FSDP pads dim 0: 7 rows split 4 + 3, and the 1-row head (and its bias) leaves rank 1
an empty shard; the Conv1D layer is sharded along its input dimension (its stored rows).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard

import randopt
from conftest import LLAMA_TARGETS
from distributed import finish_distributed, start_distributed
from fsdp2_integrations import accelerate_case, trainer_case

STEPS, RESUME_AT, MICRO = 5, 3, 2
TARGETS = ["fc"]


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.blocks = nn.ModuleList([Block(12, 7), Block(7, 9)])
        self.proj = Conv1D(5, 9)  # stored in x out (9 x 5): RandLoRA trains it with fan_in_fan_out
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(torch.tanh(self.proj(x))).squeeze(-1)


def make_model(lora: bool):
    torch.manual_seed(0)
    model = Net()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    return model


def make_optimizer(kind: str, model):
    if kind == "randlora":
        return randopt.RandLoRAAdamW(randopt.param_groups(model, TARGETS + ["proj"], rank=3, alpha=6.0), lr=2e-2)
    mode = kind.removeprefix("lorapro_")
    return randopt.LoRAProAdamW(model, lr=2e-2, mode=mode, weight_decay=0.1, decay_base_weight=True)


def shard(model, mp_policy=None, mesh=None):
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    if mesh is not None:
        kwargs["mesh"] = mesh
    blocks = model.base_model.model.blocks if hasattr(model, "base_model") else model.blocks
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=generator), torch.randn(8, generator=generator)) for _ in range(STEPS)]


def train_step(model, opt, x, y, sharded: bool):
    """Two micro-batches accumulated (FSDP2 reduce-scatters only after the last), clipping at 0.5, one step."""
    total = 0.0
    for i, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
        if sharded:
            model.set_requires_gradient_sync(i == MICRO - 1)
        loss = nn.functional.mse_loss(model(xm).float(), ym) / MICRO
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad()
    return total


def local_batch(x, y, rank, world):
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def mean_over_ranks(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def full_weights(model) -> dict:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for name, p in model.state_dict().items()}


def reference(kind):
    model = make_model(kind != "randlora")
    opt = make_optimizer(kind, model)
    losses = [train_step(model, opt, x, y, sharded=False) for x, y in batches()]
    return losses, full_weights(model)


def sharded_run(kind, rank, world, steps=range(STEPS), model=None, opt=None, mp_policy=None):
    if model is None:
        model = shard(make_model(kind != "randlora"), mp_policy)
        opt = make_optimizer(kind, model)
    data = batches()
    losses = [mean_over_ranks(train_step(model, opt, *local_batch(*data[i], rank, world), sharded=True))
              for i in steps]
    return model, opt, losses


def coefficient_bytes(opt) -> int:
    return sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("lambda", "gamma") if k in s)


def factor_bytes(opt) -> int:
    return sum(p.numel() * p.element_size() for g in opt.param_groups if g.get("lora_scale") for p in g["params"])


def parity_case(kind, rank, world, mp_policy=None) -> dict:
    model, opt, losses = sharded_run(kind, rank, world, mp_policy=mp_policy)
    ref_losses, ref_weights = reference(kind)
    return {"losses": losses, "weights": full_weights(model), "reference_losses": ref_losses,
            "reference_weights": ref_weights, "communicated": dict(opt.communicated),
            "coefficient_bytes": coefficient_bytes(opt), "factor_bytes": factor_bytes(opt),
            "optimizer_class": type(opt).__name__,
            "fan_in_fan_out_matrices": sum(len(g["params"]) for g in opt.param_groups if g.get("fan_in_fan_out"))}


def resume_case(kind, rank, world, out: Path, full: bool) -> dict:
    """Save at RESUME_AT with DCP (sharded) or as full state dicts, resume in a fresh model and optimizer."""
    options = StateDictOptions(full_state_dict=full)
    model, opt, losses = sharded_run(kind, rank, world, steps=range(RESUME_AT))
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, opt, options=options)
    if full:  # what a user would write out: a snapshot (the live state dicts share tensors with the model)
        torch.save({"model": model_sd, "optim": optim_sd}, out.with_suffix(f".rank{rank}.pt"))
    else:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))
    _, _, rest = sharded_run(kind, rank, world, steps=range(RESUME_AT, STEPS), model=model, opt=opt)
    expected = full_weights(model)

    model = shard(make_model(kind != "randlora"))
    opt = make_optimizer(kind, model)
    if full:
        saved = torch.load(out.with_suffix(f".rank{rank}.pt"), weights_only=False)
        model_sd, optim_sd = saved["model"], saved["optim"]
    else:
        model_sd = get_model_state_dict(model, options=options)
        optim_sd = get_optimizer_state_dict(model, opt, options=options)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, opt, optim_sd, options=options)
    state_tensors_only = all(isinstance(v, torch.Tensor) for s in opt.state.values() for v in s.values())
    _, _, resumed = sharded_run(kind, rank, world, steps=range(RESUME_AT, STEPS), model=model, opt=opt)
    return {"losses": rest, "resumed_losses": resumed, "weights": expected, "resumed_weights": full_weights(model),
            "state_tensors_only": state_tensors_only}


def refused(build) -> str:
    """The error a setup we do not support raises at the first step (an empty string if none)."""
    try:
        model, opt = build()
        x, y = batches()[0]
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    except (RuntimeError, ValueError) as error:
        return str(error)
    return ""


def fsdp1():
    model = FullyShardedDataParallel(make_model(False), device_id=torch.device("cpu"))
    return model, randopt.RandLoRAAdamW(model.parameters(), lr=1e-2, rank=3)


def hsdp():
    model = shard(make_model(False), mesh=init_device_mesh("cpu", (1, dist.get_world_size()),
                                                              mesh_dim_names=("replicate", "shard")))
    return model, make_optimizer("randlora", model)


def eight_bit():
    model = shard(make_model(False))
    return model, randopt.RandLoRAAdamW(randopt.param_groups(model, TARGETS, rank=3), state_dtype="8bit",
                                        min_8bit_size=0)


def exact_weight_update():
    model = shard(make_model(False))
    return model, randopt.RandLoRAAdamW(randopt.param_groups(model, TARGETS, rank=3), weight_update="exact")


def main(out_dir):
    rank, world = start_distributed()
    out = Path(out_dir)
    results = {}
    for kind in ("randlora", "lorapro_full", "lorapro_efficient"):
        results[kind] = parity_case(kind, rank, world)
    results["randlora_bf16_compute"] = parity_case(
        "randlora", rank, world, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    for kind in ("randlora", "lorapro_full"):
        for full in (False, True):
            results[f"{kind}_resume_{'full' if full else 'sharded'}"] = resume_case(
                kind, rank, world, out / f"{kind}_checkpoint", full)
    results["refused"] = {"fsdp1": refused(fsdp1), "hsdp": refused(hsdp), "8bit": refused(eight_bit),
                          "exact": refused(exact_weight_update)}
    results["trainer_randlora"] = trainer_case(out / "trainer_randlora", {"optimizer": "RandLoRAAdamW", "rank": 3,
                                               "target_modules": LLAMA_TARGETS, "alpha": 5.0, "lr": 1e-2}, lora=False)
    results["accelerate_lorapro"] = accelerate_case()
    if rank == 0:
        torch.save(results, out / "results.pt")
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
