"""Quantized bases (bitsandbytes Linear4bit nf4/fp4, Linear8bitLt) on CPU: the RandLoRA module route against PEFT
RandLora on the same quantized layers, what is saved for backward, merge/unmerge, LoRA-Pro over quantized LoRA,
refusals of routes that must write a weight, and exports."""
import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import LLAMA_TARGETS, tiny_llama
from randopt.randlora import bases_from_tensors, inject_randlora, randlora_layers, unload_randlora
from randopt.randlora.quantized import QuantizedWeight, is_quantized

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

RANK, ALPHA = 3, 5.0
KINDS = ["nf4", "fp4", "nf4-bf16-storage", "int8"]


def quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes copy of ``linear`` (fp32 compute), quantized on CPU."""
    bias = linear.bias is not None
    weight = linear.weight.detach().float().clone()
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, _, storage = kind.partition("-")
        storage = torch.bfloat16 if storage else torch.uint8
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32,
                                  quant_type=quant_type, quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, quant_storage=storage)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to("cpu")


def quantize(model: nn.Module, targets, kind: str) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized_linear(module, kind))
    return model


def quantized_llama(kind: str, seed: int = 0) -> nn.Module:
    model = quantize(tiny_llama(torch.float32, seed), LLAMA_TARGETS, kind)
    model.requires_grad_(False)
    # what transformers sets when it loads a model quantized; PEFT picks its bitsandbytes layers from it
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = kind == "int8", kind != "int8"
    return model


def build_pair(kind: str):
    """Our module route and PEFT RandLora on the same quantized model, same bases and random coefficients."""
    ours = quantized_llama(kind)
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.RandLoraConfig(
        r=RANK, randlora_alpha=ALPHA, target_modules=LLAMA_TARGETS, init_weights=False))
    theirs_layers = {n.replace("base_model.model.", ""): m for n, m in theirs.named_modules()
                     if hasattr(m, "randlora_lambda") and "default" in m.randlora_lambda}
    some = next(iter(theirs_layers.values()))
    bases = bases_from_tensors(some.randlora_A["default"].float(), some.randlora_B["default"].float())
    for layer in theirs_layers.values():  # PEFT keeps bf16 bases; ours are their fp32 values
        layer.randlora_A["default"], layer.randlora_B["default"] = bases.A, bases.B
    inject_randlora(ours, LLAMA_TARGETS, rank=RANK, alpha=ALPHA, bases=bases)
    ours_layers = dict(randlora_layers(ours))
    assert ours_layers.keys() == theirs_layers.keys() and ours_layers
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            assert is_quantized(layer.base_layer.weight) and not layer.base_layer.weight.requires_grad
            for ours_p, theirs_p in ((layer.randlora_lambda, theirs_layers[name].randlora_lambda["default"]),
                                     (layer.randlora_gamma, theirs_layers[name].randlora_gamma["default"])):
                ours_p.copy_(torch.randn(ours_p.shape, generator=generator) * 0.3)
                theirs_p.copy_(ours_p)
    return ours, theirs, ours_layers, theirs_layers


def probe_loss(logits: torch.Tensor) -> torch.Tensor:
    """Linear in the logits: the gradient reaching each layer does not depend on the base's matmul rounding."""
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
    return (logits * weights).sum()


@pytest.mark.parametrize("kind", KINDS)
def test_module_route_matches_peft_on_quantized_layers(order, kind, tokens):
    # (PEFT 0.21's bitsandbytes RandLora layers get dW's shape wrong in get_delta_weight, so only outputs and
    # gradients are compared here; dW itself is compared with PEFT's plain layers in test_peft_parity)
    ours, theirs, ours_layers, theirs_layers = build_pair(kind)
    out_ours, out_theirs = ours(tokens).logits, theirs(input_ids=tokens).logits
    # Linear4bit computes x @ dequantize(W)^T, as we do; Linear8bitLt rounds its input to int8 on the way
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-4 if kind != "int8" else 2e-2)
    probe_loss(out_ours).backward()
    probe_loss(out_theirs).backward()
    tolerance = dict(rtol=1e-4, atol=1e-4) if kind != "int8" else dict(rtol=3e-2, atol=3e-2)
    for name, layer in ours_layers.items():
        theirs_layer = theirs_layers[name]
        scale = theirs_layer.randlora_lambda["default"].grad.abs().max()
        torch.testing.assert_close(layer.randlora_lambda.grad / scale,
                                   theirs_layer.randlora_lambda["default"].grad / scale, **tolerance)
        scale = theirs_layer.randlora_gamma["default"].grad.abs().max()
        torch.testing.assert_close(layer.randlora_gamma.grad / scale,
                                   theirs_layer.randlora_gamma["default"].grad / scale, **tolerance)


