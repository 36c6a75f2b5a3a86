"""Tests written for bugs that a mutation run put into the library and the rest of the suite let through
(issue 13, item 8; benchmarks/mutation.py finds more): each test fails on that deliberate bug."""
import copy
import os
import shutil
import types
import warnings

import pytest
import torch

import randopt
import distributed
from conftest import LLAMA_TARGETS, tiny_llama

transformers = pytest.importorskip("transformers")
from randopt.integrations.peft import load_randlora_adapter  # noqa: E402
from randopt.integrations.transformers import RandoptCallback  # noqa: E402
from test_trainer import make_trainer  # noqa: E402


def randlora_on(model):
    return randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=3, alpha=5.0), lr=1e-2)


def lorapro_on(model):
    return randopt.LoRAProAdamW(model, lr=1e-2, mode="full")


def lora_llama():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(tiny_llama(), config)


def train(model, opt, steps):
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def tensors_of(state: dict) -> dict:
    return {(id(p), k): v.clone() for p, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("make_model,make_optimizer", [(tiny_llama, randlora_on), (lora_llama, lorapro_on)],
                         ids=["RandLoRAAdamW", "LoRAProAdamW"])
def test_load_state_dict_copies_the_tensors_it_loads(make_model, make_optimizer):
    """A step of the optimizer that loaded a state dict changes neither the dict nor the optimizer it came from."""
    model = make_model()
    _, opt = train(model, make_optimizer(model), steps=2)
    saved = opt.state_dict()
    saved_before, source_before = copy.deepcopy(saved), tensors_of(opt.state)
    twin = copy.deepcopy(model)
    loaded = make_optimizer(twin)
    loaded.load_state_dict(saved)
    just_loaded = tensors_of(loaded.state)
    train(twin, loaded, steps=1)
    stepped = tensors_of(loaded.state)
    assert any(not torch.equal(stepped[key], value) for key, value in just_loaded.items()), "it must have stepped"
    for position, entry in saved["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, saved_before["state"][position][key]), (position, key)
    after = tensors_of(opt.state)
    assert after.keys() == source_before.keys()
    assert all(torch.equal(after[key], value) for key, value in source_before.items())


def test_callback_exports_the_adapter_into_each_checkpoint(tmp_path):
    """By default the callback writes the RandLoRA update into checkpoint-N/randopt_adapter, and that adapter
    reproduces the trained matrices on the base model (the factory trains only the targets, so the adapter holds all
    of the training and no warning says otherwise)."""
    trainer = make_trainer(tmp_path, max_steps=3)
    RandoptCallback.attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "does not hold them" in str(w.message)]
    adapter_dir = tmp_path / "checkpoint-3" / "randopt_adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    base = tiny_llama(torch.float32)
    load_randlora_adapter(base, adapter_dir)
    trained = dict(trainer.model.named_parameters())
    matrices = [name for name, _ in base.named_parameters() if name.endswith(tuple(f"{t}.weight" for t in LLAMA_TARGETS))]
    assert len(matrices) == 2 * len(LLAMA_TARGETS)
    for name in matrices:
        torch.testing.assert_close(base.get_parameter(name), trained[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(base.get_parameter(name), tiny_llama(torch.float32).get_parameter(name))


def test_callback_without_export_writes_no_adapter(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    RandoptCallback.attach(trainer, export_adapter=False)
    trainer.train()
    assert (tmp_path / "checkpoint-3").is_dir() and not (tmp_path / "checkpoint-3" / "randopt_adapter").exists()


@pytest.mark.parametrize("chosen_lr,trainer_lr,warns", [(None, 1e-3, False), (None, 3e-4, True), (1e-2, 3e-4, False)])
def test_callback_warns_only_about_a_learning_rate_nobody_chose(chosen_lr, trainer_lr, warns):
    """The factory's optimizer at its default lr (1e-3) while TrainingArguments says otherwise: a warning; an lr
    the user gave (or the same one): none."""
    from randopt.integrations.transformers import RandoptOptimizerFactory

    options = {} if chosen_lr is None else {"lr": chosen_lr}
    opt = RandoptOptimizerFactory()(tiny_llama(), target_modules=LLAMA_TARGETS, rank=3, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RandoptCallback().on_train_begin(types.SimpleNamespace(learning_rate=trainer_lr), None, None, optimizer=opt)
    assert any("learning rate" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize("min_8bit_size", [15, 16])
def test_a_moment_of_exactly_min_8bit_size_elements_is_8bit(min_8bit_size):
    """gamma has 15 elements (rank 2, 6 -> 5: 3 x 5), lambda 6: "at least min_8bit_size" includes equality."""
    pytest.importorskip("bitsandbytes")
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2, state_dtype="8bit", min_8bit_size=min_8bit_size)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert state["gamma"].numel() == 15
    assert ("gamma_exp_avg_codes" in state) == (min_8bit_size <= 15)
    assert ("gamma_exp_avg" in state) == (min_8bit_size > 15)
    assert "lambda_exp_avg" in state and "lambda_exp_avg_codes" not in state


def test_8bit_moments_have_one_scale_per_256_elements_and_the_default_threshold_is_4096():
    """The documented layout: block-wise codes with one fp32 absmax per 256 elements; moments of at least 4096
    elements (the default ``min_8bit_size``) go 8-bit."""
    pytest.importorskip("bitsandbytes")
    from randopt.optim.state import init_moment

    state = {}
    init_moment(state, "a_exp_avg", torch.zeros(4096 + 513), "8bit")
    init_moment(state, "b_exp_avg", torch.zeros(4096), "8bit")
    init_moment(state, "c_exp_avg", torch.zeros(4095), "8bit")
    assert state["a_exp_avg_absmax"].numel() == 19  # ceil(4609 / 256)
    assert state["b_exp_avg_codes"].dtype == torch.uint8 and state["b_exp_avg_absmax"].numel() == 16
    assert state["c_exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("state_dtype,stored_as", [("8bit", "exp_avg_codes"), ("bf16", "exp_avg"),
                                                   ("fp32", "exp_avg")])
def test_lorapro_stores_moments_as_asked(state_dtype, stored_as):
    if state_dtype == "8bit":
        pytest.importorskip("bitsandbytes")
    model = lora_llama()
    _, opt = train(model, randopt.LoRAProAdamW(model, lr=1e-2, mode="full", state_dtype=state_dtype,
                                                min_8bit_size=0), steps=1)
    expected = {"8bit": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float64}[state_dtype]  # an fp64 model
    first_moments = [value for state in opt.state.values() for key, value in state.items() if key.endswith(stored_as)]
    assert first_moments and all(m.dtype == expected for m in first_moments)


def test_second_moments_use_the_finer_unsigned_map():
    """Second moments are never negative: their 8-bit codes use bitsandbytes' unsigned dynamic map, which spends
    all 256 codes on [0, 1] and so rounds them more finely than the signed map does."""
    pytest.importorskip("bitsandbytes")
    from randopt.optim.state import dequantize, quantize

    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    error = {signed: (dequantize(*quantize(x, signed=signed), signed=signed) - x).abs().mean() for signed in (True, False)}
    assert error[False] < error[True]


def test_dtensor_moments_follow_the_shards_and_only_8bit_is_refused():
    """FSDP2's DTensor parameters, in one process (a 1-rank gloo group): fp32/bf16 moments of any size are DTensors
    sharded like the parameter; 8-bit moments are refused."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from randopt.optim.state import init_moment

    with distributed.one_rank_group() as mesh:
        like = distribute_tensor(torch.zeros(64, 64), mesh, [Shard(0)])  # 4096 elements
        state = {}
        init_moment(state, "exp_avg", like, "fp32")
        init_moment(state, "exp_avg_sq", like, "bf16")
        for name, dtype in (("exp_avg", torch.float32), ("exp_avg_sq", torch.float32)):
            assert state[name].placements == like.placements and state[name].shape == like.shape
            assert state[name].to_local().dtype == dtype
        with pytest.raises(ValueError, match="not supported for DTensor"):
            init_moment({}, "exp_avg", like, "8bit")


# ----- survivors of the sampled run (benchmarks/results/mutation.md) -------------------------------------------------
def test_python_dash_m_randopt_exits_with_the_cli_status(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", ["randopt", "squeeze", str(tmp_path / "missing"), "--rank", "1",
                                     "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("randopt", run_name="__main__")
    assert exit_.value.code == 1 and "does not exist" in capsys.readouterr().err


def test_the_cli_table_has_its_rule_under_the_header():
    from randopt.cli import format_report
    from randopt.lorasqueeze.adapters import LayerReport

    table = format_report([LayerReport("q", (16, 40), 4, 2, 8.0, 4.0, 0.9), LayerReport("v", (16, 16), 4, 1, 8.0, 2.0,
                                                                                          0.5)]).splitlines()
    assert table[0].startswith("layer") and set(table[1]) == {"-", " "} and table[2].startswith("q ")
    assert len(table) == 4
    assert table[2].startswith("q      ") and table[2].endswith("0.900000")  # names left, numbers right-aligned
    assert table[0].split()[-2:] == ["energy", "kept"] and table[0].endswith("energy kept")


def test_atomic_writes_close_every_descriptor_they_open(tmp_path):
    from randopt import _atomic

    def write(d):
        with open(os.path.join(d, "a"), "w") as f:
            f.write("x")

    before = len(os.listdir("/proc/self/fd"))
    for overwrite in (False, True, True):
        _atomic.write_directory(tmp_path / "out", write, overwrite=overwrite, owner_file="a")
    assert len(os.listdir("/proc/self/fd")) == before


def test_deepspeed_block_defaults_to_rank_32_and_leaves_a_zero_0_config_alone():
    from randopt.integrations import deepspeed as plugin

    block = {"optimizer": "RandLoRAAdamW", "params": {"lr": 1e-3}, "target_modules": ["q_proj"]}
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(40, 48)})
    optimizer, config = plugin.optimizer_from_config(model, {"zero_optimization": {"overlap_comm": False},
                                                             "randopt": block})
    assert optimizer.param_groups[0]["rank"] == 32
    assert config == {"zero_optimization": {"overlap_comm": False}}, "stage 0 (the default) needs no ZeRO flag"


def test_randomized_cost_counts_two_products_per_power_iteration_and_two_more():
    """``2 * (power_iters + 1)`` products with the operator, as randomized_svd makes them."""
    from randopt.lorasqueeze.export import SVD_COST, export_costs

    D, d, columns, width = 40, 16, 16, 12
    for power_iters in (0, 2):
        passes = 2 * (power_iters + 1)
        expected = (columns * d + passes * (D + d) * columns * width + passes * 2 * D * width ** 2  # QR: ~2 m k^2
                    + SVD_COST * d * width ** 2)
        assert export_costs(d, D, columns, 2, oversample=10, power_iters=power_iters,
                            exact_energy=False)["randomized"] == expected


def test_factored_svd_refuses_factors_that_do_not_chain():
    from randopt.lorasqueeze.functional import factored_svd

    with pytest.raises(ValueError, match="same r"):
        factored_svd(torch.randn(6, 3), torch.randn(2, 5))


@pytest.mark.parametrize("power_iters", [-1, 1.5])
def test_randomized_svd_refuses_a_bad_power_iteration_count(power_iters):
    from randopt.lorasqueeze.functional import dense_operator, randomized_svd

    with pytest.raises(ValueError, match="power_iters"):
        randomized_svd(dense_operator(torch.randn(8, 6, dtype=torch.float64)), 2, power_iters=power_iters)


def test_a_rank_schedule_of_two_stages_is_accepted():
    from randopt.lorasqueeze.training import RankSchedule

    assert RankSchedule.linear(8, 2, 10, 2).stages == ((0, 8), (5, 2))


def test_state_summary_counts_moments_elements_and_bytes_exactly():
    """8-bit moments: one byte per element plus an fp32 scale per block; the rest: their dtype's size."""
    pytest.importorskip("bitsandbytes")
    from randopt.optim.state import state_summary

    model = torch.nn.Linear(64, 80)
    opt = randopt.RandLoRAAdamW([model.weight], rank=32, state_dtype="8bit", min_8bit_size=100)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    (state,) = opt.state.values()
    codes = [v for k, v in state.items() if k.endswith("_codes")]
    scales = [v for k, v in state.items() if k.endswith("_absmax")]
    fp32 = [v for k, v in state.items() if "exp_avg" in k and v.dtype == torch.float32 and not k.endswith("_absmax")]
    assert codes and fp32, "lambda (32 x 2) stays fp32 below 100 elements, gamma (2 x 64) goes 8-bit"
    assert state_summary(opt) == {
        "8bit": {"moments": len(codes), "elements": sum(c.numel() for c in codes),
                 "bytes": sum(c.numel() for c in codes) + 4 * sum(s.numel() for s in scales)},
        "float32": {"moments": len(fp32), "elements": sum(m.numel() for m in fp32),
                    "bytes": 4 * sum(m.numel() for m in fp32)}}


def test_integer_checks_a_value_given_where_none_is_allowed():
    from randopt import validation

    assert validation.integer("n", 3, minimum=1, allow_none=True) == 3
    assert validation.integer("n", None, allow_none=True) is None
    with pytest.raises(ValueError, match="n must be an integer >= 1 or None"):
        validation.integer("n", 0, minimum=1, allow_none=True)


def test_bases_cached_on_a_device_are_renewed_when_a_group_needs_larger_ones():
    layers = torch.nn.ModuleDict({"small": torch.nn.Linear(6, 5), "big": torch.nn.Linear(12, 10)})
    opt = randopt.RandLoRAAdamW([{"params": [layers["small"].weight], "rank": 2}])
    assert not opt.bases_for(opt.param_groups[0], "cpu", torch.float32).covers(10, 12)
    opt.add_param_group({"params": [layers["big"].weight], "rank": 2})
    assert opt.bases_for(opt.param_groups[1], "cpu", torch.float32).covers(10, 12)


def test_refused_load_coefficients_leaves_no_state():
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2)
    with pytest.raises(ValueError, match="load_coefficients: lambda has shape"):
        opt.load_coefficients(model.weight, torch.zeros(7), torch.zeros(3, 5))
    assert not opt.state.get(model.weight)
    assert opt.state_dict()["state"] == {}


def test_a_lora_layer_without_a_2d_floating_base_weight_trains_without_a_base_handle():
    """Duck-typed LoRA layers: a base weight that is not a 2-D float matrix is no ``W0``: the pair trains, and only
    decaying ``W0`` is refused, saying that none was found."""

    class Layer(torch.nn.Module):
        def __init__(self, base_weight):
            super().__init__()
            self.base_layer = torch.nn.Module()
            self.base_layer.weight = base_weight
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(6, 2, bias=False)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 5, bias=False)})
            self.scaling = {"default": 2.0}

    for base_weight in (torch.zeros(5, 6, dtype=torch.int32), torch.zeros(5, 6, 1)):
        model = torch.nn.Sequential(Layer(torch.nn.Parameter(base_weight, requires_grad=False)))
        (pair,) = randopt.optim.lorapro_adamw.find_lora_pairs(model)
        assert pair.base_weight is None
        randopt.LoRAProAdamW(model, lr=1e-2, mode="full")
        with pytest.raises(ValueError, match="none was found"):
            randopt.LoRAProAdamW(model, lr=1e-2, mode="full", decay_base_weight=True)


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group in this process: FSDP2 and DTensors without torchrun."""
    with distributed.one_rank_group() as mesh:
        yield mesh


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))


def _lora_mlp():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(_mlp(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                       init_lora_weights=False))


def _shard(model, mesh, optimizer=None):
    """``fully_shard`` every linear layer and the model; with an ``optimizer`` built before, do what accelerate's
    ``prepare`` does next: put each new DTensor parameter where the old parameter was in the optimizer's groups."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if optimizer is not None:
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]


