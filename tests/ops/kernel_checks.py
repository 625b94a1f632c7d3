"""Checks shared by the Triton kernel tests."""
import torch


def fill_outputs_with_nan(monkeypatch, kernels) -> None:
    """Kernel outputs start as NaN: an element a kernel forgets to write cannot pass."""
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))


def assert_relative_close(name, out, ref, tol) -> None:
    """max |out - ref| / max |ref| <= tol, with every element written and finite."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (never written?)"
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
