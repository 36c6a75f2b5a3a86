"""DeepSpeed: RandLoRAAdamW and LoRAProAdamW under ZeRO 1/2/3 in real 2-rank runs (one torchrun launch), and the
config plugin."""
import json
import os
from pathlib import Path

import pytest
import torch

import randopt
from conftest import LLAMA_TARGETS, tiny_llama
from distributed import run_distributed
from randopt.integrations import deepspeed as plugin

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-compiles a comm op on its first initialize (35-105 s): build it once, in the project's cache
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
STEPS, RESUME_AT = 5, 3


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    run_distributed("deepspeed_zero.py", out, timeout=900)
    return torch.load(out / "results.pt", weights_only=False)


def split_matrices(fragments) -> list[str]:
    """Matrices whose rows a partition boundary cuts: both ranks own part of them, one part starts or ends mid-row."""
    by_name = {}
    for rank_fragments in fragments:
        for name, numel, cols, start, count in rank_fragments:
            by_name.setdefault(name, []).append((numel, cols, start, count))
    split = []
    for name, parts in by_name.items():
        owned = [(s, c) for numel, cols, s, c in parts if c]
        numel, cols = parts[0][:2]
        if len(owned) == 2 and sum(c for _, c in owned) == numel and any(s % cols or (s + c) % cols for s, c in owned):
            split.append(name)
    return split


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3"])
def test_zero_stage_equals_single_process_on_global_batch(zero_runs, case):
    run = zero_runs[case]
    assert run["optimizer_class"] == "RandLoRAAdamW"
    assert split_matrices(run["fragments"]), "the test model must put a partition boundary inside a matrix's row"
    assert_matches_reference(run)
    # DeepSpeed stepped the optimizer once per group (or sub-group); it ran once per real step, and communicated
    # one flat all-reduce of exactly the coefficient gradients per step: no full-size gradient or weight
    assert run["step_calls"] > STEPS
    assert run["communicated"] == {"all_reduces": STEPS, "bytes": STEPS * run["coefficient_bytes"]}


@pytest.mark.distributed
def test_zero2_ran_gradient_accumulation_and_clipping(zero_runs):
    run = zero_runs["zero2"]
    assert any(start % cols for r in run["fragments"] for _, _, cols, start, count in r if count), \
        "the Conv1D (fan_in_fan_out) matrix must be cut mid-row"
    assert max(run["reference_grad_norms"]) > 0.5, "clipping at 0.5 must have clipped"


@pytest.mark.distributed
def test_zero3_checkpoint_resume_is_exact(zero_runs):
    run = zero_runs["zero3"]
    assert run["state_restored"], "load_checkpoint must restore the optimizer state saved by save_checkpoint"
    assert run["resumed_losses"] == run["losses"][RESUME_AT:]
    for name, value in run["weights"].items():
        assert torch.equal(run["resumed_weights"][name], value), name


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["zero1_bf16", "zero3_bf16"])
def test_bf16_trains_like_fp32(zero_runs, case):
    """bf16 models with fp32 master weights (ZeRO-1 through DeepSpeed's BF16 optimizer, ZeRO-3 with sub-groups,
    gradient accumulation and clipping): same coefficient traffic, low-precision weights in sync, losses close."""
    run = zero_runs[case]
    assert run["low_precision_matches_master"]
    assert run["communicated"] == {"all_reduces": STEPS, "bytes": STEPS * run["coefficient_bytes"]}
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(run["reference_losses"]), rtol=0, atol=5e-3)



def assert_matches_reference(run):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(run["reference_losses"]), rtol=1e-5, atol=0)
    assert run["weights"].keys() == run["reference_weights"].keys()
    for name, expected in run["reference_weights"].items():
        torch.testing.assert_close(run["weights"][name], expected, rtol=1e-5, atol=1e-5, msg=name)
    assert run["low_precision_matches_master"], "a fragment written after DeepSpeed copied it was not re-synced"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["lorapro_zero1_full", "lorapro_zero2_efficient", "lorapro_zero3_full"])