@pytest.mark.parametrize("optimizer_first", [False, True], ids=["sharded-first", "optimizer-first"])
@pytest.mark.parametrize("make_model,make_optimizer", [
    (_mlp, lambda m: randopt.RandLoRAAdamW(randopt.param_groups(m, ["0", "2"], rank=2, train_rest=True), lr=1e-2)),
    (_lora_mlp, lambda m: randopt.LoRAProAdamW(m, lr=1e-2, mode="full")),
    (_lora_mlp, lambda m: randopt.LoRAProAdamW(m, lr=1e-2, mode="full", weight_decay=0.1, decay_base_weight=True)),
    (_lora_mlp, lambda m: randopt.LoRAProAdamW(m, lr=1e-2, mode="efficient")),
], ids=["RandLoRAAdamW", "LoRAProAdamW-full", "LoRAProAdamW-full-decaying-W0", "LoRAProAdamW-efficient"])
def test_fsdp2_on_one_rank_trains_exactly_like_the_unsharded_model(one_rank_group, make_model, make_optimizer,
                                                                    optimizer_first):
    """The DTensor route (FSDP2's ``fully_shard``) in one process, so that the fast suite reaches it too; the
    2-rank runs of tests/test_fsdp.py check the sharding itself. ``optimizer-first``: built before sharding, with the
    DTensors swapped into its groups afterwards (accelerate's order): the optimizer adopts them, and full mode's
    decay then scales the model's sharded ``W0``."""
    sharded = make_model()
    plain, start = copy.deepcopy(sharded), copy.deepcopy(sharded)
    built_first = make_optimizer(sharded) if optimizer_first else None
    _shard(sharded, one_rank_group, built_first)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    for model, opt in ((sharded, built_first or make_optimizer(sharded)), (plain, make_optimizer(plain))):
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    after = [p.full_tensor() for p in sharded.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, plain.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(after, start.parameters())), "it must have trained"
    if getattr(opt, "decay_base_weight", False):
        frozen = [name for name, p in plain.named_parameters() if not p.requires_grad and p.dim() == 2]
        assert frozen and all(not torch.equal(plain.get_parameter(n), start.get_parameter(n)) for n in frozen)


def test_an_optimizer_pickled_before_the_sharding_attributes_existed_unpickles_ready_to_step():
    """``__setstate__`` fills what an older pickle lacks: no locator yet, nothing pending, zero traffic."""
    import pickle

    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2)
    state = opt.__getstate__()
    old = {k: v for k, v in state.items() if k not in ("_originals", "_all_groups", "_locator", "_real_step",
                                                       "_pending", "communicated", "engine")}
    restored = randopt.RandLoRAAdamW.__new__(randopt.RandLoRAAdamW)
    restored.__setstate__(pickle.loads(pickle.dumps(old)))
    assert restored.communicated == {"all_reduces": 0, "bytes": 0} and restored.engine is None
    assert restored._locator is None and restored._pending == {}
    assert [list(g["params"]) for g in restored._all_groups] == [list(g["params"]) for g in restored.param_groups]


def test_squeeze_callback_refuses_a_bad_alpha_policy_when_built():
    from randopt.integrations.squeeze_trainer import SqueezeCallback
    from randopt.lorasqueeze import RankSchedule

    with pytest.raises(ValueError, match="alpha"):
        SqueezeCallback(RankSchedule([(0, 8), (2, 4)]), alpha="keep_everything")


def test_clipping_never_scales_a_gradient_up():
    from randopt.optim.functional import clip_factor

    total, factor = clip_factor([torch.tensor(0.3), torch.tensor(0.4)], max_norm=10.0)
    assert total.item() == pytest.approx(0.5) and factor.item() == 1.0
    assert clip_factor([torch.tensor(30.0), torch.tensor(40.0)], max_norm=10.0)[1].item() == pytest.approx(0.2)


@pytest.mark.parametrize("module_names", ["q_proj", ["no_such_layer"]])
def test_exporting_named_randlora_layers_refuses_names_that_are_not_layers(module_names):
    from randopt.lorasqueeze import export_lora

    model = tiny_llama()
    randopt.inject_randlora(model, LLAMA_TARGETS, rank=2)
    with pytest.raises(ValueError, match="module_names must be a list of the model's RandLoRA layers"):
        export_lora(model, rank=1, module_names=module_names)


def test_a_bf16_plain_parameter_gets_its_adamw_update():
    """Plain (rank=None) low-precision weights step in fp32 and get the update added with stochastic rounding."""
    weight = torch.nn.Parameter(torch.linspace(-1, 1, 40, dtype=torch.bfloat16).reshape(5, 8))
    reference = torch.nn.Parameter(weight.detach().float())
    opt = randopt.RandLoRAAdamW([{"params": [weight], "rank": None}], lr=1e-2)
    adamw = torch.optim.AdamW([reference], lr=1e-2)
    grad = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    weight.grad, reference.grad = grad.bfloat16(), grad.bfloat16().float()
    before = weight.detach().clone()
    opt.step()
    adamw.step()
    assert not torch.equal(weight, before)
    ulp = (before.float().abs() * 2 ** -7).clamp(min=2 ** -133)  # one bf16 step at these magnitudes
    assert ((weight.float() - reference.detach()).abs() <= 2 * ulp).all()


