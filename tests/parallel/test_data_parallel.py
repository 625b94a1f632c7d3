"""`megarnn train` under torchrun with 2 data-parallel gloo ranks logs the losses of one process."""
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=4", "train.save_interval=4", "train.eval_interval=4",
          "data.holdout=[macbeth_gut.txt]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_data_parallel_ranks_equal_one_process(tmp_path, zero_stage):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", "configs/quickstart.yaml", *COMMON, "train.micro_batch_size=8", f"train.out_dir={one}",
            f"parallel.zero_stage={zero_stage}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "megarnn", "train", "configs/quickstart.yaml", *COMMON,
           "train.micro_batch_size=4", f"train.out_dir={two}", f"parallel.zero_stage={zero_stage}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(one, "train/loss"), read_metrics(two, "train/loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5)
    assert read_metrics(two, "val/loss")[4] == pytest.approx(read_metrics(one, "val/loss")[4], rel=1e-5)
    assert (two / "checkpoints" / "latest").read_text() == "step_000004"
