"""8-bit (and bf16) optimizer states: quantisation bounds, training that tracks fp32, resume, no silent fallback."""
import pytest
import torch

import randopt
from randopt.optim.state import (BLOCK_SIZE, dequantize, init_moment, quantize, read_moment, state_summary,
                                 write_moment)

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_round_trip_error_is_bounded_by_block_absmax(signed):
    generator = torch.Generator().manual_seed(0)
    n = 40_000 + 77  # not a multiple of the block size
    x = torch.randn(n, generator=generator) * torch.logspace(-4, 0, n)[torch.randperm(n, generator=generator)]
    x = x if signed else x.abs()
    codes, absmax = quantize(x, signed=signed)
    assert codes.dtype == torch.uint8 and absmax.numel() == -(-n // BLOCK_SIZE)
    error = (dequantize(codes, absmax, signed=signed) - x).abs()
    block_absmax = torch.repeat_interleave(absmax, BLOCK_SIZE)[:n]
    assert (error <= 0.01 * block_absmax).all()
    large = x.abs() > 0.1 * block_absmax
    assert (error[large] <= 0.07 * x.abs()[large]).all()


def test_moment_storage_formats_and_threshold():
    state = {}
    big, small = torch.zeros(5000), torch.zeros(10)
    init_moment(state, "exp_avg", big, "8bit")
    init_moment(state, "exp_avg_sq", big, "8bit")
    init_moment(state, "b_exp_avg", small, "8bit")
    init_moment(state, "c_exp_avg", small, "8bit", min_8bit_size=0)
    assert state["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state
    assert state["b_exp_avg"].dtype == torch.float32, "below the threshold the moment stays fp32"
    assert state["c_exp_avg_codes"].dtype == torch.uint8
    value = torch.linspace(-1, 1, 5000)
    write_moment(state, "exp_avg", value)
    torch.testing.assert_close(read_moment(state, "exp_avg"), value, atol=0.01, rtol=0)
    init_moment(state, "d_exp_avg", big, "bf16")
    init_moment(state, "d_exp_avg_sq", big, "bf16")
    assert state["d_exp_avg"].dtype == torch.bfloat16 and state["d_exp_avg_sq"].dtype == torch.float32


def regression_task(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=generator)
    target = torch.tanh(x @ torch.randn(64, 96, generator=generator) / 8) @ torch.randn(96, 8, generator=generator)
    noise = 0.5 * torch.randn(target.shape, generator=generator)  # a loss floor near 0.25 that both runs reach
    return x, target / target.std() + noise


def train(state_dtype, steps=200, min_8bit_size=4096, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 8))
    opt = randopt.RandLoRAAdamW(model.parameters(), lr=3e-3, rank=8, alpha=16.0, state_dtype=state_dtype,
                                min_8bit_size=min_8bit_size)
    x, target = regression_task()
    for step in range(steps):
        batch = slice(128 * (step % 32), 128 * (step % 32 + 1))
        torch.nn.functional.mse_loss(model(x[batch]), target[batch]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), target).item(), opt, model


@pytest.mark.parametrize("state_dtype,storage", [("8bit", "8bit"), ("bf16", "bfloat16")])
def test_low_precision_states_track_fp32_over_200_steps(state_dtype, storage):
    """8-bit moments, and the bf16 first moment (the evidence that it is safe to offer), train like fp32."""
    fp32_loss, _, _ = train("fp32")
    low_loss, opt, _ = train(state_dtype, min_8bit_size=256)
    first_loss = train("fp32", steps=1)[0]
    assert fp32_loss < 0.5 * first_loss, "the task must be learnt for the comparison to mean anything"
    assert abs(low_loss - fp32_loss) <= 0.02 * fp32_loss
    summary = state_summary(opt)
    assert summary[storage]["moments"] >= 4


def test_no_silent_fp32_fallback_above_the_threshold():
    _, opt, _ = train("8bit", steps=1, min_8bit_size=256)
    for state in opt.state.values():
        for key, value in state.items():
            if "exp_avg" in key and not key.endswith(("_codes", "_absmax")):
                assert value.numel() < 256, f"{key} of {value.numel()} elements stayed {value.dtype}"
    summary = state_summary(opt)
    fp32_bytes = summary.get("float32", {}).get("bytes", 0)
    assert summary["8bit"]["bytes"] < 0.3 * 4 * summary["8bit"]["elements"]
    assert fp32_bytes < summary["8bit"]["bytes"]


def test_8bit_state_dict_round_trip_resumes_exactly(tmp_path):
    _, opt, model = train("8bit", steps=5, min_8bit_size=256)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    x, target = regression_task()

    def more(m, o):
        losses = []
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(m(x), target)
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss.item())
        return losses

    expected = more(model, opt)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    _, fresh_opt, fresh = train("8bit", steps=0, min_8bit_size=256)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["opt"])
    codes = [v for s in fresh_opt.state.values() for k, v in s.items() if k.endswith("_codes")]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    assert more(fresh, fresh_opt) == expected


def test_bad_state_options_raise():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        randopt.RandLoRAAdamW(model.parameters(), rank=2, state_dtype="int8")
    with pytest.raises(ValueError, match="min_8bit_size must be an integer"):
        randopt.RandLoRAAdamW(model.parameters(), rank=2, state_dtype="8bit", min_8bit_size=-1)
