"""Resuming on another data / context parallel layout: ZeRO-0 checkpoints move between cp2, dp2 and
one process with the losses continuing as the uninterrupted run (through DeepSpeed's own loading;
changes that need a conversion, such as ZeRO 1-2 on another number of ranks, tp or pp, are in
test_reshard.py)."""

import pytest

from tests.conftest import TINY, run_cli, run_launcher
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=6", "train.save_interval=2", "train.eval_interval=100", "data.holdout=[]"]


def _launch(nproc, *args):
    run_launcher(nproc, "configs/quickstart.yaml", *COMMON, *args)


def test_zero0_resumes_across_cp2_dp2_and_one_process(tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    z0 = "parallel.zero_stage=0"
    run_cli("train", "configs/quickstart.yaml", *COMMON, z0, "train.micro_batch_size=8", f"train.out_dir={straight}")
    _launch(2, z0, "parallel.cp=2", "train.micro_batch_size=8", f"train.out_dir={moved}", "train.exit_at_step=2")
    _launch(2, z0, "train.micro_batch_size=4", f"train.out_dir={moved}", "train.exit_at_step=4")  # cp2 -> dp2
    run_cli("train", "configs/quickstart.yaml", *COMMON, z0, "train.micro_batch_size=8",
            f"train.out_dir={moved}")  # dp2 -> one process
    a, b = read_metrics(straight, "train/loss"), read_metrics(moved, "train/loss")
    assert sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5)
