"""LoRA-Pro: the adjustment against dense/brute-force references, LoRAProAdamW on PEFT models, state."""
import copy
import io
import math

import pytest
import torch

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.lorapro import (LoRAProAdamW, adjust_gradients, equivalent_gradient, find_lora_pairs, lorapro_groups,
                             projected_gradient)
from randopt.lorapro.functional import lora_gradients, solve_x

peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

F64 = torch.float64
SHAPES = [(5, 7, 3), (8, 4, 2), (6, 6, 1)]  # (m, n, r): tall, wide, square with r = 1


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def eye(k):
    return torch.eye(k, dtype=F64)


def dense_projection(g, A, B):
    """``P_B g + (I - P_B) g P_A`` with full m x m / n x n projectors (pinv: valid when rank-deficient)."""
    PB = B @ torch.linalg.pinv(B)
    PA = torch.linalg.pinv(A) @ A
    return PB @ g + (eye(B.shape[0]) - PB) @ g @ PA


def dense_closed_form(A, B, gA_lora, gB_lora, s):
    """X-free part of the paper's closed form with explicit inverses (full-rank factors)."""
    GB_inv, GA_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    PB = B @ GB_inv @ B.T
    return GB_inv @ gA_lora / s ** 2, (eye(B.shape[0]) - PB) @ gB_lora @ GA_inv / s ** 2


def kron_sylvester(GB, GA, C):
    """Solve ``GB X + X GA = C`` through the r^2 x r^2 Kronecker system (vec is column-major)."""
    r = GB.shape[0]
    K = torch.kron(eye(r), GB) + torch.kron(GA.T.contiguous(), eye(r))
    return torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T


def random_problem(m, n, r, seed, s=1.7):
    A, B, g = randn(r, n, seed=seed), randn(m, r, seed=seed + 1), randn(m, n, seed=seed + 2)
    return A, B, g, s


# (1) equivalent gradient = tangent-space projection of g, and optimal

@pytest.mark.parametrize("m,n,r", SHAPES)
def test_equivalent_gradient_is_the_optimal_projection(m, n, r):
    A, B, g, s = random_problem(m, n, r, seed=10 * m + n)
    gA, gB = adjust_gradients(A, B, *lora_gradients(A, B, g, s), s)
    g_equiv = equivalent_gradient(A, B, gA, gB, s)
    torch.testing.assert_close(g_equiv, dense_projection(g, A, B), rtol=0, atol=1e-10)
    # brute force: least squares over all (gA, gB) of |s (B gA + gB A) - g|
    columns = []
    for i in range(r * n):
        E = torch.zeros(r * n, dtype=F64)
        E[i] = 1
        columns.append((s * B @ E.view(r, n)).reshape(-1))
    for i in range(m * r):
        E = torch.zeros(m * r, dtype=F64)
        E[i] = 1
        columns.append((s * E.view(m, r) @ A).reshape(-1))
    K = torch.stack(columns, 1)
    best = K @ torch.linalg.lstsq(K, g.reshape(-1), driver="gelsd").solution
    torch.testing.assert_close(g_equiv.reshape(-1), best, rtol=0, atol=1e-10)
    for x_mode in ("zero", "sylvester"):
        other = equivalent_gradient(A, B, *adjust_gradients(A, B, *lora_gradients(A, B, g, s), s, x_mode), s)
        torch.testing.assert_close(other, g_equiv, rtol=0, atol=1e-10)
    torch.testing.assert_close(projected_gradient(A, B, *lora_gradients(A, B, g, s), s), g_equiv,
                               rtol=0, atol=1e-10)


def lora_model(make_model, targets, r=2, alpha=3.0, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=kwargs.pop("init_lora_weights", False),
                             fan_in_fan_out=make_model is tiny_gpt2, **kwargs)
    return peft.get_peft_model(make_model(), config)


def loss_of(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


MODELS = [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)]
MODEL_IDS = ["gpt2-conv1d", "llama-linear"]


