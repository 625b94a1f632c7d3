"""Save, then resume in a new process: the next losses equal an uninterrupted run bit for bit."""
import pytest

from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.eval_interval=1000", "train.save_interval=4", "data.holdout=[]"]


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_resume_in_new_process_is_bitwise_identical(tmp_path, zero_stage):
    common = [*COMMON, f"parallel.zero_stage={zero_stage}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", "configs/quickstart.yaml", *common, f"train.out_dir={straight}", "train.max_steps=8")
    run_cli("train", "configs/quickstart.yaml", *common, f"train.out_dir={resumed}", "train.max_steps=8",
            "train.exit_at_step=4")
    proc = run_cli("train", "configs/quickstart.yaml", *common, f"train.out_dir={resumed}", "train.max_steps=8")
    assert "resumed from" in proc.stdout
    a, b = read_metrics(straight, "train/loss"), read_metrics(resumed, "train/loss")
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # exact float equality
    assert read_metrics(straight, "train/grad_norm")[8] == read_metrics(resumed, "train/grad_norm")[8]
