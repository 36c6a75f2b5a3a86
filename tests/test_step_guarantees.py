"""What a step promises: all or nothing (a failure anywhere inside leaves weight, coefficients and moments as they
were), no NaN/inf ever written (skipped and counted instead), and fused backward accumulating like unfused."""
import copy
import types
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import randopt
from randopt.lorapro import lorapro_groups
from randopt.optim import functional as functional_module
from randopt.optim import precision as precision_module
from randopt.optim import randlora_adamw as randlora_module
from randopt.optim import state as state_module

import distributed
from test_validation import Pair, TwoLayer, assert_same, backward, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Injected(RuntimeError):
    pass


def failing_at(function, call):
    """``function`` raising ``Injected`` at its ``call``-th call (0-based)."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 == call:
            raise Injected(f"{function.__name__} call {call}")
        return function(*args, **kwargs)
    return wrapper


def failed_with(step, owner, name, call) -> bool:
    """Run ``step()`` with ``owner.name`` (a module's function, or an optimizer's method) failing at its ``call``-th
    call; whether it failed. ``owner`` is restored either way."""
    patched_instance = not isinstance(owner, types.ModuleType)
    original = getattr(owner, name)
    setattr(owner, name, failing_at(original, call))
    try:
        step()
        return False
    except Injected:
        return True
    finally:
        if patched_instance:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


# functions a step calls while it computes (for the matrices and for the plain parameters, here the biases; the
# last two run inside the AdamW rule, after it has started): a failure in any of them must leave everything as it was
STEP_FUNCTIONS = {
    "reconstruct": (randlora_module, "reconstruct"), "scaled_basis": (randlora_module, "scaled_basis"),
    "adamw_results": (randlora_module, "adamw_results"), "read_moment": (randlora_module, "read_moment"),
    "encode_moment": (randlora_module, "encode_moment"), "quantize": (state_module, "quantize"),
    "_adam_directions": (functional_module, "_adam_directions"), "add_": (torch, "_foreach_add_"),
    "stochastic_round_bf16": (precision_module, "stochastic_round_bf16"),  # bf16 weights: the rounded new weight
}


def assert_each_parameter_all_or_nothing(model, optimizer, before):
    """Per parameter (matrices and plain ones), a step happened completely or not at all: when its step count did
    not move, neither did its weight, coefficients, moments (nor a kept ``W0`` appear)."""
    after = snapshot(model, optimizer)
    for name, param in model.named_parameters():
        prefix = f"state.{id(param)}."
        step_key = prefix + "step"
        if step_key in before and torch.equal(before[step_key], after[step_key]):
            keys = [k for k in before if k.startswith(prefix)] + [f"model.{name}"]
            for key in keys:
                assert torch.equal(before[key], after[key]), key
            assert set(k for k in after if k.startswith(prefix)) == set(k for k in before if k.startswith(prefix))
        elif step_key not in before:  # fresh start: the failing step left nothing behind but zero state
            assert torch.equal(before[f"model.{name}"], after[f"model.{name}"]) or int(after[step_key]) == 1


@settings(max_examples=30, deadline=None)
@given(function=st.sampled_from(sorted(STEP_FUNCTIONS)), call=st.integers(0, 5),
       weight_update=st.sampled_from(["stochastic", "exact"]), state_dtype=st.sampled_from(["fp32", "8bit"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_a_failure_inside_a_randlora_step_leaves_everything_as_it_was(function, call, weight_update, state_dtype,
                                                                      dtype):
    model = TwoLayer().to(dtype)
    optimizer = randopt.RandLoRAAdamW(model.parameters(), rank=2, weight_update=weight_update,
                                      state_dtype=state_dtype, min_8bit_size=1)
    for seed in range(2):  # from a fresh start and from a trained state
        optimizer.zero_grad()
        backward(model, seed)
        before = snapshot(model, optimizer)
        rng_before = {k: g.get_state() for k, g in optimizer._generators.items()}
        if failed_with(optimizer.step, *STEP_FUNCTIONS[function], call):
            assert_each_parameter_all_or_nothing(model, optimizer, before)
            assert {k: g.get_state() for k, g in optimizer._generators.items()}.keys() <= rng_before.keys() or \
                not rng_before
            optimizer.step()  # the same step, now without the failure, works
        assert all(torch.isfinite(p).all() for p in model.parameters())


PLAIN = ("q.bias", "v.bias", "v.weight")  # the matrix q.weight: test_a_failure_inside_a_randlora_step_leaves_...


def plain_parameters(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """``{parameter name: {"weight": ..., state key: ...}}`` of the ``PLAIN`` parameters, copied."""
    return {name: {"weight": p.detach().clone(),
                   **{k: v.clone() for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor)}}
            for name, p in model.named_parameters() if name in PLAIN}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def as_before(after: dict, before: dict) -> bool:
    """``after`` is ``before``, or (from a fresh start) ``before``'s weight with a new state at step 0."""
    if before.keys() == {"weight"} and after.get("step", 0) == 0:
        return torch.equal(after["weight"], before["weight"])
    return same(after, before)