def test_lorapro_zero_stage_equals_single_process_on_global_batch(zero_runs, case):
    """Every LoRA pair assembled whole although a partition boundary cuts a factor mid-row; trained factors and the
    base weights (full mode decays W0) equal the single-process run; the traffic is the factor weights and
    gradients (plus, in full mode, the adjusted updates) once per real step, never an m x n matrix."""
    run = zero_runs[case]
    assert run["optimizer_class"] == "LoRAProAdamW"
    assert any(".lora_" in name for name in split_matrices(run["fragments"])), "a LoRA factor must be cut mid-row"
    assert any(name.endswith("base_layer.weight") for name in run["weights"])
    assert_matches_reference(run)
    assert run["skipped"] == 0
    full = case.endswith("_full")
    per_step = (3 if full else 2) * run["factor_bytes"]
    assert run["communicated"] == {"all_reduces": STEPS * (2 if full else 1), "bytes": STEPS * per_step}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["lorapro_zero1_full", "lorapro_zero3_full"])
def test_lorapro_full_mode_moments_are_sharded_by_layer(zero_runs, case):
    run = zero_runs[case]
    per_rank = [set(names) for names in run["full_moments_of"]]
    assert all(per_rank), "each rank keeps the m x n moments of some pairs"
    assert not per_rank[0] & per_rank[1], "no pair's moments are kept twice"
    assert per_rank[0] | per_rank[1] == set(run["pair_names"])


@pytest.mark.distributed
def test_lorapro_checkpoint_resume_is_exact(zero_runs):
    run = zero_runs["lorapro_zero1_full"]
    assert run["state_restored"]
    assert run["resumed_losses"] == run["losses"][RESUME_AT:]
    for name, value in run["weights"].items():
        assert torch.equal(run["resumed_weights"][name], value), name

@pytest.mark.distributed
def test_trainer_factory_trains_under_deepspeed(zero_runs):
    """Trainer(optimizer_cls_and_kwargs=randopt_optimizer(...)) with TrainingArguments(deepspeed=ZeRO-2): DeepSpeed
    steps our optimizer (not transformers' AdamW), which communicates its coefficients once per step it runs. The
    second step's loss is NaN: the engine skips it without calling the optimizer, and RandoptCallback (attached)
    counts it as randopt/engine_skipped_steps from that step on."""
    run = zero_runs["trainer"]["factory_training"]
    assert run["optimizer"] == run["deepspeed_optimizer"] == "RandLoRAAdamW"
    assert run["steps"] == 3 and run["changed"]
    assert run["engine_skipped_steps"] == 1 and run["coefficient_all_reduces"] == 2
    assert [h["randopt/engine_skipped_steps"] for h in run["logged"]] == [0.0, 1.0, 1.0]
    assert all(h["randopt/nonfinite_skips"] == 0.0 for h in run["logged"])


@pytest.mark.distributed
def test_trainer_check_flags_the_dropped_optimizer(zero_runs):
    outcomes = zero_runs["trainer"]
    assert "drops the optimizer passed as Trainer(optimizers=" in outcomes["optimizers_argument"]
    assert outcomes["create_optimizer"] is None


# ----- the config plugin (no DeepSpeed run needed) -------------------------------------------------------------
def config_with(**block):
    base = {"optimizer": "RandLoRAAdamW", "params": {"lr": 1e-3, "rank": 4}, "target_modules": ["q_proj", "v_proj"]}
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "randopt": {**base, **block}}


@pytest.mark.parametrize("as_path", [False, True], ids=["dict", "json-path"])
def test_config_block_builds_the_optimizer(tmp_path, as_path):
    model = tiny_llama()
    config = config_with(params={"lr": 2e-3, "rank": 4, "alpha": 8.0, "weight_decay": 0.0},
                         modules_to_save=["lm_head"], plain_lr=1e-2)
    source = config
    if as_path:
        source = tmp_path / "ds.json"
        source.write_text(json.dumps(config))
    optimizer, ds_config = plugin.optimizer_from_config(model, source)
    assert isinstance(optimizer, randopt.RandLoRAAdamW)
    randlora, plain = optimizer.param_groups
    targets = {id(m.weight) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    assert {id(p) for p in randlora["params"]} == targets
    assert randlora["rank"] == 4 and randlora["alpha"] == 8.0 and randlora["lr"] == 2e-3
    assert plain["rank"] is None and plain["lr"] == 1e-2
    assert {id(p) for p in plain["params"]} == {id(model.lm_head.weight)}
    assert not model.model.embed_tokens.weight.requires_grad, "outside targets and modules_to_save all is frozen"
    assert "randopt" not in ds_config and ds_config["zero_allow_untested_optimizer"] is True
    assert "randopt" in config, "the caller's config is left as it was"


@pytest.mark.parametrize("change,match", [
    ({"optimizer": "AdamW"}, "must be one of"),
    ({"params": {"lr": 1e-3, "rnak": 4}}, r"unknown parameter\(s\) \['rnak'\] for RandLoRAAdamW"),
    ({"params": {"rank": 4, "fused_backward": True}}, "cannot be used under DeepSpeed"),
    ({"target_modules": ["query_proj"]}, "matched no module"),
    ({"target_modules": None}, "target_modules must be"),
    ({"targets": ["q_proj"]}, r"unknown key\(s\) \['targets'\]"),
])
def test_bad_config_block_fails_before_deepspeed_starts(monkeypatch, change, match):
    deepspeed = pytest.importorskip("deepspeed")
    started = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: started.append(kwargs))
    config = config_with(**change)
    with pytest.raises(ValueError, match=match):
        plugin.initialize(model=tiny_llama(), config=config)
    assert not started


