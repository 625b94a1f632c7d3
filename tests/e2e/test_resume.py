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


def test_a_new_schedule_on_resume_needs_resume_schedule_new_and_then_follows_the_config(tmp_path):
    """Raising max_steps (or changing warmup, lr) on resume would re-stretch the cosine silently:
    it is an error naming the keys, unless train.resume_schedule=new; then from the saved step on
    the lr is the new schedule's (as a run started with it has), and the log says what changed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    new = ["train.max_steps=10", "train.lr=0.004"]
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={straight}", *new)
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={resumed}", "train.max_steps=6",
            "train.exit_at_step=4")
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={resumed}", *new, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.max_steps: checkpoint 6 vs config 10" in proc.stderr and "train.resume_schedule=new" in proc.stderr
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={resumed}", *new,
                   "train.resume_schedule=new")
    assert "LR schedule changed on resume" in proc.stdout and "train.lr: checkpoint" in proc.stdout
    a, b = read_metrics(straight, "train/lr"), read_metrics(resumed, "train/lr")
    assert sorted(b) == list(range(1, 11))
    assert all(abs(a[s] - b[s]) <= 1e-12 * a[s] for s in range(5, 11)), (a, b)
    assert any(abs(a[s] - b[s]) > 1e-6 * a[s] for s in range(1, 5))  # the first steps ran the old schedule
