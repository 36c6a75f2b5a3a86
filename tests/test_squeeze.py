"""LoRA-Squeeze: exact factored SVD (Eckart-Young against a dense SVD), randomised SVD of operators, PEFT round
trips at the target rank (Llama nn.Linear and GPT-2 Conv1D), energy targets, bad input, atomic output, CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from randopt import _atomic, cli
from randopt.randlora import delta_weight, make_bases
from randopt.randlora.bases import LayerBases
from randopt.lorasqueeze import adapters, squeeze_lora
from randopt.lorasqueeze.functional import (dense_operator, factored_svd, lora_scale, randlora_operator,
                                            randomized_svd, select_rank, squeeze_factors, squeeze_operator)

peft = pytest.importorskip("peft")

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def best_rank_k(W, k):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def with_spectrum(m, n, S, seed=0):
    """A random ``m x n`` matrix with singular values ``S``."""
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=F64)).Q
    return (U * S) @ V.T


# ------------------------------------------------------------------------------------------- pure functions

SHAPES = [(40, 16, 8), (16, 40, 8), (64, 64, 32), (10, 12, 16), (100, 3, 2)]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_factored_svd_is_the_exact_svd(m, n, r):
    g = gen(m + n + r)
    B, A = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64)
    svd = factored_svd(B, A, 0.7)
    W = 0.7 * B @ A
    c = min(m, n, r)
    assert svd.S.shape == (c,) and svd.U.shape == (m, c) and svd.V.shape == (n, c)
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(W)[:c], **TOL)
    torch.testing.assert_close((svd.U * svd.S) @ svd.V.T, W, **TOL)
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(c, dtype=F64), **TOL)
    torch.testing.assert_close(svd.V.T @ svd.V, torch.eye(c, dtype=F64), **TOL)


@pytest.mark.parametrize("m,n,r,k", [(40, 16, 8, 3), (16, 40, 8, 7), (64, 64, 32, 1), (64, 48, 32, 20),
                                     (10, 12, 16, 14), (100, 3, 2, 1)])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("policy", ["keep_scale", "keep_alpha", 3.0])
def test_eckart_young_truncation_for_every_alpha_policy(m, n, r, k, rslora, policy):
    g = gen(m * n + k)
    B, A = torch.randn(m, r, generator=g, dtype=F64), torch.randn(r, n, generator=g, dtype=F64)
    source = lora_scale(16.0, r, rslora)
    sq = squeeze_factors(B, A, 16.0, rank=k, target_alpha_policy=policy, rslora=rslora)
    assert sq.B.shape == (m, k) and sq.A.shape == (k, n) and sq.rank == k
    assert sq.scale == lora_scale(sq.alpha, k, rslora)  # the scale follows from the written alpha
    expected_alpha = {"keep_scale": source * (math.sqrt(k) if rslora else k), "keep_alpha": 16.0}.get(policy, policy)
    assert sq.alpha == pytest.approx(expected_alpha, rel=1e-12)
    if policy == "keep_scale":
        assert sq.scale == pytest.approx(source, rel=1e-12)
    torch.testing.assert_close(sq.scale * sq.B @ sq.A, best_rank_k(source * B @ A, k), **TOL)
    if k <= min(m, n):  # balanced split: both factors carry sqrt(S / s)
        torch.testing.assert_close(sq.B.norm(), sq.A.norm(), **TOL)


def test_select_rank_and_energy():
    S = torch.tensor([3.0, 2.0, 1.0], dtype=F64)  # energies 9, 4, 1 of 14
    assert select_rank(S, 9 / 14) == 1
    assert select_rank(S, 9 / 14 + 1e-9) == 2
    assert select_rank(S, 13 / 14) == 2
    assert select_rank(S, 1.0) == 3
    assert select_rank(torch.zeros(4, dtype=F64), 0.5) == 1  # a zero update still needs rank >= 1
    sq = squeeze_factors(torch.diag(S), torch.eye(3, dtype=F64), 3.0, energy=0.9)
    assert sq.rank == 2 and sq.energy == pytest.approx(13 / 14)


@pytest.mark.parametrize("m,n,k,decay", [(300, 200, 10, "geometric"), (200, 300, 25, "geometric"),
                                         (256, 256, 16, "power"), (400, 120, 40, "power")])
def test_randomized_svd_is_within_one_percent_of_optimal(m, n, k, decay):
    i = torch.arange(min(m, n), dtype=F64)
    S = 0.9 ** i if decay == "geometric" else (i + 1) ** -2.0
    W = with_spectrum(m, n, S, seed=k)
    svd = randomized_svd(dense_operator(W), k, seed=5)
    error = (W - (svd.U * svd.S) @ svd.V.T).norm()
    optimal = S[k:].norm()
    assert error <= 1.01 * optimal
    torch.testing.assert_close(svd.S, S[:k], rtol=1e-2, atol=0)
    again = randomized_svd(dense_operator(W), k, seed=5)
    assert torch.equal(again.S, svd.S)  # seeded


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["out>in", "in>out"])
def test_randomized_svd_of_a_randlora_operator(shape):
    bases = make_bases(shape, rank=4, seed=3)
    layer = bases.layer(*shape)
    layer = LayerBases(layer.A.to(F64), layer.B.to(F64), layer.out_features, layer.in_features)
    g = gen(11)
    # Coefficients decaying across bases give a decaying (blockwise) spectrum, as trained updates have.
    lam = torch.randn(layer.rank, layer.num_bases, generator=g, dtype=F64) * 0.4 ** torch.arange(layer.num_bases)
    gam = torch.randn(layer.num_bases, layer.A.shape[-1], generator=g, dtype=F64)
    W = delta_weight(layer, lam, gam, 2.5, shape)
    op = randlora_operator(layer, lam, gam, 2.5)
    X, Y = torch.randn(shape[1], 5, generator=g, dtype=F64), torch.randn(shape[0], 5, generator=g, dtype=F64)
    torch.testing.assert_close(op.matmul(X), W @ X, **TOL)
    torch.testing.assert_close(op.rmatmul(Y), W.T @ Y, **TOL)
    S = torch.linalg.svdvals(W)
    for k in (4, 6, 12):
        svd = randomized_svd(op, k, seed=1)
        assert (W - (svd.U * svd.S) @ svd.V.T).norm() <= 1.01 * S[k:].norm()
    sq = squeeze_operator(op, 6, alpha=12.0, total_energy=float(W.square().sum()))
    assert sq.scale == 2.0 and sq.B.shape == (shape[0], 6) and sq.A.shape == (6, shape[1])
    assert sq.energy == pytest.approx(float(S[:6].square().sum() / S.square().sum()), rel=1e-6)
    assert (W - sq.scale * sq.B @ sq.A).norm() <= 1.01 * S[6:].norm()


# -------------------------------------------------------------------------------------------- PEFT adapters

MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


def lora_model(kind, r=8, alpha=16, rslora=False, decays=None, seed=0):
    """A PEFT LoRA model with random (or, with ``decays``, per-layer geometric-spectrum) fp64 factors."""
    make_model, targets = MODELS[kind]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                             fan_in_fan_out=kind == "gpt2", init_lora_weights=False)
    model = peft.get_peft_model(make_model(), config)
    g = gen(seed)
    with torch.no_grad():
        for i, layer in enumerate(lora_layers_of(model).values()):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if decays is None:
                A.copy_(torch.randn(A.shape, generator=g, dtype=F64))
                B.copy_(torch.randn(B.shape, generator=g, dtype=F64))
            else:
                S = decays[i % len(decays)] ** torch.arange(r, dtype=F64)
                B.copy_(torch.linalg.qr(torch.randn(B.shape, generator=g, dtype=F64)).Q * S)
                A.copy_(torch.linalg.qr(torch.randn(A.shape[::-1], generator=g, dtype=F64)).Q.T)
    return model


def lora_layers_of(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def saved(model, path):
    model.save_pretrained(path)
    return str(path)


def load(kind, path):
    return peft.PeftModel.from_pretrained(MODELS[kind][0](), path)


def check_loaded(source, loaded, result):
    """Each loaded layer's PEFT update is the best rank-r_t approximation of the source layer's update, and its
    factors and scale are exactly the ones squeeze wrote."""
    reports = {r.name: r for r in result.layers}
    source_layers, loaded_layers = lora_layers_of(source), lora_layers_of(loaded)
    assert source_layers.keys() == loaded_layers.keys() == reports.keys()
    for name, layer in loaded_layers.items():
        report = reports[name]
        assert layer.r["default"] == report.rank
        assert layer.scaling["default"] == lora_scale(report.alpha, report.rank, layer.use_rslora["default"])
        A = layer.lora_A["default"].weight
        assert torch.equal(A, result.tensors[f"base_model.model.{name}.lora_A.weight"])
        expected = best_rank_k(source_layers[name].get_delta_weight("default"), report.rank)
        torch.testing.assert_close(layer.get_delta_weight("default"), expected, **TOL)


@pytest.mark.parametrize("kind,policy,rslora", [("llama", "keep_scale", False), ("gpt2", "keep_scale", False),
                                                ("llama", "keep_alpha", False), ("gpt2", 3.0, False),
                                                ("llama", "keep_scale", True), ("gpt2", "keep_alpha", True)])
def test_peft_loads_squeezed_adapter(tmp_path, kind, policy, rslora, tokens):
    source = lora_model(kind, rslora=rslora)
    out = tmp_path / "out"
    result = squeeze_lora(saved(source, tmp_path / "src"), rank=3, out_dir=out, alpha=policy)
    config = json.loads((out / "adapter_config.json").read_text())
    expected_alpha = {"keep_scale": 16 * (math.sqrt(3 / 8) if rslora else 3 / 8), "keep_alpha": 16}.get(policy, policy)
    assert config["r"] == 3 and config["lora_alpha"] == pytest.approx(expected_alpha, rel=1e-12)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["use_rslora"] is rslora
    loaded = load(kind, out)
    check_loaded(source, loaded, result)
    # the model output only changes by the truncation: same as merging the truncated deltas by hand
    reference = MODELS[kind][0]()
    with torch.no_grad():
        for name, layer in lora_layers_of(source).items():
            delta = best_rank_k(layer.get_delta_weight("default"), 3)
            reference.get_submodule(name).weight += delta
    torch.testing.assert_close(loaded(input_ids=tokens).logits, reference(tokens).logits, **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_energy_target_picks_ranks_per_layer_and_peft_loads_the_patterns(tmp_path, kind):
    source = lora_model(kind, decays=[0.2, 0.5, 0.8])
    result = squeeze_lora(saved(source, tmp_path / "src"), energy=0.99, out_dir=tmp_path / "out")
    ranks = {r.name: r.rank for r in result.layers}
    assert len(set(ranks.values())) == 3
    for report in result.layers:
        layer = source.get_submodule("base_model.model." + report.name)
        S = torch.linalg.svdvals(layer.get_delta_weight("default").detach())
        kept = S.square().cumsum(0) / S.square().sum()
        assert kept[report.rank - 1] >= 0.99 and (report.rank == 1 or kept[report.rank - 2] < 0.99)
        assert report.energy == pytest.approx(float(kept[report.rank - 1]), rel=1e-10)
        assert report.alpha == pytest.approx(16 * report.rank / 8)  # keep_scale
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    for name, rank in ranks.items():
        assert adapters.pattern_value(config["rank_pattern"], name, config["r"]) == rank
    check_loaded(source, load(kind, tmp_path / "out"), result)


def test_in_memory_model_and_source_rank_pattern(tmp_path):
    source = lora_model("llama", decays=[0.3, 0.7])
    first = squeeze_lora(source, energy=0.95)  # in memory, nothing written
    assert first.out_dir is None and not list(tmp_path.iterdir())
    from_dir = squeeze_lora(saved(source, tmp_path / "src"), energy=0.95)
    assert first.config["inference_mode"] is True  # as save_pretrained writes it
    differ = {"auto_mapping", "target_modules"}  # save_pretrained's extras; a set saved in arbitrary order
    assert {k: v for k, v in first.config.items() if k not in differ} == \
        {k: v for k, v in from_dir.config.items() if k not in differ}
    assert all(torch.equal(first.tensors[k], v) for k, v in from_dir.tensors.items())
    # squeezing an adapter that already has rank/alpha patterns reads them per layer
    first.save(tmp_path / "mid")
    second = squeeze_lora(tmp_path / "mid", rank=1, out_dir=tmp_path / "out", alpha="keep_alpha")
    mid_alpha = {r.name: r.alpha for r in first.layers}
    assert all(r.source_alpha == mid_alpha[r.name] and r.alpha == r.source_alpha for r in second.layers)
    check_loaded(load("llama", tmp_path / "mid"), load("llama", tmp_path / "out"), second)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def source_dir(tmp_path):
    return saved(lora_model("llama", r=4), tmp_path / "src")


@pytest.mark.parametrize("rank", [0, -1, 4, 5, 2.0, True, "2"])
def test_bad_rank(source_dir, rank):
    with pytest.raises(ValueError, match="rank"):
        squeeze_lora(source_dir, rank=rank)


@pytest.mark.parametrize("out_dir", ["", 5])
def test_bad_out_dir_is_refused_before_anything_is_computed(source_dir, out_dir):
    """"" would be the working directory (an unset variable, say), 5 a TypeError deep in os."""
    with pytest.raises(ValueError, match="out_dir must be a non-empty path"):
        squeeze_lora(source_dir, rank=2, out_dir=out_dir)


@pytest.mark.parametrize("energy", [0, 0.0, -0.1, 1.5, math.nan, True, "0.9"])
def test_bad_energy(source_dir, energy):
    with pytest.raises(ValueError, match="energy"):
        squeeze_lora(source_dir, energy=energy)


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.9}])
def test_exactly_one_target(source_dir, kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        squeeze_lora(source_dir, **kwargs)


@pytest.mark.parametrize("alpha", ["keep", -1.0, 0, math.inf, True])
def test_bad_alpha(source_dir, alpha):
    with pytest.raises(ValueError, match="alpha"):
        squeeze_lora(source_dir, rank=2, alpha=alpha)


def edit_config(path, **changes):
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w") as f:
        json.dump(config, f)


def edit_tensors(path, change):
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)


def test_not_a_lora_adapter(tmp_path):
    randlora = peft.get_peft_model(tiny_llama(), peft.RandLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match="not a LoRA adapter.*RANDLORA"):
        squeeze_lora(saved(randlora, tmp_path / "randlora"), rank=2)
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        squeeze_lora(randlora, rank=2)
    with pytest.raises(ValueError, match="PEFT model"):
        squeeze_lora(torch.nn.Linear(2, 2), rank=1)


@pytest.mark.parametrize("damage,match", [
    (lambda p: os.remove(os.path.join(p, "adapter_config.json")), "adapter_config.json is missing"),
    (lambda p: os.remove(os.path.join(p, "adapter_model.safetensors")), "no adapter weights"),
    (lambda p: open(os.path.join(p, "adapter_config.json"), "w").write("{"), "not valid JSON"),
    (lambda p: open(os.path.join(p, "adapter_model.safetensors"), "wb").write(b"junk"), "safetensors"),
    (lambda p: edit_config(p, use_dora=True), "variant.*use_dora"),
    (lambda p: edit_config(p, r=8), "rank 4 in the weights but the config says 8"),
    (lambda p: edit_tensors(p, lambda t: t.update({k: torch.zeros(t[k].shape[0], 5, dtype=F64)
                                                  for k in list(t) if k.endswith("q_proj.lora_B.weight")})),
     "mismatched LoRA shapes"),
    (lambda p: edit_tensors(p, lambda t: [t.pop(k) for k in list(t) if k.endswith("v_proj.lora_B.weight")]),
     "no matching"),
    (lambda p: edit_tensors(p, lambda t: t.update({"base_model.model.x.lora_magnitude_vector": torch.ones(2)})),
     "not LoRA A/B factor pairs"),
    (lambda p: edit_tensors(p, lambda t: [v.view(-1)[0].fill_(math.nan) for k, v in t.items()
                                          if k.endswith("q_proj.lora_A.weight")]), "non-finite"),
    (lambda p: edit_config(p, rank_pattern={"q_proj(": 4}), "not a valid regex"),
    (lambda p: edit_config(p, alpha_pattern=5), "must be a JSON object"),
    (lambda p: edit_config(p, use_rslora="yes"), "use_rslora must be true or false"),
    (lambda p: edit_tensors(p, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()})),
     "expected floating point"),
], ids=["no-config", "no-weights", "bad-json", "bad-safetensors", "dora", "rank-vs-config", "shapes", "unpaired",
        "magnitude", "nan", "bad-pattern", "pattern-not-an-object", "rslora-not-a-bool", "integer-factors"])
def test_damaged_adapter_directory(source_dir, damage, match):
    damage(source_dir)
    with pytest.raises(ValueError, match=match):
        squeeze_lora(source_dir, rank=2)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        squeeze_lora(tmp_path / "nope", rank=2)


# ------------------------------------------------------------------------------------------ atomic output


def failing_second_write(monkeypatch):
    calls = []
    real = adapters._write_file

    def write(path, data):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(adapters, "_write_file", write)


def tree(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_failed_write_leaves_no_output(tmp_path, source_dir, monkeypatch):
    failing_second_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no out dir, no temp dir left behind


def test_failed_write_keeps_previous_output(tmp_path, source_dir, monkeypatch):
    squeeze_lora(source_dir, rank=3, out_dir=tmp_path / "out")
    before = tree(tmp_path / "out")
    with pytest.raises(ValueError, match="already exists"):
        squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "out")
    failing_second_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "out", overwrite=True)
    assert tree(tmp_path / "out") == before and sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_failed_rename_restores_previous_output(tmp_path, source_dir, monkeypatch):
    """Where directories cannot be exchanged in one step, the old one is moved aside and back if the new one
    cannot take its place."""
    squeeze_lora(source_dir, rank=3, out_dir=tmp_path / "out")
    before = tree(tmp_path / "out")
    real, calls = os.replace, []
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # after the old directory was moved aside, before the new one is in place
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "out", overwrite=True)
    assert tree(tmp_path / "out") == before and sorted(os.listdir(tmp_path)) == ["out", "src"]
    monkeypatch.setattr(os, "replace", real)
    squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_squeeze_in_place(source_dir):
    before = squeeze_lora(source_dir, rank=2)
    squeeze_lora(source_dir, rank=2, out_dir=source_dir, overwrite=True)
    after = load_file(os.path.join(source_dir, "adapter_model.safetensors"))
    assert after.keys() == before.tensors.keys() and all(torch.equal(after[k], v) for k, v in before.tensors.items())
    assert not [n for n in os.listdir(os.path.dirname(source_dir)) if n.startswith(".")]


def test_refuses_to_replace_a_directory_that_is_not_an_adapter(tmp_path, source_dir):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter directory"):
        squeeze_lora(source_dir, rank=2, out_dir=tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, source_dir, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["squeeze", source_dir, "--rank", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "4 -> 2" in printed and "16 -> 8" in printed
    assert "wrote" in printed and json.loads(open(os.path.join(out, "adapter_config.json")).read())["r"] == 2
    assert cli.main(["squeeze", source_dir, "--energy", "0.5", "--alpha", "keep_alpha", "--out", out]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["squeeze", source_dir, "--energy", "0.5", "--alpha", "keep_alpha", "--out", out,
                     "--overwrite"]) == 0
    assert "16 -> 16" in capsys.readouterr().out
    PeftModel = peft.PeftModel
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), out), PeftModel)


@pytest.mark.parametrize("argv,code,message", [
    (["squeeze", "{src}", "--rank", "9", "--out", "{out}"], 1, "0 < rank"),
    (["squeeze", "{src}", "--energy", "2", "--out", "{out}"], 1, "energy must be in (0, 1]"),
    (["squeeze", "{tmp}/missing", "--rank", "2", "--out", "{out}"], 1, "does not exist"),
    (["squeeze", "{src}", "--out", "{out}"], 2, "one of the arguments --rank --energy is required"),
    (["squeeze", "{src}", "--rank", "2", "--alpha", "big", "--out", "{out}"], 2, "keep_scale"),
    ([], 2, "COMMAND"),
])
def test_cli_errors(tmp_path, source_dir, capsys, argv, code, message):
    argv = [a.format(src=source_dir, out=tmp_path / "out", tmp=tmp_path) for a in argv]
    assert cli.main(argv) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_dash_m(tmp_path, source_dir):
    done = subprocess.run([sys.executable, "-m", "randopt", "squeeze", source_dir, "--rank", "1", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 -> 1" in done.stdout and (tmp_path / "out" / "adapter_model.safetensors").exists()
