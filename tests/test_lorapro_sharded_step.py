"""LoRAProAdamW's sharded real step (``_finish_real_step``: DeepSpeed ZeRO simulated in this process, as in
tests/test_step_guarantees.py) and its state checks: tests written for mutants the rest of the suite let through
(issue 13, item 8; benchmarks/mutation.py)."""
import copy

import torch

from randopt.optim.functional import adamw_results
from test_mutation_kills import one_rank_group, second_rank  # noqa: F401 (fixtures)
from test_step_guarantees import LoRAProRun, same, zero_gradients, zero_step

UNITS = ("pair0", "plain W", "plain b", "pair1")


def test_under_zero_the_model_copies_of_pairs_stepped_in_earlier_calls_are_refreshed():
    """A pair's new factors are computed in the last call of the real step, after DeepSpeed copied the partitions of
    the earlier calls to the model: the optimizer refreshes those copies, so every model parameter equals its master
    weight after the step (pair 0 is carried by the first of three calls)."""
    for mode in ("full", "efficient"):
        run = LoRAProRun("zero", mode, "fp32")
        for seed in range(2):
            run.set_gradients(seed)
            before = run.masters["A0"].clone()
            zero_step(run.optimizer, copy_to_model=True)
            assert not torch.equal(run.masters["A0"], before)
            for name, param in run.params.items():
                assert torch.equal(param.detach(), run.masters[name]), (mode, name)


def test_under_zero_full_mode_a_step_whose_gradients_are_all_nonfinite_sends_no_update(second_rank):
    """Full mode under ZeRO (rank 0 of 2, simulated): every rank sees the whole, non-finite gradient of a pair after
    the gradient all-reduce and skips the pair before any update is computed, so when no pair has a finite gradient
    the updates' all-reduce is not made. Each pair counts one skip and keeps its factors, moments and step."""
    second_rank["sends"] = torch.zeros_like
    run = LoRAProRun("zero", "full", "fp32")
    run.set_gradients(0)
    run.step()
    before = {unit: run.unit(unit) for unit in ("pair0", "pair1")}
    reduces = second_rank["all_reduces"]
    run.set_gradients(1)
    for name in ("A0", "B1"):
        run.params[name].grad[0, 0] = float("nan")
    zero_gradients(run.optimizer)
    run.step()
    assert second_rank["all_reduces"] == reduces + 1  # the pairs' fragments only
    assert run.optimizer.skipped_steps == {name: 1 for name in run.optimizer.skipped_steps} and \
        len(run.optimizer.skipped_steps) == 2
    for unit, tensors in before.items():
        after = run.unit(unit)
        first = next(iter(tensors)).split(".")[0]
        assert int(after[f"{first}.nonfinite_skips"]) == 1
        after[f"{first}.nonfinite_skips"] -= 1
        assert same(after, tensors), unit
    assert "A0.w_exp_avg" in before["pair0"] and "A1.w_exp_avg" not in before["pair1"]


def test_under_zero_full_mode_a_ranks_checkpoint_without_the_moments_of_pairs_it_does_not_hold_resumes(second_rank):
    """Full mode under ZeRO keeps pair i's moments on rank i % world only: rank 0 of 2 saves pair 1 with its counters
    and no moments. That checkpoint loads (into the same layout) and resumes exactly where training left off."""
    second_rank["sends"] = torch.zeros_like
    run, resumed = LoRAProRun("zero", "full", "fp32"), LoRAProRun("zero", "full", "fp32")
    for seed in range(2):
        run.set_gradients(seed)
        run.step()
    saved = copy.deepcopy(run.optimizer.state_dict())
    pair1_A = saved["param_groups"][2]["params"][0]
    assert "step" in saved["state"][pair1_A] and not any("exp_avg" in k for k in saved["state"][pair1_A])
    resumed.optimizer.load_state_dict(saved)
    for name, master in resumed.masters.items():
        master.copy_(run.masters[name])
    for r in (run, resumed):
        r.set_gradients(2)
        r.step()
    for unit in UNITS:
        assert same(run.unit(unit), resumed.unit(unit)), unit


def test_loading_a_state_dict_between_the_calls_of_a_zero_real_step_abandons_that_step():
    """A real step interrupted after its first ``step()`` call (pair 0 carried, its fragments waiting for the last
    call), then a checkpoint loaded: the next real step starts afresh and trains exactly as a run that loaded the same
    checkpoint without the interrupted call."""
    runs = interrupted, clean = LoRAProRun("zero", "efficient", "fp32"), LoRAProRun("zero", "efficient", "fp32")
    for r in runs:
        r.set_gradients(0)
        r.step()
    saved = copy.deepcopy(interrupted.optimizer.state_dict())
    interrupted.set_gradients(1)
    groups = interrupted.optimizer.param_groups
    interrupted.optimizer.param_groups = groups[:1]
    interrupted.optimizer.step()
    interrupted.optimizer.param_groups = groups
    for r in runs:
        r.optimizer.load_state_dict(saved)
        r.set_gradients(1)
        r.step()
    for unit in UNITS:
        assert same(interrupted.unit(unit), clean.unit(unit)), unit


def test_adamw_results_of_no_parameters_are_three_empty_lists():
    """Nothing to step: no new parameters and no new moments (the same ``(params, exp_avgs, exp_avg_sqs)`` shape a
    caller unpacks for any number of parameters)."""
    assert adamw_results([], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01) == ([], [], [])
