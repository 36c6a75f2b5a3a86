"""Tests written for bugs that a mutation run put into the library and the rest of the suite let through
(issue 13, item 8; benchmarks/mutation.py finds more): each test fails on that deliberate bug."""
import copy
import types
import warnings

import pytest
import torch

import randopt
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
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from randopt.optim.state import init_moment

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        like = distribute_tensor(torch.zeros(64, 64), init_device_mesh("cpu", (1,)), [Shard(0)])  # 4096 elements
        state = {}
        init_moment(state, "exp_avg", like, "fp32")
        init_moment(state, "exp_avg_sq", like, "bf16")
        for name, dtype in (("exp_avg", torch.float32), ("exp_avg_sq", torch.float32)):
            assert state[name].placements == like.placements and state[name].shape == like.shape
            assert state[name].to_local().dtype == dtype
        with pytest.raises(ValueError, match="not supported for DTensor"):
            init_moment({}, "exp_avg", like, "8bit")
    finally:
        dist.destroy_process_group()