def merged_gradients(model, tokens):
    """dL/dW (out x in) of every adapted weight, on the merged model."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.requires_grad_(True)
    loss_of(merged, tokens).backward()
    grads = {}
    for name, module in merged.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight.grad is not None:
            grads[name] = module.weight.grad.T if isinstance(module, Conv1D) else module.weight.grad
    return grads


@pytest.mark.parametrize("make_model,targets", MODELS, ids=MODEL_IDS)
def test_projection_of_the_true_gradient_on_peft_models(make_model, targets, tokens):
    model = lora_model(make_model, targets)
    g_true = merged_gradients(model, tokens)
    loss_of(model, tokens).backward()
    pairs = find_lora_pairs(model)
    assert len(pairs) == len(lora_layers(model)) >= 2 * len(targets)
    for pair in pairs:
        g = g_true[pair.name.removeprefix("base_model.model.").rsplit(":", 1)[0]]
        gA, gB = adjust_gradients(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scale)
        torch.testing.assert_close(equivalent_gradient(pair.A, pair.B, gA, gB, pair.scale),
                                   dense_projection(g, pair.A, pair.B), rtol=0, atol=1e-10)


# (2) X: Sylvester solution and the closest adjusted gradients

@pytest.mark.parametrize("m,n,r", SHAPES)
def test_x_solves_sylvester_and_minimises_the_distance(m, n, r):
    A, B, g, s = random_problem(m, n, r, seed=7 * m + n)
    gA_lora, gB_lora = lora_gradients(A, B, g, s)
    X = solve_x(A, B, gA_lora, gB_lora, s)
    GB, GA = B.T @ B, A @ A.T
    residual = GB @ X + X @ GA + torch.linalg.inv(GB) @ gA_lora @ A.T / s ** 2
    assert residual.abs().max() <= 1e-10
    # brute force: least squares over vec(X) of |a0 + X A - gA_lora|^2 + |b0 - B X - gB_lora|^2
    a0, b0 = dense_closed_form(A, B, gA_lora, gB_lora, s)
    columns = []
    for i in range(r * r):
        E = torch.zeros(r * r, dtype=F64)
        E[i] = 1
        E = E.view(r, r)
        columns.append(torch.cat([(E @ A).reshape(-1), (-B @ E).reshape(-1)]))
    target = torch.cat([(gA_lora - a0).reshape(-1), (gB_lora - b0).reshape(-1)])
    X_best = torch.linalg.lstsq(torch.stack(columns, 1), target, driver="gelsd").solution.view(r, r)
    torch.testing.assert_close(X, X_best, rtol=0, atol=1e-10)
    gA, gB = adjust_gradients(A, B, gA_lora, gB_lora, s)
    torch.testing.assert_close(gA, a0 + X_best @ A, rtol=0, atol=1e-10)
    torch.testing.assert_close(gB, b0 - B @ X_best, rtol=0, atol=1e-10)
    zero = adjust_gradients(A, B, gA_lora, gB_lora, s, "zero")
    torch.testing.assert_close(zero[0], a0, rtol=0, atol=1e-10)
    distance = lambda a, b: (a - gA_lora).square().sum() + (b - gB_lora).square().sum()  # noqa: E731
    assert distance(gA, gB) < distance(*zero)


# (3) one full-mode step against a dense reference of the paper's algorithm

def reference_full_step(A, B, W0, g, s, moments, step, lr, betas, eps, wd):
    """LoRA-Pro-AdamW written out with full matrices, explicit inverses and the full gradient g."""
    m, n = g.shape
    GB_inv, GA_inv = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    PB, PA = B @ GB_inv @ B.T, A.T @ GA_inv @ A
    g_equiv = PB @ g + (eye(m) - PB) @ g @ PA
    exp_avg, exp_avg_sq = moments
    exp_avg.mul_(betas[0]).add_((1 - betas[0]) * g_equiv)
    exp_avg_sq.mul_(betas[1]).add_((1 - betas[1]) * g_equiv ** 2)
    D = (exp_avg / (1 - betas[0] ** step)) / ((exp_avg_sq / (1 - betas[1] ** step)).sqrt() + eps)
    gA_lora, gB_lora = s * B.T @ D, s * D @ A.T
    X = kron_sylvester(B.T @ B, A @ A.T, -GB_inv @ gA_lora @ A.T / s ** 2)
    gA = GB_inv @ gA_lora / s ** 2 + X @ A
    gB = (eye(m) - PB) @ gB_lora @ GA_inv / s ** 2 - B @ X
    c = math.sqrt(1 - lr * wd)
    return c * A - lr * gA, c * B - lr * gB, (1 - lr * wd) * W0


def lora_layers(model):
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def test_full_mode_steps_match_the_dense_reference(tokens):
    model = lora_model(tiny_llama, LLAMA_TARGETS)
    reference = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}
    lr, betas, eps, wd = 3e-2, (0.8, 0.95), 1e-6, 0.5
    opt = LoRAProAdamW(model, lr=lr, betas=betas, eps=eps, weight_decay=wd, mode="full", decay_base_weight=True)
    layers = lora_layers(reference)
    moments = {name: (torch.zeros(l.out_features, l.in_features, dtype=F64),
                      torch.zeros(l.out_features, l.in_features, dtype=F64)) for name, l in layers.items()}
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)  # its gradient is dL/dW: the full g
    for step in (1, 2, 3):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
        reference.zero_grad()
        loss_of(reference, tokens).backward()
        with torch.no_grad():
            for name, layer in layers.items():
                A, B, W0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight
                new = reference_full_step(A, B, W0, W0.grad, layer.scaling["default"], moments[name], step,
                                          lr, betas, eps, wd)
                for param, value in zip((A, B, W0), new):
                    param.copy_(value)
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(ours[name], param, rtol=1e-10, atol=1e-12, msg=name)
    assert all(not torch.equal(ours[n], p) for n, p in initial.items())


def test_efficient_mode_is_adamw_on_the_adjusted_gradients(tokens):
    model = lora_model(tiny_gpt2, GPT2_TARGETS)
    reference = copy.deepcopy(model)
    kwargs = dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)
    opt = LoRAProAdamW(model, mode="efficient", **kwargs)
    ref_pairs = find_lora_pairs(reference)
    factors = [p for pair in ref_pairs for p in (pair.A, pair.B)]
    torch_adamw = torch.optim.AdamW(factors, **kwargs)
    for _ in range(3):
        for m, o in ((model, opt), (reference, torch_adamw)):
            o.zero_grad()
            loss_of(m, tokens).backward()
        moved = raw = 0.0
        with torch.no_grad():
            for pair in ref_pairs:
                a0, b0 = dense_closed_form(pair.A, pair.B, pair.A.grad, pair.B.grad, pair.scale)
                GB, GA = pair.B.T @ pair.B, pair.A @ pair.A.T
                X = kron_sylvester(GB, GA, -torch.linalg.inv(GB) @ pair.A.grad @ pair.A.T / pair.scale ** 2)
                moved += (a0 + X @ pair.A - pair.A.grad).square().sum() + (b0 - pair.B @ X - pair.B.grad).square().sum()
                raw += pair.A.grad.square().sum() + pair.B.grad.square().sum()
                pair.A.grad.copy_(a0 + X @ pair.A)
                pair.B.grad.copy_(b0 - pair.B @ X)
        opt.step()
        torch_adamw.step()
        # the metric the Trainer callback logs: how far the adjustment moved LoRA's gradients this step
        metrics = opt.metrics()
        assert metrics["lorapro/adjustment_distance"] == pytest.approx(math.sqrt(moved), rel=1e-5)
        assert metrics["lorapro/relative_adjustment"] == pytest.approx(math.sqrt(moved / raw), rel=1e-5)
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(ours[name], param, rtol=1e-10, atol=1e-12, msg=name)


# (4) PEFT models: two adapters, rsLoRA, plain parameters

@pytest.mark.parametrize("mode", ["full", "efficient"])
@pytest.mark.parametrize("make_model,targets", MODELS, ids=MODEL_IDS)
def test_peft_active_adapter_rslora_and_plain_params(make_model, targets, mode, tokens):
    model = lora_model(make_model, targets, r=2, alpha=3.0)
    second = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=targets[:2], lora_dropout=0.0,
                             use_rslora=True, init_lora_weights=False, fan_in_fan_out=make_model is tiny_gpt2)
    model.add_adapter("second", second)
    model.set_adapter("second")
    norm = next(p for n, p in model.named_parameters() if n.endswith("norm.weight") or n.endswith("ln_f.weight"))
    norm.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    pairs = find_lora_pairs(model)
    assert pairs and all(p.name.endswith(":second") for p in pairs)
    assert len(pairs) == sum("second" in m.lora_A for m in lora_layers(model).values()) >= 2 * len(targets[:2])
    assert all(p.scale == pytest.approx(6.0 / math.sqrt(4)) for p in pairs)  # rsLoRA, not alpha / r = 1.5
    assert all(p.base_weight is not None for p in pairs)

    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode=mode, decay_base_weight=True)
    plain_groups = [g["params"] for g in opt.param_groups if g["lora_scale"] is None]
    assert len(plain_groups) == 1 and len(plain_groups[0]) == 1 and plain_groups[0][0] is norm
    torch_adamw = torch.optim.AdamW([norm_clone := norm.detach().clone().requires_grad_(True)],
                                    lr=1e-2, weight_decay=0.1)
    loss_of(model, tokens).backward()
    norm_clone.grad = norm.grad.clone()
    opt.step()
    torch_adamw.step()
    after = dict(model.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        should_move = ".second." in name or after[name] is norm or (
            mode == "full" and "base_layer" in name and any(f"{t}.base_layer.weight" in name for t in targets[:2]))
        assert moved == should_move, name
    torch.testing.assert_close(norm, norm_clone, rtol=1e-12, atol=1e-14)  # plain AdamW, as torch's

    # other adapters' factors that the caller leaves trainable are plain parameters
    for name, param in model.named_parameters():
        if ".default." in name:
            param.requires_grad_(True)
    plain = next(g for g in LoRAProAdamW(model).param_groups if g["lora_scale"] is None)["params"]
    assert sum(".default." in n for n, p in model.named_parameters() if any(p is q for q in plain)) > 0


# (5) B = 0 and rank-deficient factors

def test_b_zero_reduces_to_the_pseudo_inverse_form():
    A, B, g, s = random_problem(6, 5, 3, seed=3)
    B = torch.zeros_like(B)
    gA_lora, gB_lora = lora_gradients(A, B, g, s)
    for x_mode in ("sylvester", "zero"):
        gA, gB = adjust_gradients(A, B, gA_lora, gB_lora, s, x_mode)
        assert torch.equal(gA, torch.zeros_like(gA))
        torch.testing.assert_close(gB, gB_lora @ torch.linalg.inv(A @ A.T) / s ** 2, rtol=0, atol=1e-10)
        torch.testing.assert_close(equivalent_gradient(A, B, gA, gB, s), dense_projection(g, A, B),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("deficient", ["A", "B", "both", "B=0 and A"])
def test_rank_deficient_factors_give_the_exact_projection(deficient):
    A, B, g, s = random_problem(7, 6, 3, seed=5)
    if deficient in ("A", "both", "B=0 and A"):
        A[2] = 2 * A[0] - A[1]
    if deficient in ("B", "both"):
        B[:, 1] = B[:, 0]
    if deficient == "B=0 and A":
        B.zero_()
    gA_lora, gB_lora = lora_gradients(A, B, g, s)
    gA, gB = adjust_gradients(A, B, gA_lora, gB_lora, s)
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    torch.testing.assert_close(equivalent_gradient(A, B, gA, gB, s), dense_projection(g, A, B),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_peft_init_b_zero_steps_are_finite(mode, tokens):
    model = lora_model(tiny_gpt2, GPT2_TARGETS, init_lora_weights=True)
    pairs = find_lora_pairs(model)
    assert all(torch.equal(p.B, torch.zeros_like(p.B)) for p in pairs)
    with torch.no_grad():
        pairs[0].A[1] = pairs[0].A[0]  # and a rank-deficient A
    A_before = [p.A.detach().clone() for p in pairs]
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.0, mode=mode)
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
        if _ == 0:  # B = 0: gA = 0, A does not move in the first step
            assert all(torch.equal(p.A, a) for p, a in zip(pairs, A_before))
    assert all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in pairs)
    assert all(p.B.abs().max() > 0 for p in pairs)
    assert sum(opt.skipped_steps.values()) == 0


# (6) state dict

def walk_leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk_leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from walk_leaves(v)
    else:
        yield value


@pytest.mark.parametrize("mode,state_dtype", [("full", "fp32"), ("efficient", "fp32"), ("full", "8bit")])
def test_state_dict_round_trip_and_exact_resume(mode, state_dtype, tokens):
    if state_dtype == "8bit":
        pytest.importorskip("bitsandbytes")
    model = lora_model(tiny_llama, LLAMA_TARGETS)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    storage = dict(state_dtype=state_dtype, min_8bit_size=32)
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode=mode, **storage)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            loss_of(m, tokens).backward()
            o.step()

    train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    state_leaves = list(walk_leaves(loaded["state"]))
    assert state_leaves and all(isinstance(v, torch.Tensor) for v in state_leaves)
    skips = [s["nonfinite_skips"] for s in loaded["state"].values() if "nonfinite_skips" in s]
    assert skips and all(v.dtype == torch.int64 for v in skips)
    codes = [v for s in loaded["state"].values() for k, v in s.items() if k.endswith("_codes")]
    assert bool(codes) == (state_dtype == "8bit") and all(v.dtype == torch.uint8 for v in codes)

    resumed_model = copy.deepcopy(model)
    resumed = LoRAProAdamW(resumed_model, lr=0.5, mode=mode, **storage)
    resumed.load_state_dict(loaded)
    train(model, opt, 2)
    train(resumed_model, resumed, 2)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), resumed.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(int(s["step"]) == 4 for s in opt.state.values() if "step" in s)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_bf16_factors_keep_fp32_moments_through_a_checkpoint(mode, tokens):
    model = peft.get_peft_model(tiny_llama(torch.bfloat16), peft.LoraConfig(
        r=2, target_modules=LLAMA_TARGETS, init_lora_weights=False), autocast_adapter_dtype=False)
    opt = LoRAProAdamW(model, lr=1e-2, mode=mode)
    loss_of(model, tokens).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    moments = [v for s in opt.state.values() for k, v in s.items() if "exp_avg" in k]
    assert moments and all(v.dtype == torch.float32 for v in moments)  # a bf16 v cannot decay
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# (7) bad inputs

def test_bad_inputs_raise_and_change_nothing(tokens):
    with pytest.raises(ValueError, match="no LoRA layers"):
        LoRAProAdamW(tiny_llama())
    model = lora_model(tiny_llama, LLAMA_TARGETS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    A, B = find_lora_pairs(model)[0][1:3]
    cases = [
        (dict(params=model, lr=-1.0), "lr"),
        (dict(params=model, mode="fast"), "mode"),
        (dict(params=model, x_mode="inverse"), "x_mode"),
        (dict(params=model, betas=(0.9, 1.0)), "betas"),
        (dict(params=model, betas=(-0.1, 0.9)), "betas"),
        (dict(params=lorapro_groups([(A, torch.nn.Parameter(torch.zeros(A.shape[1], 3, dtype=F64)), 1.0)])),
         r"\(2, 16\) and lora_B \(16, 3\) do not match"),
        (dict(params=lorapro_groups([(A, B.detach(), 1.0)])), "frozen"),
        (dict(params=lorapro_groups([(A, B, 0.0)])), "scale"),
        (dict(params=lorapro_groups([(A, B, 1.0, torch.zeros(3, 3))])), "base weight"),
        (dict(params=[torch.nn.Parameter(torch.zeros(3))]), "no LoRA pair"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            LoRAProAdamW(**kwargs)
    B.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        LoRAProAdamW(model)
    B.requires_grad_(True)

    opt = LoRAProAdamW(model, lr=1e-2)
    loss_of(model, tokens).backward()
    opt.param_groups[-1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.param_groups[-1]["lr"] = 1e-2
    other = LoRAProAdamW(lorapro_groups(find_lora_pairs(model)[:-1]) + [
        {"params": [find_lora_pairs(model)[-1].A, find_lora_pairs(model)[-1].B]}])
    with pytest.raises(ValueError, match="group 7 .* is plain there but a LoRA pair here"):
        opt.load_state_dict(other.state_dict())


# (8) non-finite gradients; per-pair step counting

@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_nonfinite_gradient_skips_the_pair_and_is_counted(mode, tokens):
    model = lora_model(tiny_gpt2, GPT2_TARGETS)
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode=mode)
    pairs = find_lora_pairs(model)
    bad = pairs[1]
    loss_of(model, tokens).backward()
    opt.step()
    snapshot = {id(t): t.detach().clone() for p in pairs for t in (p.A, p.B, p.base_weight)}
    state_snapshot = {k: v.clone() for k, v in opt.state[bad.A].items()}
    opt.zero_grad()
    loss_of(model, tokens).backward()
    bad.B.grad[0, 0] = float("nan")
    bad.A.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == {p.name: int(p is bad) for p in pairs} and opt.nonfinite_skips == 1
    for t in (bad.A, bad.B, bad.base_weight):
        assert torch.equal(t, snapshot[id(t)])
    for k, v in state_snapshot.items():
        assert torch.equal(opt.state[bad.A][k], v) or k == "nonfinite_skips"
    good = pairs[0]
    assert not torch.equal(good.A, snapshot[id(good.A)]) and int(opt.state[good.A]["step"]) == 2
    assert int(opt.state[bad.A]["step"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_is_counted_per_pair(tokens):
    model = lora_model(tiny_llama, LLAMA_TARGETS)
    opt = LoRAProAdamW(model, lr=1e-2, mode="efficient")
    pairs = find_lora_pairs(model)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        if step == 1:
            pairs[0].A.grad = pairs[0].B.grad = None  # this pair sits out a step
        opt.step()
    assert int(opt.state[pairs[0].A]["step"]) == 2
    assert all(int(opt.state[p.A]["step"]) == 3 for p in pairs[1:])
    assert sum(opt.skipped_steps.values()) == 0


def test_full_mode_refuses_a_decay_step_larger_than_the_weight_and_efficient_mode_does_not_need_the_limit():
    """Full mode decays W by sqrt(1 - lr * weight_decay): lr * weight_decay > 1 is refused there, naming both
    values; efficient mode decays the factors like AdamW and takes it."""
    model = lora_model(tiny_llama, LLAMA_TARGETS)
    with pytest.raises(ValueError, match=r"lr \* weight_decay must be <= 1 in full mode.*2\.0 \* 0\.75"):
        LoRAProAdamW(model, lr=2.0, weight_decay=0.75, mode="full")
    LoRAProAdamW(model, lr=2.0, weight_decay=0.75, mode="efficient")
    LoRAProAdamW(model, lr=2.0, weight_decay=0.5, mode="full")  # exactly 1: W decays to zero, allowed
