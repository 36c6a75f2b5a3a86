"""Compact ternary bases: the same values as the dense bases of the same seed, and every product with them equal
to the dense computation (fp64, 1e-12): projection, reconstruction (also of ZeRO-style blocks), the module route
in each contraction order, and RandLoRAAdamW's steps."""
import itertools

import pytest
import torch

import randopt.randlora.autograd as autograd_core
from randopt import RandLoRAAdamW
from randopt.randlora import bases_from_tensors, make_bases, project, reconstruct
from randopt.randlora.autograd import randlora_linear
from randopt.randlora.bases import LayerBases
from randopt.randlora.functional import init_coefficients, scaled_basis
from randopt.randlora.bases import compute_fingerprint
from randopt.randlora.sparse import TernaryMatrix, sparse_supported

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-12)
# (out, in): in < out, in > out (B on the input side), square; d >= 30 so that very_sparse is stored compact
SHAPES = [(70, 40), (40, 70), (48, 48)]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def layers(shape, rank=4, seed=0, max_shape=None):
    """(compact layer, the same layer with its B dense) in fp64."""
    bases = make_bases(max_shape or shape, rank, seed=seed, kind="very_sparse").to(dtype=F64)
    compact = bases.layer(*shape)
    assert isinstance(compact.stored_B, TernaryMatrix) and compact.b_cost(F64) < 1
    return compact, LayerBases(compact.A, compact.B, *shape)


def coefficients(shape, rank=4, seed=5):
    lam, gam = init_coefficients(*shape, rank, dtype=F64)
    return randn(*lam.shape, seed=seed), randn(*gam.shape, seed=seed + 1)


def test_compact_bases_are_the_dense_bases_of_the_seed():
    bases = make_bases((300, 200), 8, seed=3, kind="very_sparse")
    assert isinstance(bases.stored_B, TernaryMatrix)
    assert bases.B.shape == (300, 25, 8) and bases.B.dtype == torch.float32
    assert compute_fingerprint(bases.A, bases.B) == bases.fingerprint
    assert bases_from_tensors(bases.A, bases.B, kind="very_sparse").fingerprint == bases.fingerprint
    values = bases.B.unique()
    assert values.numel() == 3 and abs(bases.B.std().item() - 1) < 1e-5
    for shape in [(300, 200), (200, 300), (120, 64), (9, 9)]:
        layer = bases.layer(*shape)
        d, D = sorted(shape)
        n = layer.num_bases
        assert torch.equal(layer.B, bases.B[:D, :n].reshape(D, n * 8))
    # sparse (density 1/3) is multiplied faster dense, and so is stored dense
    assert isinstance(make_bases((300, 200), 8, seed=3, kind="sparse").stored_B, torch.Tensor)


def test_bases_memory_of_gpt2_sized_very_sparse_bases():
    dense = make_bases((3072, 768), 32, seed=0, kind="dense")
    compact = make_bases((3072, 768), 32, seed=0, kind="very_sparse")
    lam, gam = init_coefficients(3072, 768, 32)
    G = torch.randn(3072, 768)
    for shape in [(3072, 768), (768, 3072), (768, 768)]:
        project(G[: shape[0], : shape[1]], compact, lam[:, : lam.shape[1]], gam[:, : min(shape)], 2.0)
    assert compact.nbytes <= dense.nbytes / 4


@pytest.mark.parametrize("shape", SHAPES, ids=["in<out", "in>out", "square"])
def test_project_and_reconstruct_equal_dense(shape):
    compact, dense = layers(shape, max_shape=(shape[0] + 9, shape[1] + 5))
    lam, gam = coefficients(shape)
    G = randn(*shape, seed=1)
    for got, want in zip(project(G, compact, lam, gam, 0.7), project(G, dense, lam, gam, 0.7)):
        torch.testing.assert_close(got, want, **TOL)
    basis = scaled_basis(compact.A, lam, gam)
    torch.testing.assert_close(reconstruct(compact, basis, 0.7), reconstruct(dense, basis, 0.7), **TOL)
    # ZeRO fragments: a partial first row, whole rows, a partial last row, and rectangles in both orientations
    i, j = shape[0] // 3, shape[1] // 2
    for rows, cols in itertools.product([slice(0, i), slice(i, shape[0] - 1), slice(shape[0] - 1, shape[0])],
                                        [slice(0, j), slice(j, shape[1]), slice(0, shape[1])]):
        block = G[rows, cols]
        got = project(block, compact, lam, gam, 0.7, shape=shape, row_start=rows.start, col_start=cols.start)
        want = project(block, dense, lam, gam, 0.7, shape=shape, row_start=rows.start, col_start=cols.start)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
        torch.testing.assert_close(reconstruct(compact, basis, 0.7, rows=rows, cols=cols),
                                   reconstruct(dense, basis, 0.7, rows=rows, cols=cols), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=["in<out", "in>out", "square"])
def test_reconstruct_in_the_layout_of_a_transposed_weight_gives_the_same_values(shape):
    """A weight stored ``in x out`` (Conv1D) is seen through a transposed view: the update is made in that layout, so
    that adding it runs contiguously, and holds the same values (to rounding: BLAS multiplies in another order)."""
    compact, dense = layers(shape)
    basis = scaled_basis(compact.A, *coefficients(shape))
    for layer in (compact, dense):
        for weight in (torch.zeros(shape, dtype=F64), torch.zeros(shape[::-1], dtype=F64).T):
            update = reconstruct(layer, basis, 0.7, layout_of=weight)
            assert update.stride() == weight.stride()
            torch.testing.assert_close(update, reconstruct(layer, basis, 0.7), **TOL)


