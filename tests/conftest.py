import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under Triton's interpreter; the variable must be set
    # before any @triton.jit decoration runs, so before any test imports megarnn_kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run `python -m megarnn ARGS` in a fresh process (as a user would)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "megarnn", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"megarnn {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_launcher(nproc: int, *args, script: str = "torchrun.sh", check: bool = True) -> subprocess.CompletedProcess:
    """Run `launch/SCRIPT NPROC ARGS` (gloo ranks of one thread each), as a user would."""
    proc = subprocess.run([str(ROOT / "launch" / script), str(nproc), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"launch/{script} {nproc} exited {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


TINY = [
    "model=configs/model/griffin-tiny.yaml", "data.seq_len=64", "data.vocab_size=512",
    "train.micro_batch_size=4", "train.warmup_steps=5", "train.log_interval=1",
    "train.sample_tokens=0", "train.progress=off",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