@pytest.mark.parametrize("function,dtype", [
    *((function, dtype) for function in ["_adam_directions", "add_", "encode_moment", "read_moment"]
      for dtype in [torch.float32, torch.bfloat16]),
    ("stochastic_round_bf16", torch.bfloat16)])
def test_a_failure_inside_the_plain_parameters_adamw_leaves_them_as_they_were(function, dtype):
    """Plain parameters (biases, and a whole matrix in a ``rank=None`` group) in two groups, batched per group: a
    failure at any call while their AdamW computes, from a fresh start and from a trained state, leaves each one
    (weight, moments, step count) exactly as before or exactly as after a clean step, and the step then works."""
    def make_optimizer(model):
        return randopt.RandLoRAAdamW([{"params": [model.q.weight, model.q.bias, model.v.bias]},
                                      {"params": [model.v.weight], "rank": None}], rank=2)

    model = TwoLayer().to(dtype)
    optimizer = make_optimizer(model)
    failures = 0
    for seed in range(2):
        optimizer.zero_grad()
        backward(model, seed)
        for call in range(6):
            clean_model = copy.deepcopy(model)
            for p, clean_p in zip(model.parameters(), clean_model.parameters()):
                clean_p.grad = p.grad.clone()
            clean_optimizer = make_optimizer(clean_model)
            clean_optimizer.load_state_dict(optimizer.state_dict())
            clean_optimizer.step()
            clean = plain_parameters(clean_model, clean_optimizer)
            before = plain_parameters(model, optimizer)
            if not failed_with(optimizer.step, *STEP_FUNCTIONS[function], call):
                break  # the step ran to its end
            failures += 1
            for name, after in plain_parameters(model, optimizer).items():
                assert as_before(after, before[name]) or same(after, clean[name]), (name, function, call)
        else:
            optimizer.step()
    assert failures >= 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exact_update_with_state_from_another_partitioning_fails_before_anything_moves():
    model = TwoLayer()
    optimizer = randopt.RandLoRAAdamW(model.parameters(), rank=2, weight_update="exact")
    backward(model)
    optimizer.step()
    state = optimizer.state[model.q.weight]
    state["base_weight"] = state["base_weight"][:-1].clone()
    optimizer.zero_grad()
    backward(model, 1)
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match="different partitioning"):
        optimizer.step()
    for key in before:
        if f"state.{id(model.q.weight)}." in key or key == "model.q.weight":
            assert torch.equal(before[key], snapshot(model, optimizer)[key]), key


