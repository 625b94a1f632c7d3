import pytest
import torch

from megarnn.ops import linear_scan, linear_scan_reference


def _inputs(B=2, T=37, D=5, dtype=torch.float64):
    a = torch.rand(B, T, D, dtype=dtype)
    a[:, 3:4] = 0.0  # a document reset (when T > 3)
    a[:, 5:6] = 0.999999  # decay near 1
    return a.requires_grad_(), torch.randn(B, T, D, dtype=dtype, requires_grad=True), \
        torch.randn(B, D, dtype=dtype, requires_grad=True)


def test_reference_is_the_textbook_recurrence():
    a, b, h0 = _inputs(T=4)
    h = linear_scan_reference(a, b, h0)
    expect = h0
    for t in range(4):
        expect = a[:, t] * expect + b[:, t]
        torch.testing.assert_close(h[:, t], expect)


@pytest.mark.parametrize("T", [1, 2, 37])
def test_torch_backend_equals_reference_with_gradients(T):
    a, b, h0 = _inputs(T=T)
    ref = linear_scan(a, b, h0, backend="reference")
    out = linear_scan(a, b, h0, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (a, b, h0), g)
    out_grads = torch.autograd.grad(out, (a, b, h0), g)
    for r, o in zip(ref_grads, out_grads):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_reverse_and_zero_initial_state():
    a, b, _ = _inputs()
    out = linear_scan(a, b, reverse=True)
    ref = linear_scan_reference(a.flip(1), b.flip(1)).flip(1)
    torch.testing.assert_close(out, ref)


def test_float32_accumulates_like_reference():
    a, b, h0 = (t.detach().float() for t in _inputs(T=64))
    torch.testing.assert_close(linear_scan(a, b, h0), linear_scan_reference(a.double(), b.double(), h0.double()).float(),
                               rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        linear_scan(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="h0 must be"):
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3, 4))