def test_restore_ranks_takes_a_saved_rank_of_one():
    from randopt.lorasqueeze import restore_ranks
    from randopt.lorasqueeze.training import lora_ranks

    model = lora_llama()
    changed = restore_ranks(model, {"r": 1, "lora_alpha": 4})
    assert set(changed.values()) == {1} and set(lora_ranks(model).values()) == {1}


@pytest.mark.parametrize("rank", [0, 2.0, True, "2", None])
def test_inject_randlora_refuses_a_bad_rank_before_touching_the_model(rank):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        randopt.inject_randlora(model, LLAMA_TARGETS, rank=rank)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_failed_cleanup_of_the_replaced_copy_does_not_fail_the_write(tmp_path, monkeypatch):
    """Once OUT holds the new files, removing the old copy is best effort (a leftover is removed by the next write)."""
    from randopt import _atomic

    def rmtree(path, ignore_errors=False, **kwargs):
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", path)

    def write(text):
        return lambda d: open(os.path.join(d, "a"), "w").write(text)

    _atomic.write_directory(tmp_path / "out", write("old"), overwrite=False, owner_file="a")
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    _atomic.write_directory(tmp_path / "out", write("new"), overwrite=True, owner_file="a")
    assert (tmp_path / "out" / "a").read_text() == "new"


def test_span_rectangles_tile_any_run_of_a_row_major_matrix():
    from randopt.optim.locators import Span, span_blocks, span_rectangles

    for cols in (1, 3, 5):
        for start in range(0, 3 * cols):
            for numel in range(0, 3 * cols + 2):
                covered = [(row, col + i) for offset, row, col, rows, width in span_rectangles(start, numel, cols)
                           for row in range(row, row + rows) for i in range(width)]
                assert covered == [divmod(k, cols) for k in range(start, start + numel)], (start, numel, cols)
    matrix = torch.arange(4 * 5 * 2.0).view(4, 5, 2)  # a conv-like weight: rows of 10 elements
    span = Span(7, matrix.view(-1)[7:33], None)
    blocks = span_blocks(span, matrix.shape)
    flat = matrix.view(4, 10)
    assert all(torch.equal(b.weight, flat[b.row_start:b.row_start + b.weight.shape[0],
                                          b.col_start:b.col_start + b.weight.shape[1]]) for b in blocks)
    assert sum(b.weight.numel() for b in blocks) == 26


def test_deepspeed_initialize_without_a_config_is_plain_deepspeed(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    from randopt.integrations import deepspeed as plugin

    calls = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: calls.append(kwargs) or (None, None, None, None))
    model = torch.nn.Linear(3, 2)
    plugin.initialize(model=model, config=None, model_parameters=[])
    assert calls == [{"model": model, "config": None, "model_parameters": []}]


def test_export_lora_takes_zero_oversampling_and_power_iterations_and_defaults_to_two():
    from randopt.lorasqueeze import export_lora

    model = tiny_llama()
    randopt.inject_randlora(model, LLAMA_TARGETS, rank=2)
    for module in model.modules():
        if hasattr(module, "randlora_lambda"):
            torch.nn.init.normal_(module.randlora_lambda)
    result = export_lora(model, rank=1, method="randomized", oversample=0, power_iters=0)
    assert {layer.rank for layer in result.layers} == {1}
    default, two = (export_lora(model, rank=1, method="randomized", oversample=0, **options).tensors
                    for options in ({}, {"power_iters": 2}))
    assert default.keys() == two.keys() and all(torch.equal(default[k], two[k]) for k in default)
    assert any(not torch.equal(result.tensors[k], two[k]) for k in two), "the power iterations must matter here"
    assert result.config["init_lora_weights"] is True and result.config["use_dora"] is False  # PEFT's defaults
    assert result.config["inference_mode"] is True  # as PEFT's save_pretrained writes it


def test_an_energy_target_that_keeps_everything_reports_the_layers_left_as_they_were():
    from randopt.lorasqueeze import squeeze_in_training

    model = lora_llama()
    report = squeeze_in_training(model, torch.optim.AdamW(model.parameters()), energy=1.0)
    assert len(report.layers) == 8 and all(layer.rank == layer.source_rank == 2 for layer in report.layers)
    assert all(layer.energy == pytest.approx(1.0) for layer in report.layers)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("deficient", ["A", "both"])
def test_rank_deficient_factors_of_any_magnitude_give_the_exact_projection(deficient, scale):
    """The singular part of the Sylvester solve is cut relative to the largest Gram eigenvalue: factors scaled by
    1e3 or 1e-3 (eigenvalues 1e6 or 1e-6) still drop their rounding-noise directions."""
    from randopt.lorapro import adjust_gradients, equivalent_gradient
    from randopt.lorapro.functional import lora_gradients
    from test_lorapro import dense_projection, random_problem

    A, B, g, s = random_problem(7, 6, 3, seed=5)
    A[2] = 2 * A[0] - A[1]
    if deficient == "both":
        B[:, 1] = B[:, 0]
    A, B = A * scale, B * scale
    gA_lora, gB_lora = lora_gradients(A, B, g, s)
    gA, gB = adjust_gradients(A, B, gA_lora, gB_lora, s)
    assert torch.isfinite(gA).all() and torch.isfinite(gB).all()
    torch.testing.assert_close(equivalent_gradient(A, B, gA, gB, s), dense_projection(g, A, B), rtol=0, atol=1e-8)


@pytest.mark.parametrize("key", ["r", "lora_alpha"])
def test_a_lora_config_with_a_zero_rank_or_alpha_is_refused(key):
    from randopt.lorasqueeze.adapters import check_lora_config

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    check_lora_config(config, "adapter")
    check_lora_config({**config, "r": 1, "lora_alpha": 0.5}, "adapter")  # any positive number
    with pytest.raises(ValueError, match=f"adapter has {key}=0, expected a positive number"):
        check_lora_config({**config, key: 0}, "adapter")


def test_an_optimizer_group_with_a_matrix_the_adapter_bases_do_not_cover_is_refused(tmp_path):
    """The imported bases are shared by the whole group: a matrix of that group outside the adapter (here 50 x 16,
    beyond the adapter's bases of 40 x 40) must fit them too."""
    from test_peft_interop import ALPHA, LR, RANK, assert_refused, base_model, trained

    from randopt.integrations.peft import export_randlora_adapter

    adapter = export_randlora_adapter(*trained("llama-linear", steps=1), tmp_path / "adapter")
    model = base_model("llama-linear")
    groups = randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA)
    groups[0]["params"].append(torch.nn.Parameter(torch.zeros(50, 16, dtype=torch.float64)))
    wider = randopt.RandLoRAAdamW(groups, lr=LR)
    assert_refused(adapter, "llama-linear", r"also trains a matrix of shape \(out=50, in=16\)", model=model, opt=wider)


def test_seeds_are_refused_outside_the_64_bit_range():
    from randopt import validation

    assert validation.seed("seed", 2 ** 64 - 1) == 2 ** 64 - 1 and validation.seed("seed", -(2 ** 63)) == -(2 ** 63)
    for bad in (2 ** 64, -(2 ** 63) - 1):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            validation.seed("seed", bad)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"alora_invocation_tokens": [1]}], ids=["DoRA", "aLoRA"])
def test_squeezing_a_lora_variant_is_refused(variant):
    """Any PEFT LoRA variant (DoRA sets ``use_dora`` and ``lora_variant``, aLoRA only ``lora_variant``)."""
    peft = pytest.importorskip("peft")
    from randopt.lorasqueeze import squeeze_in_training

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], **variant))
    with pytest.raises(ValueError, match="uses a LoRA variant"):
        squeeze_in_training(model, torch.optim.AdamW(model.parameters()), rank=1)


def test_the_optimizers_default_to_torch_adamw_hyper_parameters():
    """A swap-in for ``torch.optim.AdamW``: the same lr, betas, eps and weight_decay when none is given."""
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).defaults
    ours = [randopt.RandLoRAAdamW([torch.nn.Linear(6, 5).weight], rank=2).defaults,
            randopt.LoRAProAdamW(lora_llama()).defaults]
    for defaults in ours:
        assert {k: defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == \
            {k: adamw[k] for k in ("lr", "betas", "eps", "weight_decay")}


def test_traffic_is_counted_from_zero_and_one_process_communicates_nothing():
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2, data_parallel=True)
    assert opt.communicated == {"all_reduces": 0, "bytes": 0}
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    assert opt.communicated == {"all_reduces": 0, "bytes": 0}


def test_the_trainable_set_freezes_the_rest_unless_asked():
    from randopt.trainable import apply_trainable_set

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    plain = apply_trainable_set(model, [model[0].weight])
    assert plain == [] and not model[0].bias.requires_grad and not model[1].weight.requires_grad
    assert len(apply_trainable_set(model, [model[0].weight], train_rest=True)) == 0  # frozen stays frozen


def test_the_trainable_summary_lists_six_plain_names_and_counts_more():
    from randopt.trainable import TrainableSummary

    six = str(TrainableSummary(10, 100, [], [f"p{i}" for i in range(6)]))
    assert "p5" in six and "in all" not in six
    seven = str(TrainableSummary(10, 100, [], [f"p{i}" for i in range(7)]))
    assert "p5, ... (7 in all)" in seven and "p6" not in seven