def lorapro_with_head(scale=2.0, mode="full", dtype=torch.float32):
    pair, head = Pair().to(dtype), torch.nn.Linear(4, 3).to(dtype)
    optimizer = randopt.LoRAProAdamW(lorapro_groups([(pair.A, pair.B, scale)], mode=mode)
                                     + [{"params": head.parameters()}], mode=mode)

    def run_backward(seed=0):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        head(pair(x)).square().sum().backward()
    return pair, head, optimizer, run_backward


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_skips_and_counts_plain_parameters_with_nonfinite_gradients(mode):
    pair, head, optimizer, run_backward = lorapro_with_head(mode=mode)
    run_backward()
    optimizer.step()
    optimizer.zero_grad()
    run_backward(1)
    head.weight.grad[0, 0] = float("nan")
    head_before, bias_before, A_before = head.weight.clone(), head.bias.clone(), pair.A.clone()
    optimizer.step()
    assert torch.equal(head.weight, head_before)
    assert not torch.equal(head.bias, bias_before) and not torch.equal(pair.A, A_before)
    assert optimizer.nonfinite_skips == 1 and optimizer.skipped_steps == {"pair0": 0}
    assert int(optimizer.state[head.weight]["step"]) == 1 and int(optimizer.state[head.bias]["step"]) == 2
    assert all(torch.isfinite(p).all() for p in (*head.parameters(), pair.A, pair.B))


def test_lorapro_tiny_scale_gives_a_counted_skip_not_nan():
    pair, head, optimizer, run_backward = lorapro_with_head(scale=1e-30)
    run_backward()
    assert all(torch.isfinite(p.grad).all() for p in (pair.A, pair.B))
    before = snapshot(pair, optimizer)
    optimizer.step()
    assert optimizer.skipped_steps == {"pair0": 1}
    after = snapshot(pair, optimizer)
    for key in before:
        if "nonfinite_skips" not in key and (key.startswith("model.") or f"state.{id(pair.A)}." in key):
            assert torch.equal(before[key], after[key]), key
    assert all(torch.isfinite(p).all() for p in (pair.A, pair.B))


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
def test_lorapro_full_step_never_writes_into_the_stored_moments(state_dtype):
    """Full mode's step shares the stored ``m x n`` moments with its copy of the state instead of cloning them, which
    is safe only because it replaces them by new tensors: the tensors stored before a step keep their values."""
    pair, head, optimizer, run_backward = lorapro_with_head()
    optimizer = randopt.LoRAProAdamW(lorapro_groups([(pair.A, pair.B, 2.0)]), state_dtype=state_dtype, min_8bit_size=1)
    for seed in range(3):
        optimizer.zero_grad()
        run_backward(seed)
        stored = {key: (value, value.clone()) for key, value in optimizer.state[pair.A].items() if "w_exp_avg" in key}
        optimizer.step()
        for key, (tensor, values) in stored.items():
            assert torch.equal(tensor, values), key
            assert optimizer.state[pair.A][key] is not tensor and optimizer.state[pair.A][key].dtype == tensor.dtype
        assert int(optimizer.state[pair.A]["step"]) == seed + 1


# ----- LoRAProAdamW: every step path all or nothing --------------------------------------------------------------
class _Address(NamedTuple):
    start: int
    numel: int


class _FragmentMapping:
    """DeepSpeed ZeRO 1/2's ``_hp_mapping`` of a parameter this (only) rank owns whole, at ``start`` in ``flat``."""

    def __init__(self, flat, start, param):
        self.flat, self.param = flat, param
        self.lp_fragment_address = _Address(0, param.numel())
        self._hp = _Address(start, param.numel())

    def get_hp_fragment_address(self):
        return self._hp

    def update_lp(self):
        self.param.data.copy_(self.master())

    def master(self):
        return self.flat.narrow(0, self._hp.start, self._hp.numel).view_as(self.param)


def zero_partitions(optimizer) -> dict:
    """DeepSpeed ZeRO 1/2 on one rank, as the optimizer sees it: each group's parameters replaced by one flat fp32
    partition holding them all, each original parameter given an ``_hp_mapping`` into it. Returns each parameter's
    master weight (a view into its partition)."""
    masters = {}
    for group in optimizer.param_groups:
        originals = list(group["params"])
        flat = torch.cat([q.detach().reshape(-1) for q in originals])
        offset = 0
        for q in originals:
            q._hp_mapping = _FragmentMapping(flat, offset, q)
            masters[q] = q._hp_mapping.master()
            offset += q.numel()
        group["params"] = [flat]
    return masters


