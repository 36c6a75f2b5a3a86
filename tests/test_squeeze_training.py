"""LoRA-Squeeze part 2: RandLoRAAdamW -> PEFT LoRA export, and In-Squeeze (rank annealing during training with the
optimizer's moments carried into the new factors' coordinates, a step-count schedule, exact resume, a Trainer
callback)."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
import randopt
from randopt.lorasqueeze import (RankSchedule, base_weights, export_lora, maybe_squeeze, restore_ranks,
                                 squeeze_in_training)
from randopt.lorasqueeze.export import export_costs, randlora_delta, randlora_matrices
from randopt.lorasqueeze.functional import factor_maps, factored_svd, lora_scale, project_moments, squeeze_for_training
from randopt.lorasqueeze.training import lora_ranks, optimizer_step_count

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

try:
    from randopt.optim.lorapro_adamw import LoRAProAdamW
except ImportError:  # LoRA-Pro not in this checkout: the AdamW cases still run
    LoRAProAdamW = None

from test_squeeze import F64, TOL, best_rank_k, gen  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only synchronise, and spin for seconds when the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(step, size=4):
    return torch.randint(0, 50, (size, 8), generator=gen(100 + step))


def lm_loss(model, x):
    return model(input_ids=x, labels=x).loss


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# ---------------------------------------------------------------------------------------- RandLoRA -> LoRA export


def randlora_trained(build, targets, steps=3, rank=4):
    """A tiny model trained by RandLoRAAdamW on the targeted weights only, and a copy of its original weights."""
    model = build()
    original = copy.deepcopy(model)
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if any(name.endswith(t) for t in targets):
            module.weight.requires_grad_(True)
    optimizer = randopt.RandLoRAAdamW(randopt.param_groups(model, targets, rank=rank, alpha=2.0 * rank), lr=2e-2)
    model.train()
    for step in range(steps):
        lm_loss(model, batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), original, optimizer


def delta_from_adapter(result, name):
    config, tensors = result.config, result.tensors
    rank = config["rank_pattern"].get(name, config["r"])
    alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
    B = tensors[f"base_model.model.{name}.lora_B.weight"]
    A = tensors[f"base_model.model.{name}.lora_A.weight"]
    assert A.shape[0] == rank
    return lora_scale(alpha, rank, config["use_rslora"]) * B @ A


@pytest.fixture(scope="module")
def trained_llama():
    return randlora_trained(tiny_llama, LLAMA_TARGETS)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_at_full_rank_reproduces_the_randlora_model(tmp_path, kind, trained_llama, tokens):
    model, original, optimizer = trained_llama if kind == "llama" else randlora_trained(tiny_gpt2, GPT2_TARGETS)
    assert (logits(model, tokens) - logits(original, tokens)).abs().max() > 1e-3  # training did something
    # W0 = W - dW recovers the original weights
    weights = base_weights(model, optimizer)
    assert len(weights) == 8
    for key, w0 in weights.items():
        torch.testing.assert_close(w0, original.state_dict()[key], rtol=0, atol=1e-12)
    base = copy.deepcopy(model)
    base.load_state_dict(weights, strict=False)
    result = export_lora(model, optimizer, tmp_path / "adapter", rank=64)
    assert all(r.rank == min(r.shape) and r.energy == pytest.approx(1.0, abs=1e-12) for r in result.layers)
    assert result.config["fan_in_fan_out"] is (kind == "gpt2")
    for served_on in (original, base):
        loaded = PeftModel.from_pretrained(copy.deepcopy(served_on), tmp_path / "adapter").eval()
        torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), **TOL)


def test_export_at_lower_rank_is_the_dense_truncated_svd(tmp_path, trained_llama, tokens):
    model, original, optimizer = trained_llama
    for method in ("dense", "auto"):
        result = export_lora(model, optimizer, tmp_path / method, rank=3, method=method, overwrite=True)
        reference = copy.deepcopy(original)
        for matrix in randlora_matrices(model, optimizer):
            delta = randlora_delta(optimizer, matrix)
            truncated = best_rank_k(delta, 3)
            torch.testing.assert_close(delta_from_adapter(result, matrix.name), truncated, **TOL)
            with torch.no_grad():
                reference.get_submodule(matrix.name).weight += truncated
        report = {r.name: r for r in result.layers}
        assert all(r.rank == 3 and r.alpha == 3.0 and 0 < r.energy < 1 for r in report.values())
        loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / method).eval()
        torch.testing.assert_close(logits(loaded, tokens), logits(reference, tokens), **TOL)


def test_export_with_an_energy_target_and_alpha(tmp_path, trained_llama, tokens):
    model, original, optimizer = trained_llama
    result = export_lora(model, optimizer, tmp_path / "e", energy=0.9, alpha=8.0)
    ranks = {r.name: r.rank for r in result.layers}
    assert len(set(ranks.values())) > 1 and result.config["rank_pattern"]  # per-layer ranks
    for r in result.layers:
        S = torch.linalg.svdvals(randlora_delta(optimizer, randlora_matrices(model, optimizer, [r.name])[0]))
        energies = S.square().cumsum(0) / S.square().sum()
        assert r.energy >= 0.9 and (r.rank == 1 or energies[r.rank - 2] < 0.9) and r.method == "dense"
        assert r.alpha == 8.0
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "e").eval()
    assert {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_A")} == ranks


def test_randomized_export_is_within_one_percent_of_optimal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 128, bias=False)).to(F64)
    optimizer = randopt.RandLoRAAdamW([{"params": [model[0].weight], "rank": 8, "alpha": 8.0}], lr=1e-2)
    model(torch.randn(4, 160, dtype=F64)).square().sum().backward()
    optimizer.step()
    state = optimizer.state[model[0].weight]
    r, n = state["lambda"].shape
    # full rank (gamma varies over the bases) with a decaying spectrum (base n, column k weighted 0.95^(n r + k))
    state["gamma"] = torch.randn(state["gamma"].shape, generator=gen(4), dtype=F64)
    state["lambda"] = 0.95 ** torch.arange(r * n, dtype=F64).view(n, r).T.contiguous()
    matrix = randlora_matrices(model, optimizer)[0]
    delta = randlora_delta(optimizer, matrix)
    assert torch.linalg.matrix_rank(delta) == 128
    for k in (4, 8, 16, 32):
        optimal = (delta - best_rank_k(delta, k)).norm()
        result = export_lora(model, optimizer, rank=k, method="randomized", seed=k)
        error = (delta - delta_from_adapter(result, "0")).norm()
        assert error <= 1.01 * optimal and result.layers[0].method == "randomized"
        assert result.layers[0].energy == pytest.approx(1 - optimal.item() ** 2 / delta.norm().item() ** 2, rel=1e-3)
    assert math.isnan(export_lora(model, optimizer, rank=4, method="randomized", exact_energy=False).layers[0].energy)


def test_auto_route_picks_by_cost():
    big = export_costs(4096, 4096, 4096, 16)
    assert big["randomized"] * 5 < big["dense"]
    small = export_costs(16, 40, 16, 12)
    assert small["dense"] < small["randomized"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "positive integer"), (dict(rank=2.5), "positive integer"), (dict(energy=0.0), r"\(0, 1\]"),
    (dict(energy=1.5), r"\(0, 1\]"), (dict(), "exactly one"), (dict(rank=2, method="svd"), "method"),
    (dict(energy=0.9, method="randomized"), "whole spectrum"), (dict(rank=2, alpha=-1.0), "alpha"),
    (dict(rank=2, module_names=["nope"]), "not layers"),
])
def test_export_bad_input(trained_llama, kwargs, match):
    model, _, optimizer = trained_llama
    with pytest.raises(ValueError, match=match):
        export_lora(model, optimizer, **kwargs)


def test_export_needs_a_randlora_optimizer(trained_llama, tmp_path):
    model, _, _ = trained_llama
    with pytest.raises(ValueError, match="RandLoRAAdamW"):
        export_lora(model, torch.optim.AdamW(model.parameters()), rank=2)


# ------------------------------------------------------------------------------------------ coordinate maps


def test_factor_maps_match_their_definitions():
    g = gen(1)
    m, n, r, k = 30, 20, 8, 3
    B, A = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64)
    for policy in ("keep_scale", "keep_alpha", 5.0):
        sq = squeeze_for_training(B, A, 16.0, rank=k, target_alpha_policy=policy)
        s, s_t, maps = lora_scale(16.0, r), sq.scale, sq.maps
        torch.testing.assert_close(sq.A, maps.A_map @ A, **TOL)  # parameters
        torch.testing.assert_close(sq.B, B @ maps.B_map, **TOL)
        G = torch.randn(m, n, generator=g, dtype=F64)  # gradients at the same dL/dW, by autograd
        A1, B1 = sq.A.clone().requires_grad_(), sq.B.clone().requires_grad_()
        A0, B0 = A.clone().requires_grad_(), B.clone().requires_grad_()
        (s_t * B1 @ A1 * G).sum().backward()
        (s * B0 @ A0 * G).sum().backward()
        torch.testing.assert_close(A1.grad, maps.grad_A_map @ A0.grad, **TOL)
        torch.testing.assert_close(B1.grad, B0.grad @ maps.grad_B_map, **TOL)
    # no truncation: the gradient map is the contragredient of the parameter map
    full = factor_maps(factored_svd(B, A, 2.0), r, 2.0, 0.5)
    torch.testing.assert_close(full.grad_A_map, torch.linalg.inv(full.A_map).T, **TOL)
    torch.testing.assert_close(full.grad_B_map, torch.linalg.inv(full.B_map).T, **TOL)


def test_dead_directions_are_revived_not_left_at_a_saddle():
    g = gen(2)
    A = torch.randn(8, 20, generator=g, dtype=F64)
    sq = squeeze_for_training(torch.zeros(30, 8, dtype=F64), A, 16.0, rank=3)  # PEFT's init: B = 0
    assert not sq.maps.live.any() and torch.equal(sq.B, torch.zeros(30, 3, dtype=F64))
    torch.testing.assert_close(sq.A.norm(dim=1), torch.full((3,), A.norm().item() / math.sqrt(8), dtype=F64), **TOL)
    torch.testing.assert_close(sq.A @ sq.A.T, sq.A.norm(dim=1).square().diag(), **TOL)  # orthogonal rows
    assert sq.maps.grad_A_map.abs().max() == 0 and sq.maps.grad_B_map.abs().max() == 0


def test_project_moments():
    g = gen(3)
    M = torch.randn(3, 6, generator=g, dtype=F64)
    m = torch.randn(6, 5, generator=g, dtype=F64)
    v = m.square() + torch.rand(6, 5, generator=g, dtype=F64)
    step, betas = 7, (0.9, 0.99)
    c1, c2 = 1 - 0.9 ** 7, 1 - 0.99 ** 7
    m2, v2 = project_moments(m, v * c2 / c1 ** 2, M, "left", step=step, betas=betas)
    torch.testing.assert_close(m2, M @ m, **TOL)  # first moment: the linear map
    expected = ((M @ m).square() + M.square() @ (v - m.square())) * c2 / c1 ** 2  # mean + independent noise
    torch.testing.assert_close(v2, expected, **TOL)
    assert ((m2 / c1).square() <= v2 / c2 * (1 + 1e-12)).all()  # Adam's step bound survives
    zero_mean, _ = project_moments(torch.zeros(5, 6, dtype=F64), v.T, M.T, "right", step=step, betas=betas)
    assert zero_mean.abs().max() == 0
    torch.testing.assert_close(project_moments(torch.zeros(5, 6, dtype=F64), v.T, M.T, "right", step=step,
                                               betas=betas)[1], v.T @ M.T.square(), **TOL)


# ------------------------------------------------------------------------------------------------ In-Squeeze


def lora_model(r=8, alpha=16, seed=0, rank_pattern=None):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                        rank_pattern=rank_pattern or {})
    model = get_peft_model(tiny_llama(seed=seed), config)
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():  # a nonzero start, so early squeezes have something to cut
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model.train()


OPTIMIZERS = ["adamw"] + ([] if LoRAProAdamW is None else ["lorapro_full", "lorapro_efficient"])


def make_optimizer(kind, model, lr=1e-2):
    if kind == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    # no weight decay: full mode would decay the base weights too, and the saved adapter goes on a pristine base
    return LoRAProAdamW(model, lr=lr, mode=kind.split("_")[1], weight_decay=0.0)


def train(model, optimizer, steps, start=0, schedule=None, scheduler=None, fired=None, data=batch):
    losses = []
    for step in range(start, start + steps):
        loss = lm_loss(model, data(step))
        loss.backward()
        optimizer.step()
        if schedule is not None:
            report = maybe_squeeze(model, optimizer, schedule)
            if report is not None and fired is not None:
                fired.append((optimizer_step_count(optimizer), report))
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def pairs_of(model):
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def deltas(model):
    return {n: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            for n, m in pairs_of(model).items()}


def truncated_reference(model, k):
    """A copy of the model whose LoRA updates are the dense rank-k truncations (zero-padded to the old rank)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in pairs_of(reference).items():
            s, A, B = module.scaling["default"], module.lora_A["default"].weight, module.lora_B["default"].weight
            U, S, Vh = torch.linalg.svd(s * B @ A, full_matrices=False)
            B.zero_()[:, :k] = U[:, :k] * S[:k] / s
            A.zero_()[:k] = Vh[:k]
    return reference


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_output_changes_only_by_the_truncation_and_training_goes_on(tmp_path, kind, tokens):
    model = lora_model()
    optimizer = make_optimizer(kind, model)
    def memorise(step):
        return batch(0)

    first = train(model, optimizer, 8, data=memorise)
    before = deltas(model)
    reference = truncated_reference(model, 4)
    alpha = "keep_alpha" if kind == "lorapro_full" else "keep_scale"
    report = squeeze_in_training(model, optimizer, rank=4, alpha=alpha)
    assert set(lora_ranks(model).values()) == {4} and report.step == 8
    for name, delta in deltas(model).items():
        torch.testing.assert_close(delta, best_rank_k(before[name], 4), **TOL)
    torch.testing.assert_close(logits(model, tokens), logits(reference, tokens), **TOL)
    energies = [layer.energy for layer in report.layers]
    assert all(0 < e < 1 for e in energies) and report.metrics()["squeeze/rank_max"] == 4
    # the saved adapter loads at the new rank and alpha
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == ((4, 16) if alpha == "keep_alpha" else (4, 8))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, tokens), logits(model.eval(), tokens), **TOL)
    if kind.startswith("lorapro"):
        groups = [g for g in optimizer.param_groups if g["lora_scale"] is not None]
        assert all(g["lora_scale"] == (4.0 if alpha == "keep_alpha" else 2.0) for g in groups)
        assert all(g["params"][0] in optimizer._base_weights for g in groups)
    # the optimizer keeps working on the new factors
    model.train()
    after = train(model, optimizer, 8, start=8, data=memorise)
    assert first[-1] < first[0] and all(b < a for a, b in zip(after, after[1:])) and after[-1] < first[-1]
    new_params = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in new_params for g in optimizer.param_groups for p in g["params"])