def test_config_block_builds_lorapro_on_a_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS))
    config = {"zero_optimization": {"stage": 3},
              "randopt": {"optimizer": "LoRAProAdamW", "params": {"lr": 1e-3, "mode": "efficient"}}}
    optimizer, ds_config = plugin.optimizer_from_config(model, config)
    assert isinstance(optimizer, randopt.LoRAProAdamW)
    pairs = [g for g in optimizer.param_groups if g["lora_scale"] is not None]
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(pairs) == len(lora_layers) > 0 and all(g["mode"] == "efficient" and g["lr"] == 1e-3 for g in pairs)
    assert ds_config["zero_allow_untested_optimizer"] is True
    with pytest.raises(ValueError, match="target_modules.*not used by LoRAProAdamW"):
        plugin.optimizer_from_config(model, {"randopt": {**config["randopt"], "target_modules": ["q_proj"]}})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rank'\] for LoRAProAdamW"):
        plugin.optimizer_from_config(model, {"randopt": {"optimizer": "LoRAProAdamW", "params": {"rank": 8}}})
    with pytest.raises(ValueError, match="no LoRA layers found"):
        plugin.optimizer_from_config(tiny_llama(), {"randopt": {"optimizer": "LoRAProAdamW"}})


def test_config_conflicts_are_refused():
    model = tiny_llama()
    config = config_with()
    del config["randopt"]["target_modules"]
    with pytest.raises(ValueError, match='needs "target_modules"'):
        plugin.optimizer_from_config(model, config)
    with pytest.raises(ValueError, match='both an "optimizer" block and a "randopt" block'):
        plugin.optimizer_from_config(model, {**config_with(), "optimizer": {"type": "AdamW"}})
    offload = config_with()
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_optimizer is not supported"):
        plugin.optimizer_from_config(model, offload)


def test_initialize_hands_the_optimizer_to_deepspeed(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    seen = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: seen.update(kwargs) or ("engine", None, None, None))
    model = tiny_llama()
    assert plugin.initialize(model=model, config=config_with())[0] == "engine"
    assert isinstance(seen["optimizer"], randopt.RandLoRAAdamW) and seen["model"] is model
    assert "randopt" not in seen["config"]
    with pytest.raises(ValueError, match="not both"):
        plugin.initialize(model=model, config=config_with(), optimizer=seen["optimizer"])


class FakeArgs:
    def __init__(self, deepspeed=None):
        self.deepspeed = deepspeed


class FakeTrainer:
    def __init__(self, deepspeed=None, optimizer=None):
        self.args, self.optimizer = FakeArgs(deepspeed), optimizer
        self.is_deepspeed_enabled = deepspeed is not None


def test_trainer_check_without_deepspeed_or_with_a_randopt_block():
    optimizer = randopt.RandLoRAAdamW(randopt.param_groups(tiny_llama(), LLAMA_TARGETS, rank=4), rank=4)
    plugin.check_trainer_optimizer(FakeTrainer(optimizer=optimizer))  # no DeepSpeed: optimizers= is honoured
    plugin.check_trainer_optimizer(FakeTrainer(deepspeed={"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="drops the optimizer"):
        plugin.check_trainer_optimizer(FakeTrainer(deepspeed={"zero_optimization": {"stage": 2}},
                                                   optimizer=optimizer))
    with pytest.raises(ValueError, match='"randopt" block, which the Trainer does not read'):
        plugin.check_trainer_optimizer(FakeTrainer(deepspeed=config_with()))