def zero_gradients(optimizer) -> None:
    """Each partition's gradient from its parameters' ``.grad`` (DeepSpeed's reduced, flattened gradients)."""
    for group in optimizer.param_groups:
        group["params"][0].grad = torch.cat([q.grad.reshape(-1) for q in optimizer._params_of(group)])


def zero_step(optimizer, copy_to_model: bool = False) -> None:
    """One real step as DeepSpeed ZeRO 1/2 makes it: one ``step()`` call per group, showing only that group; with
    ``copy_to_model``, also what DeepSpeed does after each call: copy that call's partition to the model's
    (low-precision) parameters."""
    groups = optimizer.param_groups
    try:
        for group in list(groups):
            optimizer.param_groups = [group]
            optimizer.step()
            if copy_to_model:
                for p in optimizer._params_of(group):
                    p._hp_mapping.update_lp()
    finally:
        optimizer.param_groups = groups


class LoRAProRun:
    """Two LoRA pairs and a plain group (a matrix and a vector) between them, in one of three storages: ``whole``
    tensors, ``zero`` (DeepSpeed ZeRO 1/2's flat fp32 partitions, one ``step()`` call per group, as DeepSpeed makes
    them, located through ``_hp_mapping``) or ``fsdp2`` (DTensors sharded on dim 0 over a 1-rank mesh). Built the same
    way twice, two runs step bit for bit alike."""

    def __init__(self, storage, mode, state_dtype, scales=(2.0, 0.5)):
        generator = torch.Generator().manual_seed(0)
        shapes = {"A0": (2, 6), "B0": (5, 2), "W": (3, 4), "b": (3,), "A1": (3, 4), "B1": (6, 3)}
        tensors = {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}
        self.storage = storage
        if storage == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (1,))
            self.distribute = lambda t: distribute_tensor(t, mesh, [Shard(0)])
            tensors = {name: self.distribute(t) for name, t in tensors.items()}
        self.params = {name: torch.nn.Parameter(t) for name, t in tensors.items()}
        p = self.params
        pair_groups = lorapro_groups([(p["A0"], p["B0"], scales[0]), (p["A1"], p["B1"], scales[1])], mode=mode)
        self.optimizer = randopt.LoRAProAdamW([pair_groups[0], {"params": [p["W"], p["b"]]}, pair_groups[1]],
                                              lr=0.05, mode=mode, state_dtype=state_dtype, min_8bit_size=1)
        self.units = {"pair0": ["A0", "B0"], "plain W": ["W"], "plain b": ["b"], "pair1": ["A1", "B1"]}
        self.masters = {name: param for name, param in p.items()}
        if storage == "zero":
            masters = zero_partitions(self.optimizer)
            self.masters = {name: masters[param] for name, param in p.items()}

    def set_gradients(self, seed):
        generator = torch.Generator().manual_seed(100 + seed)
        grads = {name: torch.randn(param.shape, generator=generator) for name, param in self.params.items()}
        if self.storage == "fsdp2":
            grads = {name: self.distribute(g) for name, g in grads.items()}
        for name, param in self.params.items():
            param.grad = grads[name]
        if self.storage == "zero":
            zero_gradients(self.optimizer)

    def step(self):
        if self.storage == "zero":
            zero_step(self.optimizer)
        else:
            self.optimizer.step()

    def unit(self, name) -> dict:
        """Copies of the unit's master weights and of every state tensor (local shards of DTensors)."""
        from randopt.optim.locators import local_part

        tensors = {}
        for param_name in self.units[name]:
            tensors[param_name] = local_part(self.masters[param_name]).detach().clone()
            for key, value in self.optimizer.state.get(self.params[param_name], {}).items():
                tensors[f"{param_name}.{key}"] = local_part(value).clone()
        return tensors


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo process group (FSDP2's DTensors need one); the other storages ignore it."""
    with distributed.one_rank_group() as mesh:
        yield mesh


# what a LoRA-Pro step calls while it computes (and under sharding, its all-reduces): each may fail
LORAPRO_STEP_FUNCTIONS = ["factor_grams", "projected_gradient", "lora_gradients", "adjust_gradients",
                          "adam_direction", "updated_moments", "adamw_results", "_adam_directions", "read_moment",
                          "encode_moment", "quantize", "_all_reduce_"]


@pytest.mark.parametrize("storage,state_dtype", [("whole", "fp32"), ("whole", "8bit"), ("zero", "fp32"),
                                                 ("zero", "8bit"), ("fsdp2", "fp32")])
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_a_failure_inside_a_lorapro_step_leaves_every_pair_and_parameter_as_it_was(one_rank_group, storage,
                                                                                   state_dtype, mode):
    """A failure at any call of any function a step computes with, from a fresh start or a trained state: every
    pair and every plain parameter is afterwards either exactly as before the step or exactly as after a clean
    one (weights, moments, counters), and the next step works."""
    from randopt.optim import lorapro_adamw

    failures = 0
    for function in LORAPRO_STEP_FUNCTIONS:
        for call in range(3):
            for clean_steps in (0, 1):
                runs = [LoRAProRun(storage, mode, state_dtype) for _ in range(2)]
                for seed in range(clean_steps):
                    for run in runs:
                        run.set_gradients(seed)
                        run.step()
                reference, run = runs
                for r in runs:
                    r.set_gradients(clean_steps)
                before = {name: run.unit(name) for name in run.units}
                reference.step()
                owner = run.optimizer if function == "_all_reduce_" else state_module if function == "quantize" else \
                    functional_module if function == "_adam_directions" else lorapro_adamw
                failed = failed_with(run.step, owner, function, call)
                for name in run.units:
                    after = run.unit(name)
                    assert same(after, before[name]) or same(after, reference.unit(name)), \
                        (function, call, clean_steps, name)
                if failed:
                    failures += 1
                    run.set_gradients(clean_steps + 1)
                    run.step()  # the optimizer still works
                    assert all(torch.isfinite(run.unit(name)[p]).all() for name in run.units
                               for p in run.units[name])
    assert failures  # the injections reached the step


@pytest.mark.parametrize("optimizer_name", ["RandLoRAAdamW", "LoRAProAdamW"])
def test_a_bad_option_on_a_group_deepspeed_steps_in_a_later_call_changes_nothing(optimizer_name):
    """DeepSpeed ZeRO shows the optimizer one group per ``step()`` call: a bad learning rate on the last group is
    refused at the first call of the real step, before the plain parameters of the first group move."""
    if optimizer_name == "LoRAProAdamW":
        run = LoRAProRun("zero", "full", "fp32")
        optimizer, masters, set_gradients = run.optimizer, run.masters.values(), run.set_gradients
    else:
        model = TwoLayer()
        optimizer = randopt.RandLoRAAdamW([{"params": [model.q.weight, model.q.bias]},
                                           {"params": [model.v.weight, model.v.bias]}], rank=2)
        masters = zero_partitions(optimizer).values()

        def set_gradients(seed):
            optimizer.zero_grad()
            backward(model, seed)
            zero_gradients(optimizer)
    set_gradients(0)
    zero_step(optimizer)
    set_gradients(1)
    before = [m.clone() for m in masters], copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.param_groups[-1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        zero_step(optimizer)
    assert all(torch.equal(a, m) for a, m in zip(before[0], masters))
    after = optimizer.state_dict()["state"]
    assert before[1].keys() == after.keys() and all(
        torch.equal(value, after[i][k]) for i, s in before[1].items() for k, value in s.items())
    optimizer.param_groups[-1]["lr"] = 1e-3
    zero_step(optimizer)
    assert not all(torch.equal(a, m) for a, m in zip(before[0], masters))


@pytest.mark.parametrize("storage", ["whole", "zero", "fsdp2"])
def test_lorapro_tiny_scale_is_a_counted_skip_under_every_storage(one_rank_group, storage):
    run = LoRAProRun(storage, "full", "fp32", scales=(1e-30, 0.5))
    run.set_gradients(0)
    before = run.unit("pair0")
    run.step()
    assert run.optimizer.skipped_steps == {"pair0": 1, "pair1": 0}
    after = run.unit("pair0")
    assert torch.equal(after["A0"], before["A0"]) and torch.equal(after["B0"], before["B0"])
    assert int(after["A0.step"]) == 0 and not after["A0.w_exp_avg"].any()
    assert all(torch.isfinite(run.unit(name)[p]).all() for name in run.units for p in run.units[name])


def test_zero_eps_is_refused_because_a_zero_gradient_would_give_nan():
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        randopt.RandLoRAAdamW(TwoLayer().parameters(), rank=2, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        randopt.LoRAProAdamW(lorapro_groups([(Pair().A, Pair().B, 1.0)]), eps=0)


def test_fused_backward_without_zero_grad_keeps_accumulating_like_grad_does():
    """No ``zero_grad`` between steps: ``.grad`` keeps adding up (plain parameters), and so do fused backward's
    projections of the matrices' gradients (each taken at the coefficients of its backward pass), until
    ``zero_grad``."""
    model = TwoLayer().double()
    optimizer = randopt.RandLoRAAdamW(model.parameters(), rank=2, fused_backward=True)
    expected, bias_grads = None, []
    for seed in range(3):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        # this pass's projection at the current coefficients, from an unfused copy of the gradient
        reference = TwoLayer().double()
        reference.load_state_dict(model.state_dict())
        reference(x).square().sum().backward()
        bias_grads.append(reference.q.bias.grad)
        weight = model.q.weight
        group = optimizer._group_of[weight]
        optimizer._init_state(weight, group)
        blocks = [(reference.q.weight.grad, weight, slice(0, 5), slice(0, 6))]
        projection = optimizer._project_blocks(weight, group, blocks)
        expected = projection if expected is None else [e + g for e, g in zip(expected, projection)]
        model(x).square().sum().backward()
        for total, want in zip(optimizer._accumulated[weight], expected):
            torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(model.q.bias.grad, sum(bias_grads), rtol=1e-12, atol=1e-14)
        optimizer.step()
    optimizer.zero_grad()
    assert not optimizer._accumulated and model.q.bias.grad is None


# ----- LoRAProAdamW's base-weight decay is opt-in ----------------------------------------------------------------
def test_lorapro_full_mode_leaves_w0_alone_unless_asked():
    A, B = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(4, 2))
    W0 = torch.randn(4, 6)
    original = W0.clone()
    for decay in (False, True):
        optimizer = randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0, W0)]), weight_decay=0.5, lr=0.1,
                                         decay_base_weight=decay)
        (torch.randn(3, 6) @ (W0 + B @ A).T).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if not decay:
            assert torch.equal(W0, original)
    torch.testing.assert_close(W0, original * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lorapro_base_decay_is_refused_where_it_cannot_be_exact(dtype):
    A, B = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="decay_base_weight=True cannot decay a"):
        randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0, torch.randn(4, 6, dtype=dtype))]), decay_base_weight=True)
    with pytest.raises(ValueError, match="needs the pair's frozen W0"):
        randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0)]), decay_base_weight=True)
    randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0, torch.randn(4, 6, dtype=dtype))]))  # off: fine
    randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0)]), decay_base_weight=True, mode="efficient")  # no W0 decay there