def saved_for_backward(fn):
    """Shapes and dtypes of the tensors autograd saves while ``fn`` runs its forward."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype, tensor.untyped_storage().data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("shape", [(256, 96), (96, 256)], ids=["out>in", "in>out"])
def test_backward_saves_no_dequantized_base_and_no_square_tensor(order, kind, shape):
    out_features, in_features = shape
    torch.manual_seed(0)
    model = nn.Sequential(quantized_linear(nn.Linear(in_features, out_features), kind))
    packed = model[0].weight
    inject_randlora(model, ["0"], rank=8, init_weights=False)
    x = torch.randn(6, in_features, requires_grad=True)
    out, saved = saved_for_backward(lambda: model(x))
    d = min(shape)
    big = [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= d * d]
    assert not big, f"saved for backward: {big}"
    # the packed weight is all the base keeps: dequantized on the fly in backward, and still packed afterwards
    out.square().sum().backward()
    assert model[0].base_layer.weight is packed and is_quantized(packed)
    layer = model[0]
    assert x.grad is not None and layer.randlora_lambda.grad.abs().sum() > 0
    # the input gradient goes through the same dequantized base the forward used
    dense = QuantizedWeight(layer.base_layer).dequantize() + layer.delta_weight()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, dense, layer.base_layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5 * x2.grad.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_saves_a_square_tensor_where_we_do_not(kind):
    """The comparison the previous test stands on: PEFT RandLora on the same layer saves a ~d x d scaled basis."""
    torch.manual_seed(0)
    base = nn.Sequential(quantized_linear(nn.Linear(96, 256), kind))
    theirs = peft.get_peft_model(base, peft.RandLoraConfig(r=8, target_modules=["0"], init_weights=False))
    _, saved = saved_for_backward(lambda: theirs(torch.randn(6, 96)))
    assert any(torch.Size(s[0]).numel() >= 96 * 96 for s in saved if s[1].is_floating_point)


def assert_quantized_as(layer: nn.Module, dense: torch.Tensor, kind: str) -> None:
    """``layer``'s packed weight is ``dense`` quantized (up to a bin flipped by float rounding)."""
    target = nn.Linear(dense.shape[1], dense.shape[0], bias=False)
    target.weight.data = dense
    reference = QuantizedWeight(quantized_linear(target, kind)).dequantize()
    assert (QuantizedWeight(layer).dequantize() - reference).abs().gt(1e-6).float().mean() < 0.01


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merge_requantizes_and_unmerge_unload_behave(kind, tokens):
    """Merge writes quantize(dequantize(W) + dW), what PEFT's bitsandbytes layers intend (PEFT 0.21's own merge
    fails there: its get_delta_weight has the wrong shape); unmerge writes quantize(dequantize(W') - dW), so the
    original weight comes back only up to the rounding (PEFT warns the same)."""
    ours, _, layers, _ = build_pair(kind)
    expected = ours(tokens).logits.detach()
    before = {n: QuantizedWeight(m.base_layer).dequantize() for n, m in layers.items()}
    with pytest.warns(UserWarning, match="re-quantizes"):
        for layer in layers.values():
            layer.merge()
    merged = {}
    for name, layer in layers.items():
        assert layer.merged and is_quantized(layer.base_layer.weight)
        assert_quantized_as(layer.base_layer, before[name] + layer.delta_weight().detach(), kind)
        merged[name] = QuantizedWeight(layer.base_layer).dequantize()
    merged_out = ours(tokens).logits.detach()
    assert not torch.equal(merged_out, expected)  # the merged base layer alone computes it
    with pytest.warns(UserWarning, match="re-quantizes"):
        for layer in layers.values():
            layer.unmerge()
    for name, layer in layers.items():
        assert not layer.merged and is_quantized(layer.base_layer.weight)
        assert_quantized_as(layer.base_layer, merged[name] - layer.delta_weight().detach(), kind)
        layer.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = unload_randlora(ours)
    assert not randlora_layers(plain)
    assert all(is_quantized(m.weight) for n, m in plain.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS)
    assert torch.isfinite(plain(tokens).logits).all()


