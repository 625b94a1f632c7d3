"""The Triton SSD kernels (kernels/ssd.py) equal the reference, forward and every gradient.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small; on a GPU the same tests run the compiled kernels. Every kernel output is
allocated NaN-filled (see _nan_outputs), so an element a kernel never writes fails the test.
Errors are max |out - ref| / max |ref| per tensor, against the float64 reference backend (the
textbook loop of megarnn/ops/ssd.py), on fresh random inputs.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megarnn.ops import ssd as ssd_ops
from megarnn.ops import ssd_scan
from tests.conftest import ROOT
from tests.ops.kernel_checks import assert_relative_close as _assert_close, fill_outputs_with_nan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = ssd_ops._ssd_kernels(torch.zeros(1, device=DEVICE))  # megarnn_kernels.ssd
FP32_TOL = 1e-5  # the bar for fp32 kernels, gradients included
FP64_TOL = 1e-10
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, kernels)


def _resets(kind, b, T, chunk):
    """(b, T) bool: "inside" chunks (and across their ends), at chunk "starts" (t = 0 drops the
    initial state), or None."""
    if kind is None:
        return None
    at = {"inside": [(5, 20), (9, 33)], "starts": [(0, chunk), (2 * chunk,)]}[kind]
    reset = torch.zeros(b, T, dtype=torch.bool)
    for i, ts in enumerate(at[:b]):
        reset[i, [t for t in ts if t < T]] = True
    return reset


def _case(T, chunk, G=2, reset=None, with_D=True, with_s0=True, b=2, H=4, P=8, N=16, seed=0):
    """Float64 inputs as ssd_scan takes them (None for absent D / initial state) and a reset mask.
    dt = softplus(normal) in (0, ~4), A in [-2.01, -0.01]: decays from ~1 to ~e^-8 per step."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, B, C = rand(b, T, H, P), rand(b, T, G, N), rand(b, T, G, N)
    dt = F.softplus(rand(b, T, H))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.01
    D = rand(H) if with_D else None
    s0 = rand(b, H, P, N) if with_s0 else None
    return [x, dt, A, B, C, D, s0], _resets(reset, b, T, chunk)


def _run(backend, inputs, reset, chunk, gy, gs, dtype):
    """ssd_scan's (y, state) and the gradients of <y, gy> + <state, gs> (gs None: state unused)
    wrt every input that is not None, all as float64 for comparison."""
    leaves = [None if t is None else t.detach().to(DEVICE, dtype).requires_grad_() for t in inputs]
    y, state = ssd_scan(*leaves[:6], chunk_size=chunk, initial_state=leaves[6],
                        reset=None if reset is None else reset.to(DEVICE), backend=backend)
    loss = (y * gy.to(y)).sum() + (0 if gs is None else (state * gs.to(state)).sum())
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return y.detach(), state.detach(), [None if t is None else next(grads) for t in leaves]


