"""The gated delta rule's "triton" backend (kernels/delta_rule.py, forward and backward kernels)
equals the reference loop: float64 within 1e-10, float32 within 1e-5
relative, the output, the final state and the gradients of q, k, v, g, beta and the initial
state, with document resets (inside chunks, at a chunk's first and last step), beta up to 2,
lengths that are not a multiple of the chunk, key / value widths that are neither powers of two
nor one tile; Gated DeltaProduct runs on it; torch.compile (fullgraph) takes the op as one node.
(Context parallelism and the model's training step with the kernels:
tests/ops/test_gla_delta_triton_e2e.py.)

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small. Every kernel output is allocated NaN-filled, so an element a kernel never
writes fails. (bf16 tl.dot is wrong under the interpreter: bf16 is checked on a GPU only.)
"""
import importlib

import pytest
import torch

from megarnn.ops import gated_delta_rule
from megarnn.ops.delta_rule import gated_delta_product
from tests.ops.kernel_checks import fill_outputs_with_nan
from tests.ops.test_delta_rule import NAMES, _inputs, _rel, _run

ops_delta = importlib.import_module("megarnn.ops.delta_rule")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = ops_delta._delta_kernels(torch.zeros(1, device=DEVICE))  # megarnn_kernels.delta_rule


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, kernels)


def _on(inputs, dtype):
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in inputs]


def _check(inputs, chunk, dtype, tol, grads=True):
    ref = _run(inputs, "reference", grads=grads)
    got = _run(_on(inputs, dtype), "triton", chunk, grads=grads)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    errs = {"o": _rel(got[0].cpu().double(), ref[0]), "state": _rel(got[1].cpu().double(), ref[1])}
    if grads:
        errs.update({f"d{n}": _rel(g.cpu().double(), r) for n, g, r in zip(NAMES, got[2], ref[2])})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {bad}"


@pytest.fixture
def wide(monkeypatch):
    """fp32 / fp64 with the 64-step chunks and 64-channel tiles of bf16 on a GPU (bf16 products
    are wrong under the interpreter): four sub-chunks, pairs across whole sub-chunks."""
    for size in (4, 8):
        monkeypatch.setitem(kernels.MAX_TILE, size, 64)


@pytest.mark.parametrize("T,chunk", [(40, 16), (70, 64)])
def test_triton_equals_reference_in_float64(T, chunk, wide):
    _check(_inputs(T=T, H=2), chunk, torch.float64, 1e-10)


def test_backward_chunk_is_capped_for_unaligned_widths(wide):
    """The backward keeps 64-step chunks when K and V are multiples of 16 and takes 32-step ones
    otherwise (its chunk kernel loads element by element there and spills at 64); the forward
    keeps 64. The 64-step backward equals the reference (the test above runs the capped one)."""
    for K, V, q_bwd in ((16, 16, 64), (8, 5, 32), (40, 24, 32)):
        q, k, v, g, beta, _, _ = _inputs(T=70, H=1, K=K, V=V)
        assert kernels._plan(q, k, v, g, beta, 64).Q == 64
        assert kernels._plan(q, k, v, g, beta, 64, backward=True).Q == q_bwd
    _check(_inputs(T=70, H=1, K=16, V=16), 64, torch.float64, 1e-10)


def test_triton_equals_reference_in_float32():
    _check(_inputs(T=37, H=2), 32, torch.float32, 1e-5)


def test_several_tiles_ragged_widths():
    """K = 80, V = 70: several key and value tiles, the last ones masked, forward and gradients;
    then without an initial state or resets."""
    inputs = _inputs(B=2, T=24, H=1, K=80, V=70)
    _check(inputs, 16, torch.float64, 1e-10)
    leaves = [t.clone().requires_grad_() for t in inputs[:5]]
    got = gated_delta_rule(*leaves, chunk_size=16, backend="triton")
    ref_leaves = [t.clone().requires_grad_() for t in inputs[:5]]
    ref = gated_delta_rule(*ref_leaves, backend="reference")
    assert _rel(got[0], ref[0]) <= 1e-10 and _rel(got[1], ref[1]) <= 1e-10
    torch.autograd.backward([got[0].sum() + got[1].square().sum(), ref[0].sum() + ref[1].square().sum()])
    for n, a, b in zip(NAMES, leaves, ref_leaves):
        assert _rel(a.grad, b.grad) <= 1e-10, n


def test_delta_product_runs_on_the_kernels():
    q, k, v, g, beta, s0, reset = _inputs(T=24)
    n = 2
    kn, vn, bn = (torch.cat([t, t.flip(1)], 1).reshape(t.shape[0], n * t.shape[1], *t.shape[2:]) for t in (k, v, beta))
    ref = gated_delta_product(q, kn, vn, g, bn, n, s0, reset, backend="reference")
    got = gated_delta_product(q, kn, vn, g, bn, n, s0, reset, chunk_size=16, backend="triton")
    assert _rel(got[0], ref[0]) <= 1e-10 and _rel(got[1], ref[1]) <= 1e-10


def test_compiles_in_one_graph_and_matches_eager():
    q, k, v, g, beta, s0, reset = _on(_inputs(B=2, T=20, H=1, K=8, V=8), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, s0)]

    def f(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, s0, reset, chunk_size=16, backend="triton")
        return o.square().sum() + s.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