def test_factor_maps_are_immutable():
    import dataclasses

    from randopt.lorasqueeze.functional import factor_maps, factored_svd

    B, A = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    maps = factor_maps(factored_svd(B, A, 2.0), 2, 2.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        maps.A_map = None


def _conv_lora():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def test_a_conv_lora_pair_is_not_squeezed_and_lorapro_gives_it_plain_adamw():
    from randopt.lorasqueeze import squeeze_in_training

    model = _conv_lora()
    with pytest.raises(ValueError, match="is not a linear LoRA pair"):
        squeeze_in_training(model, torch.optim.AdamW(model.parameters()), rank=1)
    with pytest.warns(UserWarning, match="is not a plain 2-D LoRA pair"):
        opt = randopt.LoRAProAdamW(model, lr=1e-2)
    assert [g["name"] for g in opt.param_groups if g["lora_scale"] is not None] == ["base_model.model.2:default"]


def test_an_adapter_whose_metadata_contradicts_its_basis_flags_is_refused(tmp_path):
    from test_peft_interop import assert_refused, rewrite_weights, trained

    from randopt.integrations.peft import export_randlora_adapter

    adapter = export_randlora_adapter(*trained("llama-linear", steps=1), tmp_path / "adapter")
    rewrite_weights(adapter, change_metadata=lambda meta: meta.update(basis_kind="sparse"))
    assert_refused(adapter, "llama-linear", "flags say 'dense' bases, the randopt metadata says 'sparse'")


def test_without_renameat2_an_overwrite_falls_back_to_two_renames(tmp_path, monkeypatch):
    """Where the C library has no renameat2 (non-glibc, old kernels): OUT is swapped by two renames, still old or
    new, and nothing is left beside it."""
    from randopt import _atomic

    def write(text):
        return lambda d: open(os.path.join(d, "a"), "w").write(text)

    _atomic.write_directory(tmp_path / "out", write("old"), overwrite=False, owner_file="a")
    monkeypatch.setattr(_atomic.ctypes, "CDLL", lambda *args, **kwargs: types.SimpleNamespace())
    _atomic._renameat2.cache_clear()
    try:
        assert _atomic._renameat2() is None and _atomic._exchange(str(tmp_path / "x"), str(tmp_path / "y")) is False
        _atomic.write_directory(tmp_path / "out", write("new"), overwrite=True, owner_file="a")
    finally:
        _atomic._renameat2.cache_clear()
    assert (tmp_path / "out" / "a").read_text() == "new" and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("energy", [0.0, 1.5, "0.9"])
def test_select_rank_checks_the_energy(energy):
    from randopt.lorasqueeze.functional import select_rank

    with pytest.raises(ValueError, match="energy"):
        select_rank(torch.tensor([3.0, 2.0, 1.0]), energy)


def test_load_coefficients_refuses_a_parameter_that_is_not_one_of_its_matrices():
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([{"params": [model.weight], "rank": 2}, {"params": [model.bias], "rank": None}])
    for param in (torch.nn.Parameter(torch.zeros(5, 6)), model.bias):
        with pytest.raises(ValueError, match="not a matrix of a RandLoRA group"):
            opt.load_coefficients(param, torch.zeros(2), torch.zeros(2))


def test_select_rank_of_an_empty_spectrum_is_one():
    from randopt.lorasqueeze.functional import select_rank

    assert select_rank(torch.zeros(0), 0.5) == 1


def test_factor_maps_cut_singular_values_relative_to_the_largest():
    from randopt.lorasqueeze.functional import factor_maps, factored_svd

    generator = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=generator))[0]
    B, A = U * torch.tensor([1.0, 1e-5, 1e-8], dtype=torch.float64), V.T
    maps = factor_maps(factored_svd(B, A, 1.0), 3, 1.0, 1.0, rcond=1e-6)
    assert maps.live.tolist() == [True, True, False]


def test_a_rounding_generator_table_that_is_not_a_dict_is_refused():
    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([model.weight], rank=2)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="rounding_generators must map devices"):
        opt.load_state_dict({**saved, "rounding_generators": [saved["rounding_generators"]]})


def test_a_written_directory_is_made_durable_file_by_file_but_not_through_links(tmp_path, monkeypatch):
    from randopt import _atomic

    synced = []
    monkeypatch.setattr(_atomic, "_fsync", synced.append)

    def write(d):
        open(os.path.join(d, "a"), "w").write("x")
        os.symlink("a", os.path.join(d, "link"))

    _atomic.write_directory(tmp_path / "out", write, overwrite=False, owner_file="a")
    names = [os.path.basename(p) for p in synced]
    assert "a" in names and "link" not in names


@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e5])
def test_sylvester_solve_is_exact_for_full_rank_factors_of_any_magnitude(scale):
    """The cut of the Sylvester operator is relative to its largest entry: tiny factors (Gram eigenvalues 1e-10)
    are solved exactly, not cut as if they were rounding noise."""
    from randopt.lorapro.functional import factor_grams, solve_sylvester

    generator = torch.Generator().manual_seed(3)
    A = torch.randn(4, 9, generator=generator, dtype=torch.float64) * scale
    B = torch.randn(8, 4, generator=generator, dtype=torch.float64) * scale
    rhs = torch.randn(4, 4, generator=generator, dtype=torch.float64) * scale ** 2
    X = solve_sylvester(factor_grams(A, B), rhs)
    torch.testing.assert_close((B.T @ B) @ X + X @ (A @ A.T), rhs, rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", [0, -2.0, float("inf"), float("nan"), True, "16"])
def test_squeeze_factors_refuses_an_alpha_that_is_not_a_positive_finite_number(alpha):
    from randopt.lorasqueeze.functional import squeeze_factors

    B, A = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        squeeze_factors(B, A, alpha, rank=2)


@pytest.mark.parametrize("start,end", [(0, 4), (8, 0), (-8, 2)])
def test_a_geometric_rank_schedule_refuses_a_rank_that_is_not_positive_naming_both_ends(start, end):
    from randopt.lorasqueeze.training import RankSchedule

    with pytest.raises(ValueError, match=f"start and end must be positive integers, got {start} and {end}"):
        RankSchedule.geometric(start, end, 100, 3)


def test_maybe_squeeze_takes_an_explicit_step_0():
    """An optimizer without a step counter (SGD), before its first step: ``step=0`` is a valid count, and a stage
    starting at step 0 squeezes then."""
    from randopt.lorasqueeze import RankSchedule, maybe_squeeze

    model = lora_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    report = maybe_squeeze(model, optimizer, RankSchedule([(0, 1)]), step=0)
    assert report is not None and report.step == 0 and {layer.rank for layer in report.layers} == {1}
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        maybe_squeeze(model, optimizer, RankSchedule([(0, 1)]), step=-1)


@pytest.mark.parametrize("shape", [(5, 6), (6, 5)])
def test_a_randlora_rank_equal_to_the_smaller_side_of_the_largest_matrix_is_accepted(shape):
    """"at most" the smaller side: rank 5 for a 5 x 6 (or 6 x 5) matrix trains; rank 6 is refused."""
    weight = torch.nn.Parameter(torch.randn(*shape))
    opt = randopt.RandLoRAAdamW([weight], rank=5, lr=1e-2)
    before = weight.detach().clone()
    weight.grad = torch.randn(*shape)
    opt.step()
    assert not torch.equal(weight, before)
    with pytest.raises(ValueError, match="rank=6 is larger than allowed: at most 5"):
        randopt.RandLoRAAdamW([torch.nn.Parameter(torch.randn(*shape))], rank=6)


def test_an_explicitly_given_w0_that_fully_shard_replaced_is_refused_before_decaying_it(one_rank_group):
    """Full mode's weight decay on a ``W0`` passed in ``lorapro_groups``: once the factors were sharded after the
    optimizer was built, that ``W0`` is no longer the model's, so the step refuses instead of decaying a stale
    copy; an optimizer built from the model finds the sharded ``W0`` itself (test above)."""
    from randopt.optim.lorapro_adamw import find_lora_pairs, lorapro_groups

    model = _lora_mlp()
    pairs = find_lora_pairs(model)
    opt = randopt.LoRAProAdamW(lorapro_groups(pairs), lr=1e-2, mode="full", weight_decay=0.1, decay_base_weight=True)
    _shard(model, one_rank_group, opt)
    model(torch.randn(4, 6)).square().sum().backward()
    with pytest.raises(RuntimeError, match="the base weight W0 it was given .* is not the one in the model now"):
        opt.step()


def test_other_dtensors_swapped_into_an_optimizer_built_on_dtensors_are_refused(one_rank_group):
    """Only plain parameters replaced by their DTensors are adopted (accelerate's swap); an optimizer given DTensors
    whose groups later hold different DTensors was not told why: its step refuses."""
    models = [_mlp(), _mlp()]
    for model in models:
        _shard(model, one_rank_group)
    opt = randopt.RandLoRAAdamW(randopt.param_groups(models[0], ["0", "2"], rank=2, train_rest=True), lr=1e-2)
    others = dict(models[1].named_parameters())
    names = {id(p): name for name, p in models[0].named_parameters()}
    for group in opt.param_groups:
        group["params"] = [others[names[id(p)]] for p in group["params"]]
    models[1](torch.randn(4, 6)).square().sum().backward()
    with pytest.raises(RuntimeError, match="hold DTensors other than the parameters it was given"):
        opt.step()


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_load_state_dict_puts_moments_on_each_parameters_device_and_counters_on_the_cpu(mode):
    """As torch's optimizers do, loaded moments follow their parameter's device, while the step and skip counters
    stay CPU tensors. The meta device stands in for a second device (a GPU) here: parameters on it, a state dict
    saved on the CPU."""
    from randopt.optim.lorapro_adamw import lorapro_groups

    def optimizer(A, B, W):
        return randopt.LoRAProAdamW(lorapro_groups([(A, B, 2.0)], mode=mode) + [{"params": [W]}], lr=1e-2, mode=mode)

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((2, 6), (5, 2), (3, 4))]
    opt = optimizer(*params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    opt.step()
    with torch.device("meta"):
        on_meta = optimizer(*(torch.nn.Parameter(torch.empty(p.shape)) for p in params))
    on_meta.load_state_dict(opt.state_dict())
    devices = {key: value.device.type for state in on_meta.state.values() for key, value in state.items()}
    assert devices.pop("step") == devices.pop("nonfinite_skips") == "cpu"
    assert devices and set(devices.values()) == {"meta"}, devices


def test_a_sharded_plain_parameter_with_a_nonfinite_gradient_is_skipped_and_counted(one_rank_group):
    """FSDP2 (one rank): a bias whose gradient holds a NaN keeps its weight and moments; the skip is counted once,
    and the matrices and other plain parameters step as usual."""
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model, mesh=one_rank_group)
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, ["0", "2"], rank=2, train_rest=True), lr=1e-2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()
    bias = model[0].bias
    before = {"bias": bias.full_tensor().clone(), "weight": model[2].weight.full_tensor().clone(),
              **{k: v.full_tensor().clone() for k, v in opt.state[bias].items() if k.startswith("exp_avg")}}
    model(x).square().sum().backward()
    bias.grad.to_local()[0] = float("nan")
    opt.step()
    assert opt.nonfinite_skips == 1 and int(opt.state[bias]["nonfinite_skips"]) == 1
    assert torch.equal(bias.full_tensor(), before["bias"])
    assert all(torch.equal(opt.state[bias][k].full_tensor(), before[k]) for k in before if k.startswith("exp_avg"))
    assert not torch.equal(model[2].weight.full_tensor(), before["weight"])


