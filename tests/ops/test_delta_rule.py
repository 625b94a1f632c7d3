"""The gated delta rule: the chunked WY (UT transform) torch backend equals the reference loop
(float64 within 1e-10, float32 within 1e-5 relative), forward, final state and gradients of q, k,
v, g, beta and the initial state, with document resets (inside chunks, at a chunk's first and last
step), an initial state and beta up to 2 (negative eigenvalues); the reference equals
flash-linear-attention's naive_recurrent_gated_delta_rule when that package is installed; context
parallelism on 3 ranks equals one process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megarnn.ops import gated_delta_rule
from megarnn.ops.delta_rule import l2_normalize
from megarnn.parallel.launch_env import free_port
from tests.parallel.spawn_util import run_on_ranks

NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


def _inputs(B=2, T=45, H=3, K=8, V=5, dtype=torch.float64, seed=0, neg=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = l2_normalize(r(B, T, H, K)), l2_normalize(r(B, T, H, K))
    v = r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H) * 2 + 2)
    beta = torch.sigmoid(r(B, T, H) * 2) * (2 if neg else 1)
    s0 = r(B, H, K, V)
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, t in [(0, 7), (0, 16), (1, 15), (1, 40)]:  # inside a chunk, a chunk's first, its last step
        if t < T:
            reset[row, t] = True
    return [t.to(dtype) for t in (q, k, v, g, beta, s0)] + [reset]


def _run(inputs, backend, chunk_size=16, grads=True, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:6]]
    o, state = gated_delta_rule(*leaves[:5], initial_state=leaves[5], reset=inputs[6], chunk_size=chunk_size,
                                backend=backend, **kw)
    if not grads:
        return o, state, None
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(o.dtype)
    ws = torch.randn(state.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(state.dtype)
    ((o * w).sum() + (state * ws).sum()).backward()
    return o, state, [t.grad for t in leaves]


def _rel(a, b):
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("chunk_size", [16, 64, 5])
def test_chunked_equals_reference_in_float64_forward_and_gradients(chunk_size):
    inputs = _inputs()
    ref = _run(inputs, "reference")
    got = _run(inputs, "torch", chunk_size)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-10)
    for name, g, r in zip(NAMES, got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_chunked_equals_reference_in_float32():
    ref = _run(_inputs(T=70), "reference")
    got = _run(_inputs(T=70, dtype=torch.float32), "torch", 32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert _rel(got[0].double(), ref[0]) <= 1e-5
    assert _rel(got[1].double(), ref[1]) <= 1e-5
    for name, g, r in zip(NAMES, got[2], ref[2]):
        assert _rel(g.double(), r) <= 1e-5, name


def test_normalize_flag_equals_normalising_first():
    q, k, *rest = _inputs(T=20)
    o1, s1 = gated_delta_rule(q * 3, k * 0.5, *rest[:3], rest[3], rest[4], normalize_qk=True)
    o2, s2 = gated_delta_rule(l2_normalize(q * 3), l2_normalize(k * 0.5), *rest[:3], rest[3], rest[4])
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-10)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-10)


def test_single_step_steps_with_state_and_errors():
    q, k, v, g, beta, s0, reset = _inputs(T=20)
    o, s = gated_delta_rule(q, k, v, g, beta, s0, reset)
    state, outs = s0, []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        ot, state = gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], state, reset[:, a:b])
        outs.append(ot)
    torch.testing.assert_close(torch.cat(outs, 1), o, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, s, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown backend"):
        gated_delta_rule(q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="g = beta"):
        gated_delta_rule(q, k, v, g[..., :1], beta)


def test_reference_equals_fla_naive_recurrent_gated_delta_rule():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="flash-linear-attention is not installed")
    q, k, v, g, beta, s0, _ = _inputs(dtype=torch.float32)
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    for backend in ("torch", "reference"):
        o, s = gated_delta_rule(q, k, v, g, beta, s0, backend=backend)
        assert _rel(o, o_fla) <= 1e-5 and _rel(s, s_fla) <= 1e-5, backend


# --- context parallelism -------------------------------------------------------------------------

def _check_cp(backend=None):
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    T = 24
    inputs = _inputs(T=T)
    inputs[6][0, 8] = True  # a document starting exactly at a rank boundary
    inputs[6][1, 7] = True  # on the last step of rank 0
    ref = _run(inputs, "reference")
    Tl = T // world
    sl = slice(rank * Tl, (rank + 1) * Tl)
    leaves = [t.detach()[:, sl].clone().requires_grad_() for t in inputs[:5]]
    s0 = inputs[5].detach().clone().requires_grad_()
    o, state = gated_delta_rule(*leaves, initial_state=s0, reset=inputs[6][:, sl], chunk_size=4, cp=group,
                                backend=backend)
    w = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)[:, sl]
    ws = torch.randn(state.shape, generator=torch.Generator().manual_seed(2), dtype=state.dtype)
    ((o * w).sum() + (state * ws).sum() / world).backward()  # the final state: each rank a share
    torch.testing.assert_close(o, ref[0][:, sl], rtol=0, atol=1e-10)
    torch.testing.assert_close(state, ref[1], rtol=0, atol=1e-10)
    for name, g, r in zip(NAMES, [t.grad for t in leaves], ref[2]):
        torch.testing.assert_close(g, r[:, sl], rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")
    ds0 = s0.grad.clone()
    dist.all_reduce(ds0)
    torch.testing.assert_close(ds0, ref[2][5], rtol=0, atol=1e-10)
    # DeltaProduct (2 steps per token) under the same split: forward and final state.
    from megarnn.ops.delta_rule import gated_delta_product
    q, k, v, g, beta, s0, reset = inputs
    kk, vv, bb = (torch.stack([x, x.flip(1)], 2).flatten(1, 2) for x in (k, v, beta))  # (B, 2T, ...)
    want, want_s = gated_delta_product(q, kk, vv, g, beta=bb, num_householder=2, initial_state=s0, reset=reset)
    l2 = slice(2 * rank * Tl, 2 * (rank + 1) * Tl)
    o, state = gated_delta_product(q[:, sl], kk[:, l2], vv[:, l2], g[:, sl], bb[:, l2], 2, s0, reset[:, sl],
                                   chunk_size=4, cp=group, backend=backend)
    torch.testing.assert_close(o, want[:, sl], rtol=0, atol=1e-10)
    torch.testing.assert_close(state, want_s, rtol=0, atol=1e-10)


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check_cp)


def test_context_parallel_on_3_ranks_equals_one_process():
    """3 ranks: the last one folds two earlier ranks' (transition, state) summaries."""
    mp.spawn(_worker, args=(3, free_port()), nprocs=3, join=True)


