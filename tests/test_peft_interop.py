"""PEFT RandLora adapters out of and into RandLoRAAdamW (randopt.integrations.peft), checked against PEFT 0.21."""
import ast
import copy
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import randopt
import randopt.integrations.peft as interop
from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt.integrations.peft import base_weights_from, export_randlora_adapter, load_randlora_adapter
from randopt.randlora import merge_randlora, randlora_layers, unload_randlora
from test_randlora_adamw import batches, only_targets_trainable, train

peft = pytest.importorskip("peft")

RANK, ALPHA, LR, WD = 3, 5.0, 1e-2, 0.1
MODELS = {"gpt2-conv1d": (tiny_gpt2, GPT2_TARGETS), "llama-linear": (tiny_llama, LLAMA_TARGETS)}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def base_model(name, dtype=torch.float64):
    make, targets = MODELS[name]
    return only_targets_trainable(make(dtype), targets)


def optimizer_for(model, name, **options):
    groups = randopt.param_groups(model, MODELS[name][1], rank=RANK, alpha=ALPHA, **options)
    return randopt.RandLoRAAdamW(groups, lr=LR, weight_decay=WD)


def trained(name, dtype=torch.float64, steps=4, **options):
    model = base_model(name, dtype)
    opt = optimizer_for(model, name, **options)
    train(model, opt, batches(steps))
    return model, opt


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def load_in_peft(base, adapter_dir, **kwargs):
    """``PeftModel.from_pretrained``; also returns the keys PEFT reported missing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir, **kwargs)
    missing = []
    for w in caught:
        message = str(w.message)
        if "Found missing adapter keys" in message:
            missing += ast.literal_eval(message[message.index("["): message.rindex("]") + 1])
    return model, missing


def read_adapter(adapter_dir):
    with open(os.path.join(adapter_dir, CONFIG)) as f:
        config = json.load(f)
    with safe_open(os.path.join(adapter_dir, WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return config, tensors, metadata


def rewrite_weights(adapter_dir, change_tensors=None, change_metadata=None):
    config, tensors, metadata = read_adapter(adapter_dir)
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        randopt_meta = json.loads(metadata["randopt"])
        change_metadata(randopt_meta)
        metadata["randopt"] = json.dumps(randopt_meta)
    save_file(tensors, os.path.join(adapter_dir, WEIGHTS), metadata=metadata)


def size(adapter_dir):
    return os.path.getsize(os.path.join(adapter_dir, WEIGHTS))


# ----- export: PEFT loads it and reproduces the fine-tuned model --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_peft_loads_export_and_reproduces_finetuned_outputs(name, dtype, tokens, tmp_path):
    model, opt = trained(name, dtype)
    out = export_randlora_adapter(model, opt, tmp_path / "adapter")
    config, tensors, _ = read_adapter(out)

    module_names = [n for n, m in model.named_modules() if any(n.endswith("." + t) for t in MODELS[name][1])]
    bases_keys = sorted(k for k in tensors if k.endswith(("randlora_A", "randlora_B")))
    assert bases_keys == ["base_model.randlora_A", "base_model.randlora_B"], "bases must be stored once"
    assert sorted(tensors) == sorted(bases_keys + [f"base_model.model.{n}.randlora_{c}" for n in module_names
                                                   for c in ("lambda", "gamma")])
    key = (RANK, 0, "dense")
    torch.testing.assert_close(tensors["base_model.randlora_A"], opt._bases[key].A, rtol=0, atol=0)
    assert config["peft_type"] == "RANDLORA" and config["r"] == RANK and config["randlora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted(module_names)
    assert config["fan_in_fan_out"] is (name == "gpt2-conv1d")
    assert config["save_projection"] is True and not config["sparse"] and not config["very_sparse"]

    original = base_model(name, dtype)
    loaded, missing = load_in_peft(original, out)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=tol, atol=tol)
    # PEFT 0.21 reports each layer's reference to the shared bases as missing: a false positive
    assert missing and all(k.endswith((".randlora_A.default", ".randlora_B.default")) for k in missing)
    assert "base_model.randlora_A.default" not in missing

    # W0 recovered from the fine-tuned model and the optimizer is the original base model
    recovered = base_weights_from(model, opt)
    reference = base_model(name, dtype).state_dict()
    assert sorted(recovered) == sorted(f"{n}.weight" for n in module_names)
    for k, w0 in recovered.items():
        torch.testing.assert_close(w0, reference[k], rtol=0, atol=tol / 10)

    # PEFT's own save of the same adapter holds the bases once per layer too
    loaded.save_pretrained(tmp_path / "peft")
    _, peft_tensors, _ = read_adapter(tmp_path / "peft")
    assert sum(k.endswith(("randlora_A", "randlora_B")) for k in peft_tensors) == 2 * (len(module_names) + 1)
    assert size(tmp_path / "peft") > 5 * size(out)


@pytest.mark.parametrize("kind", ["very_sparse"])  # "sparse": test_adapter_without_bases_regenerates_and_checks_them
def test_sparse_bases_round_trip_through_peft(kind, tokens, tmp_path):
    model, opt = trained("llama-linear", basis_kind=kind, seed=5)
    config, _, _ = read_adapter(export_randlora_adapter(model, opt, tmp_path / "a"))
    assert config[kind] is True and config["projection_prng_key"] == 5
    loaded, _ = load_in_peft(base_model("llama-linear"), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)
    imported = base_model("llama-linear")
    adapter = load_randlora_adapter(imported, tmp_path / "a")
    assert (adapter.basis_kind, adapter.seed) == (kind, 5)
    torch.testing.assert_close(logits(imported, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)


# ----- import: continue training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_import_and_resume_follows_the_uninterrupted_run(name, tmp_path):
    data = batches(7)
    model, opt = trained(name, steps=4)
    checkpoint = copy.deepcopy(opt.state_dict())
    export_randlora_adapter(model, opt, tmp_path / "adapter")
    expected = train(model, opt, data[4:])

    resumed = base_model(name)  # the original pre-trained weights
    adapter = load_randlora_adapter(resumed, tmp_path / "adapter")
    resumed_opt = randopt.RandLoRAAdamW(adapter.param_groups(resumed), lr=LR, weight_decay=WD)
    adapter.install(resumed_opt)
    for index, p in enumerate(p for g in resumed_opt.param_groups for p in g["params"]):
        state = resumed_opt.state[p]
        assert torch.equal(state["lambda"], checkpoint["state"][index]["lambda"])
        assert torch.equal(state["gamma"], checkpoint["state"][index]["gamma"])
        assert torch.equal(state["bases_fingerprint"], checkpoint["state"][index]["bases_fingerprint"])
        assert state["step"].item() == 0 and not state["lambda_exp_avg"].any()
    export_randlora_adapter(resumed, resumed_opt, tmp_path / "again")
    first, again = read_adapter(tmp_path / "adapter"), read_adapter(tmp_path / "again")
    assert first[0] == again[0] and first[1].keys() == again[1].keys()
    assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])
    resumed_opt.load_state_dict(checkpoint)  # the moments; the bases fingerprint must match
    got = train(resumed, resumed_opt, data[4:])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-10, atol=0)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_adapter_saved_by_peft_continues_like_peft(name, tokens, tmp_path):
    """An adapter PEFT made (bases once per layer too): imported, it gives PEFT's outputs, and RandLoRAAdamW
    continues from it exactly as AdamW on the reloaded PeftModel does (fresh moments on both sides)."""
    make, targets = MODELS[name]
    config = peft.RandLoraConfig(r=RANK, randlora_alpha=ALPHA, target_modules=targets, init_weights=False,
                                 fan_in_fan_out=name == "gpt2-conv1d")
    made = peft.get_peft_model(make(torch.float64), config)
    made.save_pretrained(tmp_path / "peft")

    ours = base_model(name)
    opt = optimizer_for(ours, name)
    adapter = load_randlora_adapter(ours, tmp_path / "peft", optimizer=opt)
    assert adapter.rank == RANK and adapter.alpha == ALPHA and len(adapter.module_names) == 8
    torch.testing.assert_close(logits(ours, tokens), logits(made, tokens), rtol=1e-10, atol=1e-10)

    theirs, _ = load_in_peft(make(torch.float64), tmp_path / "peft", is_trainable=True)
    theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    data = batches(4)
    expected = train(theirs, theirs_opt, data)
    got = train(ours, opt, data)
    assert max(expected) - min(expected) > 1e-3, "the losses must move for the comparison to mean anything"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-8, atol=0)
    for module_name in adapter.module_names:
        layer = theirs.get_submodule(f"base_model.model.{module_name}")
        merged = layer.base_layer.weight + layer.get_delta_weight("default")
        torch.testing.assert_close(ours.get_submodule(module_name).weight, merged, rtol=1e-8, atol=1e-10)


def test_adapter_without_bases_regenerates_and_checks_them(tokens, tmp_path):
    model, opt = trained("gpt2-conv1d", seed=7, basis_kind="sparse")
    out = export_randlora_adapter(model, opt, tmp_path / "adapter", save_bases=False)
    config, tensors, _ = read_adapter(out)
    assert config["save_projection"] is False and config["projection_prng_key"] == 7 and config["sparse"]
    assert not any(k.endswith(("randlora_A", "randlora_B")) for k in tensors)
    with_bases = export_randlora_adapter(model, opt, tmp_path / "with_bases")
    assert size(out) < size(with_bases) / 2

    imported = base_model("gpt2-conv1d")
    imported_opt = optimizer_for(imported, "gpt2-conv1d", seed=7, basis_kind="sparse")
    load_randlora_adapter(imported, out, optimizer=imported_opt)
    torch.testing.assert_close(logits(imported, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)
    fingerprint = opt._bases[(RANK, 7, "sparse")].fingerprint
    assert imported_opt._bases[(RANK, 7, "sparse")].fingerprint == fingerprint
    assert all(torch.equal(s["bases_fingerprint"], opt._bases[(RANK, 7, "sparse")].fingerprint_tensor())
               for s in imported_opt.state.values())

    rewrite_weights(out, change_metadata=lambda meta: meta.update(bases_fingerprint="0" * 32))
    assert_refused(out, "gpt2-conv1d", "fingerprint mismatch", seed=7, basis_kind="sparse")


# ----- bad input: clear errors, nothing changed ---------------------------------------------------------------------
def assert_refused(adapter_dir, name, match, model=None, opt=None, **options):
    model = base_model(name) if model is None else model
    opt = optimizer_for(model, name, **options) if opt is None else opt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprints = {k: b.fingerprint for k, b in opt._bases.items()}
    states = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=match):
        load_randlora_adapter(model, adapter_dir, optimizer=opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed import"
    assert {k: b.fingerprint for k, b in opt._bases.items()} == fingerprints
    assert opt.state.keys() == states.keys()
    for p, s in states.items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, opt = trained("llama-linear", steps=2)
    return export_randlora_adapter(model, opt, tmp_path_factory.mktemp("exported") / "adapter")


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def overwrite(path, offset, payload):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        f.write(payload)


def set_config(adapter_dir, **changes):
    path = os.path.join(adapter_dir, CONFIG)
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


BAD_FILES = {
    "truncated": (lambda d: truncate(os.path.join(d, WEIGHTS)), "not a readable safetensors file"),
    "garbage-header": (lambda d: overwrite(os.path.join(d, WEIGHTS), 8, b"\xff" * 32),
                       "not a readable safetensors file"),
    "flipped-data": (lambda d: overwrite(os.path.join(d, WEIGHTS), -100, b"\x7f\x7f\x7f\x7f"), "checksum"),
    "no-weights": (lambda d: os.remove(os.path.join(d, WEIGHTS)), "has no adapter_model.safetensors"),
    "config-truncated": (lambda d: truncate(os.path.join(d, CONFIG)), "not valid JSON"),
    "not-randlora": (lambda d: set_config(d, peft_type="LORA"), "'LORA' adapter, not a RandLora"),
    "bad-rank": (lambda d: set_config(d, r=0), "r must be a positive integer"),
    "targets-do-not-match": (lambda d: set_config(d, target_modules=LLAMA_TARGETS + ["k_proj"]),
                             r"select the model's layers \['model.layers.0.self_attn.k_proj'"),
    "other-bases": (lambda d: replace_bases(d), "fingerprint mismatch"),
    "nan-in-peft-file": (lambda d: rewrite_peft_style(d, nan=True), "non-finite"),
    "extra-tensors": (lambda d: rewrite_peft_style(d, extra=True), "not RandLora coefficients or bases"),
}


def replace_bases(adapter_dir):
    """Other bases in an otherwise consistent file (checksum updated): only the fingerprint can tell."""
    _, tensors, metadata = read_adapter(adapter_dir)
    tensors["base_model.randlora_B"].neg_()
    meta = json.loads(metadata["randopt"])
    meta["tensors_sha256"] = interop._checksum(tensors)
    save_file(tensors, os.path.join(adapter_dir, WEIGHTS), metadata={**metadata, "randopt": json.dumps(meta)})


def rewrite_peft_style(adapter_dir, nan=False, extra=False):
    """As PEFT would save it: no randopt metadata."""
    _, tensors, _ = read_adapter(adapter_dir)
    if nan:
        tensors["base_model.model.model.layers.0.self_attn.q_proj.randlora_gamma"][0, 0] = float("nan")
    if extra:
        tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(16)
    save_file(tensors, os.path.join(adapter_dir, WEIGHTS), metadata={"format": "pt"})


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_files_are_refused_and_nothing_changes(case, exported, tmp_path):
    adapter_dir = shutil.copytree(exported, tmp_path / "adapter")
    corrupt, match = BAD_FILES[case]
    corrupt(adapter_dir)
    assert_refused(adapter_dir, "llama-linear", match)


def llama_variant(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=40, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    model = LlamaForCausalLM(LlamaConfig(**{**config, **changes})).to(torch.float64)
    return only_targets_trainable(model, LLAMA_TARGETS)


def test_adapter_for_another_model_is_refused(exported):
    assert_refused(exported, "gpt2-conv1d", r"target modules \['model.layers.0.mlp.down_proj'.* not in the model",
                   model=only_targets_trainable(tiny_gpt2(), LLAMA_TARGETS + GPT2_TARGETS))
    assert_refused(exported, "llama-linear", r"q_proj: the adapter has lambda \(3, 6\) and gamma \(6, 16\), but the "
                   r"model's layer \(out=24, in=24\) with r=3 needs lambda \(3, 8\)",
                   model=llama_variant(hidden_size=24))
    assert_refused(exported, "llama-linear", r"gate_proj: the adapter's bases cover .* \(out=48, in=16\)",
                   model=llama_variant(intermediate_size=48))


def test_optimizer_that_cannot_continue_the_adapter_is_refused(exported):
    model = base_model("llama-linear")
    other_rank = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=4, alpha=ALPHA), lr=LR)
    assert_refused(exported, "llama-linear", "rank=4", model=model, opt=other_rank)
    other_alpha = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=RANK), lr=LR)
    assert_refused(exported, "llama-linear", "scale=20", model=model, opt=other_alpha)
    stepped = optimizer_for(model, "llama-linear")
    train(model, stepped, batches(1))
    assert_refused(exported, "llama-linear", "already has state", model=model, opt=stepped)
    partial = randopt.RandLoRAAdamW(randopt.param_groups(model, ["q_proj"], rank=RANK, alpha=ALPHA), lr=LR)
    assert_refused(exported, "llama-linear", "v_proj is not in a RandLoRA parameter group", model=model, opt=partial)


# ----- export details -----------------------------------------------------------------------------------------------
def test_export_is_atomic(tmp_path, monkeypatch):
    model, opt = trained("llama-linear", steps=1)
    out = tmp_path / "adapter"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(interop, "save_file", disk_full)
        with pytest.raises(OSError, match="disk full"):
            export_randlora_adapter(model, opt, out)
    assert os.listdir(tmp_path) == [], "nothing half-written, no temporary directory left"

    export_randlora_adapter(model, opt, out)
    previous = {n: open(out / n, "rb").read() for n in os.listdir(out)}
    train(model, opt, batches(1))
    with monkeypatch.context() as patched:
        patched.setattr(interop, "save_file", disk_full)
        with pytest.raises(OSError):
            export_randlora_adapter(model, opt, out)
    assert {n: open(out / n, "rb").read() for n in os.listdir(out)} == previous
    assert os.listdir(tmp_path) == ["adapter"]

    export_randlora_adapter(model, opt, out)  # replaces the adapter's files
    assert open(out / WEIGHTS, "rb").read() != previous[WEIGHTS] and os.listdir(tmp_path) == ["adapter"]
    (out / "notes.txt").write_text("mine")
    export_randlora_adapter(model, opt, out)
    assert (out / "notes.txt").read_text() == "mine", "files we do not write survive an export"
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an adapter directory"):
        export_randlora_adapter(model, opt, tmp_path / "precious")
    assert os.listdir(tmp_path / "precious") == ["notes.txt"]


def test_export_needs_one_rank_alpha_seed_and_kind(tmp_path):
    model = base_model("llama-linear")
    groups = [g for targets, rank in ((["q_proj", "v_proj"], RANK), (["gate_proj"], 4))
              for g in randopt.param_groups(model, targets, rank=rank, alpha=ALPHA, train_rest=True)
              if g["rank"] is not None]
    opt = randopt.RandLoRAAdamW(groups, lr=LR)
    train(model, opt, batches(1))
    with pytest.raises(ValueError, match="one rank, alpha, seed and basis kind"):
        export_randlora_adapter(model, opt, tmp_path / "a")
    with pytest.raises(ValueError, match=r"module_names \['lm_head'\] are not layers"):
        export_randlora_adapter(model, opt, tmp_path / "a", module_names=["lm_head"])
    assert not os.path.exists(tmp_path / "a")
    names = [n for n, _ in model.named_modules() if n.endswith("gate_proj")]
    config, tensors, _ = read_adapter(export_randlora_adapter(model, opt, tmp_path / "a", module_names=names))
    assert config["r"] == 4 and sorted(config["target_modules"]) == names
    assert tensors["base_model.randlora_B"].shape == (40, 4, 4)  # sliced to gate_proj (out=40, in=16)


def test_export_warns_about_trained_parameters_an_adapter_cannot_hold(tmp_path):
    model = tiny_llama()
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA), lr=LR)
    train(model, opt, batches(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # by default only the targets train: the adapter holds all of it
        export_randlora_adapter(model, opt, tmp_path / "quiet")
    model = tiny_llama()
    opt = randopt.RandLoRAAdamW(randopt.param_groups(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA, train_rest=True),
                                lr=LR)
    train(model, opt, batches(1))
    with pytest.warns(UserWarning, match="not RandLoRA matrices"):
        export_randlora_adapter(model, opt, tmp_path / "a")


# ----- the module route (inject_randlora): export, load and merge without an optimizer ---------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_module_route_exports_without_an_optimizer(name, tokens, tmp_path):
    make, targets = MODELS[name]
    model = randopt.inject_randlora(make(), targets, rank=RANK, alpha=ALPHA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    train(model, opt, batches(3))
    out = export_randlora_adapter(model, out_dir=tmp_path / "adapter")
    config, tensors, _ = read_adapter(out)
    assert config["r"] == RANK and config["randlora_alpha"] == ALPHA
    assert len([k for k in tensors if k.endswith("randlora_lambda")]) == len(randlora_layers(model))

    loaded, _ = load_in_peft(make(), out)
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)
    plain = make()
    load_randlora_adapter(plain, out)  # randopt's loader merges it into a plain model
    torch.testing.assert_close(logits(plain, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)
    merged = unload_randlora(copy.deepcopy(model))  # merge and unload: a plain model again
    assert not randlora_layers(merged)
    torch.testing.assert_close(logits(merged, tokens), logits(model, tokens), rtol=1e-10, atol=1e-10)


def test_module_route_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="no RandLoRALinear layer"):
        export_randlora_adapter(tiny_llama(), out_dir=tmp_path / "a")
    model = randopt.inject_randlora(tiny_llama(), ["q_proj"], rank=RANK)
    randopt.inject_randlora(model, ["v_proj"], rank=4)
    with pytest.raises(ValueError, match="one rank, alpha, seed and basis kind"):
        export_randlora_adapter(model, out_dir=tmp_path / "a")
    names = [n for n, _ in randlora_layers(model) if n.endswith("v_proj")]
    config, _, _ = read_adapter(export_randlora_adapter(model, out_dir=tmp_path / "a", module_names=names))
    assert config["r"] == 4 and config["randlora_alpha"] == 80
    merge_randlora(model)
    with pytest.raises(ValueError, match="unmerge_randlora"):
        export_randlora_adapter(model, out_dir=tmp_path / "b")
    assert not os.path.exists(tmp_path / "b")