# ----- a second data-parallel rank, simulated in this process ------------------------------------------------------
@pytest.fixture
def second_rank(one_rank_group, monkeypatch):
    """Collectives as rank 0 of 2 sees them, without a second process: ``get_world_size`` says 2 and an all-reduce
    (sum) adds the other rank's contribution, ``second_rank["sends"](tensor)``: by default the same tensor, as a rank
    with the same data sends. Only the collectives the optimizers call are simulated (not FSDP's own)."""
    import torch.distributed as dist

    contribution = {"sends": lambda tensor: tensor.clone(), "all_reduces": 0}

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        assert op == dist.ReduceOp.SUM and not async_op
        contribution["all_reduces"] += 1
        tensor.add_(contribution["sends"](tensor))

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return contribution


def _tiny_gradients(model, optimizer, steps, scale=1.0, partitions=False):
    """Gradients as small as Adam's eps (so that the update depends on their scale), ``scale`` times over."""
    from test_step_guarantees import zero_gradients, zero_step

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        (model(x).square().sum() * 1e-8 * scale).backward()
        if partitions:
            zero_gradients(optimizer)
            zero_step(optimizer)
            for group in optimizer.param_groups:  # what DeepSpeed does after step(): partitions to the model
                for p in optimizer._params_of(group):
                    p._hp_mapping.update_lp()
        else:
            optimizer.step()
        optimizer.zero_grad()
        model.zero_grad()  # under partitions the optimizer's own zero_grad clears only theirs


def test_data_parallel_randlora_averages_the_coefficient_gradients_in_one_counted_all_reduce(second_rank):
    """``data_parallel=True``: one all-reduce per step averages the coefficient gradients (and plain gradients) over
    the ranks; with the other rank's batch the same, training is exactly that of one process."""
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, ["0", "2"], rank=2, train_rest=True), data_parallel=True)
    alone = randopt.RandLoRAAdamW(randopt.param_groups(twin, ["0", "2"], rank=2, train_rest=True))
    _tiny_gradients(model, opt, steps=2)
    _tiny_gradients(twin, alone, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    reduced = sum(s["lambda"].numel() + s["gamma"].numel() if "lambda" in s else s["exp_avg"].numel()
                  for s in opt.state.values())
    assert opt.communicated == {"all_reduces": 2, "bytes": 2 * 4 * reduced} and second_rank["all_reduces"] == 2


def test_under_zero_the_ranks_partial_coefficient_gradients_are_summed_once_per_real_step(second_rank):
    """DeepSpeed ZeRO (simulated: flat partitions, one ``step()`` call per group): each rank projects the blocks it
    owns, and the last call of the real step sums the partial coefficient gradients over the ranks in one all-reduce
    (not an average: ZeRO's gradients are averaged already). The other rank's partial sums equal to this one's give
    exactly the coefficients of one process with twice the gradient."""
    from test_step_guarantees import zero_partitions

    model = _mlp()
    for module in model:
        if isinstance(module, torch.nn.Linear):
            module.bias.requires_grad_(False)  # only matrices: ZeRO leaves plain gradients to DeepSpeed
    twin = copy.deepcopy(model)
    opt = randopt.RandLoRAAdamW([{"params": [model[0].weight], "rank": 2}, {"params": [model[2].weight], "rank": 2}])
    alone = randopt.RandLoRAAdamW([{"params": [twin[0].weight], "rank": 2}, {"params": [twin[2].weight], "rank": 2}])
    masters = zero_partitions(opt)
    _tiny_gradients(model, opt, steps=2, partitions=True)
    _tiny_gradients(twin, alone, steps=2, scale=2.0)
    for mine, theirs in ((model[0].weight, twin[0].weight), (model[2].weight, twin[2].weight)):
        assert torch.equal(masters[mine], theirs)
        assert torch.equal(opt.state[mine]["lambda"], alone.state[theirs]["lambda"])
    assert second_rank["all_reduces"] == 2 and opt.communicated["all_reduces"] == 2


def test_under_zero_full_mode_a_rank_counts_the_steps_of_the_pairs_another_rank_holds_the_moments_of(second_rank):
    """Full mode under ZeRO keeps pair i's moments on rank i % world only: on rank 0 of 2, pair 0 gets its moments and
    its update exactly as in one process, pair 1 no moments, and both count the step (each rank's checkpoint then
    resumes at the same step). The other rank's contributions are zeros here: it owns no fragment and sends no
    update, so pair 1 only decays."""
    from test_step_guarantees import LoRAProRun, same

    second_rank["sends"] = torch.zeros_like
    run, alone = LoRAProRun("zero", "full", "fp32"), LoRAProRun("whole", "full", "fp32")
    for seed in range(2):
        for r in (run, alone):
            r.set_gradients(seed)
            r.step()
    assert second_rank["all_reduces"] == 4  # per real step: the pairs' fragments, then the owners' updates
    assert same(run.unit("pair0"), alone.unit("pair0"))
    pair1 = run.unit("pair1")
    assert int(pair1["A1.step"]) == 2 and "A1.w_exp_avg" not in pair1 and "A1.w_exp_avg" in alone.unit("pair1")
    assert torch.equal(run.unit("plain W")["W"], alone.unit("plain W")["W"])


def test_fsdp2_row_ranges_follow_torch_chunk_over_any_world_size():
    """FSDP2 shards dim 0 as ``torch.chunk`` does (``ceil(rows / world)`` rows per rank, the last ranks fewer or
    none): the rows each rank's locator reports are exactly its chunk; a shard of another size is refused."""
    from randopt.optim.locators import DTensorShards

    def shard(full, world, rank, held=None):
        chunks = torch.chunk(full, world)
        local = chunks[rank] if rank < len(chunks) else full[:0]
        mesh = types.SimpleNamespace(size=lambda: world, get_local_rank=lambda: rank)
        return types.SimpleNamespace(shape=full.shape, device_mesh=mesh, _local_tensor=local if held is None else held)

    locator = DTensorShards()
    for rows in (1, 2, 5, 7, 8):
        full = torch.arange(rows * 3.0).view(rows, 3)
        for world in (1, 2, 3, 4):
            pieces = [full[locator.rows(shard(full, world, rank))] for rank in range(world)]
            assert all(torch.equal(piece, shard(full, world, rank)._local_tensor) for rank, piece in enumerate(pieces))
            assert torch.equal(torch.cat(pieces), full), (rows, world)
    with pytest.raises(RuntimeError, match="holds 1 rows on this rank, but an even dim-0 split over 2 ranks gives 3"):
        DTensorShards.row_start(shard(torch.zeros(5, 3), 2, 0, held=torch.zeros(1, 3)))


def test_zero3_ranks_own_consecutive_equal_parts_and_the_last_one_no_padding():
    """ZeRO-3: rank k owns elements [k * pn, (k + 1) * pn) of a parameter (``pn = partition_numel()``); the padding
    after the last element belongs to no span, and a rank that holds only padding owns none of it."""
    import torch.distributed as dist

    from randopt.optim.locators import ZeRO3Partitions

    locator = ZeRO3Partitions()
    p = types.SimpleNamespace(ds_numel=10, partition_numel=lambda: 4, ds_process_group=None)
    spans = []
    for rank in range(4):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dist, "get_rank", lambda group=None: rank)
            spans.append(locator._span_range(p))
    assert spans == [(0, 4), (4, 4), (8, 2), None]


def test_a_zero_partition_group_that_is_not_one_flat_tensor_is_refused():
    """DeepSpeed ZeRO 1/2 hands each group one flat 1-D partition: a group holding two tensors, or one that is not
    flat, means the optimizer is not run the way it expects; the step says so instead of stepping a wrong view."""
    from test_step_guarantees import zero_partitions

    model = torch.nn.Linear(6, 5)
    opt = randopt.RandLoRAAdamW([{"params": [model.weight, model.bias], "rank": 2}])
    zero_partitions(opt)
    (flat,) = opt.param_groups[0]["params"]
    model(torch.randn(3, 6)).sum().backward()
    for params in ([flat, torch.zeros(3)], [flat.view(1, -1)]):
        opt.param_groups[0]["params"] = params
        with pytest.raises(RuntimeError, match="one flat partition per parameter group"):
            opt.step()


def test_a_written_directory_and_its_parent_are_fsynced_entry_by_entry(tmp_path, monkeypatch):
    """Durability (module docstring of randopt._atomic): every file and every directory of the new tree is fsynced
    (a directory's fsync makes its entries durable), and so is the parent that the rename changed; links are not
    followed."""
    from randopt import _atomic

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def write(d):
        os.makedirs(os.path.join(d, "sub"))
        open(os.path.join(d, "a"), "w").write("x")
        open(os.path.join(d, "sub", "b"), "w").write("y")
        os.symlink("a", os.path.join(d, "link"))

    _atomic.write_directory(tmp_path / "out", write, overwrite=False, owner_file="a")
    names = [os.path.relpath(path, os.path.realpath(tmp_path)) for path in synced]
    # the tree is synced under its temporary name, before the rename: compare paths below it
    below = {os.path.join(*name.split(os.sep)[1:]) if os.sep in name else "<root>" for name in names
             if name != "."}
    assert {"a", "sub", os.path.join("sub", "b"), "<root>"} <= below and "link" not in below
    assert "." in names, "the parent directory, whose entry the rename changed"