def test_a_weight_bitsandbytes_repacked_for_cpu_inference_is_read_right():
    """An eval-mode forward without gradients lets bitsandbytes repack a 4-bit weight for its CPU kernel (on CPUs
    with AVX512-BF16); the module route still sees the same matrix."""
    torch.manual_seed(0)
    layer = quantized_linear(nn.Linear(64, 64), "nf4")
    before = QuantizedWeight(layer).dequantize()
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = layer.eval()(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    model = inject_randlora(nn.Sequential(layer), ["0"], rank=8)
    # the repacking itself rounds the block scales (to bf16), so equal up to that rounding
    torch.testing.assert_close(QuantizedWeight(layer).dequantize(), before, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(model(x), reference, rtol=1e-2, atol=1e-2)


def test_trains_with_the_base_frozen_and_packed(tokens):
    model = quantized_llama("nf4")
    inject_randlora(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA)
    packed = {n: m.base_layer.weight.detach().clone() for n, m in randlora_layers(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.is_floating_point() for p in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "randlora_" in n)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).logits[:, :-1].reshape(-1, 50),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(m.base_layer.weight, packed[n]) for n, m in randlora_layers(model))


# ----- LoRA-Pro over a quantized PEFT LoRA model ------------------------------------------------------------------
def dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every bitsandbytes layer (also a PEFT layer's base layer) replaced by an fp32 ``nn.Linear`` of
    its dequantized weight: the full-precision model that computes what the quantized one does."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized(module.weight):  # PEFT's wrappers also show a .weight
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.data = QuantizedWeight(module).dequantize()
            if module.bias is not None:
                plain.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain.requires_grad_(False))
    return model


def quantized_lora(kind: str, r: int = 2):
    """PEFT LoRA on the quantized Llama, and the same LoRA model on its dequantized (fp32) base."""
    torch.manual_seed(5)
    model = peft.get_peft_model(quantized_llama(kind), peft.LoraConfig(
        r=r, lora_alpha=3.0, target_modules=LLAMA_TARGETS, lora_dropout=0.0, init_lora_weights=False))
    return model, dequantized(copy.deepcopy(model))


def lora_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_on_a_quantized_base_follows_the_dequantized_base(kind, mode, tokens):
    from randopt import LoRAProAdamW
    model, dequantized = quantized_lora(kind)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
    assert packed
    runs = []
    for m in (model, dequantized):
        opt = LoRAProAdamW(m, lr=1e-2, weight_decay=0.0, mode=mode)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = lora_loss(m, tokens)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0][-1] < runs[0][0]
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=1e-4, atol=1e-5)
    factors = {n: p for n, p in dequantized.named_parameters() if "lora_" in n}
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, factors[name], rtol=1e-3, atol=1e-5)
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)


@pytest.mark.parametrize("kind", ["nf4", "nf4-bf16-storage", "int8"])
def test_lorapro_full_mode_never_writes_a_quantized_base(kind, tokens):
    """Full mode decays W0 only when asked (decay_base_weight=True), and a packed W0 (even one stored as bf16
    bytes, which looks like a float tensor) cannot take it: refused. By default W0 is left alone, silently."""
    from randopt import LoRAProAdamW
    model, _ = quantized_lora(kind)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
    with pytest.raises(ValueError, match="cannot decay a quantized W0"):
        LoRAProAdamW(model, lr=1e-2, weight_decay=0.5, mode="full", decay_base_weight=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.5, mode="full")
    for _ in range(2):
        opt.zero_grad()
        lora_loss(model, tokens).backward()
        opt.step()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no decay asked for: nothing to warn about
        LoRAProAdamW(model, lr=1e-2, weight_decay=0.0, mode="full")
        LoRAProAdamW(model, lr=1e-2, weight_decay=0.5, mode="efficient")


