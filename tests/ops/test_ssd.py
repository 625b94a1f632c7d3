import pytest
import torch

from megarnn.ops import ssd_scan


def _inputs(b=2, T=37, H=4, P=3, G=2, N=5, dtype=torch.float64):
    g = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, B, C = g(b, T, H, P), g(b, T, G, N), g(b, T, G, N)
    dt = torch.nn.functional.softplus(g(b, T, H))
    A = -torch.rand(H, dtype=dtype) * 2 - 0.01
    D = g(H)
    s0 = g(b, H, P, N)
    reset = torch.zeros(b, T, dtype=torch.bool)
    reset[0, min(T - 1, 9)] = True
    reset[1, min(T - 1, 16)] = True
    return [t.requires_grad_() if t.is_floating_point() else t for t in (x, dt, A, B, C, D, s0)] + [reset]


def test_reference_is_the_textbook_recurrence():
    x, dt, A, B, C, D, s0, _ = _inputs(T=3, H=2, G=1)
    y, s = ssd_scan(x, dt, A, B, C, D, initial_state=s0, backend="reference")
    S = s0
    for t in range(3):
        S = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * S + \
            dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, 0, None, None, :]
        torch.testing.assert_close(y[:, t], (S * C[:, t, 0, None, None, :]).sum(-1) + D[:, None] * x[:, t])
    torch.testing.assert_close(s, S)


@pytest.mark.parametrize("T,chunk", [(1, 8), (8, 8), (37, 8), (37, 64), (40, 4)])
@pytest.mark.parametrize("with_reset", [False, True])
def test_chunked_equals_reference_with_gradients(T, chunk, with_reset):
    *args, reset = _inputs(T=T)
    reset = reset if with_reset else None
    x, dt, A, B, C, D, s0 = args
    ref = ssd_scan(x, dt, A, B, C, D, initial_state=s0, reset=reset, backend="reference")
    out = ssd_scan(x, dt, A, B, C, D, chunk_size=chunk, initial_state=s0, reset=reset, backend="torch")
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    gy, gs = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    g_ref = torch.autograd.grad((ref[0] * gy).sum() + (ref[1] * gs).sum(), args)
    g_out = torch.autograd.grad((out[0] * gy).sum() + (out[1] * gs).sum(), args)
    for r, o in zip(g_ref, g_out):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)


def test_chunk_by_chunk_with_carried_state_and_reset_at_cut():
    *args, reset = _inputs(T=30)
    x, dt, A, B, C, D, _ = args
    reset[:, 12] = True  # a document starts exactly where the sequence is cut
    y, s = ssd_scan(x, dt, A, B, C, D, chunk_size=8, reset=reset)
    y1, s1 = ssd_scan(x[:, :12], dt[:, :12], A, B[:, :12], C[:, :12], D, chunk_size=8, reset=reset[:, :12])
    y2, s2 = ssd_scan(x[:, 12:], dt[:, 12:], A, B[:, 12:], C[:, 12:], D, chunk_size=8, initial_state=s1,
                      reset=reset[:, 12:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, s)


def test_float32_long_decay_stays_accurate():
    x, dt, A, B, C, D, s0, reset = (t.detach().float() for t in _inputs(T=200, dtype=torch.float64))
    y32, _ = ssd_scan(x, dt, A, B, C, D, chunk_size=64, reset=reset.bool())
    y64, _ = ssd_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(), reset=reset.bool(),
                      backend="reference")
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_shapes_are_checked():
    x, dt, A, B, C, D, s0, _ = _inputs()
    with pytest.raises(ValueError, match="H % G"):
        ssd_scan(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))
