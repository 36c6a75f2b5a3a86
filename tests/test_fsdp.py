"""FSDP2 (torch ``fully_shard``): RandLoRAAdamW and LoRAProAdamW in real 2-rank runs on CPU (gloo), one torchrun
launch for all cases of ``scripts/fsdp2.py``: equal to one process on the global batch, DCP resume, refusals."""
import pytest
import torch

from distributed import run_distributed

STEPS = 5


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_distributed("fsdp2.py", out, timeout=600)
    return torch.load(out / "results.pt", weights_only=False)


def assert_matches_reference(run, atol=1e-5):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(run["reference_losses"]), rtol=0, atol=atol)
    assert run["weights"].keys() == run["reference_weights"].keys()
    for name, expected in run["reference_weights"].items():
        torch.testing.assert_close(run["weights"][name], expected, rtol=0, atol=atol, msg=name)


@pytest.mark.distributed
def test_randlora_equals_single_process_with_one_coefficient_all_reduce_per_step(fsdp_runs):
    """Uneven shards (7 rows -> 4 + 3, an empty shard on rank 1), 2 accumulated micro-batches, clipping on
    DTensors, a Conv1D matrix sharded along its input dimension: the same losses and weights as one process on the
    global batch; the optimizer's only traffic is one all-reduce of the coefficient gradients per step."""
    run = fsdp_runs["randlora"]
    assert run["fan_in_fan_out_matrices"] == 1
    assert_matches_reference(run)
    assert run["coefficient_bytes"] > 0
    assert run["communicated"] == {"all_reduces": STEPS, "bytes": STEPS * run["coefficient_bytes"]}


@pytest.mark.distributed
@pytest.mark.parametrize("mode, factor_copies", [("full", 3), ("efficient", 2)])
def test_lorapro_equals_single_process(fsdp_runs, mode, factor_copies):
    """Pairs assembled from their shards (weights and gradients: two factor-sized copies); full mode's m x n moments
    stay sharded by W's rows and only the factor-sized direction gradients travel (one more copy)."""
    run = fsdp_runs[f"lorapro_{mode}"]
    assert run["optimizer_class"] == "LoRAProAdamW"
    assert any("base_layer.weight" in name for name in run["weights"])
    assert_matches_reference(run)
    all_reduces = STEPS * (2 if mode == "full" else 1)
    assert run["communicated"] == {"all_reduces": all_reduces, "bytes": STEPS * factor_copies * run["factor_bytes"]}


@pytest.mark.distributed
def test_mixed_precision_policy_trains_like_fp32(fsdp_runs):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) runs on gloo/CPU: bf16 compute (losses differ from
    fp32), fp32 sharded parameters and optimizer, the same coefficient traffic, close to the fp32 run."""
    run = fsdp_runs["randlora_bf16_compute"]
    assert run["losses"] != run["reference_losses"], "the bf16 policy must have changed the compute"
    assert_matches_reference(run, atol=5e-3)
    assert run["communicated"] == {"all_reduces": STEPS, "bytes": STEPS * run["coefficient_bytes"]}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["randlora_resume_sharded", "randlora_resume_full", "lorapro_full_resume_sharded",
                                  "lorapro_full_resume_full"])
def test_checkpoint_resume_is_exact(fsdp_runs, case):
    """get/set_optimizer_state_dict (sharded through DCP, or full state dicts) at step 3 of 5: the resumed run
    continues exactly; state holds tensors only."""
    run = fsdp_runs[case]
    assert run["state_tensors_only"]
    assert run["resumed_losses"] == run["losses"]
    for name, value in run["weights"].items():
        assert torch.equal(run["resumed_weights"][name], value), name


@pytest.mark.distributed
@pytest.mark.parametrize("setup, words", [("fsdp1", "FSDP1"), ("hsdp", "HSDP"), ("8bit", "8bit"),
                                          ("exact", "weight_update='exact'")])
def test_unsupported_sharding_is_refused(fsdp_runs, setup, words):
    assert words in fsdp_runs["refused"][setup]


@pytest.mark.distributed
def test_trainer_with_fsdp2_trains_and_resumes_from_its_sharded_checkpoint(fsdp_runs):
    """TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"})
    with optimizer_cls_and_kwargs=randopt_optimizer(...): the Trainer builds the optimizer before sharding, accelerate
    swaps in the DTensors, ours trains them (one coefficient all-reduce per step); resuming from checkpoint-2 gives
    the same losses and weights."""
    run = fsdp_runs["trainer_randlora"]
    assert run["optimizer"] == "RandLoRAAdamW" and run["sharded"]
    assert run["communicated"]["all_reduces"] == 4
    assert {"randopt/lambda_norm", "randopt/update_norm"} <= set(run["logged_metrics"])
    assert run["adapter_exported"], "RandoptCallback exports the RandLoRA adapter at each save"
    assert run["resumed_losses"] == run["losses"]
    for name, value in run["weights"].items():
        assert torch.equal(run["resumed_weights"][name], value), name


@pytest.mark.distributed
def test_accelerate_prepare_swaps_parameters_and_lorapro_still_decays_the_base_weight(fsdp_runs):
    """LoRAProAdamW(model) built before accelerator.prepare(model, optimizer): after the swap, full mode's weight decay
    reaches the model's sharded W0 (1 - lr * wd per step, two steps)."""
    run = fsdp_runs["accelerate_lorapro"]
    assert run["sharded"] and run["steps"] == 2
    assert run["base_weight_decay"] == pytest.approx((1 - 1e-2 * 0.1) ** 2, abs=1e-6)