# ----- routes that write weights refuse quantized ones -----------------------------------------------------------
def test_randlora_adamw_refuses_quantized_targets_and_points_to_the_module_route():
    from randopt import RandLoRAAdamW, param_groups
    model = quantized_llama("nf4")
    with pytest.raises(ValueError, match=r"cannot take a written update.*inject_randlora"):
        param_groups(model, LLAMA_TARGETS, rank=2)
    # mixed with full-precision targets: refused too, naming the quantized ones, never skipped in silence
    mixed = quantize(tiny_llama(torch.float32), ["q_proj"], "nf4")
    with pytest.raises(ValueError, match=r"q_proj.*quantized bitsandbytes"):
        param_groups(mixed, ["q_proj", "v_proj"], rank=2)
    packed = next(p for p in model.parameters() if is_quantized(p))
    for params in ([packed], [{"params": [packed], "rank": None}]):
        with pytest.raises(ValueError, match="RandLoRAAdamW: .*quantized bitsandbytes"):
            RandLoRAAdamW(params, rank=2)


def test_lorapro_refuses_a_quantized_weight_in_a_plain_group():
    from randopt import LoRAProAdamW, lorapro_groups
    model, _ = quantized_lora("nf4-bf16-storage")
    packed = next(p for p in model.parameters() if is_quantized(p))
    assert packed.is_floating_point()  # bf16 storage: a float tensor that AdamW would silently corrupt
    A = nn.Parameter(torch.randn(2, 16))
    B = nn.Parameter(torch.randn(16, 2))
    with pytest.raises(ValueError, match="LoRAProAdamW: .*quantized bitsandbytes"):
        LoRAProAdamW(lorapro_groups([(A, B, 1.0)]) + [{"params": [packed]}])


