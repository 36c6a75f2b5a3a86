"""RandLoRAAdamW's two ways of writing a matrix's update: ``"stochastic"`` (add the change, round stochastically)
and ``"exact"`` (keep ``W0`` and write ``round(W0 + dW)``): the exact mode's weights equal the adapter at every
step, in bf16 and fp32, with fused backward, 8-bit state, an imported adapter and across a resume."""
import pytest
import torch

import randopt
from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.randlora import delta_weight

RANK, ALPHA, LR = 3, 5.0, 2e-2


def only_targets_trainable(model, targets):
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.endswith(f"{t}.weight") for t in targets))
    return model


def batches(n, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 8), generator=generator) for _ in range(n)]


def make(model_fn, targets, dtype, lr=LR, **options):
    model = only_targets_trainable(model_fn(dtype), targets)
    starting = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, targets, rank=RANK, alpha=ALPHA), lr=lr,
                                weight_decay=0.0, **options)
    return model, opt, starting


def train(model, opt, data):
    for tokens in data:
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()


def adapter_weights(opt, starting, dtype=torch.float64):
    """``W0 + dW(lambda, gamma)`` computed in ``dtype`` for every matrix, in the parameter's storage layout."""
    expected = {}
    for p, group, lam, gam, _, scale in opt.matrices():
        shape = opt._matrix_shape(p, group)
        layer = opt.bases_for(group, p.device, dtype).layer(*shape)
        delta = delta_weight(layer, lam.to(dtype), gam.to(dtype), scale, shape)
        delta = delta.T if group["fan_in_fan_out"] else delta
        expected[p] = starting[p].to(dtype) + delta.reshape(p.shape)
    return expected


def drift(opt, starting) -> float:
    """max over matrices of ``|W - (W0 + dW)| / |dW|`` (Frobenius norms)."""
    worst = 0.0
    for p, expected in adapter_weights(opt, starting).items():
        delta = expected - starting[p].double()
        worst = max(worst, ((p.double() - expected).norm() / delta.norm()).item())
    return worst


@pytest.mark.parametrize("model_fn,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)],
                         ids=["llama-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("options", [{}, {"fused_backward": True}, {"state_dtype": "8bit", "min_8bit_size": 0}],
                         ids=["plain", "fused", "8bit"])
def test_exact_bf16_weights_equal_rounded_adapter_at_every_step(model_fn, targets, options):
    model, opt, starting = make(model_fn, targets, torch.bfloat16, weight_update="exact", **options)
    for tokens in batches(6):
        train(model, opt, [tokens])
        for p, expected in adapter_weights(opt, starting, torch.float32).items():
            assert torch.equal(p, expected.to(torch.bfloat16)), "the weight is not round(W0 + dW)"


def test_stochastic_bf16_weights_drift_where_exact_ones_do_not():
    """The reason the exact mode exists: with updates near the weights' resolution (a small learning rate), the
    stochastic rounding errors add up to a sizeable part of dW; the exact mode's error is one rounding."""
    data = batches(20)
    model, opt, starting = make(tiny_llama, LLAMA_TARGETS, torch.bfloat16, lr=1e-3)
    train(model, opt, data)
    exact_model, exact_opt, exact_starting = make(tiny_llama, LLAMA_TARGETS, torch.bfloat16, lr=1e-3,
                                                  weight_update="exact")
    train(exact_model, exact_opt, data)
    assert drift(opt, starting) > 0.05 > 3 * drift(exact_opt, exact_starting)


def test_exact_fp32_training_follows_the_stochastic_fp32_trajectory():
    data = batches(10)
    runs = []
    for mode in ("stochastic", "exact"):
        model, opt, _ = make(tiny_llama, LLAMA_TARGETS, torch.float32, weight_update=mode)
        train(model, opt, data)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_exact_mode_keeps_one_starting_weight_per_matrix_in_its_dtype():
    model, opt, starting = make(tiny_llama, LLAMA_TARGETS, torch.bfloat16, weight_update="exact")
    train(model, opt, batches(2))
    for p, state in opt.state.items():
        assert state["base_weight"].dtype == torch.bfloat16 and state["base_weight"].numel() == p.numel()
        assert torch.equal(state["base_weight"].view(p.shape), starting[p])


def test_exact_mode_resumes_bit_for_bit(tmp_path):
    data = batches(8)
    model, opt, _ = make(tiny_llama, LLAMA_TARGETS, torch.bfloat16, weight_update="exact")
    train(model, opt, data[:4])
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    train(model, opt, data[4:])

    checkpoint = torch.load(path, weights_only=True)
    resumed, resumed_opt, _ = make(tiny_llama, LLAMA_TARGETS, torch.bfloat16, weight_update="exact")
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, data[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_exact_mode_starts_from_an_imported_adapter():
    """``load_coefficients`` with the weight already holding the update: W0 is recovered as W - dW."""
    model, opt, starting = make(tiny_llama, LLAMA_TARGETS, torch.float64, weight_update="exact")
    generator = torch.Generator().manual_seed(3)
    for p in [p for p in model.parameters() if p.requires_grad]:
        group = opt._group_of[p]
        state = opt._init_state(p, group)
        lam = torch.randn(state["lambda"].shape, generator=generator, dtype=torch.float64)
        gam = torch.randn(state["gamma"].shape, generator=generator, dtype=torch.float64)
        layer = opt.bases_for(group, p.device, torch.float64).layer(*opt._matrix_shape(p, group))
        with torch.no_grad():
            p.add_(delta_weight(layer, lam, gam, opt._scale(group), p.shape))
        opt.load_coefficients(p, lam, gam)
    train(model, opt, batches(3))
    for p, expected in adapter_weights(opt, starting).items():
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", ["fp32", None, "Exact", 1])
def test_unknown_weight_update_is_refused(value):
    with pytest.raises(ValueError, match="weight_update"):
        randopt.RandLoRAAdamW(tiny_llama().parameters(), rank=RANK, weight_update=value)