def test_unwrapping_an_optimizer_stops_at_a_wrapper_that_wraps_itself():
    from randopt.integrations.transformers import unwrap_optimizer

    wrapper = types.SimpleNamespace()
    wrapper.optimizer = wrapper
    assert unwrap_optimizer(wrapper) is None
    inner = randopt.RandLoRAAdamW([torch.nn.Linear(6, 5).weight], rank=2)
    assert unwrap_optimizer(types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=inner))) is inner


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_basis_products_are_row_major_unless_column_major_is_asked_for(kind):
    """``b_matmul`` returns ``B[rows] @ other`` (plus ``add_to``) in row-major memory, the layout the callers'
    in-place adds and transposes expect, and in column-major memory only when asked: the same values either way."""
    from randopt.randlora.bases import make_bases

    layer = make_bases((40, 16), 2, kind=kind).layer(40, 16)
    other = torch.randn(layer.stored_B.shape[1], 16, generator=torch.Generator().manual_seed(0))
    add_to = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    expected = layer.B @ other
    for product, with_add in ((layer.b_matmul(other), False), (layer.b_matmul(other, add_to=add_to.clone()), True)):
        assert product.is_contiguous()
        torch.testing.assert_close(product, expected + add_to if with_add else expected)
    column_major = layer.b_matmul(other, column_major=True)
    assert column_major.T.is_contiguous() and not column_major.is_contiguous()
    torch.testing.assert_close(column_major, expected)


def test_lorapro_efficient_fragment_state_from_another_partitioning_is_refused_before_anything_moves():
    """Under ZeRO each rank saves the moments of the fragments it owns, with their span (start, count): loading a
    checkpoint whose factor state covers other elements than this rank owns now (another world size) is refused at
    the step, with every pair as it was (plain parameters step in their own call, as after a clean step)."""
    from test_step_guarantees import LoRAProRun, same

    run = LoRAProRun("zero", "efficient", "fp32")
    run.set_gradients(0)
    run.step()
    saved = run.optimizer.state_dict()
    numel = run.params["B0"].numel()
    assert saved["state"][1]["span"].tolist() == [0, numel]  # B0, the second parameter
    saved["state"][1]["span"] = torch.tensor([3, numel])  # as saved by a rank that owned elements 3.. of B0
    resumed = LoRAProRun("zero", "efficient", "fp32")
    resumed.optimizer.load_state_dict(saved)
    resumed.set_gradients(1)
    before = {name: resumed.unit(name) for name in ("pair0", "pair1")}
    with pytest.raises(RuntimeError, match="saved with a different partitioning"):
        resumed.step()
    assert all(same(resumed.unit(name), unit) for name, unit in before.items())


@pytest.mark.parametrize("writer,kept", [("running", True), ("another user's", True), ("gone", False)])
def test_leftovers_of_a_writer_are_removed_only_once_it_is_gone(tmp_path, monkeypatch, writer, kept):
    """A hidden directory beside OUT belongs to the writer whose pid it names: while that process runs (also one of
    another user, which ``kill(pid, 0)`` may not signal) it is left alone; once it is gone, the next write removes it."""
    from randopt import _atomic

    def kill(pid, signal):
        assert signal == 0
        if writer == "another user's":
            raise PermissionError(1, "Operation not permitted")
        if writer == "gone":
            raise ProcessLookupError(3, "No such process")

    pid = os.getpid() + 1
    leftover = tmp_path / f".out.tmp-{pid}-0123abcd"
    leftover.mkdir()
    monkeypatch.setattr(os, "kill", kill)
    _atomic.write_directory(tmp_path / "out", lambda d: open(os.path.join(d, "a"), "w").write("x"), overwrite=False,
                            owner_file="a")
    assert leftover.exists() == kept and (tmp_path / "out" / "a").read_text() == "x"


@pytest.mark.parametrize("optimizer_name", ["RandLoRAAdamW", "LoRAProAdamW"])
def test_other_plain_tensors_swapped_into_the_groups_are_refused_not_adopted(optimizer_name):
    """Only DTensors that replaced the optimizer's parameters (accelerate's FSDP2 swap) are adopted: plain tensors of
    the same shapes put in their place are no storage the optimizer knows, and its step refuses them, changing
    nothing."""
    model = _lora_mlp() if optimizer_name == "LoRAProAdamW" else _mlp()
    opt = randopt.LoRAProAdamW(model, lr=1e-2) if optimizer_name == "LoRAProAdamW" else \
        randopt.RandLoRAAdamW(randopt.param_groups(model, ["0", "2"], rank=2, train_rest=True), lr=1e-2)
    model(torch.randn(4, 6)).square().sum().backward()
    for group in opt.param_groups:
        group["params"] = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
        for new in group["params"]:
            new.grad = torch.ones_like(new)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="no longer hold the parameters it was given"):
        opt.step()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items()) and not opt.state


def test_a_model_whose_lora_layers_have_no_plain_pair_is_refused_with_their_count():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))
    with pytest.warns(UserWarning, match="not a plain 2-D LoRA pair"):
        with pytest.raises(ValueError, match="model: 2 LoRA layers but none has a 2-D pair"):
            randopt.LoRAProAdamW(model)


@pytest.mark.parametrize("change", [("full", "efficient"), ("efficient", "full")])
def test_the_mode_of_a_stepped_pair_cannot_change(change):
    """Full mode keeps a pair's m x n moments with A, efficient mode per-factor moments: a group switched to the other
    mode after a step is refused (both ways), before anything moves."""
    before_mode, after_mode = change
    model = lora_llama()
    opt = randopt.LoRAProAdamW(model, lr=1e-2, mode=before_mode)
    train(model, opt, 1)
    group = next(g for g in opt.param_groups if g["lora_scale"] is not None)
    group["mode"] = after_mode
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"mode='{after_mode}' but its state holds the other mode's moments"):
        train(model, opt, 1)
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


def test_a_lora_layer_that_does_not_say_it_uses_rslora_is_squeezed_as_plain_lora():
    """``use_rslora`` without an entry for the adapter (a LoRA layer built by other code than PEFT's config path):
    plain LoRA's ``alpha / r`` scale, which the layer's ``scaling`` matches, so it squeezes."""
    from randopt.lorasqueeze import squeeze_in_training

    model = lora_llama()
    for module in model.modules():
        if isinstance(getattr(module, "use_rslora", None), dict):
            module.use_rslora.clear()
    report = squeeze_in_training(model, None, rank=1)
    assert {layer.rank for layer in report.layers} == {1}


@pytest.mark.parametrize("args,fingerprint", [
    (((40, 16), 2, 0, "dense"), "53289c9bf4ae74b4965ea12a940a4557"),
    (((64, 300), 8, 7, "dense"), "9ffbed6bf7d7572328f4a0371c1258f0"),
    (((5, 6), 1, 123, "dense"), "f5efd0a58b9a0798b528f016e7272508"),
    (((40, 16), 3, 0, "dense"), "fffe185a5e2c3f7cc6549154d42856f4"),
    (((30, 20), 5, 2, "dense"), "5568742a33f2704d6add3a361e8bca1c"),
    (((40, 16), 4, 3, "sparse"), "1bae7c9d1fa1c3119719571c7696cb62"),
    (((48, 40), 3, 1, "very_sparse"), "90060705e65d6a0e7199cb03095207a2"),
])
def test_the_bases_of_a_seed_never_change(args, fingerprint):
    """A checkpoint keeps only the bases' fingerprint and an adapter may keep only the seed: the bases drawn for a
    (shape, rank, seed, kind) must stay bit for bit what they were (values from fp32 CPU draws, machine-independent)."""
    from randopt.randlora.bases import make_bases

    assert make_bases(*args).fingerprint == fingerprint


@pytest.mark.parametrize("make_model,make_optimizer", [
    (_mlp, lambda m: randopt.RandLoRAAdamW(randopt.param_groups(m, ["0", "2"], rank=2), lr=1e-2)),
    (_lora_mlp, lambda m: randopt.LoRAProAdamW(m, lr=1e-2, mode="efficient")),
], ids=["RandLoRAAdamW", "LoRAProAdamW"])
def test_under_fsdp2_the_optimizers_reduce_over_the_meshs_process_group(second_rank, one_rank_group, make_model,
                                                                        make_optimizer):
    """The ranks that hold the other shards of a parameter are its device mesh's group, which need not be the default
    group (a sub-mesh): the optimizers' all-reduces go to that group."""
    import torch.distributed as dist

    groups = []
    reduce = dist.all_reduce
    model = make_model()
    _shard(model, one_rank_group)
    opt = make_optimizer(model)
    model(torch.randn(4, 6)).square().sum().backward()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "all_reduce", lambda tensor, group=None, **kw: groups.append(group) or reduce(tensor, **kw))
        second_rank["sends"] = torch.zeros_like
        opt.step()
    assert groups and all(group is one_rank_group.get_group() for group in groups)


@pytest.mark.parametrize("frozen", ["randlora_lambda", "randlora_gamma"])
def test_training_only_one_randlora_coefficient_gives_it_the_same_gradient(frozen):
    """Either coefficient may be frozen: the other's gradient is the one it gets when both train."""
    grads = {}
    for freeze in (None, frozen):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 5))
        randopt.inject_randlora(model, ["0", "1"], rank=2)
        for module in model.modules():
            if hasattr(module, "randlora_lambda"):
                torch.nn.init.normal_(module.randlora_lambda, generator=torch.Generator().manual_seed(1))
                if freeze:
                    getattr(module, freeze).requires_grad_(False)
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(2))).square().sum().backward()
        grads[freeze] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[frozen] and all(frozen not in name for name in grads[frozen])
    for name, grad in grads[frozen].items():
        torch.testing.assert_close(grad, grads[None][name], rtol=1e-6, atol=1e-7, msg=name)


def test_engine_skipped_steps_is_zero_without_an_engine_or_its_count():
    opt = randopt.RandLoRAAdamW([torch.nn.Linear(6, 5).weight], rank=2)
    assert opt.engine_skipped_steps == 0
    opt.engine = types.SimpleNamespace()  # an engine without the counter
    assert opt.engine_skipped_steps == 0
    opt.engine = types.SimpleNamespace(skipped_steps=3)
    assert opt.engine_skipped_steps == 3


@pytest.mark.parametrize("deepspeed,engine,warns", [(None, None, False), ("ds_config.json", None, True),
                                                    ("ds_config.json", "an engine", False)])