# ----- exports from a model with a quantized base -----------------------------------------------------------------
def trained_module_route(kind: str, tokens) -> nn.Module:
    """The module route on the quantized Llama after a few AdamW steps (no RandLoRAAdamW involved)."""
    model = quantized_llama(kind)
    inject_randlora(model, LLAMA_TARGETS, rank=RANK, alpha=ALPHA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        opt.zero_grad()
        lora_loss(model, tokens).backward()
        opt.step()
    return model.eval()


def full_precision_llama_with(deltas: dict) -> nn.Module:
    """The fp32 Llama the quantized one was made from, with ``deltas`` ({module name: dW}) added to its weights."""
    model = tiny_llama(torch.float32)
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta
    return model


def load_lora(base: nn.Module, adapter_dir) -> nn.Module:
    """PEFT's model in train mode (no dropout here): in eval mode without gradients bitsandbytes switches to a CPU
    inference kernel that needs layers of at least 32 outputs, more than the tiny test model has."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter_dir)).train()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_module_route_exports_a_lora_adapter_without_an_optimizer(kind, tokens, tmp_path):
    """Full-rank RandLoRA -> LoRA export from a quantized-base model: PEFT loads it on the quantized base (same
    outputs as our adapter) and on the full-precision base (that base plus the same dW)."""
    from randopt.lorasqueeze import export_lora
    model = trained_module_route(kind, tokens)
    with torch.no_grad():
        expected = model(tokens).logits
        deltas = {name: layer.delta_weight() for name, layer in randlora_layers(model)}
    assert all(d.abs().max() > 0 for d in deltas.values())
    result = export_lora(model, out_dir=tmp_path / "lora", rank=64)
    assert {r.name for r in result.layers} == set(deltas) and all(r.rank == min(r.shape) for r in result.layers)
    assert all(t.dtype == torch.float32 for t in result.tensors.values())  # the adapter's dtype, not the packed one
    on_quantized = load_lora(quantized_llama(kind), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(on_quantized(input_ids=tokens).logits, expected, rtol=1e-4,
                                   atol=1e-4 if kind != "int8" else 2e-2)
        on_full = load_lora(tiny_llama(torch.float32), tmp_path / "lora")
        torch.testing.assert_close(on_full(input_ids=tokens).logits,
                                   full_precision_llama_with(deltas)(tokens).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no RandLoRA adapter layer"):
        export_lora(quantized_llama(kind), rank=2)


def test_squeeze_of_a_lora_model_over_a_quantized_base(tokens, tmp_path):
    """LoRA-Pro-trained PEFT LoRA r4 over nf4, squeezed to r2 from the model in memory (the same adapter as from its
    saved directory); the squeezed adapter loads on the quantized base (computing what it computes on the
    dequantized base) and on the full-precision base (that base plus the squeezed update)."""
    import randopt
    model, _ = quantized_lora("nf4", r=4)
    opt = randopt.LoRAProAdamW(model, lr=1e-2, weight_decay=0.0, mode="efficient")
    for _ in range(2):
        opt.zero_grad()
        lora_loss(model, tokens).backward()
        opt.step()
    model.save_pretrained(tmp_path / "original")
    result = randopt.squeeze(model, rank=2, out_dir=tmp_path / "squeezed")
    from_dir = randopt.squeeze(tmp_path / "original", rank=2)
    assert result.layers and all(r.rank == 2 for r in result.layers)
    assert result.tensors.keys() == from_dir.tensors.keys()
    assert all(torch.equal(result.tensors[k], from_dir.tensors[k]) for k in result.tensors)
    scale = result.config["lora_alpha"] / 2
    deltas = {}
    for key, A in result.tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = result.tensors[key.replace("lora_A", "lora_B")]
            deltas[name] = scale * B.float() @ A.float()
    with torch.no_grad():
        on_quantized = load_lora(quantized_llama("nf4"), tmp_path / "squeezed")(input_ids=tokens).logits
        on_dequantized = load_lora(dequantized(quantized_llama("nf4")), tmp_path / "squeezed")(input_ids=tokens).logits
        torch.testing.assert_close(on_quantized, on_dequantized, rtol=1e-4, atol=1e-5)
        on_full = load_lora(tiny_llama(torch.float32), tmp_path / "squeezed")(input_ids=tokens).logits
        torch.testing.assert_close(on_full, full_precision_llama_with(deltas)(tokens).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["nf4", "fp32"])
def test_benchmark_methods_build_and_step_on_both_bases(base, tokens):
    """benchmarks.qlora_step's methods on the tiny Llama: each trains adapters only, and the nf4 base stays packed."""
    from benchmarks.qlora_step import METHODS, build, quantize_projections
    for method in METHODS:
        model = tiny_llama(torch.float32)
        if base == "nf4":
            model = quantize_projections(model)
        model, opt = build(method, model)
        packed = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
        assert bool(packed) == (base == "nf4")
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n or "randlora_" in n for n in trained), (method, trained[:3])
        lora_loss(model, tokens).backward()
        opt.step()
        assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_module_route_exports_a_peft_randlora_adapter_without_an_optimizer(kind, tokens, tmp_path):
    """PEFT RandLora adapter from a quantized-base module-route model: PEFT loads it on the quantized base (our
    outputs) and on the full-precision base (that base plus the same dW)."""
    from randopt.integrations.peft import export_randlora_adapter
    model = trained_module_route(kind, tokens)
    with torch.no_grad():
        expected = model(tokens).logits
        deltas = {name: layer.delta_weight() for name, layer in randlora_layers(model)}
    export_randlora_adapter(model, out_dir=tmp_path / "randlora")
    with torch.no_grad():
        on_quantized = load_lora(quantized_llama(kind), tmp_path / "randlora")
        torch.testing.assert_close(on_quantized(input_ids=tokens).logits, expected, rtol=1e-4,
                                   atol=1e-4 if kind != "int8" else 2e-2)
        on_full = load_lora(tiny_llama(torch.float32), tmp_path / "randlora")
        torch.testing.assert_close(on_full(input_ids=tokens).logits,
                                   full_precision_llama_with(deltas)(tokens).logits, rtol=1e-4, atol=1e-5)