@pytest.mark.parametrize("order", list(itertools.product([True, False], repeat=2)),
                         ids=lambda o: f"fwd-{'merged' if o[0] else 'factored'}-bwd-{'merged' if o[1] else 'factored'}")
@pytest.mark.parametrize("dropout", [False, True], ids=["same-input", "x_adapter"])
@pytest.mark.parametrize("shape", SHAPES, ids=["in<out", "in>out", "square"])
def test_module_route_equals_dense(shape, dropout, order, monkeypatch):
    monkeypatch.setattr(autograd_core, "_forward_merged", lambda *a, **k: order[0])
    monkeypatch.setattr(autograd_core, "_backward_merged", lambda *a, **k: order[1])
    compact, dense = layers(shape)
    weight = randn(*shape, seed=2)
    bias = randn(shape[0], seed=3)
    results = []
    for layer in (compact, dense):
        lam, gam = (t.requires_grad_() for t in coefficients(shape))
        x = randn(3, 5, shape[1], seed=4).requires_grad_()
        xa = randn(3, 5, shape[1], seed=6).requires_grad_() if dropout else None
        y = randlora_linear(x, weight, bias, lam, gam, layer, 0.7, x_adapter=xa)
        y.backward(randn(*y.shape, seed=7))
        results.append([y, lam.grad, gam.grad, x.grad] + ([xa.grad] if dropout else []))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)


def test_products_the_sparse_kernels_cannot_do_fall_back_to_dense():
    bases = make_bases((70, 40), 4, seed=0, kind="very_sparse")
    layer = bases.to(dtype=torch.bfloat16).layer(70, 40)
    assert layer.b_cost(torch.bfloat16) == 1.0
    # sparse kernels' throughput is measured on CPU only: elsewhere compact bases are multiplied densely
    assert sparse_supported(torch.float32, torch.device("cpu"))
    assert not sparse_supported(torch.float32, torch.device("cuda"))
    basis = torch.randn(layer.stored_B.cols, 40, dtype=torch.bfloat16)
    torch.testing.assert_close(layer.b_matmul(basis), layer.B @ basis)


def test_cost_model_prices_compact_products():
    """Forming dW through compact bases is cheap, so the module route merges at token counts where it would go
    through dense bases (768x768, 128 tokens: merged 768^3 vs factored 128 * 768 * 1536 multiply-adds)."""
    shape, tokens = (768, 768), 128
    dense_layer = make_bases(shape, 32, kind="dense").layer(*shape)
    compact_layer = make_bases(shape, 32, kind="very_sparse").layer(*shape)
    cost = compact_layer.b_cost(torch.float32)
    assert 0 < cost < 0.25 and dense_layer.b_cost(torch.float32) == 1.0
    assert not autograd_core._forward_merged(dense_layer, tokens, True)
    assert autograd_core._forward_merged(compact_layer, tokens, True)


@pytest.mark.parametrize("weight_update", ["stochastic", "exact"])
def test_optimizer_steps_equal_dense_bases(weight_update):
    """RandLoRAAdamW with compact very_sparse bases takes the same steps as with the same bases stored dense."""
    runs = []
    for store_dense in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.Linear(70, 40)).to(F64)
        opt = RandLoRAAdamW(model.parameters(), lr=1e-2, rank=4, basis_kind="very_sparse",
                            weight_update=weight_update)
        if store_dense:
            group = opt.param_groups[0]
            bases = opt._bases[opt._bases_key(group)]
            opt.set_bases(bases_from_tensors(bases.A, bases.B, kind="dense"), group)
        for step in range(3):
            x = randn(8, 40, seed=step)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert isinstance(make_bases((70, 40), 4, kind="very_sparse").stored_B, TernaryMatrix)
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, **TOL)


def test_injected_modules_keep_compact_bases_through_dtype_moves():
    """inject_randlora with very_sparse bases: the modules hold the compact form as buffers, ``.to(fp64)`` casts
    its values, and outputs and gradients equal those of the same bases stored dense."""
    from randopt.randlora import inject_randlora

    outputs = []
    for store_dense in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.ReLU(), torch.nn.Linear(70, 40))
        bases = make_bases((70, 40), 4, seed=1, kind="very_sparse")
        if store_dense:
            bases = bases_from_tensors(bases.A, bases.B, kind="dense")
        inject_randlora(model, ["0", "2"], rank=4, bases=bases, init_weights=False)
        model.to(F64)
        shared = model[0].shared
        assert isinstance(shared.bases.stored_B, TernaryMatrix) != store_dense
        assert shared.bases.stored_B.dtype == F64 if not store_dense else shared.B.dtype == F64
        torch.manual_seed(1)
        for m in (model[0], model[2]):
            m.randlora_lambda.data.normal_()
        y = model(randn(6, 40, seed=9))
        y.square().sum().backward()
        outputs.append([y] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*outputs):  # the orders differ (compact bases are priced lower): equal up to rounding
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
