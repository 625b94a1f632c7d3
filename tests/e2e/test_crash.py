"""kill -9 at several points — mid-step, during a checkpoint save, right after one — then restart:
the loss curve equals the uninterrupted run bit for bit, and a damaged checkpoint is refused."""
import json
import os
import signal
import subprocess
import sys

from tests.conftest import ROOT, TINY, run_cli
from tests.e2e.test_preemption import _wait_for_step
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=10", "train.save_interval=2", "train.keep_checkpoints=2",
          "train.eval_interval=100", "data.holdout=[]"]


def _all_losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["value"]) for m in lines if m["tag"] == "train/loss"]


def test_kill_9_anywhere_then_restart_reproduces_the_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={straight}")
    args = ["train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={crashed}"]

    # 1. SIGKILL in the middle of saving step 4: step 2 stays the latest, step 4 is never loaded.
    proc = run_cli(*args, env={"MEGARNN_TEST_CRASH_AT_SAVE": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpts = crashed / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000002"
    assert (ckpts / "step_000004").is_dir() and not (ckpts / "step_000004" / "megarnn.json").exists()

    # 2. SIGKILL from outside in the middle of training (after step 7, before the save at 8).
    p = subprocess.Popen([sys.executable, "-m", "megarnn", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_for_step(crashed, 7, p)
    p.kill()
    p.wait()

    # 3. Restart and finish.
    run_cli(*args)
    want = read_metrics(straight, "train/loss")
    got = _all_losses(crashed)
    assert {s for s, _ in got} == set(range(1, 11))
    assert all(v == want[s] for s, v in got), [(s, v, want[s]) for s, v in got if v != want[s]]
    # keep_checkpoints=2: only the two newest complete checkpoints remain.
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000008", "step_000010"]


def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    run = tmp_path / "run"
    args = ["train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={run}", "train.warmup_steps=1",
            "train.max_steps=2"]
    run_cli(*args)
    shard = run / "checkpoints" / "step_000002" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli(*args[:-1], "train.max_steps=4", check=False)
    assert proc.returncode == 2
    assert f"{shard}: checksum mismatch" in proc.stderr
    proc = run_cli("generate", run, "--prompt", "A", check=False)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr
