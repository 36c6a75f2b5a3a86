"""Bad input at every public entry point: a ValueError naming the option, the model and the optimizer unchanged, and
a normal step still working afterwards (hypothesis over the constructors' arguments and over group edits)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import randopt
from randopt.lorapro import lorapro_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ----- bad values, by the kind of option -------------------------------------------------------------------------
NOT_A_NUMBER = st.sampled_from([None, "1e-8", "0.1", "", True, False, [0.1], (0.1,), {"lr": 0.1}, torch.tensor(0.1),
                                float("nan"), float("inf"), -float("inf")])
NEGATIVE = st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False)
NOT_A_FLAG = st.one_of(st.sampled_from(["no", "yes", "False", 0, 1, None, 0.0, [True]]), st.integers())
NOT_AN_INT = st.one_of(st.sampled_from([None, "3", 2.0, 2.5, True, float("nan"), [2]]),
                       st.floats(allow_nan=False).filter(lambda x: x != int(x) if math.isfinite(x) else True))
NOT_A_SEED = st.one_of(NOT_AN_INT, st.integers(min_value=2 ** 64), st.integers(max_value=-(2 ** 63) - 1))
BAD_BETAS = st.one_of(
    NOT_A_NUMBER, st.floats(0, 0.99),  # scalars
    st.tuples(st.floats(allow_nan=True), st.floats(min_value=1.0)),
    st.tuples(NEGATIVE, st.floats(0, 0.99)),
    st.tuples(st.floats(0, 0.99), st.floats(0, 0.99), st.floats(0, 0.99)),
    st.tuples(st.text(max_size=4), st.floats(0, 0.99)))


def not_one_of(options):
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in options), st.sampled_from([None, 0, 1.5, True]))


NON_NEGATIVE_NUMBER = st.one_of(NOT_A_NUMBER, NEGATIVE)
BAD = {
    "lr": NON_NEGATIVE_NUMBER, "eps": NON_NEGATIVE_NUMBER, "weight_decay": NON_NEGATIVE_NUMBER, "betas": BAD_BETAS,
    "alpha": st.one_of(NOT_A_NUMBER.filter(lambda v: v is not None), NEGATIVE, st.just(0.0)),
    "rank": st.one_of(NOT_AN_INT.filter(lambda v: v is not None), st.integers(max_value=0)),
    "seed": NOT_A_SEED, "rounding_seed": NOT_A_SEED,
    "basis_kind": not_one_of(randopt.randlora.BASIS_KINDS), "kind": not_one_of(randopt.randlora.BASIS_KINDS),
    "fan_in_fan_out": NOT_A_FLAG, "fused_backward": NOT_A_FLAG, "data_parallel": NOT_A_FLAG,
    "init_weights": NOT_A_FLAG,
    "state_dtype": not_one_of(("fp32", "bf16", "8bit")), "weight_update": not_one_of(("stochastic", "exact")),
    "min_8bit_size": st.one_of(NOT_AN_INT, st.integers(max_value=-1)),
    "mode": not_one_of(("full", "efficient")), "x_mode": not_one_of(("sylvester", "zero", "symmetric")),
    "rcond": st.one_of(NOT_A_NUMBER.filter(lambda v: v is not None), NEGATIVE),
    "dropout": st.one_of(NOT_A_NUMBER, NEGATIVE, st.floats(min_value=1.0)),
    "target_modules": st.sampled_from([5, None, [], "", [5], ["q", None], {"q": 1}, "(unclosed", b"q", 2.5]),
}
RANDLORA_ARGS = ["lr", "betas", "eps", "weight_decay", "alpha", "rank", "seed", "basis_kind", "fan_in_fan_out",
                 "fused_backward", "data_parallel", "state_dtype", "min_8bit_size", "rounding_seed", "weight_update"]
LORAPRO_ARGS = ["lr", "betas", "eps", "weight_decay", "mode", "x_mode", "rcond", "state_dtype", "min_8bit_size"]
GROUP_ARGS = ["lr", "betas", "eps", "weight_decay"]


def bad_argument(names):
    return st.sampled_from(names).flatmap(lambda name: st.tuples(st.just(name), BAD[name]))


# ----- models and snapshots --------------------------------------------------------------------------------------
class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(6, 5)
        self.v = torch.nn.Linear(5, 4)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def backward(model, seed=0):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
    model(x.to(next(model.parameters()).dtype)).square().sum().backward()


def snapshot(model, optimizer=None):
    """Every tensor of the model and of the optimizer's state, copied."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{id(p)}.{key}"] = value.clone()
    return tensors


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def randlora(model, **kwargs):
    return randopt.RandLoRAAdamW(model.parameters(), **{"rank": 2, **kwargs})


def lorapro(pair_model, **kwargs):
    return randopt.LoRAProAdamW(lorapro_groups([(pair_model.A, pair_model.B, 2.0)]), **kwargs)


class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(2, 6) * 0.1)
        self.B = torch.nn.Parameter(torch.randn(4, 2) * 0.1)

    def forward(self, x):
        return x @ self.A.T @ self.B.T

    def backward(self, seed=0):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
        self(x).square().sum().backward()


def trained(make_optimizer, model, run_backward):
    """An optimizer after one step, so that it has state to protect."""
    optimizer = make_optimizer(model)
    run_backward()
    optimizer.step()
    return optimizer


def step_moves_weights(model, optimizer, run_backward):
    before = snapshot(model)
    optimizer.zero_grad()
    run_backward()
    optimizer.step()
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


# ----- constructors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,model_class,names", [(randlora, TwoLayer, RANDLORA_ARGS), (lorapro, Pair, LORAPRO_ARGS)],
                         ids=["RandLoRAAdamW", "LoRAProAdamW"])
@SETTINGS
@given(data=st.data())
def test_optimizer_refuses_every_bad_argument(make, model_class, names, data):
    name, value = data.draw(bad_argument(names))
    model = model_class()
    before = snapshot(model)
    with pytest.raises(ValueError, match=name):
        make(model, **{name: value})
    assert_same(before, snapshot(model))


@SETTINGS
@given(bad_argument(["rank", "alpha", "seed", "kind", "dropout", "init_weights", "target_modules"]))
def test_inject_randlora_refuses_every_bad_argument(argument):
    name, value = argument
    model = TwoLayer()
    before = snapshot(model)
    kwargs = {"target_modules": ["q", "v"], "rank": 2, name: value}
    with pytest.raises(ValueError, match=name if name != "kind" else "kind"):
        randopt.inject_randlora(model, **kwargs)
    assert_same(before, snapshot(model))
    assert isinstance(model.q, torch.nn.Linear) and isinstance(model.v, torch.nn.Linear)


@SETTINGS
@given(bad_argument(["rank", "alpha", "seed", "fan_in_fan_out", "lr", "betas", "target_modules"]))
def test_param_groups_refuses_every_bad_argument(argument):
    name, value = argument
    kwargs = {"target_modules": ["q", "v"], "rank": 2, name: value}
    with pytest.raises(ValueError, match=name):
        randopt.param_groups(TwoLayer(), **kwargs)


@SETTINGS
@given(bad_argument(RANDLORA_ARGS + ["target_modules"]))
def test_trainer_factory_refuses_bad_arguments_when_called(argument):
    transformers_integration = pytest.importorskip("randopt.integrations.transformers")
    name, value = argument
    kwargs = {"target_modules": ["q", "v"], "rank": 2, name: value}
    with pytest.raises(ValueError, match=name):
        transformers_integration.randopt_optimizer("RandLoRAAdamW", **kwargs)


@SETTINGS
@given(bad_argument([n for n in RANDLORA_ARGS if n not in ("fused_backward", "data_parallel")] + ["target_modules"]))
def test_deepspeed_block_refuses_bad_arguments_before_deepspeed_starts(argument):
    plugin = pytest.importorskip("randopt.integrations.deepspeed")
    name, value = argument
    block = {"optimizer": "RandLoRAAdamW", "params": {"lr": 1e-3, "rank": 2}, "target_modules": ["q", "v"]}
    if name == "target_modules":
        block["target_modules"] = value
    else:
        block["params"][name] = value
    model = TwoLayer()
    before = snapshot(model)
    with pytest.raises(ValueError, match=name):
        plugin.optimizer_from_config(model, {"randopt": block})
    assert_same(before, snapshot(model))


