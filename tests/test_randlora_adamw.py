"""RandLoRAAdamW: exactness against the module route and PEFT, fused backward, bf16, resume, bad input."""
import copy

import pytest
import torch

import randopt
from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from distributed import run_distributed
from randopt.optim.precision import updated_weight
from randopt.randlora import inject_randlora, randlora_layers

RANK, ALPHA, LR, WD = 3, 5.0, 1e-2, 0.1
MODELS = [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)]
IDS = ["gpt2-conv1d", "llama-linear"]


def only_targets_trainable(model, targets):
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.endswith(f"{t}.weight") for t in targets))
    return model


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def batches(n, seed=5, distinct=3):
    """``n`` batches cycling through a few distinct ones, so that training visibly lowers the loss."""
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, 50, (2, 8), generator=generator) for _ in range(distinct)]
    return [pool[i % distinct] for i in range(n)]


def train(model, opt, data):
    losses = []
    for tokens in data:
        loss = lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_rel_close(actual, expected, rtol):
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((actual - expected).abs().max() / scale).item() <= rtol


@pytest.mark.parametrize("make_model,targets", MODELS, ids=IDS)
def test_matches_module_route_and_peft_for_50_steps(make_model, targets):
    peft = pytest.importorskip("peft")
    data = batches(50)
    plain = only_targets_trainable(make_model(), targets)
    opt = randopt.RandLoRAAdamW(randopt.param_groups(plain, targets, rank=RANK, alpha=ALPHA), lr=LR, weight_decay=WD)
    module_model = only_targets_trainable(make_model(), targets)
    inject_randlora(module_model, targets, rank=RANK, alpha=ALPHA)
    module_opt = torch.optim.AdamW([p for p in module_model.parameters() if p.requires_grad], lr=LR,
                                   weight_decay=WD)
    layers = dict(randlora_layers(module_model))
    bases = next(iter(layers.values())).shared.bases
    assert bases.fingerprint == opt._bases[(RANK, 0, "dense")].fingerprint

    peft_model = peft.get_peft_model(make_model(), peft.RandLoraConfig(r=RANK, randlora_alpha=ALPHA,
                                                                       target_modules=targets))
    for module in peft_model.modules():
        if hasattr(module, "randlora_A") and module.randlora_A is not None and "default" in module.randlora_A:
            module.randlora_A["default"] = bases.A.clone()
            module.randlora_B["default"] = bases.B.clone()
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)

    ours = train(plain, opt, data)
    module_losses = train(module_model, module_opt, data)
    peft_losses = train(peft_model, peft_opt, data)
    assert ours[-1] < ours[0] - 0.05, "training must make progress for the comparison to mean anything"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(module_losses), rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(peft_losses), rtol=1e-8, atol=0)
    peft_layers = {n.replace("base_model.model.", ""): m for n, m in peft_model.named_modules()
                   if hasattr(m, "get_delta_weight") and "default" in getattr(m, "randlora_lambda", {})}
    for name, layer in layers.items():
        weight = plain.get_submodule(name).weight
        assert_rel_close(weight, layer.base_layer.weight + layer.delta_weight(), 1e-8)
        peft_layer = peft_layers[name]
        assert_rel_close(weight, peft_layer.base_layer.weight + peft_layer.get_delta_weight("default"), 1e-8)
        state = opt.state[weight]
        assert_rel_close(state["lambda"], layer.randlora_lambda, 1e-8)
        assert_rel_close(state["gamma"], layer.randlora_gamma, 1e-8)


def make_optimizer(model, **kwargs):
    return randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA), lr=LR,
                                 weight_decay=WD, **kwargs)