def test_callback_warns_that_it_cannot_see_the_engine_only_under_deepspeed(deepspeed, engine, warns):
    """A callback given as ``Trainer(callbacks=[...])`` cannot find DeepSpeed's engine: it says so under DeepSpeed
    when no engine is known, and never without DeepSpeed."""
    opt = randopt.RandLoRAAdamW([torch.nn.Linear(6, 5).weight], rank=2)
    opt.engine = engine
    args = types.SimpleNamespace(learning_rate=opt.defaults["lr"], deepspeed=deepspeed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RandoptCallback().on_train_begin(args, None, None, optimizer=opt)
    assert any("cannot see the engine" in str(w.message) for w in caught) == warns


def test_restore_ranks_takes_a_peft_lora_config():
    peft = pytest.importorskip("peft")
    from randopt.lorasqueeze import restore_ranks

    model = lora_llama()
    config = peft.LoraConfig(r=1, lora_alpha=2, target_modules=LLAMA_TARGETS)
    changed = restore_ranks(model, config)
    assert changed and set(changed.values()) == {1}
    assert all(module.r["default"] == 1 for module in model.modules() if hasattr(module, "lora_A"))


def test_an_adapter_whose_alpha_pattern_gives_a_layer_alpha_0_is_refused_naming_the_layer():
    from randopt.lorasqueeze.adapters import adapter_from_model, squeeze_adapter

    config, tensors = adapter_from_model(lora_llama())
    config = {**config, "alpha_pattern": {"q_proj": 0}}
    with pytest.raises(ValueError, match=r"q_proj' has alpha 0 \(lora_alpha / alpha_pattern\), expected a positive"):
        squeeze_adapter(config, tensors, rank=1)


def test_dora_is_recognised_by_use_dora_alone_and_layers_without_it_squeeze():
    """PEFT versions before ``lora_variant`` mark DoRA by ``use_dora`` only: still refused; a LoRA layer without a
    ``use_dora`` attribute at all (other LoRA implementations) is plain LoRA and squeezes."""
    peft = pytest.importorskip("peft")
    from randopt.lorasqueeze import squeeze_in_training

    dora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                             use_dora=True))
    plain = lora_llama()
    for model, remove in ((dora, "lora_variant"), (plain, "use_dora")):
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, remove):
                delattr(module, remove)
    with pytest.raises(ValueError, match="uses a LoRA variant"):
        squeeze_in_training(dora, None, rank=1)
    assert {layer.rank for layer in squeeze_in_training(plain, None, rank=1).layers} == {1}


def test_keyword_arguments_are_the_constructors_named_options_only():
    """What the constructors' option checks accept: neither ``self``, ``params`` nor ``*args``/``**kwargs``."""
    from randopt.validation import keyword_arguments

    class Optimizer:
        def __init__(self, params, lr=1e-3, *args, betas=(0.9, 0.999), **kwargs):
            pass

    assert keyword_arguments(Optimizer) == ["lr", "betas"]
    names = keyword_arguments(randopt.RandLoRAAdamW)
    assert "lr" in names and "rank" in names and not {"self", "params"} & set(names)
    with pytest.raises(ValueError, match="params"):
        randopt.RandLoRAAdamW.check_arguments(params=[])


def test_a_geometric_schedule_anneals_down_to_rank_1_and_an_equal_start_is_refused_as_such():
    from randopt.lorasqueeze.training import RankSchedule

    assert RankSchedule.geometric(8, 1, 100, 4).stages == ((0, 8), (25, 4), (50, 2), (75, 1))
    with pytest.raises(ValueError, match="end rank must be below start rank, got start=1, end=1"):
        RankSchedule.geometric(1, 1, 100, 4)


def test_moments_projected_before_any_step_stay_zero():
    """At step 0 no gradient was seen: zero moments map to zero moments (no bias correction by 1 - beta^0 = 0)."""
    from randopt.lorasqueeze.functional import project_moments

    matrix = torch.randn(2, 3, dtype=torch.float64)
    for side, shape in (("left", (3, 4)), ("right", (4, 3))):
        m, v = project_moments(torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
                               matrix if side == "left" else matrix.T, side, betas=(0.9, 0.999), step=0)
        assert not m.any() and not v.any(), side


def test_the_squeeze_unwraps_an_optimizer_wrapping_itself_and_refuses_what_is_no_optimizer():
    from randopt.lorasqueeze.training import unwrap_optimizer

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    inner.optimizer = inner
    assert unwrap_optimizer(inner) is inner
    for not_an_optimizer in (types.SimpleNamespace(param_groups=[]), types.SimpleNamespace(state={})):
        with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
            unwrap_optimizer(not_an_optimizer)


def test_an_exact_svd_of_factors_is_immutable():
    import dataclasses

    from randopt.lorasqueeze.functional import factored_svd

    svd = factored_svd(torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        svd.S = None


def test_the_trainable_share_of_an_empty_model_is_zero():
    from randopt.trainable import TrainableSummary

    assert TrainableSummary(0, 0).percent == 0.0 and TrainableSummary(1, 4).percent == 25.0


def test_state_kept_like_a_sharded_parameter_has_its_global_row_major_strides(one_rank_group):
    """DCP checkpoints read a DTensor's global shape and strides: state kept with ``shard_like`` has those of a
    contiguous tensor of the parameter's global shape."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from randopt.optim.locators import shard_like

    for shape in ((4, 3), (5, 3, 2), (6,)):
        like = distribute_tensor(torch.zeros(shape), one_rank_group, [Shard(0)])
        state = shard_like(torch.ones(shape), like)
        assert state.shape == like.shape and state.stride() == torch.empty(shape).stride(), shape
    wider = shard_like(torch.ones(4, 5), like=distribute_tensor(torch.zeros(4, 3), one_rank_group, [Shard(0)]),
                       shape=(4, 5))
    assert wider.stride() == (5, 1)


@pytest.mark.parametrize("storage", ["zero", "fsdp2"])
def test_lorapro_sharded_steps_report_each_real_steps_adjustment_like_whole_steps(one_rank_group, storage):
    """``metrics()`` describes the last real step: under sharding (one call per group under ZeRO) as without."""
    from test_step_guarantees import LoRAProRun

    for mode in ("full", "efficient"):
        runs = [LoRAProRun(storage, mode, "fp32"), LoRAProRun("whole", mode, "fp32")]
        for seed in range(3):
            for run in runs:
                run.set_gradients(seed)
                run.step()
            sharded, whole = (run.optimizer.metrics() for run in runs)
            assert sharded == pytest.approx(whole, rel=1e-12), (mode, seed)


def test_the_forward_tells_the_cost_model_which_gradients_the_backward_will_need(monkeypatch):
    """The merged/factored forward route is chosen by cost, counting the backward's needs: no input gradient for a
    first layer whose input does not require one, no coefficient gradients when both coefficients are frozen."""
    from randopt.randlora import autograd as autograd_core

    asked = []
    choose = autograd_core._forward_merged
    monkeypatch.setattr(autograd_core, "_forward_merged",
                        lambda layer, tokens, same_input, needs_input, needs_coefficients, dtype=None:
                        asked.append((same_input, needs_input, needs_coefficients))
                        or choose(layer, tokens, same_input, needs_input, needs_coefficients, dtype))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8))
    randopt.inject_randlora(model, ["0"], rank=2)
    x = torch.randn(4, 6)
    model(x)
    model(x.requires_grad_())
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)
    assert asked == [(True, False, True), (True, True, True), (True, True, False)]


def test_set_bases_replaces_the_bases_already_cached_for_a_device():
    from randopt.randlora.bases import make_bases

    opt = randopt.RandLoRAAdamW([torch.nn.Linear(6, 5).weight], rank=2)
    group = opt.param_groups[0]
    cached = opt.bases_for(group, "cpu", torch.float32)
    imported = make_bases((5, 6), 2, seed=9)
    opt.set_bases(imported, group)
    assert opt.bases_for(group, "cpu", torch.float32).fingerprint == imported.fingerprint != cached.fingerprint


def test_a_lora_pair_of_two_dtypes_is_refused():
    from randopt.optim.lorapro_adamw import lorapro_groups

    A = torch.nn.Parameter(torch.zeros(2, 6))
    B = torch.nn.Parameter(torch.zeros(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="must share dtype and device"):
        randopt.LoRAProAdamW(lorapro_groups([(A, B, 2.0)]))


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_zero_partitions_without_a_process_group_step_exactly_like_whole_tensors(mode):
    """DeepSpeed's partitions in a process without torch.distributed initialised: one rank, which holds every pair's
    moments, so the step is the whole-tensor step."""
    import torch.distributed as dist

    from test_step_guarantees import LoRAProRun

    assert not dist.is_initialized()
    runs = [LoRAProRun("zero", mode, "fp32"), LoRAProRun("whole", mode, "fp32")]
    for seed in range(2):
        for run in runs:
            run.set_gradients(seed)
            run.step()
    for unit in ("pair0", "pair1"):
        sharded, whole = (run.unit(unit) for run in runs)
        assert {k for k in sharded if not k.endswith(".span")} == whole.keys()  # the fragments' spans: ZeRO's own
        assert all(torch.equal(sharded[k].view(-1), whole[k].view(-1)) for k in whole), unit


def _randlora_on_partitions(model=None):
    """RandLoRAAdamW on DeepSpeed ZeRO's flat partitions (one process): a RandLoRA matrix and a plain matrix."""
    from test_step_guarantees import zero_partitions

    if model is None:
        model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False))
    opt = randopt.RandLoRAAdamW([{"params": [model[0].weight], "rank": 2}, {"params": [model[1].weight], "rank": None}],
                                lr=1e-2)
    return model, opt, zero_partitions(opt)


