"""The Triton scan kernels (kernels/linear_scan.py) equal their references, forward and gradients.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small; on a GPU the same tests run the compiled kernels. Every kernel output is
allocated NaN-filled (see _nan_outputs), so an element a kernel never writes fails the test.
Errors are measured as max |out - ref| / max |ref| per tensor, against float64 references.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megarnn.models.cells import RG_LRU_C, RGLRU, SqrtBoundDerivative
from megarnn.ops import linear_scan, linear_scan_reference
from megarnn.ops import scan as scan_ops
from megarnn.ops.scan import rglru_scan
from tests.conftest import ROOT
from tests.ops.kernel_checks import assert_relative_close as _assert_close, fill_outputs_with_nan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = scan_ops._require_triton(torch.zeros(1, device=DEVICE), "tests")  # megarnn_kernels.linear_scan
FP32_TOL = 1e-5  # the bar for fp32 kernels, gradients included
FP64_TOL = 1e-10


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, kernels)


def _scan_inputs(B, T, D, dtype=torch.float32, seed=0):
    """Decays uniform in [0, 1), near 0 (< 1e-3), near 1 (> 1 - 1e-4) and exact resets (a = 0;
    none when T = 1, so that h0 still matters there)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, D, generator=g, dtype=torch.float64)
    a[..., 1::4] = 1 - 1e-4 * torch.rand(B, T, D, generator=g, dtype=torch.float64)[..., 1::4]
    a[..., 2::4] *= 1e-3
    if T > 1:
        a[:, T // 2] = 0.0  # a document reset in every channel
        a[0, (2 * T) // 3] = 0.0
    b = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    return (t.to(dtype).to(DEVICE) for t in (a, b, h0))


def _reference_grads(a, b, h0, gy, g_last=None):
    """The float64 reference and its gradients wrt (a, b, h0) for loss = <h, gy> + <h_T, g_last>."""
    a, b = (t.double().requires_grad_() for t in (a, b))
    h0 = None if h0 is None else h0.double().requires_grad_()
    h = linear_scan_reference(a, b, h0)
    loss = (h * gy.double()).sum() + (0 if g_last is None else (h[:, -1] * g_last.double()).sum())
    grads = torch.autograd.grad(loss, [a, b] + ([] if h0 is None else [h0]))
    return h.detach(), grads


@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("T", [1, 7, 37, 130])
def test_triton_scan_equals_reference_with_gradients(T, with_h0):
    a, b, h0 = _scan_inputs(2, T, 20)
    h0 = h0 if with_h0 else None
    gy = torch.randn(2, T, 20, dtype=torch.float32, device=DEVICE)
    ref, ref_grads = _reference_grads(a, b, h0, gy)
    inputs = [t.clone().requires_grad_() for t in (a, b)] + ([] if h0 is None else [h0.clone().requires_grad_()])
    out = linear_scan(*inputs[:2], inputs[2] if with_h0 else None, backend="triton")
    _assert_close("h", out, ref, FP32_TOL)
    grads = torch.autograd.grad(out, inputs, gy)
    for name, g, r in zip(("da", "db", "dh0"), grads, ref_grads):
        _assert_close(name, g, r, FP32_TOL)


@pytest.mark.parametrize("chunk_size,D", [(None, 70), (16, 20), (37, 20)])
def test_time_chunked_scan_and_final_state_gradient_equal_reference(chunk_size, D):
    """The two-pass chunked scan (chunks of 16 and a ragged 37) and the one-pass scan equal the
    reference; D = 70 spans two channel blocks with a ragged tail; h_last and its gradient too."""
    T = 130
    a, b, h0 = _scan_inputs(2, T, D, seed=1)
    gy = torch.randn(2, T, D, device=DEVICE)
    g_last = torch.randn(2, D, device=DEVICE)
    ref, (ra, rb, rh0) = _reference_grads(a, b, h0, gy, g_last)
    h, h_last = kernels.scan_fwd(a, b, h0, chunk_size=chunk_size)
    _assert_close("h", h, ref, FP32_TOL)
    _assert_close("h_last", h_last, ref[:, -1], FP32_TOL)
    da, db, dh0 = kernels.scan_bwd(a, h, h0, gy, g_last, chunk_size=chunk_size)
    for name, g, r in (("da", da, ra), ("db", db, rb), ("dh0", dh0, rh0)):
        _assert_close(name, g, r, FP32_TOL)


def test_chunk_plan_splits_time_only_when_batch_times_width_cannot_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    cuda = torch.device("cuda")
    assert kernels._plan(8, 4096, 4096, cuda, None) == (4096, 1)  # 512 programs: enough
    chunk, n = kernels._plan(1, 16384, 1024, cuda, None)  # 16 programs: chunk to ~4 per SM
    assert n * 16 >= 2 * 132 and chunk * n >= 16384 and chunk % 16 == 0
    assert kernels._plan(1, 100, 64, cuda, None) == (100, 1)  # too short to be worth a second pass
    assert kernels._plan(1, 16384, 1024, torch.device("cpu"), None) == (16384, 1)
    assert kernels._plan(2, 130, 20, torch.device("cpu"), 37) == (37, 4)


def test_triton_scan_float64_equals_reference_to_rounding():
    a, b, h0 = _scan_inputs(2, 37, 20, dtype=torch.float64, seed=2)
    gy = torch.randn(2, 37, 20, dtype=torch.float64, device=DEVICE)
    ref, ref_grads = _reference_grads(a, b, h0, gy)
    h, h_last = kernels.scan_fwd(a, b, h0, chunk_size=16)
    assert h.dtype == h_last.dtype == torch.float64
    _assert_close("h", h, ref, FP64_TOL)
    for name, g, r in zip(("da", "db", "dh0"), kernels.scan_bwd(a, h, h0, gy, chunk_size=16), ref_grads):
        _assert_close(name, g, r, FP64_TOL)


def test_bf16_activations_keep_the_fp32_decay():
    """b and h in bf16, a in fp32 = 0.999 (bf16 would round it to 1.0): h_T = (1 - 0.999^T) / 0.001,
    accumulated in fp32, not T."""
    T = 1000
    a = torch.full((1, T, 4), 0.999, device=DEVICE)
    b = torch.ones(1, T, 4, dtype=torch.bfloat16, device=DEVICE)
    h, h_last = kernels.scan_fwd(a, b)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    expect = (1 - 0.999 ** torch.arange(1, T + 1, dtype=torch.float64)) / 0.001
    _assert_close("h_last", h_last, expect[-1].expand(1, 4), 1e-5)
    # One bf16 step of the output (2^-7 relative: the interpreter truncates, a GPU rounds to nearest).
    _assert_close("h", h, expect[None, :, None].expand(1, T, 4).to(DEVICE), 2**-7)


def test_bf16_scan_gradients_are_within_bf16_rounding():
    """bf16 b, dh (fp32 a): fwd and grads vs float64 on the same bf16 values, to a bf16 step."""
    a, b, h0 = _scan_inputs(2, 37, 20, seed=4)
    b, gy = b.bfloat16(), torch.randn(2, 37, 20, device=DEVICE).bfloat16()
    ref, ref_grads = _reference_grads(a, b, h0, gy)
    h, _ = kernels.scan_fwd(a, b, h0)
    _assert_close("h", h, ref, 2**-7)
    grads = kernels.scan_bwd(a, h, h0, gy)
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32]
    for name, g, r in zip(("da", "db", "dh0"), grads, ref_grads):
        _assert_close(name, g, r, 2**-7)


def test_reverse_scan():
    a, b, h0 = _scan_inputs(2, 37, 20, seed=3)
    out = linear_scan(a, b, h0, reverse=True, backend="triton")
    ref = linear_scan_reference(a.double().flip(1), b.double().flip(1), h0.double()).flip(1)
    _assert_close("h", out, ref, FP32_TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default and the CPU error only")
def test_cpu_default_is_torch_and_triton_without_interpreter_says_what_to_do(monkeypatch):
    a, b, h0 = _scan_inputs(1, 5, 3)
    monkeypatch.setattr(scan_ops, "_scan_triton_op", lambda *args: pytest.fail("triton picked on CPU"))
    torch.testing.assert_close(linear_scan(a, b, h0), linear_scan(a, b, h0, backend="torch"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_scan(a, b, h0, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="compiled for a GPU"):
        rglru_scan(b, b, b, h0[0], h0, backend="triton")


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import megarnn_kernels.linear_scan as K
    DATA = {"X", "H", "DH", "DB", "GX", "GA", "DX", "DGX", "DGA"}
    for fn in (K._scan_fwd_kernel, K._scan_bwd_kernel, K._rglru_fwd_kernel, K._rglru_bwd_kernel):
        flags = [p.name for p in fn.params if p.name.startswith(("HAS_", "WRITE_"))]
        for pass1 in (False, True):  # pass 1 of the time-chunked scan writes products, not outputs
            ce = {"BLOCK_T": 16, "BLOCK_D": 64, "ACC": tl.float32}
            ce.update({f: ((f != "WRITE_PROD") != pass1) if f.startswith("WRITE_") else True for f in flags})
            sig = {p.name: "constexpr" if p.name in ce else "i32" if p.name in ("T", "D", "CHUNK")
                   else "*u8" if p.name == "RESET" else "*bf16" if p.name in DATA else "*fp32" for p in fn.params}
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above runs the compiled kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects: compile every kernel and pass (bf16 data,
    fp32 state) for sm_90 down to a cubin, with Triton's bundled ptxas, in a process without
    TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if "No module named 'triton.backends.nvidia'" in proc.stderr or ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip(f"this triton cannot compile for CUDA: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# RG-LRU with the gates fused into the scan
# ------------------------------------------------------------------------------------------------

def _rglru_reference(m, x, h0, reset):
    """models/cells.py RGLRU.forward restated with 1 - exp(2 log a) as -expm1(2 log a): the same
    math, without the cancellation near a = 1 (where the float64 module keeps ~8 digits)."""
    gate_x = torch.sigmoid(m.input_gate(x))
    gate_a = torch.sigmoid(m.recurrent_gate(x))
    log_a = -RG_LRU_C * gate_a * F.softplus(m.recurrent_param)
    a = torch.exp(log_a)
    multiplier = SqrtBoundDerivative.apply(-torch.expm1(2 * log_a))
    if reset is not None:
        r = reset[..., None]
        a = a * ~r
        multiplier = torch.where(r, torch.ones_like(multiplier), multiplier)
    h = linear_scan_reference(a, x * gate_x * multiplier, h0)
    return h, h[:, -1]


def _rglru_case(T, D=16, seed=0, dtype=torch.float64):
    """An RGLRU with biased gates and extreme decays in its first channels: a0 -> 1 (the clipped
    sqrt gradient), a0 = 0.9999, a0 ~ 0.0025 (decay near 0); x, h0, resets at t = 0 and inside."""
    torch.manual_seed(seed)
    m = RGLRU(D, 2, 1.0).to(dtype)
    with torch.no_grad():
        m.recurrent_param[:3] = torch.tensor([-20.0, -9.2, 6.0])
        m.input_gate.bias.normal_()
        m.recurrent_gate.bias.normal_()
    x = torch.randn(2, T, D, dtype=dtype)
    h0 = torch.randn(2, D, dtype=dtype)
    reset = torch.rand(2, T) < 0.1
    reset[0, 0], reset[1, 0] = True, False
    return m.to(DEVICE), x.to(DEVICE), h0.to(DEVICE), reset.to(DEVICE)


def _rglru_grads(fn, m, x, h0, reset, gy, g_last):
    """fn's outputs (y, h_T) and the gradients of <y, gy> + <h_T, g_last> wrt x, h0 and m's params."""
    x, h0 = x.detach().requires_grad_(), h0.detach().requires_grad_()
    y, h_last = fn(m, x, h0, reset)
    loss = (y * gy.to(y.dtype)).sum() + (h_last * g_last.to(h_last.dtype)).sum()
    names = ["dx", "dh0"] + [f"d{n}" for n, _ in m.named_parameters()]
    return y.detach(), h_last.detach(), dict(zip(names, torch.autograd.grad(loss, [x, h0, *m.parameters()])))


def _fused(m, x, h0, reset):
    return rglru_scan(x, m.input_gate(x), m.recurrent_gate(x), m.recurrent_param, h0, reset, backend="triton")


def test_rglru_reference_restates_cells_module():
    """The judge of the fused kernel is the module's math: equal to RGLRU.forward in float64."""
    m, x, h0, reset = _rglru_case(37)
    gy, g_last = torch.randn_like(x), torch.randn_like(h0)
    ref = _rglru_grads(_rglru_reference, m, x, h0, reset, gy, g_last)
    mod = _rglru_grads(lambda m, x, h0, reset: m(x, h0, reset), m, x, h0, reset, gy, g_last)
    _assert_close("y", mod[0], ref[0], FP64_TOL)
    for name in ref[2]:
        _assert_close(name, mod[2][name], ref[2][name], FP64_TOL)


@pytest.mark.parametrize("T,with_reset", [(1, True), (37, True), (37, False), (130, True)])
def test_fused_rglru_equals_cells_math_with_gradients(T, with_reset):
    m, x, h0, reset = _rglru_case(T, seed=T)
    reset = reset if with_reset else None
    gy, g_last = torch.randn_like(x), torch.randn_like(h0)
    ref_y, ref_last, ref_grads = _rglru_grads(_rglru_reference, m, x, h0, reset, gy, g_last)
    y, h_last, grads = _rglru_grads(_fused, m.float(), x.float(), h0.float(), reset, gy, g_last)
    assert y.dtype == h_last.dtype == torch.float32
    _assert_close("y", y, ref_y, FP32_TOL)
    _assert_close("h_last", h_last, ref_last, FP32_TOL)
    for name in ref_grads:
        _assert_close(name, grads[name], ref_grads[name], FP32_TOL)


def test_fused_rglru_float64_equals_cells_math_to_rounding():
    m, x, h0, reset = _rglru_case(37, seed=5)
    gy, g_last = torch.randn_like(x), torch.randn_like(h0)
    ref_y, ref_last, ref_grads = _rglru_grads(_rglru_reference, m, x, h0, reset, gy, g_last)
    y, h_last, grads = _rglru_grads(_fused, m, x, h0, reset, gy, g_last)
    _assert_close("y", y, ref_y, FP64_TOL)
    _assert_close("h_last", h_last, ref_last, FP64_TOL)
    for name in ref_grads:
        _assert_close(name, grads[name], ref_grads[name], FP64_TOL)


def test_fused_rglru_time_chunked_equals_one_pass():
    """The two-pass chunked RG-LRU kernels equal the one-pass kernels (chunks of 37 of T = 100)."""
    m, x, h0, reset = _rglru_case(100, D=12, seed=7, dtype=torch.float32)
    with torch.no_grad():
        gx, ga, sp = m.input_gate(x), m.recurrent_gate(x), F.softplus(m.recurrent_param)
    dh, dh_last = torch.randn_like(x), torch.randn_like(h0)
    one = kernels.rglru_fwd(x, gx, ga, sp, h0, reset)
    chunked = kernels.rglru_fwd(x, gx, ga, sp, h0, reset, chunk_size=37)
    for name, o, c in zip(("h", "h_last"), one, chunked):
        _assert_close(name, c, o, FP32_TOL)
    one = kernels.rglru_bwd(x, gx, ga, sp, one[0], h0, reset, dh, dh_last)
    chunked = kernels.rglru_bwd(x, gx, ga, sp, chunked[0], h0, reset, dh, dh_last, chunk_size=37)
    for name, o, c in zip(("dx", "dgate_x", "dgate_a", "dsp", "dh0"), one, chunked):
        _assert_close(name, c, o, FP32_TOL)


def test_bench_kernels_prints_every_row_and_the_missing_peers(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "tools" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--shape", "1", "8", "4", "--reps", "1", "--no-compile"]) == 0
    out = capsys.readouterr().out
    for name in ("megarnn triton", "megarnn torch backend", "torch loop eager", "megarnn triton fused", "copy bandwidth"):
        assert name in out
    assert "failed" not in out
    assert "missing: torch loop torch.compile: --no-compile" in out


def test_griffin_with_the_fused_triton_rglru_equals_the_torch_backend():
    from megarnn.config import ModelConfig
    from megarnn.models import RecurrentLM
    c = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, block_pattern="RA", attention_window=8)
    torch.manual_seed(0)
    ref = RecurrentLM(c)
    fused = RecurrentLM(ModelConfig(**{**c.__dict__, "scan_backend": "triton"}))
    fused.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 40, (2, 11))
    reset = torch.zeros(2, 11, dtype=torch.bool)
    reset[1, 4] = True
    outs = []
    for m in (ref, fused):
        logits, state = m(tokens, reset=reset)
        logits.square().mean().backward()
        outs.append((logits, state["layers"][0]["h"]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