def moments_of(optimizer, param, names=("exp_avg", "exp_avg_sq")):
    return [optimizer.state[param][n].clone() for n in names]


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_projected_moments_are_the_maps_of_the_old_ones(kind):
    model = lora_model()
    optimizer = make_optimizer(kind, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    train(model, optimizer, 6, scheduler=scheduler)
    name, module = next(iter(pairs_of(model).items()))
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    lrs = [g["lr"] for g in optimizer.param_groups]
    steps = {id(p): s["step"].item() for p, s in optimizer.state.items() if "step" in s}
    efficient = kind == "lorapro_efficient"
    if kind == "lorapro_full":
        old = moments_of(optimizer, A, ("w_exp_avg", "w_exp_avg_sq"))
    else:
        old_A, old_B = moments_of(optimizer, A), moments_of(optimizer, B)
    expected = squeeze_for_training(B.detach(), A.detach(), 16.0, rank=3)
    squeeze_in_training(model, optimizer, rank=3)
    A2, B2 = module.lora_A["default"].weight, module.lora_B["default"].weight
    if kind == "lorapro_full":  # m x n moments do not depend on the factors: unchanged
        for before, after in zip(old, moments_of(optimizer, A2, ("w_exp_avg", "w_exp_avg_sq"))):
            assert torch.equal(before, after)
    else:
        map_A = expected.maps.A_map if efficient else expected.maps.grad_A_map
        map_B = expected.maps.B_map if efficient else expected.maps.grad_B_map
        step = optimizer.state[A2]["step"].item()
        betas = optimizer.param_groups[0]["betas"]
        m_A, v_A = moments_of(optimizer, A2)
        m_B, v_B = moments_of(optimizer, B2)
        torch.testing.assert_close(m_A, map_A @ old_A[0], **TOL)  # first moment: M m
        torch.testing.assert_close(m_B, old_B[0] @ map_B, **TOL)
        torch.testing.assert_close(v_A, project_moments(*old_A, map_A, "left", step=step, betas=betas)[1], **TOL)
        torch.testing.assert_close(v_B, project_moments(*old_B, map_B, "right", step=step, betas=betas)[1], **TOL)
    # nothing restarts: step counts, learning rates, the scheduler
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert sorted(s["step"].item() for s in optimizer.state.values() if "step" in s) == sorted(steps.values())
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_reset_zeroes_the_moments_and_keeps_the_steps(kind):
    model = lora_model()
    optimizer = make_optimizer(kind, model)
    train(model, optimizer, 3)
    squeeze_in_training(model, optimizer, rank=2, moments="reset")  # 8 -> 2
    for name, module in pairs_of(model).items():
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert optimizer.state[A]["step"].item() == 3
        if kind == "lorapro_full":
            assert optimizer.state[A]["w_exp_avg"].abs().max() > 0  # rank-independent: kept
            continue
        for param in (A, B):
            for moment in moments_of(optimizer, param):
                assert moment.shape == param.shape and moment.abs().max() == 0
    assert math.isfinite(train(model, optimizer, 2, start=3)[-1])  # still steps


STORAGES = ["amsgrad", "sgd"] + ([] if LoRAProAdamW is None else ["lorapro_bf16", "lorapro_8bit"])


@pytest.mark.parametrize("kind", STORAGES)
def test_other_adam_states_and_moment_storages(kind):
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "amsgrad":
        optimizer = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    else:
        if kind == "lorapro_8bit":
            pytest.importorskip("bitsandbytes")
        optimizer = LoRAProAdamW(model, lr=1e-2, mode="efficient", state_dtype=kind.split("_")[1], min_8bit_size=16)
    train(model, optimizer, 3)
    module = next(iter(pairs_of(model).values()))
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    old = {k: v.clone() for k, v in optimizer.state[A].items()}
    maps = squeeze_for_training(B.detach(), A.detach(), 16.0, rank=4).maps
    squeeze_in_training(model, optimizer, rank=4)
    A2 = module.lora_A["default"].weight
    new = optimizer.state[A2]
    assert new.keys() == old.keys()
    for key, value in new.items():
        assert value.dtype == old[key].dtype
        if value.dim() and not key.endswith("_absmax"):
            assert value.shape == A2.shape, key
    if kind == "sgd":  # a momentum buffer is a sum of gradients: the gradient map, exactly
        torch.testing.assert_close(new["momentum_buffer"], maps.grad_A_map @ old["momentum_buffer"], **TOL)
        assert optimizer_step_count(optimizer) == 0  # SGD keeps no step counter: the schedule takes one
        assert maybe_squeeze(model, optimizer, RankSchedule([(0, 4), (5, 2)]), step=5).step == 5
    assert math.isfinite(train(model, optimizer, 2, start=3)[-1])


def test_energy_target_squeezes_per_layer(tokens):
    model = lora_model()
    optimizer = make_optimizer("adamw", model)
    train(model, optimizer, 5)
    reference = {n: torch.linalg.svdvals(d) for n, d in deltas(model).items()}
    report = squeeze_in_training(model, optimizer, energy=0.8)
    ranks = lora_ranks(model)
    for layer in report.layers:
        S = reference[layer.name]
        assert layer.energy >= 0.8 and ranks[layer.name] == layer.rank
        assert layer.rank == 1 or (S[: layer.rank - 1].square().sum() / S.square().sum()) < 0.8
    assert len(set(ranks.values())) > 1 or model.peft_config["default"].rank_pattern == {}


def test_schedule_fires_exactly_at_the_boundaries_and_is_idempotent():
    model = lora_model()
    optimizer = make_optimizer("adamw", model)
    fired = []
    schedule = RankSchedule([(0, 8), (4, 4), (7, 2)])
    train(model, optimizer, 9, schedule=schedule, fired=fired)
    assert [step for step, _ in fired] == [4, 7]
    assert [set(report.ranks.values()) for _, report in fired] == [{4}, {2}]
    assert maybe_squeeze(model, optimizer, schedule) is None  # again at the same count: nothing
    assert schedule.rank_at(3) == 8 and schedule.rank_at(4) == 4 and schedule.rank_at(100) == 2
    assert RankSchedule([(10, 4)]).rank_at(9) is None
    assert RankSchedule.geometric(64, 8, 800, 4).stages == ((0, 64), (200, 32), (400, 16), (600, 8))
    assert RankSchedule.linear(64, 8, 800, 4).stages == ((0, 64), (200, 45), (400, 27), (600, 8))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_checkpoint_after_a_squeeze_resumes_exactly(tmp_path, kind):
    schedule = RankSchedule([(0, 8), (3, 4), (7, 2)])
    model = lora_model()
    optimizer = make_optimizer(kind, model)
    train(model, optimizer, 5, schedule=schedule)
    assert set(lora_ranks(model).values()) == {4}
    model.save_pretrained(tmp_path)  # the adapter config holds the squeezed ranks
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, 5, start=5, schedule=schedule)
    # resume: a fresh model at the initial rank, reshaped from the saved adapter, then the states
    resumed = lora_model(seed=7)
    assert set(restore_ranks(resumed, tmp_path).values()) == {4}
    resumed_optimizer = make_optimizer(kind, resumed)
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert optimizer_step_count(resumed_optimizer) == 5
    assert maybe_squeeze(resumed, resumed_optimizer, schedule) is None  # idempotent on resume
    train(resumed, resumed_optimizer, 5, start=5, schedule=schedule)
    assert set(lora_ranks(resumed).values()) == {2}
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------- bad input


def snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
            [list(map(id, g["params"])) for g in optimizer.param_groups], model.peft_config["default"].to_dict())


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "positive integer"), (dict(rank=-1), "positive integer"), (dict(rank=8), "0 < rank < 8"),
    (dict(rank=9), "0 < rank < 8"), (dict(rank=4), r"0 < rank < 2"), (dict(energy=0.0), r"\(0, 1\]"),
    (dict(energy=1.01), r"\(0, 1\]"), (dict(energy=float("nan")), r"\(0, 1\]"), (dict(), "exactly one"),
    (dict(rank=2, moments="keep"), "moments"), (dict(rank=1, alpha="double"), "alpha"),
])
def test_bad_squeeze_input_changes_nothing(kwargs, match):
    model = lora_model(rank_pattern={"model.layers.1.mlp.down_proj": 2})
    optimizer = make_optimizer("adamw", model)
    train(model, optimizer, 2)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        squeeze_in_training(model, optimizer, **kwargs)
    assert same(before, snapshot(model, optimizer))


@pytest.mark.parametrize("stages, match", [
    ([], "at least one"), ([(0, 8), (0, 4)], "strictly increase"), ([(5, 8), (3, 4)], "strictly increase"),
    ([(0, 4), (5, 8)], "strictly decrease"), ([(0, 4), (5, 4)], "strictly decrease"), ([(-1, 4)], "step >= 0"),
    ([(0, 0)], "rank > 0"), ([(0, 2.5)], "integers"), ([(0,)], "stage"), (5, "pairs"),
])
def test_bad_schedules(stages, match):
    with pytest.raises(ValueError, match=match):
        RankSchedule(stages)


