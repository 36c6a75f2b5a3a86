"""RandLoRA core: autograd function (both contraction orders), adjoint identity, bases, module route, bad input."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import randopt.randlora.autograd as autograd_core
from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.randlora import (RandLoRALinear, bases_from_tensors, delta_weight, inject_randlora, make_bases,
                              merge_randlora, project, randlora_layers, reconstruct, unload_randlora, unmerge_randlora)
from randopt.randlora.autograd import randlora_linear
from randopt.randlora.bases import num_bases
from randopt.randlora.functional import init_coefficients, scaled_basis
from randopt.randlora.bases import tensor_to_fingerprint

F64 = torch.float64
ORDERS = list(itertools.product([True, False], repeat=2))  # (forward merged, backward merged)
ORDER_IDS = [f"fwd-{'merged' if f else 'factored'}-bwd-{'merged' if b else 'factored'}" for f, b in ORDERS]
SHAPES = [(7, 5), (5, 7), (6, 6)]  # (out, in): in < out, in > out (B on the input side), square
SHAPE_IDS = ["in<out", "in>out", "square"]


def randn(*shape, seed, requires_grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(requires_grad)


def force_order(monkeypatch, forward_merged, backward_merged):
    monkeypatch.setattr(autograd_core, "_forward_merged", lambda *a, **k: forward_merged)
    monkeypatch.setattr(autograd_core, "_backward_merged", lambda *a, **k: backward_merged)


@pytest.fixture(params=ORDERS, ids=ORDER_IDS)
def order(request, monkeypatch):
    force_order(monkeypatch, *request.param)
    return request.param


def layer_for(out_features, in_features, rank=2, seed=0, kind="dense"):
    return make_bases((out_features, in_features), rank, seed=seed, kind=kind).to(dtype=F64).layer(
        out_features, in_features)


def coefficients(out_features, in_features, rank=2, seed=10, requires_grad=True):
    (lam_shape, gam_shape) = (t.shape for t in init_coefficients(out_features, in_features, rank))
    return randn(*lam_shape, seed=seed, requires_grad=requires_grad), randn(*gam_shape, seed=seed + 1,
                                                                         requires_grad=requires_grad)


# ---------------------------------------------------------------- autograd function

@pytest.mark.parametrize("base", ["frozen", "frozen+bias", "trainable+bias"])
@pytest.mark.parametrize("dropout", [False, True], ids=["same-input", "x_adapter"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gradcheck(order, shape, dropout, base):
    out_features, in_features = shape
    layer = layer_for(*shape)
    lam, gam = coefficients(*shape)
    x = randn(2, 3, in_features, seed=1, requires_grad=True)
    weight = randn(out_features, in_features, seed=2, requires_grad=base.startswith("trainable"))
    bias = randn(out_features, seed=3, requires_grad=base.startswith("trainable")) if "bias" in base else None
    inputs = (x, lam, gam) + ((randn(2, 3, in_features, seed=4, requires_grad=True),) if dropout else ())

    def f(x, lam, gam, x_adapter=None):
        return randlora_linear(x, weight, bias, lam, gam, layer, 0.7, x_adapter=x_adapter)

    assert torch.autograd.gradcheck(f, inputs)
    if base.startswith("trainable"):
        assert torch.autograd.gradcheck(lambda w, b: randlora_linear(x, w, b, lam, gam, layer, 0.7),
                                        (weight, bias))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_gradcheck_coefficients_only(order, shape):
    """The input needs no gradient (e.g. the first adapted layer): only the coefficient gradients are formed."""
    layer = layer_for(*shape)
    x = randn(4, shape[1], seed=1)
    weight = randn(*shape, seed=2)
    assert torch.autograd.gradcheck(lambda lam, gam: randlora_linear(x, weight, None, lam, gam, layer, 1.3),
                                    coefficients(*shape))


def run_function(shape, dropout, seed=0):
    out_features, in_features = shape
    layer = layer_for(*shape)
    lam, gam = coefficients(*shape)
    x = randn(3, 4, in_features, seed=1, requires_grad=True)
    x_adapter = randn(3, 4, in_features, seed=4, requires_grad=True) if dropout else None
    weight, bias = randn(out_features, in_features, seed=2), randn(out_features, seed=3)
    y = randlora_linear(x, weight, bias, lam, gam, layer, 0.7, x_adapter=x_adapter)
    y.backward(randn(*y.shape, seed=5))
    grads = [x.grad, lam.grad, gam.grad] + ([x_adapter.grad] if dropout else [])
    reference = F.linear(x, weight, bias) + F.linear(x if x_adapter is None else x_adapter,
                                                     delta_weight(layer, lam, gam, 0.7, shape))
    return y.detach(), grads, reference.detach()


@pytest.mark.parametrize("dropout", [False, True], ids=["same-input", "x_adapter"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_contraction_orders_agree(monkeypatch, shape, dropout):
    results = []
    for forward_merged, backward_merged in ORDERS:
        force_order(monkeypatch, forward_merged, backward_merged)
        results.append(run_function(shape, dropout))
    y0, grads0, reference = results[0]
    torch.testing.assert_close(y0, reference, rtol=1e-12, atol=1e-12)
    for y, grads, _ in results[1:]:
        torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_output_is_not_a_view_and_can_be_modified_in_place(order, shape):
    layer = layer_for(*shape)
    lam, gam = coefficients(*shape)
    x = randn(2, 3, shape[1], seed=1, requires_grad=True)
    y = randlora_linear(x, randn(*shape, seed=2), randn(shape[0], seed=3), lam, gam, layer, 0.7)
    assert not y._is_view()
    y.mul_(2).sum().backward()
    assert lam.grad is not None and x.grad is not None


def test_order_choice_follows_token_count():
    """Few tokens: go through the bases; many tokens: form dW once (the cost model, not a fixed order)."""
    for shape in [(64, 64), (64, 256), (256, 64)]:
        layer = make_bases(shape, 8).layer(*shape)
        assert not autograd_core._forward_merged(layer, 4, True, True, True)
        assert autograd_core._forward_merged(layer, 100_000, True, True, True)
        assert not autograd_core._backward_merged(layer, 4, True, True, True)
        assert autograd_core._backward_merged(layer, 100_000, True, True, True)


@pytest.mark.parametrize("dropout", [False, True], ids=["same-input", "x_adapter"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)], ids=["in<out", "in>out"])
def test_saves_no_full_size_tensor_but_the_base_weight(order, shape, dropout):
    """Neither the scaled basis (rN x d) nor a weight gradient or dW (out x in) is kept for backward."""
    out_features, in_features = shape
    d = min(shape)
    layer = layer_for(*shape, rank=4)
    lam, gam = coefficients(*shape, rank=4)
    x = randn(3, in_features, seed=1, requires_grad=True)
    x_adapter = randn(3, in_features, seed=4, requires_grad=True) if dropout else None
    weight = randn(out_features, in_features, seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = randlora_linear(x, weight, None, lam, gam, layer, 0.7, x_adapter=x_adapter)
    big = [tuple(t.shape) for t in saved
           if t.numel() >= d * d and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()]
    assert saved and not big
    y.sum().backward()
    assert lam.grad is not None and gam.grad is not None and x.grad is not None


def test_factored_forward_keeps_x_times_B_instead_of_the_wide_input(monkeypatch):
    """With B on the input side, the factored forward keeps ``x @ B`` (tokens x rN) rather than x (tokens x in)."""
    force_order(monkeypatch, False, True)
    layer = layer_for(16, 40, rank=4)  # rN = 16 < in = 40
    lam, gam = coefficients(16, 40, rank=4)
    x = randn(5, 40, seed=1, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        randlora_linear(x, randn(16, 40, seed=2), None, lam, gam, layer, 0.7)
    assert (5, 16) in saved and (5, 40) not in saved


# ---------------------------------------------------------------- projection and reconstruction

dims = st.integers(1, 12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out_features=dims, in_features=dims, rank=st.integers(1, 14), extra=st.tuples(st.integers(0, 3),
       st.integers(0, 3)), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_adjoint_identity(out_features, in_features, rank, extra, seed, scale):
    """<G, d/dt dW(theta + t v)> == <project(G), v>, with the directional derivative exact (forward mode)."""
    assume(rank * min(out_features + extra[0], in_features + extra[1]) > 1)  # a 1-element basis has no std
    bases = make_bases((out_features + extra[0], in_features + extra[1]), rank, seed=seed).to(dtype=F64)
    shape = (out_features, in_features)
    lam, gam = coefficients(*shape, rank=rank, seed=seed, requires_grad=False)
    v_lam, v_gam = coefficients(*shape, rank=rank, seed=seed + 7, requires_grad=False)
    G = randn(*shape, seed=seed + 3)
    _, tangent = torch.func.jvp(lambda lam, gam: delta_weight(bases, lam, gam, scale, shape), (lam, gam),
                                (v_lam, v_gam))
    grad_lam, grad_gam = project(G, bases, lam, gam, scale)
    lhs = (G * tangent).sum()
    rhs = (grad_lam * v_lam).sum() + (grad_gam * v_gam).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(out_features=st.integers(1, 10), in_features=st.integers(1, 10), rank=st.integers(1, 12),
       row_split=st.floats(0, 1), col_split=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_blocks_add_up(out_features, in_features, rank, row_split, col_split, seed):
    """Projections of row blocks and of rectangular blocks sum to the full one; reconstructed blocks tile dW."""
    assume(rank * min(out_features, in_features) > 1)
    bases = make_bases((out_features, in_features), rank, seed=seed).to(dtype=F64)
    shape = (out_features, in_features)
    layer = bases.layer(*shape)
    lam, gam = coefficients(*shape, rank=rank, seed=seed, requires_grad=False)
    G = randn(*shape, seed=seed + 1)
    full = project(G, bases, lam, gam, 0.5)
    i, j = round(row_split * out_features), round(col_split * in_features)
    row_blocks = [(G[:i], 0, 0), (G[i:], i, 0)]
    blocks = [(G[:i, :j], 0, 0), (G[:i, j:], 0, j), (G[i:, :j], i, 0), (G[i:, j:], i, j)]
    for tiling in (row_blocks, blocks):
        parts = [project(g, bases, lam, gam, 0.5, shape=shape, row_start=r, col_start=c)
                 for g, r, c in tiling if g.numel()]
        for k in range(2):
            torch.testing.assert_close(sum(p[k] for p in parts), full[k], rtol=1e-10, atol=1e-12)

    basis = scaled_basis(layer.A, lam, gam)
    dW = delta_weight(bases, lam, gam, 0.5, shape)
    assembled = torch.empty_like(dW)
    for rows, cols in itertools.product([slice(0, i), slice(i, None)], [slice(0, j), slice(j, None)]):
        assembled[rows, cols] = reconstruct(layer, basis, 0.5, rows=rows, cols=cols)
    torch.testing.assert_close(assembled, dW, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bases

def test_same_seed_same_bases_and_fingerprint():
    a, b = make_bases((40, 24), 4, seed=3), make_bases((40, 24), 4, seed=3)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.fingerprint == b.fingerprint
    others = [make_bases((40, 24), 4, seed=4), make_bases((40, 24), 4, seed=3, kind="sparse"),
              make_bases((40, 24), 4, seed=3, kind="very_sparse"), make_bases((40, 24), 5, seed=3),
              make_bases((40, 32), 4, seed=3)]
    assert len({a.fingerprint} | {o.fingerprint for o in others}) == 1 + len(others)


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_layout_and_values(kind):
    out_features, in_features, rank = 300, 200, 7  # d=200, D=300, N=ceil(200/7)=29
    bases = make_bases((out_features, in_features), rank, seed=1, kind=kind)
    n = num_bases(out_features, in_features, rank)
    assert n == 29
    assert bases.A.shape == (rank, 1, 200) and bases.B.shape == (300, n, rank)
    for t in (bases.A, bases.B):
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert abs(t.std().item() - 1) < 1e-5
    if kind == "dense":
        assert bases.B.unique().numel() > 1000
        return
    expected_nonzero = 1 / 3 if kind == "sparse" else 1 / 200 ** 0.5
    for t in (bases.A, bases.B):
        values = t.unique()
        c = values.abs().max()
        assert values.numel() == 3 and torch.equal(values, torch.stack([-c, torch.zeros(()), c]))
        assert abs((t != 0).float().mean().item() - expected_nonzero) < 0.25 * expected_nonzero


def test_layer_slices_share_the_global_bases():
    bases = make_bases((30, 20), 3, seed=2)
    for out_features, in_features in [(30, 20), (20, 30), (12, 20), (20, 7), (5, 5)]:
        layer = bases.layer(out_features, in_features)
        d, D = sorted((out_features, in_features))
        n = num_bases(out_features, in_features, 3)
        assert layer.transposed == (in_features > out_features)
        assert torch.equal(layer.A, bases.A[:, :, :d])
        assert torch.equal(layer.B, bases.B[:D, :n, :].reshape(D, n * 3))
        assert torch.equal(layer.B[:, 1 * 3 + 2], bases.B[:D, 1, 2])  # column n*r + k is base n's column k


def test_fingerprint_round_trip_and_mismatch():
    bases = make_bases((16, 8), 2, seed=0)
    tensor = bases.fingerprint_tensor()
    assert tensor.dtype == torch.int64 and tensor_to_fingerprint(tensor) == bases.fingerprint
    bases.check_fingerprint(tensor)
    bases.check_fingerprint(bases.fingerprint)
    other = make_bases((16, 8), 2, seed=1)
    for expected in (other.fingerprint, other.fingerprint_tensor()):
        with pytest.raises(ValueError, match="fingerprint") as info:
            bases.check_fingerprint(expected)
        assert other.fingerprint in str(info.value) and bases.fingerprint in str(info.value)
    wrapped = bases_from_tensors(bases.A.clone(), bases.B.clone())
    assert wrapped.fingerprint == bases.fingerprint


def test_bases_are_fp32_on_cpu_whatever_the_default_dtype():
    reference = make_bases((12, 9), 2, seed=5, kind="sparse")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for kind in ("dense", "sparse"):
            bases = make_bases((12, 9), 2, seed=5, kind=kind)
            assert bases.A.dtype == torch.float32 and bases.B.dtype == torch.float32
            assert bases.A.device.type == "cpu"
        assert bases.fingerprint == reference.fingerprint and torch.equal(bases.B, reference.B)
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------- module route

def conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@pytest.mark.parametrize("make_model,targets,kind", [(tiny_gpt2, GPT2_TARGETS, "conv1d"),
                                                     (tiny_llama, LLAMA_TARGETS, "linear")], ids=["gpt2", "llama"])
def test_inject_wraps_targets_and_starts_at_zero_update(make_model, targets, kind, tokens):
    model = make_model()
    expected = model(tokens).logits
    inject_randlora(model, targets, rank=3, alpha=5.0)
    layers = randlora_layers(model)
    base_type = conv1d_class() if kind == "conv1d" else nn.Linear
    assert layers and all(isinstance(m.base_layer, base_type) for _, m in layers)
    assert {name.rsplit(".", 1)[-1] for name, _ in layers} == set(targets)
    assert len({id(m.shared) for _, m in layers}) == 1
    for _, layer in layers:
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
        assert layer.randlora_lambda.requires_grad and layer.randlora_gamma.requires_grad
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=1e-12)
    assert not any("shared" in k for k in model.state_dict()), "bases are not checkpointed: seed + fingerprint"


@pytest.mark.parametrize("make_model,targets", [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)],
                         ids=["gpt2-conv1d", "llama-linear"])
def test_merge_unmerge_unload_exact(make_model, targets, tokens):
    model = inject_randlora(make_model(), targets, rank=3, alpha=5.0, init_weights=False)
    layers = dict(randlora_layers(model))
    original = {name: m.base_layer.weight.detach().clone() for name, m in layers.items()}
    expected = model(tokens).logits.detach()
    kept = unload_randlora(copy.deepcopy(model), merge=False)
    for name in layers:
        assert torch.equal(kept.get_submodule(name).weight, original[name])
    merge_randlora(model)
    assert all(m.merged for m in layers.values())
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-10, atol=1e-10)
    unmerge_randlora(model)
    for name, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, original[name], rtol=0, atol=1e-12)
    plain = unload_randlora(model)
    assert not randlora_layers(plain)
    assert all(not isinstance(m, RandLoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=1e-10, atol=1e-10)


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(12, 20).to(F64)
    layer = inject_randlora(nn.Sequential(base), ["0"], rank=3, alpha=2.0, dropout=0.5, init_weights=False)[0]
    x = randn(6, 12, seed=1, requires_grad=True)
    dW = layer.delta_weight().detach()

    torch.manual_seed(7)
    y = layer.train()(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and not torch.equal(dropped, x)
    torch.testing.assert_close(y, base(x) + dropped @ dW.T, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(y, base(x) + x @ dW.T)

    # gradients through the dropped adapter input match plain autograd with the same mask
    y.square().sum().backward()
    ours = [x.grad.clone(), layer.randlora_lambda.grad.clone(), layer.randlora_gamma.grad.clone()]
    x.grad = None
    lam, gam = (p.detach().clone().requires_grad_() for p in (layer.randlora_lambda, layer.randlora_gamma))
    reference = base(x) + F.linear(dropped, delta_weight(layer.layer_bases, lam, gam, layer.scaling, (20, 12)))
    reference.square().sum().backward()
    for got, want in zip(ours, [x.grad, lam.grad, gam.grad]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, base(x) + x @ dW.T, rtol=1e-12, atol=1e-12)


def test_model_to_moves_shared_bases_once(tokens):
    model = inject_randlora(tiny_llama(dtype=torch.float32), LLAMA_TARGETS, rank=3, alpha=5.0, init_weights=False)
    layers = [m for _, m in randlora_layers(model)]
    assert layers[0].layer_bases.A.dtype == torch.float32  # fill the slice cache before the move
    model.to(F64)
    shared = {id(m.shared) for m in layers}
    storages = {m.shared.A.untyped_storage().data_ptr() for m in layers}
    assert len(shared) == 1 and len(storages) == 1
    for m in layers:
        assert m.shared.A.dtype == F64 and m.layer_bases.A.dtype == F64 and m.layer_bases.B.dtype == F64
        assert m.randlora_lambda.dtype == F64
    reference = copy.deepcopy(model)
    for m in (m for _, m in randlora_layers(reference)):
        m.merge()
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-10, atol=1e-10)
    model(tokens).logits.sum().backward()
    assert all(m.randlora_gamma.grad is not None and m.randlora_gamma.grad.dtype == F64 for m in layers)


# ---------------------------------------------------------------- bad input

def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (value, requires_grad) in params.items():
        assert torch.equal(value, before[1][name][0]) and requires_grad == before[1][name][1], name


BAD_INJECT = [
    (dict(rank=0), "rank", "0"),
    (dict(rank=-3), "rank", "-3"),
    (dict(rank=2.5), "rank", "2.5"),
    (dict(rank="4"), "rank", "'4'"),
    (dict(rank=True), "rank", "True"),
    (dict(target_modules=["no_such_layer"]), "target_modules", "no_such_layer"),
    (dict(target_modules="model.*nothing"), "target_modules", "nothing"),
    (dict(target_modules=["q_proj", "input_layernorm"]), "input_layernorm", "LlamaRMSNorm"),
    (dict(target_modules=["embed_tokens"]), "embed_tokens", "Embedding"),
    (dict(target_modules=[]), "target_modules", "[]"),
    (dict(kind="gaussian"), "kind", "gaussian"),
    (dict(dropout=1.0), "dropout", "1.0"),
    (dict(dropout=-0.1), "dropout", "-0.1"),
    (dict(bases=make_bases((40, 40), 2)), "rank", "2"),
    (dict(bases=make_bases((16, 16), 3)), "bases", "max side 16"),
]


@pytest.mark.parametrize("kwargs,word,value", BAD_INJECT,
                         ids=[",".join(f"{k}={v!r}" for k, v in c[0].items())[:40] for c in BAD_INJECT])
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, word, value):
    model = tiny_llama()
    before = snapshot(model)
    arguments = dict(target_modules=LLAMA_TARGETS, rank=3) | kwargs
    with pytest.raises(ValueError) as info:
        inject_randlora(model, **arguments)
    message = str(info.value)
    assert word in message and value in message, message
    assert_unchanged(model, before)


def test_second_injection_is_refused_and_leaves_model_unchanged():
    model = inject_randlora(tiny_gpt2(), GPT2_TARGETS, rank=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already have a RandLoRA adapter"):
        inject_randlora(model, ["c_fc"], rank=3)
    assert_unchanged(model, before)


def test_bad_basis_arguments():
    with pytest.raises(ValueError, match="kind.*'gaussian'"):
        make_bases((8, 8), 2, kind="gaussian")
    with pytest.raises(ValueError, match="rank.*0"):
        make_bases((8, 8), 0)
    with pytest.raises(ValueError, match="seed"):
        make_bases((8, 8), 2, seed=1.5)
    with pytest.raises(ValueError, match="max_shape"):
        make_bases((0, 8), 2)
    with pytest.raises(ValueError, match=r"A=\(2, 1, 8\) B=\(8, 2\)"):
        bases_from_tensors(torch.zeros(2, 1, 8), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="dropout"):
        RandLoRALinear(nn.Linear(4, 4), None, rank=2, dropout=1.5)
