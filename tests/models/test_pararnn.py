"""ParaRNNMixer: parallel (Newton) form equals step-by-step, chunked and per-document forms."""
import pytest
import torch

from megarnn.models.pararnn import ParaRNNMixer

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _mixer(cell, **kw):
    return ParaRNNMixer(d_model=10, hidden=8, n_heads=2, conv_width=4, cell=cell, **kw).to(DT)


def _resets(B, T, starts):
    r = torch.zeros(B, T, dtype=torch.bool)
    for b, t in starts:
        r[b, t] = True
    return r


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_step_by_step_equals_parallel(cell):
    m = _mixer(cell)
    x = torch.randn(2, 15, 10, dtype=DT)
    reset = _resets(2, 15, [(0, 0), (0, 9), (1, 4)])
    full, full_state = m(x, reset)
    state, outs = None, []
    for t in range(15):
        y, state = m(x[:, t:t + 1], reset[:, t:t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    for k in ("conv", "h"):
        torch.testing.assert_close(state[k], full_state[k], **TOL)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_chunked_forward_with_carried_state_equals_full(cell):
    m = _mixer(cell)
    x = torch.randn(2, 21, 10, dtype=DT)
    reset = _resets(2, 21, [(1, 8), (0, 15)])
    full, _ = m(x, reset)
    a, s = m(x[:, :8], reset[:, :8])
    b, s = m(x[:, 8:17], reset[:, 8:17], s)
    c, _ = m(x[:, 17:], reset[:, 17:], s)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, **TOL)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_packed_documents_equal_separate_documents(cell):
    m = _mixer(cell)
    d1, d2 = torch.randn(1, 9, 10, dtype=DT), torch.randn(1, 6, 10, dtype=DT)
    packed, _ = m(torch.cat([d1, d2], 1), _resets(1, 15, [(0, 0), (0, 9)]))
    torch.testing.assert_close(packed[:, :9], m(d1)[0], **TOL)
    torch.testing.assert_close(packed[:, 9:], m(d2)[0], **TOL)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_newton_gradients_equal_sequential_and_reach_every_parameter(cell):
    m = _mixer(cell)
    seq = _mixer(cell, backend="reference")
    seq.load_state_dict(m.state_dict())
    x = torch.randn(2, 19, 10, dtype=DT, requires_grad=True)
    reset = _resets(2, 19, [(1, 7)])
    g = torch.randn(2, 19, 10, dtype=DT)
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(m(x, reset)[0], [x, *m.parameters()], g)
    ref = torch.autograd.grad(seq(x, reset)[0], [x, *seq.parameters()], g)
    for name, got, want in zip(["x"] + names, grads, ref):
        torch.testing.assert_close(got, want, **TOL, msg=lambda s: f"{name}: {s}")
    missing = [n for n, gr in zip(names, grads[1:]) if not gr.abs().sum() > 0]
    assert not missing


def test_last_stats_are_exposed_for_logging():
    m = _mixer("lstm", max_iters=6, backend="torch_newton")  # Newton: the torch backend runs sequentially on CPU
    m(torch.randn(2, 30, 10, dtype=DT))
    s = m.last_stats
    assert s["converged"] and not s["fallback"]
    assert 1 <= s["iters"] <= 6 and s["residual"] < 1e-12


def test_float32_model_keeps_a_float32_state():
    m = ParaRNNMixer(10, 8, 2, cell="lstm")
    y, state = m(torch.randn(2, 12, 10))
    assert y.dtype == torch.float32 and state["h"].shape == (2, 16) and state["h"].dtype == torch.float32
    assert m.last_stats["converged"]


def test_bad_configuration_raises_value_error():
    with pytest.raises(ValueError, match="unknown cell"):
        ParaRNNMixer(10, 8, 2, cell="rnn")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ParaRNNMixer(10, 8, 3)


@pytest.mark.parametrize("pattern", ["G", "L", "GL"])
def test_pararnn_lm_step_equals_parallel_and_reports_newton_stats(pattern):
    from megarnn.config import ModelConfig
    from megarnn.models import RecurrentLM
    m = RecurrentLM(ModelConfig(family="pararnn", block_pattern=pattern, vocab_size=50, d_model=16, n_layers=2,
                                n_heads=2, lru_width=16)).double()
    x = torch.randint(0, 50, (2, 13))
    reset = torch.zeros(2, 13, dtype=torch.bool)
    reset[1, 6] = True
    full, _ = m(x, reset=reset)
    stats = m.solver_stats()
    assert set(stats) == {f"newton/{k}/layer_{i}" for k in ("iters", "residual") for i in range(2)}
    assert all(stats[f"newton/residual/layer_{i}"] < 1e-10 for i in range(2))
    state, outs = None, []
    for t in range(13):
        logits, state = m.step(x[:, t:t + 1], state, reset[:, t:t + 1])
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
