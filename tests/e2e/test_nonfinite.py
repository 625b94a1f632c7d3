"""A diverging run: non-finite steps are skipped and counted, then the run stops naming its last checkpoint."""
import pytest

from tests.conftest import TINY, run_cli


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nonfinite_steps_are_skipped_then_stop_names_last_good_checkpoint(tmp_path, zero_stage):
    run = tmp_path / "run"
    # lr = 1e30: step 1 is finite and saved, its update makes every later loss NaN.
    proc = run_cli("train", "configs/quickstart.yaml", *TINY, f"train.out_dir={run}", "train.max_steps=20",
                   "train.warmup_steps=1", "train.lr=1e30", "train.save_interval=1", "train.max_bad_steps=3",
                   f"parallel.zero_stage={zero_stage}", "data.holdout=[]", check=False)
    assert proc.returncode == 2
    assert "step 2: non-finite loss" in proc.stdout and "(3 in a row, 3 in all)" in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert "3 non-finite steps in a row" in err
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_000001'}" in err
    assert (run / "checkpoints" / "latest").read_text() == "step_000001"
