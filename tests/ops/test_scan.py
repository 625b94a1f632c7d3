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


def _chunk_inputs(B, T, D, dtype):
    g = torch.Generator().manual_seed(T * 7 + D)
    a = torch.rand(B, T, D, dtype=dtype, generator=g)
    a[:, ::50] = 0.0  # resets, some at a chunk's first step
    a[:, 64] = 0.0
    a[0, 70:75, 1] = 0.0  # a run of zero decays in one channel
    a[:, 130:140] = 1.0  # no decay
    b = torch.randn(B, T, D, dtype=dtype, generator=g)
    h0 = torch.randn(B, D, dtype=dtype, generator=g)
    return a, b, h0


@pytest.mark.parametrize("T", [128, 200, 321])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_scan_is_exact_with_resets_and_zero_decays(T, dtype, tol):
    """The chunked form (picked for few channels) equals the loop forward and backward."""
    from megarnn.ops import scan
    a, b, h0 = _chunk_inputs(3, T, 7, dtype)
    assert T >= 2 * scan.CHUNK and 3 * 7 < scan.CHUNKED_MAX_CHANNELS  # linear_scan takes the chunked form
    acc = torch.float64
    ref = linear_scan_reference(a.double(), b.double(), h0.double())
    torch.testing.assert_close(scan._scan_chunked(a, b, h0.to(acc)), ref, rtol=tol, atol=tol)
    a, b, h0 = (t.requires_grad_() for t in (a, b, h0))
    out = linear_scan(a, b, h0, backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    ad, bd, hd = (t.detach().double().requires_grad_() for t in (a, b, h0))
    want = torch.autograd.grad(linear_scan_reference(ad, bd, hd), (ad, bd, hd), g.double())
    got = torch.autograd.grad(out, (a, b, h0), g)
    for w, o in zip(want, got):
        torch.testing.assert_close(o.double(), w, rtol=tol, atol=tol)