def test_fused_backward_frees_gradients_and_accumulates_micro_batches():
    data = batches(8)
    reference = only_targets_trainable(tiny_llama(), LLAMA_TARGETS)
    reference_opt = make_optimizer(reference)
    fused = only_targets_trainable(tiny_llama(), LLAMA_TARGETS)
    fused_opt = make_optimizer(fused, fused_backward=True)
    targets = [p for p in fused.parameters() if p.requires_grad]
    for step in range(4):
        micro = data[2 * step: 2 * step + 2]
        for tokens in micro:
            (lm_loss(reference, tokens) / 2).backward()
        reference_opt.step()
        reference_opt.zero_grad()
        for tokens in micro:
            (lm_loss(fused, tokens) / 2).backward()
            assert all(p.grad is None for p in targets), "fused backward must free each weight gradient"
        fused_opt.step()
        fused_opt.zero_grad()
    for p, q in zip(reference.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert any(not torch.equal(p, q) for p, q in zip(tiny_llama().parameters(), fused.parameters()))


def test_stepping_groups_one_at_a_time_counts_steps_per_parameter():
    data = batches(5)
    whole = tiny_llama()
    whole_opt = randopt.RandLoRAAdamW(randopt.param_groups(whole, LLAMA_TARGETS, rank=RANK, alpha=ALPHA,
                                                           train_rest=True), lr=LR)
    split = tiny_llama()
    split_opt = randopt.RandLoRAAdamW(randopt.param_groups(split, LLAMA_TARGETS, rank=RANK, alpha=ALPHA,
                                                           train_rest=True), lr=LR)
    assert len(split_opt.param_groups) == 2
    train(whole, whole_opt, data)
    groups = split_opt.param_groups
    for tokens in data:
        lm_loss(split, tokens).backward()
        for group in groups:  # as DeepSpeed does: one group at a time
            split_opt.param_groups = [group]
            split_opt.step()
        split_opt.param_groups = groups
        split_opt.zero_grad()
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(s["step"].item() == len(data) for s in split_opt.state.values())


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_batched_coefficient_adamw_equals_one_matrix_at_a_time(state_dtype):
    """The coefficient AdamW of a group's matrices runs batched (``adamw_results``): bit-identical to a group per
    matrix, where each runs alone; also with step counts that differ between the matrices."""
    data = batches(4)
    runs = []
    for per_matrix in (False, True):
        model = tiny_llama(torch.float32)
        groups = randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA)
        if per_matrix:
            groups = [{**group, "params": [p]} for group in groups for p in group["params"]]
        opt = randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WD, state_dtype=state_dtype, min_8bit_size=64)
        first = groups[0]["params"][0]
        for i, tokens in enumerate(data):
            lm_loss(model, tokens).backward()
            if i == 1:
                first.grad = None  # one matrix misses a step: its step count differs from the others'
            opt.step()
            opt.zero_grad()
        runs.append(model)
    for p, q in zip(*(run.parameters() for run in runs)):
        assert torch.equal(p, q)