def test_lorapro_warns_about_lora_on_embeddings():
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UserWarning, match="LoRA on an embedding"):
        optimizer = randopt.LoRAProAdamW(model)
    plain = [g for g in optimizer.param_groups if g["lora_scale"] is None]
    assert any(p is model.base_model.model.model.embed_tokens.lora_embedding_A["default"]
               for g in plain for p in g["params"])


def test_trainer_callback_warns_at_save_when_base_decay_was_on(tmp_path):
    transformers_integration = pytest.importorskip("randopt.integrations.transformers")
    from types import SimpleNamespace
    A, B = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(4, 2))
    callback = transformers_integration.RandoptCallback(export_adapter=False)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=1, is_world_process_zero=True)
    with pytest.warns(UserWarning, match="decay_base_weight=True"):
        callback.on_save(args, state, None, optimizer=randopt.LoRAProAdamW(
            lorapro_groups([(A, B, 1.0, torch.randn(4, 6))]), decay_base_weight=True))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_save(args, state, None, optimizer=randopt.LoRAProAdamW(lorapro_groups([(A, B, 1.0)])))


def test_steps_the_deepspeed_engine_skips_are_counted(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    plugin = pytest.importorskip("randopt.integrations.deepspeed")
    transformers_integration = pytest.importorskip("randopt.integrations.transformers")
    from types import SimpleNamespace
    model = TwoLayer()
    engine = SimpleNamespace(skipped_steps=0)

    def fake_initialize(model, config, optimizer):
        engine.basic_optimizer = optimizer
        return engine, optimizer, None, None
    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    _, optimizer, _, _ = plugin.initialize(model=model, config={"randopt": {
        "optimizer": "RandLoRAAdamW", "params": {"rank": 2}, "target_modules": ["q", "v"]}})
    assert optimizer.engine_skipped_steps == 0
    engine.skipped_steps = 3  # the engine saw NaN gradients three times and never called the optimizer
    assert optimizer.engine_skipped_steps == 3 and optimizer.nonfinite_skips == 0
    assert transformers_integration.optimizer_metrics(optimizer)["randopt/engine_skipped_steps"] == 3.0


def test_the_trainer_callback_tracks_the_engine_the_trainer_runs():
    """``RandoptCallback.attach(trainer)`` hands the Trainer's DeepSpeed engine (``trainer.model_wrapped``) to the
    optimizer when training begins; a callback that cannot know the Trainer warns under DeepSpeed instead."""
    transformers_integration = pytest.importorskip("randopt.integrations.transformers")
    pytest.importorskip("randopt.integrations.deepspeed")
    from types import SimpleNamespace

    class Trainer:  # what the callback reads of a transformers Trainer running DeepSpeed
        def __init__(self, engine):
            self.callback_handler = SimpleNamespace(callbacks=[])
            self.model_wrapped = engine

    optimizer = randopt.RandLoRAAdamW(TwoLayer().parameters(), rank=2)
    engine = SimpleNamespace(basic_optimizer=optimizer, skipped_steps=0)
    trainer = Trainer(engine)
    callback = transformers_integration.RandoptCallback.attach(trainer, export_adapter=False)
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, learning_rate=1e-3)
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer))  # accelerate's and DeepSpeed's wrappers
    callback.on_train_begin(args, None, None, optimizer=wrapped)
    engine.skipped_steps = 2
    assert optimizer.engine is engine and optimizer.engine_skipped_steps == 2
    logs = {"loss": 1.0}
    callback.on_log(args, SimpleNamespace(log_history=[]), None, logs=logs, optimizer=wrapped)
    assert logs["randopt/engine_skipped_steps"] == 2.0 and logs["randopt/nonfinite_skips"] == 0.0

    unattached = randopt.RandLoRAAdamW(TwoLayer().parameters(), rank=2)
    with pytest.warns(UserWarning, match=r"cannot see the engine.*RandoptCallback.attach\(trainer\)"):
        transformers_integration.RandoptCallback().on_train_begin(args, None, None, optimizer=unattached)
    assert unattached.engine is None