def _check_against_reference(inputs, reset, chunk, dtype, tol, final_grad=True, seed=1):
    b, T, H, P = inputs[0].shape
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(b, T, H, P, generator=g, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(b, H, P, inputs[3].shape[3], generator=g, dtype=torch.float64).to(DEVICE) if final_grad else None
    ref_y, ref_s, ref_g = _run("reference", inputs, reset, chunk, gy, gs, torch.float64)
    y, s, grads = _run("triton", inputs, reset, chunk, gy, gs, dtype)
    assert y.dtype == dtype and s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close("y", y, ref_y, tol)
    _assert_close("final state", s, ref_s, tol)
    for name, out, ref in zip(NAMES, grads, ref_g):
        assert (out is None) == (ref is None), name
        if ref is not None:
            assert out.dtype == dtype, name
            _assert_close(f"d{name}", out, ref, tol)


@pytest.mark.parametrize("T,chunk,G,reset,with_D,with_s0,final_grad", [
    (1, 16, 1, None, True, True, True),  # one step: the initial state and D alone
    (7, 16, 2, "inside", True, True, True),  # shorter than a chunk
    (37, 16, 2, "inside", True, True, True),  # a ragged last chunk, resets inside chunks
    (37, 16, 1, "starts", True, True, False),  # resets at chunk starts (t = 0 drops the initial state)
    (37, 32, 2, None, False, False, True),  # no reset, no D, no initial state
    (37, 32, 1, "inside", False, True, False),
])
def test_triton_ssd_equals_reference_with_gradients(T, chunk, G, reset, with_D, with_s0, final_grad):
    inputs, reset = _case(T, chunk, G, reset, with_D, with_s0, seed=T + chunk)
    _check_against_reference(inputs, reset, chunk, torch.float32, FP32_TOL, final_grad)


def test_tiles_smaller_than_the_chunk_and_ragged_widths(monkeypatch):
    """16-wide tiles in a chunk of 40 (not a power of two: 3 tiles, the last ragged), P = 20 and
    N = 24 over two tiles each: every loop over tiles, the lower-triangle tile skips and the
    per-tile partial sums of dA run more than once, as they do at Q = 256 on a GPU."""
    for name in ("BQ", "BP", "BN"):
        monkeypatch.setattr(kernels._Plan, name, property(lambda self: 16))
    inputs, reset = _case(70, 40, G=2, reset="inside", b=1, P=20, N=24, seed=3)
    reset[0, 40] = True  # and one at the second chunk's start
    _check_against_reference(inputs, reset, 40, torch.float32, FP32_TOL)


@pytest.mark.parametrize("split_target", [1, 256])
def test_head_blocks_of_the_backward(monkeypatch, split_target):
    """_dcb, _dc, _db split a group's heads into blocks (partial sums added by the host): 5 heads
    in blocks of 3 and 2 (a ragged last block), and no split at all (SPLIT_TARGET = 1)."""
    monkeypatch.setattr(kernels, "SPLIT_TARGET", split_target)
    pl = kernels._Plan(1, 37, 5, 8, 1, 16, 16, 3, torch.float32, torch.float32)
    assert pl.heads(3) == ((3, 2) if split_target == 256 else (5, 1))
    inputs, reset = _case(37, 16, G=1, reset="inside", b=1, H=5, seed=11)
    _check_against_reference(inputs, reset, 16, torch.float32, FP32_TOL)


def _tf32(a, round_nearest):
    """fp32 -> tf32 (10 mantissa bits) as fp32: rounded to nearest (ties away, cvt.rna.tf32.f32)
    or truncated (what a tf32 MMA does with the low bits of an fp32 register)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if round_nearest:
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test above runs the real tf32x3 path")
def test_fp32_tensor_core_path_tf32x3_is_within_the_fp32_bar(monkeypatch):
    """fp32 matmuls run as input_precision="tf32x3". Triton's interpreter ignores input_precision
    (an fp32 numpy matmul for all), so here its dot is replaced by the 3xTF32 split as Triton
    lowers it (F32DotTC): a = a_big + a_small with a_big rounded to tf32, a_small = a - a_big
    truncated by the MMA; a_big b_big + (a_small b_big + a_big b_small), fp32 accumulation.
    Measured max relative errors vs the fp64 reference: ~2e-6 (ieee fp32 ~3.5e-6); a plain tf32
    dot gives ~7e-3 on dA and fails."""
    import triton.runtime.interpreter as interpreter
    from triton._C.libtriton import ir
    assert kernels._Plan(1, 1, 1, 1, 1, 1, 1, 1, torch.float32, torch.float32).meta()["PREC"] == "tf32x3"
    plain = interpreter.InterpreterBuilder.create_dot
    calls = []

    def dot_3xtf32(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision != ir.INPUT_PRECISION.TF32x3:
            return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        calls.append(1)
        big_a, big_b = _tf32(a.data, True), _tf32(b.data, True)
        small_a, small_b = _tf32(a.data - big_a, False), _tf32(b.data - big_b, False)
        small = np.matmul(small_a, big_b, dtype=np.float32) + np.matmul(big_a, small_b, dtype=np.float32)
        out = np.matmul(big_a, big_b, dtype=np.float32) + (small + d.data)
        return interpreter.TensorHandle(out.astype(np.float32), d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot_3xtf32)
    inputs, reset = _case(37, 16, G=2, reset="inside", seed=53)
    _check_against_reference(inputs, reset, 16, torch.float32, FP32_TOL)
    assert calls


def test_triton_ssd_float64_equals_reference_to_rounding():
    inputs, reset = _case(37, 16, G=2, reset="inside", seed=4)
    _check_against_reference(inputs, reset, 16, torch.float64, FP64_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong under the interpreter")
def test_triton_ssd_bf16_is_within_bf16_rounding():
    """bf16 x, B, C (dt, A, D, states fp32): matmul operands round to bf16, so ~1e-2 of the
    float64 reference on the same bf16 values, forward and gradients."""
    inputs, reset = _case(300, 64, G=2, reset="inside", P=64, N=32, seed=5)
    inputs = [t if t is None else t.to(torch.bfloat16).double() if i in (0, 3, 4) else t
              for i, t in enumerate(inputs)]
    gy = torch.randn(*inputs[0].shape, dtype=torch.float64, device=DEVICE)
    ref_y, _, ref_g = _run("reference", inputs, reset, 64, gy, None, torch.float64)
    leaves = [t.detach().to(DEVICE, torch.bfloat16 if i in (0, 3, 4) else torch.float32).requires_grad_()
              for i, t in enumerate(inputs)]
    y, _ = ssd_scan(*leaves[:6], chunk_size=64, initial_state=leaves[6], reset=reset.to(DEVICE), backend="triton")
    grads = torch.autograd.grad((y.float() * gy.float()).sum(), leaves)
    _assert_close("y", y, ref_y, 2e-2)
    for name, out, ref in zip(NAMES, grads, ref_g):
        _assert_close(f"d{name}", out, ref, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a GPU with 40 GiB")
def test_offsets_past_2_to_the_31_use_64_bits():
    """B T H P = 3 * 2^30 elements: the last sequence starts past 2^31; it must equal the same
    sequence run alone (int32 offsets would wrap and read the wrong memory)."""
    b, T, H, P, G, N = 3, 2**16, 128, 128, 1, 16
    torch.manual_seed(0)
    x = torch.randn(b, T, H, P, device="cuda", dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(b, T, H, device="cuda"))
    A = -torch.rand(H, device="cuda") - 0.1
    B, C = (torch.randn(b, T, G, N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    y, s = kernels.ssd_fwd(x, dt, A, B, C, 256)
    y2, s2 = kernels.ssd_fwd(x[2:], dt[2:], A, B[2:], C[2:], 256)
    assert torch.equal(y[2:], y2) and torch.equal(s[2:], s2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default and the CPU errors only")
def test_cpu_default_is_torch_and_triton_without_interpreter_says_what_to_do(monkeypatch):
    (x, dt, A, B, C, D, s0), _ = _case(5, 16)
    with monkeypatch.context() as m:
        m.setattr(ssd_ops, "_ssd_triton_op", lambda *args: pytest.fail("triton picked on CPU"))
        torch.testing.assert_close(ssd_scan(x, dt, A, B, C, D), ssd_scan(x, dt, A, B, C, D, backend="torch"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ssd_scan(x, dt, A, B, C, D, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="compiled for a GPU"):
        ssd_scan(x, dt, A, B, C, D, backend="triton")


def test_bad_reset_and_state_shapes_are_refused():
    (x, dt, A, B, C, D, s0), _ = _case(5, 16)
    with pytest.raises(ValueError, match="reset must be"):
        ssd_scan(x, dt, A, B, C, D, reset=torch.zeros(2, 4, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_scan(x, dt, A, B, C, D, initial_state=s0[:, :2], backend="triton")


_COMPILE_SCRIPT = textwrap.dedent("""
    import os, re, subprocess, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import megarnn_kernels.ssd as K

    PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.int32: "*i32"}
    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    seen, spills = set(), []

    def compile_only(kernel, grid, *args, **meta):
        # What a launch would compile, specialised as the JIT does: ints equal to 1 are constants;
        # pointers and ints divisible by 16 carry that hint (it decides vector loads, so registers).
        options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        names = [p.name for p in kernel.params if not p.is_constexpr]
        sig, attrs = {}, {}
        for name, a in zip(names, args):
            if not torch.is_tensor(a) and a == 1:
                meta[name] = 1
                continue
            sig[name] = PTR[a.dtype] if torch.is_tensor(a) else "i32"
            if (a.data_ptr() if torch.is_tensor(a) else a) % 16 == 0:
                attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        sig.update({k: "constexpr" for k in meta})
        key = (kernel.fn.__name__, str(sorted(sig.items())), str(sorted(meta.items(), key=str)))
        if key in seen:
            return
        seen.add(key)
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=meta, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
        if os.path.exists(CUOBJDUMP) and meta.get("DOT_T") is not None and str(meta["DOT_T"]) == "bf16":
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(c.asm["cubin"]); f.flush()
                usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
            stack = re.search(r"STACK:(\\d+)", usage)
            if stack and int(stack.group(1)):
                spills.append(f"{kernel.fn.__name__}: {stack.group(0)} bytes")

    K._launch = compile_only
    # bf16 at Mamba2-1.3B head shapes (P = 64, N = 128, chunk 256) with every option on; fp32
    # small and ragged with every option off.
    for dtype, (b, T, H, P, G, N, Q), on in ((torch.bfloat16, (1, 300, 4, 64, 1, 128, 256), True),
                                              (torch.float32, (1, 37, 4, 8, 2, 16, 16), False)):
        x = torch.zeros(b, T, H, P, dtype=dtype)
        dt, A = torch.ones(b, T, H), -torch.ones(H)
        B = torch.zeros(b, T, G, N, dtype=dtype)
        D, s0 = (torch.ones(H), torch.zeros(b, H, P, N)) if on else (None, None)
        reset = torch.zeros(b, T, dtype=torch.bool) if on else None
        K.ssd_fwd(x, dt, A, B, B, Q, D, s0, reset)
        K.ssd_bwd(x, dt, A, B, B, Q, D, s0, reset, x, s0 if on else None)
    print("compiled", len(seen))
    print("spills:", "; ".join(spills) or "none")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above runs the compiled kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects: compile every kernel and variant that a
    forward and backward launch (bf16 at the 1.3B head shape, fp32 small) for sm_90 down to a
    cubin, with Triton's bundled ptxas, in a process without TRITON_INTERPRET; and the bf16
    variants keep their tiles in registers (no spills to local memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    no_cuda = "No module named 'triton.backends.nvidia'" in proc.stderr
    if no_cuda or ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip(f"this triton cannot compile for CUDA: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    assert "spills: none" in proc.stdout, proc.stdout


def test_bench_kernels_prints_the_ssd_rows(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "tools" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--only", "ssd", "--ssd-shape", "1", "20", "2", "8", "1", "16", "16", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("ssd 1x20", "megarnn triton", "megarnn torch backend", "TFLOP/s"):
        assert name in out
    assert "failed" not in out
    assert "missing: mamba_ssm" in out
