import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the test models are tiny: extra threads only contend (a 2-core CI box runs subprocess tests beside pytest)
torch.set_num_threads(1)


def tiny_gpt2(dtype=torch.float64, seed=0):
    """2-layer GPT-2 with Conv1D layers: c_attn 16->48, c_fc 16->64, c_proj 64->16 (both orientations)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(dtype=torch.float64, seed=0):
    """2-layer Llama with nn.Linear layers and a rectangular MLP (16 <-> 40)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=40, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 8), generator=generator)


GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]
LLAMA_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(params=[(True, True), (False, False), (True, False), (False, True)],
                ids=["merged", "factored", "fwd-merged-bwd-factored", "fwd-factored-bwd-merged"])
def order(request, monkeypatch):
    """Every contraction order of the RandLoRA autograd core, forced, for tests that must hold in all of them."""
    import randopt.randlora.autograd as autograd_core

    forward_merged, backward_merged = request.param
    monkeypatch.setattr(autograd_core, "_forward_merged", lambda *a, **k: forward_merged)
    monkeypatch.setattr(autograd_core, "_backward_merged", lambda *a, **k: backward_merged)