def test_bad_spaced_schedules():
    with pytest.raises(ValueError, match="below start"):
        RankSchedule.linear(8, 16, 100, 3)
    with pytest.raises(ValueError, match="stages"):
        RankSchedule.geometric(64, 8, 100, 1)
    with pytest.raises(ValueError, match="strictly decrease"):
        RankSchedule.linear(4, 3, 100, 4)  # rounding would repeat a rank


def test_unsupported_optimizer_state_is_refused():
    model = lora_model()
    optimizer = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad])
    train(model, optimizer, 1)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="'sum'"):
        squeeze_in_training(model, optimizer, rank=2)
    assert same(before, snapshot(model, optimizer))


# ------------------------------------------------------------------------------------------------------ Trainer


def test_trainer_callback_squeezes_and_logs_ranks(tmp_path):
    from transformers import Trainer, TrainingArguments

    from randopt.integrations.squeeze_trainer import SqueezeCallback

    model = lora_model()
    data = [{"input_ids": x, "labels": x} for x in batch(0, size=8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    callback = SqueezeCallback.attach(trainer, RankSchedule([(0, 8), (2, 4), (4, 2)]))
    trainer.train()
    assert set(lora_ranks(model).values()) == {2} and model.peft_config["default"].r == 2
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert [logged[s]["squeeze/rank_max"] for s in range(1, 7)] == [8, 4, 4, 2, 2, 2]
    assert 0 < logged[6]["squeeze/energy_kept_min"] <= logged[6]["squeeze/energy_kept_mean"] < 1
    assert [r.step for r in callback.reports] == [2, 4]
    assert optimizer_step_count(optimizer) == 6 and trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
