"""Our module route against PEFT 0.21's RandLora with the same bases and coefficients (fp64, 1e-10)."""
import copy

import pytest
import torch

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.randlora import bases_from_tensors, inject_randlora, make_bases, randlora_layers, unload_randlora
from randopt.randlora.functional import scaled_basis

peft = pytest.importorskip("peft")

RANK, ALPHA = 3, 5.0
MODELS = [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)]
MODEL_IDS = ["gpt2-conv1d", "llama-linear"]


def peft_randlora(model, targets, dropout=0.0):
    config = peft.RandLoraConfig(r=RANK, randlora_alpha=ALPHA, target_modules=targets, init_weights=False,
                                 randlora_dropout=dropout)
    return peft.get_peft_model(model, config)


def build_pair(make_model, targets, dropout=0.0):
    ours = make_model()
    theirs = peft_randlora(copy.deepcopy(ours), targets, dropout)
    some_layer = next(m for m in theirs.modules() if hasattr(m, "randlora_lambda") and len(m.randlora_lambda))
    A = some_layer.randlora_A["default"].to(torch.float64)
    B = some_layer.randlora_B["default"].to(torch.float64)
    for buffers in (some_layer.randlora_A, some_layer.randlora_B):
        buffers["default"] = buffers["default"].to(torch.float64)
    inject_randlora(ours, targets, rank=RANK, alpha=ALPHA, bases=bases_from_tensors(A, B), dropout=dropout)
    theirs_layers = {n.replace("base_model.model.", ""): m for n, m in theirs.named_modules()
                     if hasattr(m, "randlora_lambda") and "default" in m.randlora_lambda}
    ours_layers = dict(randlora_layers(ours))
    assert theirs_layers.keys() == ours_layers.keys() and ours_layers
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            lam = torch.randn(layer.randlora_lambda.shape, generator=generator, dtype=torch.float64)
            gam = torch.randn(layer.randlora_gamma.shape, generator=generator, dtype=torch.float64)
            layer.randlora_lambda.copy_(lam)
            layer.randlora_gamma.copy_(gam)
            theirs_layers[name].randlora_lambda["default"].data = lam.clone()
            theirs_layers[name].randlora_gamma["default"].data = gam.clone()
    return ours, theirs, ours_layers, theirs_layers


@pytest.mark.parametrize("make_model,targets", MODELS, ids=MODEL_IDS)
def test_outputs_delta_weights_and_gradients_match_peft(order, make_model, targets, tokens):
    ours, theirs, ours_layers, theirs_layers = build_pair(make_model, targets)
    shapes = {(m.out_features, m.in_features) for m in ours_layers.values()}
    assert any(o > i for o, i in shapes) and any(o < i for o, i in shapes), "both orientations must be covered"

    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.delta_weight(), theirs_layers[name].get_delta_weight("default"),
                                   rtol=1e-10, atol=1e-10)
    out_ours = ours(tokens).logits
    out_theirs = theirs(input_ids=tokens).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
    assert_gradients_match(out_ours, out_theirs, ours_layers, theirs_layers)


def assert_gradients_match(out_ours, out_theirs, ours_layers, theirs_layers):
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for name, layer in ours_layers.items():
        theirs_layer = theirs_layers[name]
        torch.testing.assert_close(layer.randlora_lambda.grad, theirs_layer.randlora_lambda["default"].grad,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.randlora_gamma.grad, theirs_layer.randlora_gamma["default"].grad,
                                   rtol=1e-10, atol=1e-12)


def test_merge_unmerge_unload_match_adapter_output(tokens):
    ours, _, layers, _ = build_pair(tiny_llama, LLAMA_TARGETS)
    base_weights = {n: m.base_layer.weight.clone() for n, m in layers.items()}
    expected = ours(tokens).logits
    for _, layer in layers.items():
        layer.merge()
    torch.testing.assert_close(ours(tokens).logits, expected, rtol=1e-10, atol=1e-10)
    for name, layer in layers.items():
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], rtol=0, atol=1e-12)
    plain = unload_randlora(ours)
    assert not randlora_layers(plain)
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make_model,targets", MODELS, ids=MODEL_IDS)
def test_dropout_matches_peft(make_model, targets, tokens):
    """Eval mode: dropout is off in both. Train mode: the same seed draws the same masks in both."""
    ours, theirs, ours_layers, theirs_layers = build_pair(make_model, targets, dropout=0.4)
    assert all(isinstance(m.dropout, torch.nn.Dropout) for m in ours_layers.values())
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(tokens).logits, theirs(input_ids=tokens).logits, rtol=1e-10, atol=1e-10)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    out_ours = ours(tokens).logits
    torch.manual_seed(11)
    out_theirs = theirs(input_ids=tokens).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
    torch.manual_seed(12)
    assert not torch.allclose(ours(tokens).logits, out_ours), "dropout must be active in train mode"
    assert_gradients_match(out_ours, out_theirs, ours_layers, theirs_layers)


def test_layer_slices_and_scaled_bases_match_peft():
    """Our bases put into PEFT's buffers: PEFT's per-layer slicing and scaled basis equal ours, both orientations."""
    model = peft_randlora(tiny_llama(), LLAMA_TARGETS)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_scaled_bases") and
              "default" in m.randlora_lambda}
    shapes = {(m.out_features, m.in_features) for m in layers.values()}
    assert any(o > i for o, i in shapes) and any(o < i for o, i in shapes)
    largest = tuple(max(s[k] for s in shapes) for k in range(2))
    bases = make_bases(largest, RANK, seed=4).to(dtype=torch.float64)
    for module in layers.values():
        assert module.randlora_A["default"].shape == bases.A.shape
        assert module.randlora_B["default"].shape == bases.B.shape
        module.randlora_A["default"], module.randlora_B["default"] = bases.A, bases.B
    for name, module in layers.items():
        lam, gam = module.randlora_lambda["default"], module.randlora_gamma["default"]
        first, second = module.get_scaled_bases("default")
        layer = bases.layer(module.out_features, module.in_features)
        basis = scaled_basis(layer.A, lam.detach(), gam.detach())
        if layer.transposed:  # PEFT returns (B^T, Ahat^T) when in > out
            first, second = second.T, first.T
        torch.testing.assert_close(first.detach(), basis, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(second, layer.B, rtol=0, atol=0, msg=name)