# --- DeltaProduct ----------------------------------------------------------------------------------

def _product_loop(q, k, v, g, beta, n, s0, reset, scale):
    """Gated DeltaProduct written out: per token decay, n delta steps, read out (float64)."""
    B, T, H, K = q.shape
    S, outs = s0.clone(), []
    for t in range(T):
        decay = torch.exp(g[:, t]) * ~reset[:, t, None]
        S = decay[..., None, None] * S
        for j in range(n):
            kj, vj, bj = k[:, t * n + j], v[:, t * n + j], beta[:, t * n + j]
            S = S + bj[..., None, None] * kj[..., :, None] * (vj - torch.einsum("bhk,bhkv->bhv", kj, S))[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, 1), S


def test_delta_product_equals_its_loop_with_gradients_and_fla():
    from megarnn.ops.delta_rule import gated_delta_product
    n, T = 3, 13
    q, _, _, g, _, s0, reset = _inputs(T=T)
    k, _, v, _, beta, _, _ = _inputs(T=T * n, seed=1)
    reset = reset.clone()
    reset[0, 5] = True
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
    want = _product_loop(*leaves[:5], n, leaves[5], reset, 8 ** -0.5)
    sum(((x * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)).sum() for x in want)).backward()
    ref_grads = [t.grad for t in leaves]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
    got = gated_delta_product(*leaves[:5], n, leaves[5], reset, chunk_size=8)
    sum(((x * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)).sum() for x in got)).backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for name, a, b in zip(NAMES, [t.grad for t in leaves], ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m: f"d{name}: {m}")
    try:
        from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
    except ImportError:
        return
    f = lambda t: t.float()  # noqa: E731
    o_fla, s_fla = naive_recurrent_gated_delta_product(f(q), f(k), f(v), f(g), f(beta), 8 ** -0.5,
                                                       initial_state=f(s0), output_final_state=True, num_householder=n)
    o, s = gated_delta_product(f(q), f(k), f(v), f(g), f(beta), n, f(s0))
    assert _rel(o, o_fla) <= 1e-5 and _rel(s, s_fla) <= 1e-5
