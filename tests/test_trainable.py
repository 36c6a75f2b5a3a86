"""What trains is what the user asked for (PEFT's trainable-set rule), and no silent fallbacks (issue 17, items 1-2)."""
import torch
from torch import nn

import pytest

import randopt
from conftest import LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.randlora import randlora_layers
from randopt.randlora.functional import coefficient_shapes


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def target_weights(model, targets):
    return {f"{n}.weight" for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets}


def state_of(model):
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def test_param_groups_freezes_everything_outside_the_targets():
    model = tiny_llama()
    groups = randopt.param_groups(model, LLAMA_TARGETS, rank=3)
    assert trainable_names(model) == target_weights(model, LLAMA_TARGETS)
    assert all(g["rank"] == 3 for g in groups), "no plain group: nothing else trains"
    opt = randopt.RandLoRAAdamW(groups, lr=1e-2)
    loss = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
    loss.backward()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    opt.step()
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert all(p.grad is None for n, p in model.named_parameters() if "norm" in n)


def test_modules_to_save_trains_a_head_with_its_own_learning_rate():
    model = tiny_llama()
    groups = randopt.param_groups(model, LLAMA_TARGETS, rank=3, modules_to_save=["lm_head"], plain_lr=5e-3, lr=1e-3)
    assert trainable_names(model) == target_weights(model, LLAMA_TARGETS) | {"lm_head.weight"}
    *randlora, plain = groups
    assert [p for p in plain["params"]] == [model.lm_head.weight] and plain["rank"] is None
    assert plain["lr"] == 5e-3 and all(g["lr"] == 1e-3 for g in randlora)
    opt = randopt.RandLoRAAdamW(groups, lr=1.0)  # group lrs win over the default
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-3]


def test_train_rest_keeps_the_old_full_fine_tune_of_the_rest():
    model = tiny_llama()
    before = trainable_names(model)
    *_, plain = randopt.param_groups(model, LLAMA_TARGETS, rank=3, train_rest=True)
    assert trainable_names(model) == before
    assert {id(p) for p in plain["params"]} == {id(p) for n, p in model.named_parameters()
                                                if n not in target_weights(model, LLAMA_TARGETS)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["q_proj", "qproj"]), r"\['qproj'\] matched no module"),
    (dict(target_modules="q_proj"), "matched no module"),  # a string is a FULL regex match, not a suffix
    (dict(target_modules=LLAMA_TARGETS, modules_to_save=["head"]), r"modules_to_save=\['head'\]: \['head'\]"),
    (dict(target_modules=LLAMA_TARGETS, plain_lr=-1.0), "plain_lr must be >= 0, got -1.0"),
])
def test_bad_selection_raises_and_leaves_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    before = state_of(model)
    with pytest.raises(ValueError, match=message):
        randopt.param_groups(model, rank=3, **kwargs)
    after = state_of(model)
    assert {n: g for n, (g, _) in after.items()} == {n: g for n, (g, _) in before.items()}


def test_regex_string_matches_whole_names():
    model = tiny_llama()
    groups = randopt.param_groups(model, r".*\.(q_proj|v_proj)", rank=3)
    assert trainable_names(model) == target_weights(model, ["q_proj", "v_proj"])
    assert len(groups[0]["params"]) == 4


def test_all_linear_leaves_out_the_output_layer_and_head():
    model = tiny_llama()
    randopt.param_groups(model, rank=3)
    every_linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert trainable_names(model) == every_linear - {"lm_head.weight"}
    classifier = nn.Sequential()
    classifier.add_module("body", nn.Linear(8, 8))
    classifier.add_module("classifier", nn.Linear(8, 2))
    randopt.param_groups(classifier, rank=3, modules_to_save=["classifier"])
    assert trainable_names(classifier) == {"body.weight", "classifier.weight", "classifier.bias"}


