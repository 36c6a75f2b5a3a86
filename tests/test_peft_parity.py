"""Our module route against PEFT 0.21's RandLora with the same bases and coefficients (fp64, 1e-10)."""
import copy

import pytest
import torch

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.randlora import bases_from_tensors, inject_randlora, randlora_layers, unload_randlora

peft = pytest.importorskip("peft")

RANK, ALPHA = 3, 5.0


def peft_randlora(model, targets):
    config = peft.RandLoraConfig(r=RANK, randlora_alpha=ALPHA, target_modules=targets, init_weights=False)
    return peft.get_peft_model(model, config)


def build_pair(make_model, targets):
    ours = make_model()
    theirs = peft_randlora(copy.deepcopy(ours), targets)
    some_layer = next(m for m in theirs.modules() if hasattr(m, "randlora_lambda") and len(m.randlora_lambda))
    A = some_layer.randlora_A["default"].to(torch.float64)
    B = some_layer.randlora_B["default"].to(torch.float64)
    for buffers in (some_layer.randlora_A, some_layer.randlora_B):
        buffers["default"] = buffers["default"].to(torch.float64)
    inject_randlora(ours, targets, rank=RANK, alpha=ALPHA, bases=bases_from_tensors(A, B))
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


@pytest.mark.parametrize("make_model,targets", [(tiny_gpt2, GPT2_TARGETS), (tiny_llama, LLAMA_TARGETS)],
                         ids=["gpt2-conv1d", "llama-linear"])
def test_outputs_delta_weights_and_gradients_match_peft(make_model, targets, tokens):
    ours, theirs, ours_layers, theirs_layers = build_pair(make_model, targets)
    shapes = {(m.out_features, m.in_features) for m in ours_layers.values()}
    assert any(o > i for o, i in shapes) and any(o < i for o, i in shapes), "both orientations must be covered"

    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.delta_weight(), theirs_layers[name].get_delta_weight("default"),
                                   rtol=1e-10, atol=1e-10)
    out_ours = ours(tokens).logits
    out_theirs = theirs(input_ids=tokens).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
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
