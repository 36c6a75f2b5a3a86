"""Run under torchrun with 2 ranks (gloo): RandLoRAAdamW with fused_backward and data_parallel on half
of each global batch each; rank 0 also runs a single process on the whole batch and saves both."""
import sys

import torch
import torch.distributed as dist

import randopt
from conftest import LLAMA_TARGETS, tiny_llama
from distributed import finish_distributed, start_distributed


def run(model, opt, batches):
    losses = []
    for tokens in batches:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(out_dir):
    rank, world = start_distributed()
    generator = torch.Generator().manual_seed(0)
    global_batches = [torch.randint(0, 50, (4, 8), generator=generator) for _ in range(6)]
    communicated = []
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        communicated.append(tensor.numel() * tensor.element_size())
        return original_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.endswith(f"{t}.weight") for t in LLAMA_TARGETS))
    groups = randopt.param_groups(model, LLAMA_TARGETS, rank=3, alpha=5.0)
    opt = randopt.RandLoRAAdamW(groups, lr=1e-2, fused_backward=True, data_parallel=True)
    shard = slice(rank * 2, rank * 2 + 2)
    local_losses = run(model, opt, [b[shard] for b in global_batches])
    dist.all_reduce = original_all_reduce
    losses = torch.tensor(local_losses)
    original_all_reduce(losses)
    weight_bytes = sum(p.numel() * p.element_size() for g in groups for p in g["params"])
    coefficient_bytes = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("lambda", "gamma"))
    if rank == 0:
        torch.save({"losses": (losses / world).tolist(), "weights": dict(model.state_dict()),
                    "bytes_per_step": sorted(set(communicated)), "coefficient_bytes": coefficient_bytes,
                    "weight_gradient_bytes": weight_bytes},
                   f"{out_dir}/rank0.pt")
        single = tiny_llama()
        for name, p in single.named_parameters():
            p.requires_grad_(any(name.endswith(f"{t}.weight") for t in LLAMA_TARGETS))
        single_opt = randopt.RandLoRAAdamW(randopt.param_groups(single, LLAMA_TARGETS, rank=3, alpha=5.0), lr=1e-2)
        torch.save({"losses": run(single, single_opt, global_batches), "weights": dict(single.state_dict())},
                   f"{out_dir}/single.pt")
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