def _zero_backward_and_step(model, opt, seed, poison=None):
    from test_step_guarantees import zero_gradients, zero_step

    model.zero_grad()
    model(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
    if poison is not None:
        poison.grad[0, 0] = float("nan")
    zero_gradients(opt)
    zero_step(opt)
    for group in opt.param_groups:  # what DeepSpeed does after step(): partitions to the model
        for p in opt._params_of(group):
            p._hp_mapping.update_lp()


def test_randlora_under_zero_refreshes_the_model_copy_of_a_matrix_carried_by_an_earlier_call():
    """Under ZeRO a RandLoRA matrix carried by an earlier ``step()`` call of a real step is updated in its last call,
    after DeepSpeed copied the earlier call's partition to the model: the optimizer refreshes that copy, so after the
    real step every model weight equals its master."""
    from test_step_guarantees import zero_gradients, zero_step

    torch.manual_seed(0)
    model, opt, masters = _randlora_on_partitions()
    for seed in range(2):
        model.zero_grad()
        model(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        zero_gradients(opt)
        before = model[0].weight.detach().clone()
        zero_step(opt, copy_to_model=True)
        assert not torch.equal(model[0].weight, before)
        for param, master in masters.items():
            assert torch.equal(param.detach(), master)

def test_randlora_under_zero_resumes_from_its_state_dict_and_refuses_state_of_another_partitioning():
    """Each rank saves the fragments it owns with their span: a fresh optimizer on the same partitions loads them and
    steps on exactly as the original does; a span from another partitioning is refused at the step, with the plain
    parameter untouched."""
    torch.manual_seed(0)
    model, opt, masters = _randlora_on_partitions()
    _zero_backward_and_step(model, opt, 0)
    saved = copy.deepcopy(opt.state_dict())
    twin, resumed, twin_masters = _randlora_on_partitions(copy.deepcopy(model))
    resumed.load_state_dict(saved)
    _zero_backward_and_step(model, opt, 1)
    _zero_backward_and_step(twin, resumed, 1)
    assert all(torch.equal(twin_masters[q], masters[p]) for q, p in zip(twin.parameters(), model.parameters()))
    numel = model[1].weight.numel()
    assert saved["state"][1]["span"].tolist() == [0, numel]
    saved["state"][1]["span"] = torch.tensor([2, numel])  # as saved by a rank that owned elements 2.. of it
    other, other_opt, other_masters = _randlora_on_partitions(copy.deepcopy(model))
    other_opt.load_state_dict(saved)
    before = other_masters[other[1].weight].clone()
    with pytest.raises(RuntimeError, match="saved with a different partitioning"):
        _zero_backward_and_step(other, other_opt, 2)
    assert torch.equal(other_masters[other[1].weight], before)


def test_randlora_under_zero_skips_and_counts_a_matrix_with_a_nonfinite_gradient():
    model, opt, masters = _randlora_on_partitions()
    _zero_backward_and_step(model, opt, 0)
    before = masters[model[0].weight].clone(), opt.state[model[0].weight]["lambda"].clone()
    _zero_backward_and_step(model, opt, 1, poison=model[0].weight)
    assert int(opt.state[model[0].weight]["nonfinite_skips"]) == 1 and opt.nonfinite_skips == 1
    assert torch.equal(masters[model[0].weight], before[0])
    assert torch.equal(opt.state[model[0].weight]["lambda"], before[1])


def test_bases_of_a_single_entry_are_drawn_without_warnings():
    """Rank 1 for a 1 x 1 layer: A has one entry, whose standard deviation is undefined; its magnitude is used."""
    from randopt.randlora.bases import make_bases

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bases = make_bases((1, 1), 1)
    assert bases.A.abs().item() == 1.0


def test_a_rank_schedule_shows_its_stages():
    from randopt.lorasqueeze import RankSchedule

    assert repr(RankSchedule([(0, 8), (5, 2)])) == "RankSchedule([(0, 8), (5, 2)])"


def test_an_adapter_holding_its_bases_only_with_a_layer_imports_them(tmp_path):
    """Bases stored per layer (as PEFT also writes them) instead of once at the top: one layer's copy is enough, and
    the imported model reproduces the trained one."""
    from test_peft_interop import base_model, logits, rewrite_weights, trained

    from randopt.integrations.peft import _checksum, export_randlora_adapter

    model, opt = trained("llama-linear", steps=1)
    adapter = export_randlora_adapter(model, opt, tmp_path / "adapter")
    rewritten = {}

    def bases_with_one_layer(tensors):
        shared = {leaf: tensors.pop(f"base_model.{leaf}") for leaf in ("randlora_A", "randlora_B")}
        layer = next(k for k in tensors if k.endswith(".randlora_lambda")).removesuffix(".randlora_lambda")
        tensors.update({f"{layer}.{leaf}": value for leaf, value in shared.items()})
        rewritten.update(tensors)

    rewrite_weights(adapter, change_tensors=bases_with_one_layer,
                    change_metadata=lambda meta: meta.update(tensors_sha256=_checksum(rewritten)))
    imported = base_model("llama-linear")
    load_randlora_adapter(imported, adapter)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(imported, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)


def test_lora_layers_that_name_their_adapter_the_older_way_or_not_at_all_are_found():
    """LoRA layers from other code than PEFT's current one: ``active_adapter`` (one name) where ``active_adapters``
    is missing, and ``"default"`` where neither is set."""
    from randopt.lorasqueeze.training import lora_pairs

    class Layer(torch.nn.Module):
        def __init__(self, adapter):
            super().__init__()
            self.base_layer = torch.nn.Linear(6, 5)
            self.lora_A = torch.nn.ModuleDict({adapter: torch.nn.Linear(6, 2, bias=False)})
            self.lora_B = torch.nn.ModuleDict({adapter: torch.nn.Linear(2, 5, bias=False)})
            self.r, self.lora_alpha, self.scaling = {adapter: 2}, {adapter: 4}, {adapter: 2.0}

    named = Layer("mine")
    named.active_adapter = "mine"
    model = torch.nn.ModuleDict({"named": named, "unnamed": Layer("default")})
    assert sorted((pair.name, pair.adapter) for pair in lora_pairs(model)) == [("named", "mine"),
                                                                              ("unnamed", "default")]


def test_lr_times_weight_decay_above_1_is_refused_in_full_mode_only():
    """Full mode decays W by ``sqrt(1 - lr * wd)`` per factor, which needs ``lr * wd <= 1``; efficient mode's plain
    AdamW decay does not."""
    from randopt.optim.lorapro_adamw import lorapro_groups

    def pair():
        return torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(5, 2))

    with pytest.raises(ValueError, match=r"lr \* weight_decay must be <= 1 in full mode"):
        randopt.LoRAProAdamW(lorapro_groups([(*pair(), 2.0)]), lr=2.0, weight_decay=1.0, mode="full")
    randopt.LoRAProAdamW(lorapro_groups([(*pair(), 2.0)]), lr=2.0, weight_decay=1.0, mode="efficient")


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_under_zero_a_pair_with_a_nonfinite_gradient_is_skipped_and_counted(mode):
    from test_step_guarantees import LoRAProRun, same, zero_gradients

    run = LoRAProRun("zero", mode, "fp32")
    run.set_gradients(0)
    run.step()
    run.set_gradients(1)
    run.params["A0"].grad[0, 0] = float("nan")
    zero_gradients(run.optimizer)
    before = {name: run.unit(name) for name in ("pair0", "pair1")}
    run.step()
    assert run.optimizer.skipped_steps == {"pair0": 1, "pair1": 0}
    after = run.unit("pair0")
    assert all(torch.equal(after[k], before["pair0"][k]) for k in ("A0", "B0"))
    assert not same(run.unit("pair1"), before["pair1"]), "the other pair steps"


def test_under_zero_the_pairs_of_earlier_calls_get_their_low_precision_copies_rewritten():
    """DeepSpeed copies a partition to its low-precision parameters right after the ``step()`` call that carried it;
    a pair is stepped in the real step's last call, so the copies of factors carried by earlier calls are rewritten
    by the optimizer (here the parameters themselves play the copies)."""
    from test_step_guarantees import LoRAProRun

    for mode in ("full", "efficient"):
        run = LoRAProRun("zero", mode, "fp32")
        run.set_gradients(0)
        run.step()  # pair0 is carried by the first of three calls
        for name in ("A0", "B0"):
            assert torch.equal(run.params[name].data, run.masters[name]), (mode, name)


def test_under_zero_a_ranks_state_without_the_moments_of_pairs_it_does_not_own_loads(second_rank):
    """Full mode keeps pair i's moments on rank i % world: rank 0 of 2 saves pair 1 without them, and loads that."""
    from test_step_guarantees import LoRAProRun

    second_rank["sends"] = torch.zeros_like
    run = LoRAProRun("zero", "full", "fp32")
    run.set_gradients(0)
    run.step()
    saved = run.optimizer.state_dict()
    resumed = LoRAProRun("zero", "full", "fp32")
    resumed.optimizer.load_state_dict(saved)
    assert {k for k in resumed.unit("pair1") if "exp_avg" in k} == set()
    assert resumed.unit("pair1")["A1.step"] == 1 and "A0.w_exp_avg" in resumed.unit("pair0")


def test_loading_a_state_dict_in_the_middle_of_a_zero_real_step_starts_a_new_one():
    """A real step interrupted after its first ``step()`` call (DeepSpeed shows one group per call), then a
    checkpoint loaded: the next real step starts afresh and steps exactly like one from that checkpoint."""
    from test_step_guarantees import LoRAProRun, same

    runs = [LoRAProRun("zero", "full", "fp32") for _ in range(2)]
    for run in runs:
        run.set_gradients(0)
        run.step()
    saved = runs[0].optimizer.state_dict()
    interrupted, reference = runs
    interrupted.set_gradients(1)
    groups = interrupted.optimizer.param_groups
    interrupted.optimizer.param_groups = [groups[0]]
    try:
        interrupted.optimizer.step()  # the first call only
    finally:
        interrupted.optimizer.param_groups = groups
    for run in runs:
        run.optimizer.load_state_dict(saved)
        run.set_gradients(1)
        run.step()
    assert all(same(interrupted.unit(name), reference.unit(name)) for name in ("pair0", "pair1"))


def test_adamw_results_of_no_parameters_are_empty():
    from randopt.optim.functional import adamw_results

    assert adamw_results([], [], [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.01) == ([], [], [])


def test_randlora_adamw_checkpoint_after_in_squeeze_records_the_squeezed_shapes_and_loads():
    """In-Squeeze replaces LoRA factors by smaller ones: the optimizer's checkpoint records the new shapes, so it
    loads into an optimizer over the squeezed model (it used to keep the pre-squeeze shapes and be refused)."""
    from randopt.lorasqueeze import squeeze_in_training

    model = lora_llama()
    factors = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    opt = randopt.RandLoRAAdamW(factors(), rank=None, lr=1e-2)  # plain AdamW on the LoRA factors
    train(model, opt, 2)
    squeeze_in_training(model, opt, rank=1)
    train(model, opt, 1)
    saved = opt.state_dict()
    assert saved["param_shapes"] == [list(p.shape) for p in factors()]
    randopt.RandLoRAAdamW(factors(), rank=None, lr=1e-2).load_state_dict(saved)
