"""SIGUSR1 / SIGTERM: the step finishes, a checkpoint is saved, exit 75; rerunning resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=12", "train.save_interval=100", "train.eval_interval=100", "data.holdout=[]"]


def _wait_for_step(run, step, proc, timeout=120):
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={run}")
    return run


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_checkpoint_exits_75_and_rerun_matches_uninterrupted(tmp_path, straight, sig):
    preempted = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "megarnn", "train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={preempted}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_for_step(preempted, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert f"stopped by {sig.name}" in err
    stopped_at = int((preempted / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= stopped_at < 12
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={preempted}")
    a, b = read_metrics(straight, "train/loss"), read_metrics(preempted, "train/loss")
    assert sorted(b) == list(range(1, 13)) and all(a[s] == b[s] for s in a)  # bitwise on CPU


def test_signal_during_setup_stops_after_the_first_step_with_a_checkpoint(tmp_path, straight):
    """USR1 while the run is still building its model and engine (config.yaml is written just
    before): the handlers are already in place, so the run does one step, saves, exits 75."""
    preempted = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "megarnn", "train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={preempted}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (preempted / "config.yaml").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert (preempted / "checkpoints" / "latest").read_text() == "step_000001"
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={preempted}")
    a, b = read_metrics(straight, "train/loss"), read_metrics(preempted, "train/loss")
    assert sorted(b) == list(range(1, 13)) and all(a[s] == b[s] for s in a)
