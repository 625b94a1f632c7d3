#!/usr/bin/env python
"""Compile every Triton kernel in kernels/ ahead of time for GPU targets, without a GPU.

    python tools/compile_kernels.py                       # sm_80, sm_90, sm_100; every kernel
    python tools/compile_kernels.py --targets sm_90 --only linear_scan
    python tools/compile_kernels.py --json report.json    # the table as JSON too ('-': stdout only)

What is compiled: the launches the host functions in kernels/*.py (scan_fwd / scan_bwd /
rglru_fwd / rglru_bwd, ssd_fwd / ssd_bwd, sequential / newton_guess / newton_iteration /
adjoint) make, found by calling them on CPU tensors with every kernel object replaced by a
recorder (nothing runs): so the tile sizes, num_warps and constexpr flags are the ones the
launchers choose, and a change there is picked up without editing this file. They are called
  * in every dtype the ops accept (fp32, bf16, fp64; bf16 as the models pass it: fp32 scan
    decay / SSD decay rate A / states, the Newton solver only fp32 / fp64),
  * with and without each optional input (h0 / initial state, reset, the final-state gradient,
    SSD's D) and both time-chunked passes (explicit chunk sizes, as _plan picks on a GPU),
  * at the shapes of every configs/model/*.yaml of the kernel's family (at T = 512; the tiles
    only depend on T when it is short) and at a small ragged shape (sizes not divisible by 16
    and short sequences: smaller tiles, no alignment hints, sizes of 1 folded into constants).
Each launch is specialised exactly as Triton's JIT specialises it at a launch (its own binder:
pointer alignment, ints divisible by 16 or equal to 1), deduplicated, then compiled down to a
cubin with Triton's bundled ptxas (ptxas 12.x for sm_80, ptxas-blackwell for sm_90 / sm_100).

Reported per variant: registers per thread, spill stores / loads and stack frame (ptxas -v),
shared memory per program (the compiled kernel's metadata), warps, programs per launch at the
case's shape (the grid) and programs resident per SM by registers / shared memory. Exit status
1 on a compile error, any register spill (unless allowed with --allow-spill GLOB) or shared
memory over the target's per-block limit: sm_80 163 KiB (A100: 164 KiB per SM, 1 KiB
reserved), sm_90 and sm_100 227 KiB (228 KiB per SM).

TRITON_INTERPRET is removed from the environment before Triton is imported: under the
interpreter the kernels are not compiled at all.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the launches use (and no warning)

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


@dataclass(frozen=True)
class Target:
    name: str
    arch: int
    smem_block: int  # bytes of shared memory one program may use
    smem_sm: int  # bytes of shared memory per SM (for residency)
    regs_sm: int = 65536
    threads_sm: int = 2048
    blocks_sm: int = 32


TARGETS = {
    "sm_80": Target("sm_80", 80, 163 * KIB, 164 * KIB),
    "sm_90": Target("sm_90", 90, 227 * KIB, 228 * KIB),
    "sm_100": Target("sm_100", 100, 227 * KIB, 228 * KIB),
}
MODULES = ("linear_scan", "ssd", "newton", "gla", "delta_rule")
TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float64")


# ----------------------------------------------------------------------------------------------
# Shapes: every model config of a family, plus a small ragged one
# ----------------------------------------------------------------------------------------------

def _model_shapes(names: set[str] | None = None) -> dict[str, list[tuple[str, dict]]]:
    """{module: [(case name, shape dict)]} from configs/model/*.yaml (distinct shapes only; only
    the configs in `names` unless None)."""
    from megarnn.config import ModelConfig
    out: dict[str, dict[tuple, str]] = {m: {} for m in MODULES}
    for path in sorted(glob.glob(str(ROOT / "configs" / "model" / "*.yaml"))):
        name = Path(path).stem
        if names is not None and name not in names:
            continue
        c = ModelConfig.from_yaml(path)
        if c.family in ("griffin", "hawk"):
            out["linear_scan"].setdefault((("D", c.lru_width or c.d_model),), name)
        elif c.family == "mamba2":
            H = c.expand * c.d_model // c.ssm_head_dim
            key = (("H", H), ("P", c.ssm_head_dim), ("G", c.n_groups), ("N", c.d_state), ("Q", c.chunk_size))
            out["ssd"].setdefault(key, name)
        elif c.family == "pararnn":
            cells = {"G": "gru", "L": "lstm"}
            for cell in sorted({cells[b] for b in c.block_pattern if b in cells}):
                out["newton"].setdefault((("W", c.lru_width or c.d_model), ("cell", cell)), name)
        elif c.family in ("gla", "deltanet"):
            from megarnn.models import linear_attention as la
            key, value = (la.gla_dims if c.family == "gla" else la.deltanet_dims)(c)
            H = c.n_heads
            module = "gla" if c.family == "gla" else "delta_rule"
            out[module].setdefault((("H", H), ("K", key // H), ("V", value // H), ("Q", c.la_chunk_size)), name)
    return {m: [(name, dict(key)) for key, name in shapes.items()] for m, shapes in out.items()}


# Small and ragged: T, D, W, P not divisible by 16, a chunk count of 1 folded into a constant.
RAGGED = {
    "linear_scan": [("ragged", dict(D=40))],
    "ssd": [("ragged", dict(H=4, P=8, G=2, N=16, Q=16))],
    "newton": [("ragged", dict(W=40, cell="gru")), ("ragged", dict(W=40, cell="lstm"))],
    "gla": [("ragged", dict(H=3, K=40, V=24, Q=64))],
    "delta_rule": [("ragged", dict(H=3, K=40, V=24, Q=64))],
}
T_MODEL, T_RAGGED = 512, 37


# ----------------------------------------------------------------------------------------------
# Capture: call the host functions with every kernel replaced by a recorder
# ----------------------------------------------------------------------------------------------

@dataclass
class Launch:
    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    case: str


class _Recorder:
    def __init__(self, module: str, name: str, sink: list, case: list):
        self.module, self.name, self.sink, self.case = module, name, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.module, self.name, tuple(grid), args, kwargs, self.case[0]))
        return launch


def _jit_functions(mod) -> dict:
    from triton.runtime.jit import JITFunction
    return {n: v for n, v in vars(mod).items() if isinstance(v, JITFunction)}


@contextlib.contextmanager
def _recording(mod, module: str, sink: list, case: list):
    originals = _jit_functions(mod)
    try:
        for n in originals:
            setattr(mod, n, _Recorder(module, n, sink, case))
        yield
    finally:
        for n, f in originals.items():
            setattr(mod, n, f)


def _drive_linear_scan(K, dtype, shape, ragged):
    import torch
    D = shape["D"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for B, T in ((1, T_RAGGED), (2, 5)) if ragged else ((1, T_MODEL),):
        chunk = 16 if ragged else T // 4  # _plan's chunks are multiples of BLOCK_T
        a = torch.rand(B, T, D, dtype=acc)  # the decay stays fp32 for bf16 data (kernels/linear_scan.py)
        b = torch.randn(B, T, D, dtype=dtype)
        sp = torch.rand(D, dtype=torch.float32)
        for h0 in (None, torch.zeros(B, D, dtype=acc)):
            for cs in (None, chunk):
                h, _ = K.scan_fwd(a, b, h0, chunk_size=cs)
                for dh_last in (None, torch.zeros(B, D, dtype=acc)):
                    K.scan_bwd(a, b, h0, b, dh_last, chunk_size=cs)
                for reset in (None, torch.zeros(B, T, dtype=torch.bool)):
                    K.rglru_fwd(b, b, b, sp, h0, reset, chunk_size=cs)
                    for dh_last in (None, torch.zeros(B, D, dtype=acc)):
                        K.rglru_bwd(b, b, b, sp, b, h0, reset, b, dh_last, chunk_size=cs)


def _drive_ssd(K, dtype, shape, ragged):
    import torch
    H, P, G, N, Q = (shape[k] for k in "HPGNQ")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # T: several chunks; ragged also one short chunk (Q = T, one chunk).
    for b, T in ((1, T_RAGGED), (2, 5)) if ragged else ((1, T_MODEL),):
        x = torch.randn(b, T, H, P, dtype=dtype)
        dt = torch.rand(b, T, H, dtype=dtype)  # softplus of the bf16 projection in the model
        A = -torch.rand(H, dtype=acc)
        Bm = torch.randn(b, T, G, N, dtype=dtype)
        for D in (None, torch.ones(H, dtype=dtype)):
            for s0 in (None, torch.zeros(b, H, P, N, dtype=acc)):
                for reset in (None, torch.zeros(b, T, dtype=torch.bool)):
                    K.ssd_fwd(x, dt, A, Bm, Bm, Q, D, s0, reset)
                    for dfinal in (None, torch.zeros(b, H, P, N, dtype=acc)):
                        K.ssd_bwd(x, dt, A, Bm, Bm, Q, D, s0, reset, x, dfinal)


def _drive_newton(K, dtype, shape, ragged):
    import torch
    if dtype == torch.bfloat16:
        return  # the solver computes in fp32 / fp64 only (newton_solve refuses bf16)
    W, cell = shape["W"], shape["cell"]
    S = 2 * W if cell == "lstm" else W
    n_params = K.CELLS[cell]
    for B, T in ((1, T_RAGGED), (2, 5)) if ragged else ((1, T_MODEL),):
        chunk = 16 if ragged else 64  # _plan: >= MIN_CHUNK steps on a GPU
        x = torch.randn(B, T, 3, W, dtype=dtype)
        params = torch.randn(n_params, W, dtype=dtype)
        h = torch.randn(B, T, S, dtype=dtype)
        for h0 in (None, torch.zeros(B, S, dtype=dtype)):
            for reset in (None, torch.zeros(B, T, dtype=torch.bool)):
                K.sequential(cell, x, params, h0, reset)
                for cs in (None, chunk):
                    K.newton_guess(cell, x, params, h0, reset, chunk_size=cs)
                    K.newton_iteration(cell, x, params, h, h0, reset, chunk_size=cs)
                    K.adjoint(cell, x, params, h, h0, reset, h, chunk_size=cs)
        # The block scans: n = 2 for the LSTM's Newton solves across cp ranks; for the GRU's width the
        # block-diagonal GRU cells' (megarnn/models/pararnn.py, block letter B) n in 2, 4, 8, 16, plus
        # one n that is not a power of 2 (padded tiles) in the ragged case; forward and backward.
        sizes = (2,) if cell == "lstm" else (2, 3, 4, 8, 16) if ragged else (2, 4, 8, 16)
        for n in sizes:
            D = max(1, W // n)
            # empty, not randn: nothing runs, and untouched pages cost no memory (a is 512 x 4096 n floats)
            a, v = torch.empty(B, T, D, n, n, dtype=dtype), torch.empty(B, T, D, n, dtype=dtype)
            for s0 in (None, torch.zeros(B, D, n, dtype=dtype)):
                for reverse in (False, True):
                    K.block_scan(a, v, s0, reverse)
                    if cell == "gru":  # the backward only where a block cell trains through it
                        K.block_scan_bwd(a, v, s0, v, reverse)


def _drive_gla(K, dtype, shape, ragged):
    import torch
    H, Kd, V, Q = (shape[k] for k in "HKVQ")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for b, T in ((1, T_RAGGED), (2, 5)) if ragged else ((1, T_MODEL),):
        q, v = torch.randn(b, T, H, Kd, dtype=dtype), torch.randn(b, T, H, V, dtype=dtype)
        gk = -torch.rand(b, T, H, Kd, dtype=acc)  # the model's log gate is fp32 (fp64)
        for s0 in (None, torch.zeros(b, H, Kd, V, dtype=acc)):
            for reset in (None, torch.zeros(b, T, dtype=torch.bool)):
                K.gla_fwd(q, q, v, gk, Kd ** -0.5, Q, s0, reset)
                for dfinal in (None, torch.zeros(b, H, Kd, V, dtype=acc)):
                    K.gla_bwd(q, q, v, gk, Kd ** -0.5, Q, s0, reset, v, dfinal)


def _drive_delta_rule(K, dtype, shape, ragged):
    import torch
    H, Kd, V, Q = (shape[k] for k in "HKVQ")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for b, T in ((1, T_RAGGED), (2, 5)) if ragged else ((1, T_MODEL),):
        q, v = torch.randn(b, T, H, Kd, dtype=dtype), torch.randn(b, T, H, V, dtype=dtype)
        g, beta = -torch.rand(b, T, H, dtype=acc), torch.rand(b, T, H, dtype=acc)  # fp32 (fp64) in the model
        for s0 in (None, torch.zeros(b, H, Kd, V, dtype=acc)):
            for reset in (None, torch.zeros(b, T, dtype=torch.bool)):
                K.delta_fwd(q, q, v, g, beta, Kd ** -0.5, Q, s0, reset)
                for dfinal in (None, torch.zeros(b, H, Kd, V, dtype=acc)):
                    K.delta_bwd(q, q, v, g, beta, Kd ** -0.5, Q, s0, reset, v, dfinal)


DRIVERS = {"linear_scan": _drive_linear_scan, "ssd": _drive_ssd, "newton": _drive_newton, "gla": _drive_gla,
           "delta_rule": _drive_delta_rule}


def capture(modules, dtypes, shapes_arg: str = "all") -> list[Launch]:
    """Every launch of the host functions of `modules` in `dtypes` at the shapes `shapes_arg`
    selects: all, model (every configs/model/*.yaml), ragged, or a comma-separated list of
    config names (and 'ragged')."""
    import importlib
    import torch
    wanted = {s.strip() for s in shapes_arg.split(",") if s.strip()}
    configs = None if wanted & {"all", "model"} else wanted - {"ragged"}
    shapes = _model_shapes(configs)
    if not wanted & {"all", "model"} and configs and not any(shapes.values()):
        raise SystemExit(f"--shapes {shapes_arg}: no such config in configs/model/")
    use_ragged = bool(wanted & {"all", "ragged"})
    launches: list[Launch] = []
    for module in modules:
        K = importlib.import_module(f"megarnn_kernels.{module}")
        case = [""]
        with _recording(K, module, launches, case):
            for dname in dtypes:
                dtype = getattr(torch, dname)
                for (name, shape), ragged in ([(s, False) for s in shapes[module]] +
                                              [(s, True) for s in RAGGED[module] if use_ragged]):
                    case[0] = f"{name} {_short(dname)}"
                    DRIVERS[module](K, dtype, shape, ragged)
    return launches


# ----------------------------------------------------------------------------------------------
# Specialise as the JIT does, deduplicate
# ----------------------------------------------------------------------------------------------

@dataclass
class Variant:
    module: str
    kernel: str
    target: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    case: str
    programs: int
    results: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.module}.{self.kernel}[{self.config}]@{self.target}"


def _short(dtype_name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64", "float16": "fp16"}.get(dtype_name, dtype_name)


def _config_label(kernel, signature, constexprs, attrs, options) -> str:
    """dtype | tiles | flags | warps | JIT specialisation, e.g.
    'bf16 | BLOCK_T=16 BLOCK_D=64 | HAS_H0 WRITE_H | w4 | T%16 D%16'."""
    import triton.language as tl
    names = [p.name for p in kernel.params]
    declared = {p.name for p in kernel.params if p.is_constexpr}
    ptrs = {v.lstrip("*") for k, v in signature.items() if isinstance(v, str) and v.startswith("*")}
    dtype = next((d for d in ("bf16", "fp16", "fp64") if d in ptrs), "fp32")
    parts = [dtype]
    tiles, flags, other = [], [], []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if name not in declared:
            continue
        if isinstance(value, bool):
            if value:
                flags.append(name)
        elif isinstance(value, int):
            tiles.append(f"{name}={value}")
        elif isinstance(value, tl.dtype):
            if name == "ACC" and str(value) != "fp32":
                other.append(f"acc {value}")
            elif name != "ACC" and str(value).replace("bfloat16", "bf16") != dtype:
                other.append(f"{name}={value}")
        else:
            if name == "PREC" and dtype in ("fp32", "fp64"):
                other.append(f"{value}")
            elif name != "PREC":
                other.append(f"{name}={value}")
    parts[0] = " ".join([dtype] + other)
    parts.append(" ".join(tiles) or "-")
    parts.append(" ".join(flags) or "-")
    parts.append(f"w{options.get('num_warps')}" + (f" r{options['maxnreg']}" if options.get("maxnreg") else ""))
    spec = [f"{names[p[0]]}=1" for p, v in sorted(constexprs.items()) if names[p[0]] not in declared]
    spec += [f"{names[p[0]]}%16" for p, a in sorted(attrs.items())
             if a and signature.get(names[p[0]]) in ("i32", "i64")]
    misaligned = [names[p[0]] for p, a in sorted(attrs.items())
                  if not a and str(signature.get(names[p[0]], "")).startswith("*")]
    spec += [f"{n} unaligned" for n in misaligned]
    parts.append(" ".join(spec) or "-")
    return " | ".join(parts)


def specialise(launches: list[Launch], targets: list[Target]) -> list[Variant]:
    import importlib
    import math
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton import knobs
    variants: dict[tuple, Variant] = {}
    binders: dict[tuple, tuple] = {}
    for t in targets:
        backend = make_backend(GPUTarget("cuda", t.arch, 32))
        for ln in launches:
            kernel = getattr(importlib.import_module(f"megarnn_kernels.{ln.module}"), ln.kernel)
            key = (ln.module, ln.kernel, t.name)
            if key not in binders:
                binders[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
            kwargs = dict(ln.kwargs)
            # options a module sets per GPU (kernels/linear_scan.py target_options): the launch
            # was captured on the CPU, so ask again for this target
            per_target = getattr(importlib.import_module(f"megarnn_kernels.{ln.module}"), "target_options", None)
            if per_target is not None:
                kwargs.update(per_target(ln.kernel, kwargs, t.arch))
            kwargs.setdefault("debug", knobs.runtime.debug)  # as JITFunction.run adds them
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            bound, spec, opts = binders[key](*ln.args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
            options = dict(options.__dict__)
            vkey = (ln.module, ln.kernel, t.name, repr(sorted(signature.items())),
                    repr(sorted(constexprs.items(), key=str)), repr(sorted(attrs.items())),
                    repr(sorted(options.items())))
            if vkey in variants:
                continue
            variants[vkey] = Variant(ln.module, ln.kernel, t.name, signature, constexprs, attrs, options,
                                     _config_label(kernel, signature, constexprs, attrs, options), ln.case,
                                     math.prod(ln.grid))
    return list(variants.values())


# ----------------------------------------------------------------------------------------------
# Compile (in worker processes) and read the resource usage
# ----------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _worker_init(cache_root: str):
    os.environ.pop("TRITON_INTERPRET", None)
    # A private cache: every variant really goes through ptxas, whose -v log gives the spills.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


def compile_one(module: str, kernel_name: str, arch: int, signature: dict, constexprs: dict, attrs: dict,
                options: dict, dump: str | None = None) -> dict:
    import importlib
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = getattr(importlib.import_module(f"megarnn_kernels.{module}"), kernel_name)
    out: dict = {}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            c = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                               options=options)
    except Exception as e:  # noqa: BLE001 - every failure is a row in the report
        msg = str(e).strip()
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        out["error"] = f"{type(e).__name__}: " + (" / ".join(lines[:6]) if lines else "")
        out["compile_s"] = round(time.perf_counter() - start, 2)
        return out
    out["compile_s"] = round(time.perf_counter() - start, 2)
    if dump:  # the PTX and ptxas's log, to read what spills (a `call` to a slow path, a live range)
        Path(dump + ".ptx").write_text(c.asm["ptx"])
        Path(dump + ".ptxas.log").write_text(log.getvalue())
        Path(dump + ".cubin").write_bytes(c.asm["cubin"])  # cuobjdump -sass: where the STL / LDL are
    out["shared"] = int(c.metadata.shared or 0)
    out["num_warps"] = int(c.metadata.num_warps)
    text = log.getvalue()
    m = _PTXAS_REGS.search(text)
    if m:
        out["regs"] = int(m.group(1))
    m = _PTXAS_SPILL.search(text)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    usage = _res_usage(c.asm["cubin"], knobs.nvidia.cuobjdump.path)
    if usage:  # the cubin's own record; fills in what a ptxas log lacks
        out.setdefault("regs", usage[0])
        out.setdefault("stack", usage[1])
        out["local"] = usage[3]
    if "spill_stores" not in out and "stack" in out:
        out["spill_stores"] = out["spill_loads"] = out["stack"]  # no log: any stack frame counts as a spill
        out["spill_source"] = "cuobjdump stack"
    if out.get("spill_stores") or out.get("spill_loads") or out.get("stack"):
        where = _local_accesses(c.asm["cubin"], knobs.nvidia.cuobjdump.path)
        if where is not None:
            out["local_in_loop"], out["local_outside"] = where
    return out


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _local_accesses(cubin: bytes, cuobjdump: str):
    """(local-memory loads / stores inside a loop, outside any loop) in the SASS. A loop is the
    span between a backward branch and its target. A spill inside a loop costs traffic every
    iteration; one outside (a value kept across the whole loop, stored before and loaded after)
    costs one store and one load per thread."""
    text = _cuobjdump(cubin, cuobjdump, "-sass")
    if text is None:
        return None
    code = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS.finditer(text)]
    loops = []
    for addr, op, args in code:
        m = re.match(r"(?:\S+\s+)?0x([0-9a-f]+)", args.strip()) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inside = outside = 0
    for addr, op, _ in code:
        if op.startswith(("LDL", "STL")):
            if any(lo <= addr <= hi for lo, hi in loops):
                inside += 1
            else:
                outside += 1
    return inside, outside


def _cuobjdump(cubin: bytes, cuobjdump: str, flag: str) -> str | None:
    """What the bundled cuobjdump prints for a cubin (None where the wheel has none)."""
    if not os.path.exists(cuobjdump):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True).stdout


def _res_usage(cubin: bytes, cuobjdump: str):
    m = _RES_USAGE.search(_cuobjdump(cubin, cuobjdump, "-res-usage") or "")
    return tuple(int(g) for g in m.groups()) if m else None


def resident(v: Variant, t: Target) -> int | None:
    """Programs resident per SM, limited by registers (allocated per warp in units of 256),
    shared memory, threads and the block limit."""
    r = v.results
    if "regs" not in r:
        return None
    warps = r.get("num_warps") or v.options.get("num_warps", 4)
    per_warp = -(-r["regs"] * 32 // 256) * 256
    by_regs = t.regs_sm // (per_warp * warps) if per_warp else t.blocks_sm
    by_smem = t.smem_sm // r["shared"] if r.get("shared") else t.blocks_sm
    return min(by_regs, by_smem, t.threads_sm // (32 * warps), t.blocks_sm)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def glob_match(text: str, pattern: str) -> bool:
    """'*' matches any run of characters; everything else, brackets included, is literal."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text) is not None


def status(v: Variant, t: Target, allow: list[str]) -> str:
    r = v.results
    if "error" in r:
        return "ERROR"
    if r.get("shared", 0) > t.smem_block:
        return "SMEM"
    if r.get("spill_stores") or r.get("spill_loads") or r.get("stack"):
        return "spill (allowed)" if any(glob_match(v.id, g) for g in allow) else "SPILL"
    return "ok"


def print_table(variants: list[Variant], allow: list[str], file=sys.stdout) -> None:
    head = ("kernel", "config (dtype | tiles | flags | warps | JIT specialisation)", "target", "regs", "spill st/ld",
            "smem", "programs", "per SM", "status", "first case")
    rows = []
    for v in variants:
        t, r = TARGETS[v.target], v.results
        spill = "-" if "error" in r else f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
        rows.append((f"{v.module}.{v.kernel}", v.config, v.target, str(r.get("regs", "-")), spill,
                     f"{r['shared'] / KIB:.1f}K" if "shared" in r else "-", str(v.programs),
                     str(resident(v, t) or "-"), status(v, t, allow), v.case))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line, file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=file)
    for v in variants:
        if "error" in v.results:
            print(f"ERROR {v.id}: {v.results['error'][:2000]}", file=file)


def summary(variants: list[Variant], allow: list[str]) -> dict:
    out = {}
    for v in variants:
        s = out.setdefault(v.target, {"variants": 0, "ok": 0, "errors": 0, "spills": 0, "allowed_spills": 0,
                                      "smem_over": 0, "max_regs": 0, "max_shared": 0})
        st = status(v, TARGETS[v.target], allow)
        s["variants"] += 1
        s[{"ok": "ok", "ERROR": "errors", "SPILL": "spills", "spill (allowed)": "allowed_spills",
           "SMEM": "smem_over"}[st]] += 1
        s["max_regs"] = max(s["max_regs"], v.results.get("regs", 0))
        s["max_shared"] = max(s["max_shared"], v.results.get("shared", 0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="sm_80,sm_90,sm_100",
                   help=f"comma-separated, of {', '.join(TARGETS)} (default: all)")
    p.add_argument("--only", action="append", default=[],
                   help="keep kernels whose 'module.kernel' name contains this (repeatable: any)")
    p.add_argument("--dtypes", default=",".join(_short(d) for d in TORCH_DTYPE_NAMES),
                   help="comma-separated of fp32, bf16, fp64 (default: all)")
    p.add_argument("--shapes", default="all",
                   help="all (default), model (every configs/model/*.yaml), ragged, or comma-separated "
                        "config names (e.g. griffin-1b,mamba2-1.3b) and/or 'ragged'")
    p.add_argument("--allow-spill", action="append", default=[], metavar="GLOB",
                   help="a variant id (module.kernel[config]@target) pattern, '*' the only wildcard, whose "
                        "spills are reported but do not fail (known defects); repeatable")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH ('-' or no PATH: stdout, instead of the table)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")
    p.add_argument("--list", action="store_true", help="list the variants without compiling them")
    p.add_argument("--dump", metavar="DIR",
                   help="write each variant's PTX, ptxas log and cubin to DIR")
    args = p.parse_args(argv)

    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    targets = [TARGETS[n] for n in names]
    long_names = {_short(d): d for d in TORCH_DTYPE_NAMES}
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in long_names for d in dtypes):
        p.error(f"--dtypes: of {', '.join(long_names)}; got {args.dtypes}")
    modules = [m for m in MODULES if not args.only or any(o in m or m in o for o in args.only)]
    log = sys.stderr if args.json == "-" else sys.stdout

    import triton
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        print(f"this triton {triton.__version__} cannot compile for CUDA: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    launches = capture(modules, [long_names[d] for d in dtypes], args.shapes)
    launches = [ln for ln in launches if not args.only or any(o in f"{ln.module}.{ln.kernel}" for o in args.only)]
    variants = specialise(launches, targets)
    print(f"triton {triton.__version__}; {len(launches)} launches captured -> {len(variants)} variants "
          f"({len(variants) // max(1, len(targets))} per target) for {', '.join(names)}; "
          f"shared memory limits per program: "
          + ", ".join(f"{t.name} {t.smem_block // KIB} KiB" for t in targets), file=log)
    if args.list:
        for v in variants:
            print(f"{v.id}  programs {v.programs}  ({v.case})", file=log)
        return 0

    ctx = multiprocessing.get_context("spawn")
    cache_root = tempfile.mkdtemp(prefix="compile_kernels_")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, cache_root, True)
        pool = stack.enter_context(cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx,
                                                          initializer=_worker_init, initargs=(cache_root,)))
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
        dumps = {v.id: str(Path(args.dump).resolve() / re.sub(r"[^A-Za-z0-9_.@=-]+", "_", v.id)) if args.dump
                 else None for v in variants}
        futures = {pool.submit(compile_one, v.module, v.kernel, TARGETS[v.target].arch, v.signature, v.constexprs,
                               v.attrs, v.options, dumps[v.id]): v for v in variants}
        done = 0
        for fut in cf.as_completed(futures):
            v = futures[fut]
            try:
                v.results = fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker is an error row
                v.results = {"error": f"{type(e).__name__}: {e}"}
            done += 1
            if done % 25 == 0 or done == len(variants):
                print(f"  compiled {done}/{len(variants)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    order = {m: i for i, m in enumerate(MODULES)}
    variants.sort(key=lambda v: (order[v.module], v.kernel, names.index(v.target), v.config))
    summ = summary(variants, args.allow_spill)
    elapsed = time.perf_counter() - start
    failed = sum(s["errors"] + s["spills"] + s["smem_over"] for s in summ.values())

    if args.json:
        report = {
            "triton": triton.__version__, "targets": names, "seconds": round(elapsed, 1),
            "smem_limit_per_program": {t.name: t.smem_block for t in targets},
            "allow_spill": args.allow_spill, "summary": summ,
            "variants": [dict(id=v.id, module=v.module, kernel=v.kernel, config=v.config, target=v.target,
                              case=v.case, programs=v.programs, resident_per_sm=resident(v, TARGETS[v.target]),
                              status=status(v, TARGETS[v.target], args.allow_spill), **v.results)
                         for v in variants],
        }
        text = json.dumps(report, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        print_table(variants, args.allow_spill)
        print()
    for name, s in summ.items():
        print(f"{name}: {s['variants']} variants, {s['ok']} ok, {s['errors']} compile errors, {s['spills']} spilling"
              f" ({s['allowed_spills']} more allowed), {s['smem_over']} over the shared memory limit; max "
              f"{s['max_regs']} registers, max {s['max_shared'] / KIB:.1f} KiB shared", file=log)
    print(f"{elapsed:.0f} s; {'FAILED: ' + str(failed) + ' variant(s)' if failed else 'all variants pass'}",
          file=log)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
