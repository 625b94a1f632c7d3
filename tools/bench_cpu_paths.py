"""CPU fast paths of the torch backends, side by side with an earlier commit's (BENCHMARKS.md).

    python tools/bench_cpu_paths.py [--before 300728a] [--threads 1] [--repeat 5]

linear_scan (torch), ssd_scan (torch, chunked) and newton_solve's two torch forwards, forward and
forward + backward, the minimum of --repeat timed runs after one warm-up. --before REV imports
megarnn/ops/{scan,ssd,newton}.py as they were at REV (from git) for the "before" columns; without
it the scan and SSD rows are skipped. One thread by default: on a shared machine, torch's second
OpenMP thread waits for a core and a 65k-element op can take 8 ms instead of 20 us.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_before(rev: str, tmp: Path) -> dict:
    """megarnn/ops/{scan,ssd,newton}.py at rev, importable side by side with today's."""
    mods = {}
    for name in ("scan", "ssd", "newton"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:megarnn/ops/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from megarnn.ops.scan import", "from before_scan import")
        (tmp / f"before_{name}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    for name in ("scan", "ssd", "newton"):
        spec = importlib.util.spec_from_file_location(f"before_{name}", tmp / f"before_{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"before_{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods


def timed(f, repeat: int) -> float:
    f()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def row(label: str, before: tuple[float, float], after: tuple[float, float]) -> str:
    return (f"{label:38s} fwd {before[0] * 1e3:7.1f} -> {after[0] * 1e3:7.1f} ms  x{before[0] / after[0]:5.2f}   "
            f"fwd+bwd {before[1] * 1e3:7.1f} -> {after[1] * 1e3:7.1f} ms  x{before[1] / after[1]:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="", help="git revision for the 'before' columns (scan, SSD)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from megarnn.models.pararnn import ParaGRUCell, ParaLSTMCell
    from megarnn.ops import newton, scan, ssd
    with tempfile.TemporaryDirectory() as tmp:
        old = load_before(a.before, Path(tmp)) if a.before else None
        if old:
            print(f"linear_scan torch backend, fp32, before = {a.before}")
            for B, T, D in [(4, 2048, 512), (1, 2048, 256), (2, 4096, 64), (1, 4096, 512)]:
                x = (torch.rand(B, T, D) * 0.1 + 0.9).requires_grad_()
                y = torch.randn(B, T, D, requires_grad=True)
                g = torch.randn(B, T, D)
                res = [(timed(lambda: m.linear_scan(x.detach(), y.detach(), backend="torch"), a.repeat),
                        timed(lambda: torch.autograd.grad(m.linear_scan(x, y, backend="torch"), (x, y), g), a.repeat))
                       for m in (old["scan"], scan)]
                print(row(f"B={B} T={T} D={D}", *res))
            print(f"ssd_scan torch backend (chunked), fp32, before = {a.before}")
            for b, T, H, P, G, N, Q in [(2, 1024, 16, 64, 1, 64, 64), (1, 2048, 8, 64, 1, 128, 64),
                                        (2, 512, 8, 32, 2, 32, 128)]:
                x = torch.randn(b, T, H, P, requires_grad=True)
                dt = torch.nn.functional.softplus(torch.randn(b, T, H)).requires_grad_()
                A = (-torch.rand(H) - 0.1).requires_grad_()
                Bm, Cm = (torch.randn(b, T, G, N, requires_grad=True) for _ in range(2))
                gy = torch.randn(b, T, H, P)
                args = (x, dt, A, Bm, Cm)
                res = [(timed(lambda: m.ssd_scan(*(t.detach() for t in args), chunk_size=Q, backend="torch"), a.repeat),
                        timed(lambda: torch.autograd.grad((m.ssd_scan(*args, chunk_size=Q, backend="torch")[0] * gy).sum(),
                                                          args), a.repeat))
                       for m in (old["ssd"], ssd)]
                print(row(f"b={b} T={T} H={H} P={P} G={G} N={N} Q={Q}", *res))
        print("newton_solve backend torch: Newton forward (torch_newton) -> sequential forward (torch_sequential), "
              "both with the adjoint backward")
        for Cell, (B, T, W) in [(ParaGRUCell, (1, 4096, 256)), (ParaGRUCell, (4, 1024, 256)),
                                (ParaLSTMCell, (1, 2048, 128))]:
            cell = Cell(W, 4)
            x = torch.randn(B, T, 3, W, requires_grad=True)
            g = torch.randn(B, T, cell.state_size)
            params = [x, *cell.parameters()]
            res = []
            for backend in ("torch_newton", "torch_sequential"):
                with torch.no_grad():
                    fw = timed(lambda: newton.newton_solve(cell, x, backend=backend), a.repeat)
                fb = timed(lambda: torch.autograd.grad(newton.newton_solve(cell, x, backend=backend), params, g,
                                                       allow_unused=True), a.repeat)
                res.append((fw, fb))
            print(row(f"{Cell.__name__} B={B} T={T} hidden={W}", *res))


if __name__ == "__main__":
    main()