def adamw_inputs(seed, shapes):
    """``(params, grads, exp_avgs, exp_avg_sqs)``: random tensors of ``shapes``, second moments non-negative."""
    generator = torch.Generator().manual_seed(seed)
    return tuple([torch.randn(shape, generator=generator).abs() if kind == "v" else
                  torch.randn(shape, generator=generator) for shape in shapes] for kind in ("p", "g", "m", "v"))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_results_batched_equal_each_tensor_alone_and_the_rule_written_out(weight_decay):
    """Bit-identical whether batched or one tensor at a time, and to the rule written out per tensor with ordinary
    tensor operations; the moments equal ``torch.optim.AdamW``'s bit for bit, the weights up to rounding (torch folds
    ``lr / (1 - beta1^step)`` into one factor); nothing given changes."""
    import math

    from randopt.optim.functional import adamw_results

    lr, beta1, beta2, eps = 1e-2, 0.9, 0.99, 1e-8
    shapes, steps = [(3, 5), (7,), (2, 2, 2), (64, 64)], [1, 4, 9, 2]
    inputs = adamw_inputs(0, shapes)
    given = [[t.clone() for t in ts] for ts in inputs]
    batched = adamw_results(*inputs, steps, lr, beta1, beta2, eps, weight_decay)
    assert all(torch.equal(a, b) for ts, copies in zip(inputs, given) for a, b in zip(ts, copies))
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(*inputs)):
        alone = adamw_results([param], [grad], [exp_avg], [exp_avg_sq], [steps[i]], lr, beta1, beta2, eps,
                              weight_decay)
        exp_avg_ref = exp_avg.lerp(grad, 1 - beta1)
        exp_avg_sq_ref = (exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq_ref.sqrt() / math.sqrt(1 - beta2 ** steps[i]) + eps
        param_ref = (param * (1 - lr * weight_decay)).add(exp_avg_ref / (1 - beta1 ** steps[i]) / denom, alpha=-lr)
        for result, single, ref in zip(batched, alone, (param_ref, exp_avg_ref, exp_avg_sq_ref)):
            assert torch.equal(result[i], single[0]) and torch.equal(result[i], ref)
        torch_param = param.clone().requires_grad_()
        torch_param.grad = grad.clone()
        torch_opt = torch.optim.AdamW([torch_param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        torch_opt.state[torch_param] = {"step": torch.tensor(float(steps[i] - 1)), "exp_avg": exp_avg.clone(),
                                        "exp_avg_sq": exp_avg_sq.clone()}
        torch_opt.step()
        torch_state = torch_opt.state[torch_param]
        assert torch.equal(batched[1][i], torch_state["exp_avg"])
        assert torch.equal(batched[2][i], torch_state["exp_avg_sq"])
        torch.testing.assert_close(batched[0][i], torch_param.detach(), rtol=1e-6, atol=1e-9)


def test_out_of_place_moments_and_a_scratch_denominator_equal_adamw_results():
    from randopt.optim.functional import adam_direction, adamw_results, updated_moments

    (param,), (grad,), (exp_avg,), (exp_avg_sq,) = adamw_inputs(1, [(6, 9)])
    given = [t.clone() for t in (grad, exp_avg, exp_avg_sq)]
    new_exp_avg, new_exp_avg_sq = updated_moments(grad, exp_avg, exp_avg_sq, 0.9, 0.99)
    direction = adam_direction(new_exp_avg, new_exp_avg_sq, 3, 0.9, 0.99, 1e-8, scratch=grad.clone())
    (new_param,), (exp_avg_ref,), (exp_avg_sq_ref,) = adamw_results([torch.zeros(6, 9)], [grad], [exp_avg],
                                                                    [exp_avg_sq], [3], 1.0, 0.9, 0.99, 1e-8, 0.0)
    assert torch.equal(new_exp_avg, exp_avg_ref) and torch.equal(new_exp_avg_sq, exp_avg_sq_ref)
    assert torch.equal(direction, -new_param)  # zero weight, lr 1, no decay: the new weight is minus the direction
    assert all(torch.equal(a, b) for a, b in zip((grad, exp_avg, exp_avg_sq), given))


def test_state_dict_is_tensors_only_and_resume_is_bit_exact(tmp_path):
    data = batches(12)
    model = tiny_llama(torch.float32)
    opt = make_optimizer(model)
    train(model, opt, data[:6])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    expected = train(model, opt, data[6:])

    checkpoint = torch.load(path, weights_only=True)
    resumed = tiny_llama(torch.float32, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_optimizer(resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert train(resumed, resumed_opt, data[6:]) == expected
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for state in checkpoint["opt"]["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_loading_state_made_with_other_bases_is_refused():
    model = tiny_llama()
    opt = make_optimizer(model)
    train(model, opt, batches(1))
    other = randopt.RandLoRAAdamW(randopt.param_groups(tiny_llama(), LLAMA_TARGETS, rank=RANK, alpha=ALPHA, seed=7),
                                  lr=LR)
    with pytest.raises(ValueError, match="saved with seed=0, this optimizer.s has seed=7"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_bf16_weights_keep_updates_below_their_resolution():
    generator = torch.Generator().manual_seed(0)
    weight = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(200):
        weight = updated_weight(weight, torch.full((4096,), 1e-4), generator)
    assert abs(weight.float().mean().item() - 1.02) < 2e-3
    plain = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(200):
        plain = updated_weight(plain, torch.full((4096,), 1e-4), None)
    assert torch.equal(plain, torch.ones(4096, dtype=torch.bfloat16)), "round-to-nearest loses these updates"


def test_bf16_model_trains_with_fp32_coefficients():
    model = only_targets_trainable(tiny_llama(torch.bfloat16), LLAMA_TARGETS)
    opt = make_optimizer(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = train(model, opt, batches(10))
    assert losses[-1] < losses[0]
    state = next(iter(opt.state.values()))
    assert state["lambda"].dtype == torch.float32 and state["lambda_exp_avg_sq"].dtype == torch.float32
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_nonfinite_gradient_skips_that_matrix_and_counts_it():
    model = tiny_llama()
    opt = make_optimizer(model)
    train(model, opt, batches(1))
    lm_loss(model, batches(1, seed=9)[0]).backward()
    poisoned = model.model.layers[0].self_attn.q_proj.weight
    poisoned.grad[0, 0] = float("nan")
    weight_before = poisoned.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[poisoned].items()}
    other = model.model.layers[1].self_attn.q_proj.weight
    other_before = other.detach().clone()
    opt.step()
    assert torch.equal(poisoned, weight_before)
    for key, value in opt.state[poisoned].items():
        if key != "nonfinite_skips":
            assert torch.equal(value, state_before[key]), key
    assert opt.nonfinite_skips == 1 and opt.state[poisoned]["nonfinite_skips"].item() == 1
    assert not torch.equal(other, other_before)


def test_plain_parameters_in_a_randlora_group_get_adamw():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).double()
    opt = randopt.RandLoRAAdamW(model.parameters(), lr=LR, rank=2)
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.AdamW([reference[0].bias, reference[2].bias], lr=LR)
    x = torch.randn(4, 6, dtype=torch.float64)
    for m, o in ((model, opt), (reference, reference_opt)):
        m(x).square().sum().backward()
        o.step()
    assert {id(p) for p in opt.plain_parameters_in_randlora_groups} == {id(model[0].bias), id(model[2].bias)}
    torch.testing.assert_close(model[0].bias, reference[0].bias, rtol=1e-12, atol=0)
    assert "lambda" in opt.state[model[0].weight] and "lambda" not in opt.state[model[0].bias]


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"rank": 7}, "rank=7 is larger than allowed"),
    ({"rank": 2, "lr": -1.0}, "lr must be"),
    ({"rank": 2, "betas": (0.9, 1.0)}, "betas must be"),
    ({"rank": 2, "betas": (-0.1, 0.9)}, "betas must be"),
    ({"rank": 2, "basis_kind": "dense-ish"}, "basis_kind must be one of"),
    ({"rank": 2, "state_dtype": "int4"}, "state_dtype must be one of"),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    model = torch.nn.Linear(6, 5)
    with pytest.raises(ValueError, match=match):
        randopt.RandLoRAAdamW(model.parameters(), **kwargs)


def test_parameter_in_two_groups_is_refused_and_optimizer_unchanged():
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2)
    with pytest.raises(ValueError, match="appears in two parameter groups"):
        opt.add_param_group({"params": [model.weight, model.bias]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="appears in two parameter groups"):
        randopt.RandLoRAAdamW([{"params": [model.weight]}, {"params": [model.weight]}], rank=2)


@pytest.mark.distributed
def test_data_parallel_equals_single_process_on_global_batch(tmp_path):
    run_distributed("randlora_data_parallel.py", tmp_path)
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=True)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    # one all-reduce per step, of exactly the coefficient gradients: no full-size gradient travels
    assert distributed["bytes_per_step"] == [distributed["coefficient_bytes"]]
    assert distributed["coefficient_bytes"] < distributed["weight_gradient_bytes"]
    torch.testing.assert_close(torch.tensor(distributed["losses"]), torch.tensor(single["losses"]), rtol=1e-6,
                               atol=0)
    for key, value in single["weights"].items():
        torch.testing.assert_close(distributed["weights"][key], value, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_max_grad_norm_clips_like_clip_grad_norm(fused):
    """In-step clipping equals torch.nn.utils.clip_grad_norm_ over the model's gradients, also where fused backward
    has already projected and freed the matrices' gradients (one backward per step: the norm is exact)."""
    data, max_norm = batches(4), 0.05
    reference = tiny_llama()
    reference_opt = randopt.RandLoRAAdamW(randopt.param_groups(reference, LLAMA_TARGETS, rank=RANK, alpha=ALPHA,
                                                               train_rest=True), lr=LR)
    model = tiny_llama()
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA, train_rest=True),
                                lr=LR, fused_backward=fused, max_grad_norm=max_norm)
    for tokens in data:
        lm_loss(reference, tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        reference_opt.step()
        reference_opt.zero_grad()
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        assert norm > max_norm, "the test must actually clip"
        assert opt.last_grad_norm == pytest.approx(norm.item(), rel=1e-10)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("value", [0, -1.0, "1"])
def test_bad_max_grad_norm_is_refused(value):
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0 or None, got"):
        randopt.RandLoRAAdamW(tiny_llama().parameters(), rank=RANK, max_grad_norm=value)
    with pytest.raises(ValueError, match="data_parallel"):
        randopt.RandLoRAAdamW(tiny_llama().parameters(), rank=RANK, max_grad_norm=1.0, data_parallel=True)


@pytest.mark.parametrize("state_dtype,stored", [("bf16", "bfloat16"), ("8bit", "8bit")])
def test_an_fp64_model_steps_with_bf16_and_8bit_moments(state_dtype, stored):
    """bf16 and 8-bit moments read back as fp32; with an fp64 model they are worked on in the gradients' fp64 (they
    used to fail to combine), stored as asked, and train as the fp32-stored moments do, up to their rounding."""
    from randopt.optim.state import state_summary

    data = batches(3)
    runs = []
    for dtype in ("fp32", state_dtype):
        model = tiny_llama(torch.float64)
        groups = randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA, train_rest=True)
        opt = randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WD, state_dtype=dtype, min_8bit_size=64)
        for tokens in data:
            lm_loss(model, tokens).backward()
            opt.step()
            opt.zero_grad()
        assert stored in state_summary(opt) or dtype == "fp32"
        runs.append(model)
    for p, q in zip(*(run.parameters() for run in runs)):
        assert p.dtype == q.dtype == torch.float64
        torch.testing.assert_close(q, p, atol=LR, rtol=0)