def test_unknown_keyword_arguments_fail_when_the_factory_is_called():
    transformers_integration = pytest.importorskip("randopt.integrations.transformers")
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['rnak'\] for RandLoRAAdamW"):
        transformers_integration.randopt_optimizer("RandLoRAAdamW", target_modules=["q"], rnak=4)
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['rank'\] for LoRAProAdamW"):
        transformers_integration.randopt_optimizer("LoRAProAdamW", rank=4)
    with pytest.raises(ValueError, match="target_modules must be None"):
        transformers_integration.randopt_optimizer("LoRAProAdamW", target_modules=["q"])
    with pytest.raises(ValueError, match="needs target_modules"):
        transformers_integration.randopt_optimizer("RandLoRAAdamW", rank=4)
    factory, kwargs = transformers_integration.randopt_optimizer("RandLoRAAdamW", target_modules=["q", "v"], rank=2,
                                                                 lr=1e-3)
    optimizer = factory()(TwoLayer(), **kwargs)
    assert isinstance(optimizer, randopt.RandLoRAAdamW) and optimizer.param_groups[0]["rank"] == 2


def test_bad_params_are_refused_with_value_errors():
    model = TwoLayer()
    for params in (None, model.q.weight, 5, "q", [], [{"lr": 1.0}], [{"params": 5}], [model.q.weight, {"params": []}],
                   [model.q.weight * 2]):
        for make in (lambda: randopt.RandLoRAAdamW(params, rank=2), lambda: randopt.LoRAProAdamW(params)):
            with pytest.raises(ValueError, match="param"):
                make()


# ----- the same options set on a trained optimizer: add_param_group and edits between steps ----------------------
@SETTINGS
@given(bad_argument(GROUP_ARGS + ["rank", "alpha", "seed", "basis_kind", "fan_in_fan_out"]))
def test_randlora_add_param_group_refuses_bad_options_and_changes_nothing(argument):
    name, value = argument
    model = TwoLayer()
    optimizer = trained(lambda m: randopt.RandLoRAAdamW([m.q.weight, m.q.bias], rank=2), model,
                        lambda: backward(model))
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=name):
        optimizer.add_param_group({"params": [model.v.weight, model.v.bias], "rank": 2, name: value})
    assert_same(before, snapshot(model, optimizer))
    assert len(optimizer.param_groups) == 1
    step_moves_weights(model, optimizer, lambda: backward(model, seed=1))


def randlora_setup():
    model = TwoLayer()
    return model, randlora, lambda seed=0: backward(model, seed=seed)


def lorapro_setup():
    model = Pair()
    return model, lorapro, model.backward


@pytest.mark.parametrize("setup,names", [(randlora_setup, GROUP_ARGS + ["alpha", "rank"]),
                                         (lorapro_setup, GROUP_ARGS + ["mode", "x_mode", "rcond"])],
                         ids=["RandLoRAAdamW", "LoRAProAdamW"])
@SETTINGS
@given(data=st.data())
def test_group_edit_between_steps_is_refused_before_anything_moves(setup, names, data):
    name, value = data.draw(bad_argument(names))
    model, make, run_backward = setup()
    optimizer = trained(make, model, run_backward)
    group = optimizer.param_groups[0]
    good = group[name]
    optimizer.zero_grad()
    run_backward(seed=1)
    before = snapshot(model, optimizer)
    group[name] = value
    with pytest.raises(ValueError, match=name):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    group[name] = good
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in snapshot(model).items())


@pytest.mark.parametrize("name,value", [("rank", 3), ("seed", 7), ("basis_kind", "sparse"), ("fan_in_fan_out", True),
                                        ("alpha", 5.0)])
def test_randlora_math_options_cannot_change_mid_training(name, value):
    model = TwoLayer()
    optimizer = trained(randlora, model, lambda: backward(model))
    optimizer.zero_grad()
    backward(model, seed=1)
    before = snapshot(model, optimizer)
    original = optimizer.param_groups[0][name]
    optimizer.param_groups[0][name] = value
    with pytest.raises(ValueError, match=f"group option {name} was changed"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    optimizer.param_groups[0][name] = original
    optimizer.step()


@pytest.mark.parametrize("group_index,value", [(0, 1e-300), (0, 1e300), (0, None), (1, 2.0)],
                         ids=["square rounds to 0", "square overflows", "pair made plain", "plain made a pair"])
def test_lorapro_scale_edits_that_break_the_step_are_refused(group_index, value):
    """Whether a group is a pair defines its step, and the closed form divides by the scale's square: such an edit
    is refused before anything moves (a scale of 1e-300 divided by zero inside the step, a plain group given a scale
    was stepped as a pair, half of it before it failed). A new valid scale is In-Squeeze's business: accepted."""
    pair, head = Pair(), torch.nn.Linear(4, 3)
    model = torch.nn.ModuleDict({"pair": pair, "head": head})
    optimizer = randopt.LoRAProAdamW(lorapro_groups([(pair.A, pair.B, 2.0)]) + [{"params": list(head.parameters())}])

    def run_backward(seed=0):
        head(pair(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)))).square().sum().backward()
    run_backward()
    optimizer.step()
    optimizer.zero_grad()
    run_backward(1)
    before = snapshot(model, optimizer)
    group = optimizer.param_groups[group_index]
    original = group["lora_scale"]
    group["lora_scale"] = value
    with pytest.raises(ValueError, match="lora_scale"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    group["lora_scale"] = original
    optimizer.step()
    optimizer.param_groups[0]["lora_scale"] = 4.0
    optimizer.step()


@pytest.mark.parametrize("scale", [1e-300, 1e300, -1e-160])
def test_lorapro_refuses_a_scale_whose_square_is_not_a_usable_number(scale):
    with pytest.raises(ValueError, match="lora_scale must be a finite nonzero number whose square"):
        randopt.LoRAProAdamW(lorapro_groups([(Pair().A, Pair().B, scale)]))


@pytest.mark.parametrize("setup", [randlora_setup, lorapro_setup], ids=["RandLoRAAdamW", "LoRAProAdamW"])
def test_a_group_option_removed_between_steps_is_refused(setup):
    model, make, run_backward = setup()
    optimizer = trained(make, model, run_backward)
    optimizer.zero_grad()
    run_backward(seed=1)
    before = snapshot(model, optimizer)
    lr = optimizer.param_groups[0].pop("lr")
    with pytest.raises(ValueError, match=r"\['lr'\] were removed"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    optimizer.param_groups[0]["lr"] = lr
    optimizer.step()


def test_scheduler_changes_pass_and_are_checked_once():
    model = TwoLayer()
    optimizer = randlora(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    calls = []
    check = optimizer._group_checks.validate
    optimizer._group_checks.validate = lambda group: (calls.append(group["lr"]), check(group))
    for seed in range(3):
        optimizer.zero_grad()
        backward(model, seed)
        optimizer.step()
        optimizer.step() if seed == 0 else None  # an unchanged group is not re-checked
        scheduler.step()
    assert calls == [1e-2 * 0.5, 1e-2 * 0.25]


def test_values_from_configs_are_refused_not_parsed():
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got '1e-8' \(str\)"):
        randlora(TwoLayer(), eps="1e-8")
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        randlora(TwoLayer(), betas=0.9)


def test_channels_last_conv_weight_is_refused_at_construction_and_step():
    conv = torch.nn.Conv2d(3, 4, 3)
    contiguous = randopt.RandLoRAAdamW(conv.parameters(), rank=2)
    conv_last = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last"):
        randopt.RandLoRAAdamW(conv_last.parameters(), rank=2)
    # the model was moved to channels_last after the optimizer was built: refused at the step, nothing moved
    conv.to(memory_format=torch.channels_last)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    before = snapshot(conv, contiguous)
    with pytest.raises(ValueError, match="channels_last"):
        contiguous.step()
    assert_same(before, snapshot(conv, contiguous))
    conv.to(memory_format=torch.contiguous_format)
    contiguous.step()


@pytest.mark.parametrize("optimizer_kind", ["RandLoRAAdamW-matrix", "RandLoRAAdamW-plain", "LoRAProAdamW"])
def test_sparse_embedding_gradient_is_refused_with_a_clear_message(optimizer_kind):
    embedding = torch.nn.Embedding(10, 6, sparse=True)
    pair = Pair()
    if optimizer_kind == "LoRAProAdamW":
        optimizer = randopt.LoRAProAdamW(lorapro_groups([(pair.A, pair.B, 2.0)]) + [{"params": embedding.parameters()}])
    else:
        optimizer = randopt.RandLoRAAdamW(embedding.parameters(), rank=2 if optimizer_kind.endswith("matrix") else None)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = snapshot(embedding, optimizer)
    with pytest.raises(ValueError, match="sparse gradient"):
        optimizer.step()
    assert_same(before, snapshot(embedding, optimizer))


# ----- every public entry point: junk is a ValueError naming the parameter (not a TypeError/AttributeError) --------
def _integration(name):
    return pytest.importorskip(f"randopt.integrations.{name}")


PUBLIC_CALLS = {
    "lorapro_groups(5)": (lambda: randopt.lorapro_groups(5), "pairs"),
    "lorapro_groups(None)": (lambda: randopt.lorapro_groups(None), "pairs"),
    "lorapro_groups([5])": (lambda: randopt.lorapro_groups([5]), r"pairs\[0\]"),
    "LoRAProAdamW(base_weight=5)": (lambda: randopt.LoRAProAdamW(
        [{"params": [Pair().A, Pair().B], "lora_scale": 1.0, "base_weight": 5}]), "W0"),
    "param_groups(alpah=)": (lambda: randopt.param_groups(TwoLayer(), ["q"], rank=2, alpah=4.0), "alpah"),
    "find_lora_pairs(5)": (lambda: randopt.find_lora_pairs(5), "model"),
    "trainable_summary(None)": (lambda: randopt.trainable_summary(None), "model"),
    "print_trainable_parameters(5)": (lambda: randopt.print_trainable_parameters(5), "model"),
    "default_alpha('2')": (lambda: randopt.default_alpha("2"), "rank"),
    "default_alpha(0)": (lambda: randopt.default_alpha(0), "rank"),
    "randopt_optimizer(args=dict)": (lambda: _integration("transformers").randopt_optimizer(
        "RandLoRAAdamW", args={"learning_rate": 1e-3}, target_modules=["q"]), "args"),
    "RandoptCallback.attach(5)": (lambda: _integration("transformers").RandoptCallback.attach(5), "trainer"),
    "export_randlora_adapter(5)": (lambda: _integration("peft").export_randlora_adapter(5, out_dir="unused"),
                                   "model"),
    "export_randlora_adapter(out_dir=5)": (lambda: _integration("peft").export_randlora_adapter(
        randopt.inject_randlora(TwoLayer(), ["q"], rank=2), out_dir=5), "out_dir"),
    "export_randlora_adapter(out_dir='')": (lambda: _integration("peft").export_randlora_adapter(
        randopt.inject_randlora(TwoLayer(), ["q"], rank=2), out_dir=""), "out_dir"),
    "randlora_layers(5)": (lambda: randopt.randlora.randlora_layers(5), "model"),
    "merge_randlora(None)": (lambda: randopt.randlora.merge_randlora(None), "model"),
    "unload_randlora(5)": (lambda: randopt.randlora.unload_randlora(5), "model"),
    "squeeze_in_training(optimizer=5)": (lambda: randopt.lorasqueeze.squeeze_in_training(
        _lora_model(), 5, rank=1), "optimizer"),
    "load_randlora_adapter(adapter_dir=5)": (lambda: _integration("peft").load_randlora_adapter(TwoLayer(), 5),
                                             "adapter_dir"),
    "load_randlora_adapter(model=5)": (lambda: _integration("peft").load_randlora_adapter(5, "adapter"), "model"),
}


def _lora_model():
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama
    return peft.get_peft_model(tiny_llama(torch.float32), peft.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("call", sorted(PUBLIC_CALLS))
def test_public_entry_points_refuse_junk_with_a_value_error_naming_it(call):
    function, name = PUBLIC_CALLS[call]
    with pytest.raises(ValueError, match=name):
        function()
