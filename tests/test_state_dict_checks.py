"""load_state_dict checks everything first: hypothesis over mutations of real state dicts (shapes, dtypes, keys, group
options, another optimizer's dict); every refusal leaves the optimizer bit-identical and still working."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import randopt
from randopt.lorapro import lorapro_groups

from test_validation import Pair, TwoLayer, assert_same, backward, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def trained_randlora(**kwargs):
    model = TwoLayer()
    optimizer = randopt.RandLoRAAdamW(model.parameters(), rank=2, **kwargs)
    backward(model)
    optimizer.step()
    return model, optimizer, lambda seed=1: backward(model, seed)


def trained_lorapro(mode="full", **kwargs):
    pair, head = Pair(), torch.nn.Linear(4, 3)
    optimizer = randopt.LoRAProAdamW(lorapro_groups([(pair.A, pair.B, 2.0)]) + [{"params": head.parameters()}],
                                     mode=mode, **kwargs)
    model = torch.nn.ModuleDict({"pair": pair, "head": head})

    def run_backward(seed=0):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
        head(pair(x)).square().sum().backward()
    run_backward()
    optimizer.step()
    return model, optimizer, run_backward


MAKERS = {"randlora": trained_randlora, "randlora-exact": lambda: trained_randlora(weight_update="exact"),
          "randlora-8bit": lambda: trained_randlora(state_dtype="8bit", min_8bit_size=1),
          "lorapro-full": trained_lorapro, "lorapro-efficient": lambda: trained_lorapro("efficient"),
          "lorapro-8bit": lambda: trained_lorapro(state_dtype="8bit", min_8bit_size=1)}


# ----- mutations of a state dict: each returns a description, or None when it does not apply -----------------
def entries(state_dict):
    return [(position, key) for position, state in sorted(state_dict["state"].items()) for key in sorted(state)]


def wrong_shape(sd, data):
    position, key = data.draw(st.sampled_from(entries(sd)))
    value = sd["state"][position][key]
    sd["state"][position][key] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if value.dim() != 1 \
        else value[:-1] if value.numel() > 1 else value.reshape(1, 1)
    return f"{key} reshaped"


def wrong_dtype(sd, data):
    position, key = data.draw(st.sampled_from(entries(sd)))
    value = sd["state"][position][key]
    sd["state"][position][key] = value.to(torch.float16 if value.is_floating_point() else torch.float64)
    return f"{key} as another dtype"


def missing_key(sd, data):
    position, key = data.draw(st.sampled_from(entries(sd)))
    if key == "nonfinite_skips" and "rank" not in sd["param_groups"][0]:
        return None  # LoRAProAdamW's plain parameters were not counted before: their older state lacks it
    if key == "base_weight":
        return None  # optional: without it exact mode takes W0 = W - dW, so a stochastic-mode checkpoint resumes
    del sd["state"][position][key]
    return f"{key} deleted"


def unknown_key(sd, data):
    position, _ = data.draw(st.sampled_from(entries(sd)))
    sd["state"][position][data.draw(st.sampled_from(["exp_avg_max", "momentum_buffer", "extra"]))] = torch.zeros(1)
    return "unknown key"


def not_a_tensor(sd, data):
    position, key = data.draw(st.sampled_from(entries(sd)))
    sd["state"][position][key] = data.draw(st.sampled_from([None, 1.0, [0.0], "x"]))
    return f"{key} not a tensor"


def bad_hyperparameter(sd, data):
    group = data.draw(st.sampled_from(sd["param_groups"]))
    key = data.draw(st.sampled_from(["lr", "eps", "weight_decay", "betas"]))
    group[key] = data.draw(st.sampled_from(["1e-3", None, float("nan"), float("inf"), -1.0, (0.9, 1.5)]))
    return f"group {key}"


def math_option(sd, data):
    group = data.draw(st.sampled_from(sd["param_groups"]))
    if "rank" in group:
        key, value = data.draw(st.sampled_from([("rank", 3), ("rank", None), ("seed", 9), ("alpha", 3.0),
                                                ("basis_kind", "sparse"), ("fan_in_fan_out", True)]))
        if key == "rank" and group["rank"] is None:
            value = 2
    else:
        if group["lora_scale"] is None:
            return None
        key, value = data.draw(st.sampled_from([("mode", "efficient" if group["mode"] == "full" else "full"),
                                                ("lora_scale", 4.0)]))
    group[key] = value
    return f"group {key}"


def group_layout(sd, data):
    choice = data.draw(st.sampled_from(["drop group", "drop param", "extra position", "shapes"]))
    if choice == "drop group":
        sd["param_groups"].pop()
    elif choice == "drop param":
        sd["param_groups"][-1]["params"].pop()
    elif choice == "extra position":
        sd["state"][99] = copy.deepcopy(next(iter(sd["state"].values())))
    else:
        sd["param_shapes"][0] = [7, 7]
    return choice


def impossible_value(sd, data):
    position, key = data.draw(st.sampled_from(entries(sd)))
    bad = impossible_values(key, sd["state"][position][key])
    if not bad:
        return None
    sd["state"][position][key] = with_first_element(sd["state"][position][key], data.draw(st.sampled_from(bad)))
    return f"{key} impossible value"


def not_a_state_dict(sd, data):
    return data.draw(st.sampled_from([None, {}, {"state": {}}, {"state": [], "param_groups": []}, [1, 2],
                                      {"state": {}, "param_groups": [5]}]))


MUTATIONS = [wrong_shape, wrong_dtype, missing_key, unknown_key, not_a_tensor, bad_hyperparameter, math_option,
             group_layout, impossible_value]


@settings(max_examples=60, deadline=None)
@given(maker=st.sampled_from(sorted(MAKERS)), mutation=st.sampled_from(MUTATIONS + [not_a_state_dict]),
       data=st.data())
def test_a_mutated_state_dict_is_refused_and_the_optimizer_keeps_working(maker, mutation, data):
    source_model, source, _ = MAKERS[maker]()
    model, optimizer, run_backward = MAKERS[maker]()
    saved = copy.deepcopy(source.state_dict())
    if mutation is not_a_state_dict:
        saved = mutation(saved, data)
    elif mutation(saved, data) is None:
        return
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(saved)
    assert_same(before, snapshot(model, optimizer))
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    optimizer.zero_grad()
    run_backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_an_unmutated_state_dict_loads_and_resumes_bit_for_bit(maker):
    model, optimizer, run_backward = MAKERS[maker]()
    resumed_model, resumed, resumed_backward = MAKERS[maker]()
    resumed_model.load_state_dict(model.state_dict())
    saved = optimizer.state_dict()
    resumed.load_state_dict(saved)
    for m, opt, run in ((model, optimizer, run_backward), (resumed_model, resumed, resumed_backward)):
        opt.zero_grad()
        run(3)
        opt.step()
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_another_optimizers_state_dict_is_refused():
    model, optimizer, run_backward = trained_randlora()
    backward_model = TwoLayer()
    adamw = torch.optim.AdamW(backward_model.parameters())
    backward(backward_model)
    adamw.step()
    with pytest.raises(ValueError, match="not a RandLoRAAdamW state dict"):
        optimizer.load_state_dict(adamw.state_dict())
    _, lorapro, _ = trained_lorapro()
    with pytest.raises(ValueError, match="not a RandLoRAAdamW state dict|parameter groups"):
        optimizer.load_state_dict(lorapro.state_dict())
    with pytest.raises(ValueError, match="not a LoRAProAdamW state dict|parameter groups|plain there"):
        lorapro.load_state_dict(optimizer.state_dict())


def test_a_dict_saved_before_the_first_step_with_another_rank_is_refused():
    model = TwoLayer()
    fresh = randopt.RandLoRAAdamW(model.parameters(), rank=3)
    optimizer = randopt.RandLoRAAdamW(model.parameters(), rank=2)
    with pytest.raises(ValueError, match="rank=3"):
        optimizer.load_state_dict(fresh.state_dict())


def test_lorapro_rank_4_state_does_not_load_into_a_rank_2_model():
    A4, B4 = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(5, 4))
    A2, B2 = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(5, 2))
    rank4 = randopt.LoRAProAdamW(lorapro_groups([(A4, B4, 1.0)]))
    (torch.randn(3, 6) @ A4.T @ B4.T).sum().backward()
    rank4.step()
    rank2 = randopt.LoRAProAdamW(lorapro_groups([(A2, B2, 1.0)]))
    with pytest.raises(ValueError, match="shape"):
        rank2.load_state_dict(rank4.state_dict())
    with pytest.raises(ValueError, match="lora_scale=1.0.*lora_scale=2.0"):
        randopt.LoRAProAdamW(lorapro_groups([(A4, B4, 2.0)])).load_state_dict(rank4.state_dict())


# ----- values no step could have written ---------------------------------------------------------------------------
def impossible_values(key: str, value: torch.Tensor) -> list:
    """Values of a state entry that no step writes: a counter that is negative or not a whole number, a non-finite
    moment, coefficient or base weight, a negative second moment or 8-bit scale (codes can hold anything)."""
    if key in ("step", "nonfinite_skips", "span"):
        return [-1.0, 2.5, float("nan"), float("inf")] if value.is_floating_point() else [-1]
    if not value.is_floating_point():
        return []
    bad = [float("nan"), float("inf"), -float("inf")]
    return bad + [-1.0] if key.endswith("exp_avg_sq") or key.endswith("_absmax") else bad


def with_first_element(value: torch.Tensor, new) -> torch.Tensor:
    changed = value.clone()
    changed.view(-1)[0] = new
    return changed


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_state_values_no_step_could_write_are_refused(maker):
    """A NaN moment, a negative second moment or a step count of -1 loaded as they are would make every later step
    write NaN into the weights: refused at load, naming the entry, with the optimizer unchanged."""
    source_model, source, _ = MAKERS[maker]()
    saved = source.state_dict()
    model, optimizer, run_backward = MAKERS[maker]()
    before = snapshot(model, optimizer)
    tried = 0
    for position, key in entries(saved):
        for bad in impossible_values(key, saved["state"][position][key]):
            mutated = copy.deepcopy(saved)
            mutated["state"][position][key] = with_first_element(mutated["state"][position][key], bad)
            with pytest.raises(ValueError, match=key):
                optimizer.load_state_dict(mutated)
            tried += 1
    assert tried
    assert_same(before, snapshot(model, optimizer))
    optimizer.load_state_dict(saved)  # the real values load
    optimizer.zero_grad()
    run_backward(2)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("generators", [{"cpu": torch.zeros(3, dtype=torch.uint8)}, {"tpu:9": None}, {"cpu": [0, 1]}],
                         ids=["not-a-generator-state", "unknown-device", "not-a-tensor"])
def test_rounding_generators_torch_cannot_take_are_refused_before_anything_loads(generators):
    """They were set last, after the state had been replaced: the RuntimeError left a half-loaded optimizer."""
    source_model, source, source_backward = trained_randlora()
    source.zero_grad()
    source_backward(1)
    source.step()  # the source is one step ahead: a half load would show
    saved = source.state_dict()
    saved["rounding_generators"] = {key: torch.get_rng_state() if value is None else value
                                    for key, value in generators.items()}
    model, optimizer, run_backward = trained_randlora()
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="rounding_generators"):
        optimizer.load_state_dict(saved)
    assert_same(before, snapshot(model, optimizer))
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before


def test_state_for_a_factor_that_keeps_none_is_refused():
    """Full mode keeps a pair's moments with A; a dict that gives B a state of its own was not written by this mode."""
    model, optimizer, run_backward = trained_lorapro("full")
    saved = copy.deepcopy(optimizer.state_dict())
    positions = [p for group in saved["param_groups"] for p in group["params"]]
    stateless = [p for p in positions if not saved["state"].get(p)]
    assert stateless, "full mode keeps no state for B"
    saved["state"][stateless[0]] = {"exp_avg": torch.zeros(1)}
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="exp_avg"):
        optimizer.load_state_dict(saved)
    assert_same(before, snapshot(model, optimizer))