def test_optimizer_accepts_a_model_like_param_groups():
    model, reference = tiny_llama(), tiny_llama()
    opt = randopt.RandLoRAAdamW(model, rank=3, lr=1e-2)
    reference_opt = randopt.RandLoRAAdamW(randopt.param_groups(reference, rank=3), lr=1e-2)
    assert trainable_names(model) == trainable_names(reference)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in reference_opt.param_groups]
    tokens = torch.tensor([[1, 2, 3, 4]])
    for m, o in ((model, opt), (reference, reference_opt)):
        m(input_ids=tokens, labels=tokens).loss.backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_no_rank_given_means_the_documented_default_rank_not_plain_adamw():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40))
    opt = randopt.RandLoRAAdamW(model.parameters(), lr=1e-3)
    assert opt.defaults["rank"] == randopt.DEFAULT_RANK == 32
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    for layer in model:
        state = opt.state[layer.weight]
        assert state["lambda"].shape[0] == 32, "every weight matrix trains through RandLoRA at rank 32"
    plain = randopt.RandLoRAAdamW([{"params": [model[0].weight], "rank": None}], lr=1e-3)
    assert plain.param_groups[0]["rank"] is None, "plain AdamW only when a group asks for it"


@pytest.mark.parametrize("rank", [3, 8])
def test_one_alpha_rule_for_modules_and_optimizer(rank):
    assert randopt.default_alpha(rank) == 20 * rank
    model = randopt.inject_randlora(tiny_llama(), LLAMA_TARGETS, rank=rank)
    assert {m.scaling for _, m in randlora_layers(model)} == {20.0}
    opt = randopt.RandLoRAAdamW(randopt.param_groups(tiny_llama(), LLAMA_TARGETS, rank=rank))
    assert opt._scale(opt.param_groups[0]) == 20.0


def test_inject_randlora_follows_the_same_rule():
    model = randopt.inject_randlora(tiny_llama(), LLAMA_TARGETS, rank=3, modules_to_save=["lm_head"])
    assert trainable_names(model) == ({n for n, _ in model.named_parameters() if ".randlora_" in n}
                                      | {"lm_head.weight"})
    rest = randopt.inject_randlora(tiny_llama(), LLAMA_TARGETS, rank=3, train_rest=True)
    frozen = {n for n, p in rest.named_parameters() if not p.requires_grad}
    assert frozen == {f"{n}.base_layer.weight" for n, _ in randlora_layers(rest)}


def test_inject_randlora_bad_modules_to_save_leaves_the_model_unchanged():
    model = tiny_gpt2()
    before = state_of(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        randopt.inject_randlora(model, ["c_attn"], rank=3, modules_to_save=["scorer"])
    assert not randlora_layers(model)
    assert {n: g for n, (g, _) in state_of(model).items()} == {n: g for n, (g, _) in before.items()}


def test_trainable_summary_counts_what_is_learned(capsys):
    model = tiny_llama()
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=3, modules_to_save=["lm_head"]))
    summary = randopt.print_trainable_parameters(model, opt)
    coefficients = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if group["rank"] is not None:
                lam, gam = coefficient_shapes(*p.shape, 3)
                coefficients += lam[0] * lam[1] + gam[0] * gam[1]
    assert summary.trainable == coefficients + model.lm_head.weight.numel()
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.plain == ["lm_head.weight"] and len(summary.through_method) == 8
    printed = capsys.readouterr().out
    assert f"trainable params: {summary.trainable:,d} || all params: {summary.total:,d}" in printed
    assert "lm_head.weight" in printed
    module_model = randopt.inject_randlora(tiny_llama(), LLAMA_TARGETS, rank=3)
    module_summary = randopt.trainable_summary(module_model)
    assert module_summary.trainable == coefficients and module_summary.plain == []


def test_trainer_factory_passes_the_trainable_set():
    pytest.importorskip("transformers")
    from randopt.integrations.transformers import build_optimizer

    model = tiny_llama()
    opt = build_optimizer(model, "RandLoRAAdamW", target_modules=LLAMA_TARGETS, rank=3, modules_to_save=["lm_head"],
                          plain_lr=1e-2, lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert trainable_names(model) == target_weights(model, LLAMA_TARGETS) | {"lm_head.weight"}
