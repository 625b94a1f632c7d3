"""Ctrl-C (SIGINT) stops a run like SIGTERM / SIGUSR1: the step finishes, a checkpoint is saved,
exit 75; a second Ctrl-C exits at once (130) without saving; in a multi-rank run a signal on one
rank stops every rank at the same step."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, TINY, run_cli
from tests.e2e.test_preemption import _wait_for_step
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=12", "train.save_interval=100", "train.eval_interval=100", "data.holdout=[]"]


def _start(run, *extra, launcher=None):
    cmd = [sys.executable, "-m", "megarnn", "train"] if launcher is None else [str(ROOT / "launch" / launcher), "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*cmd, "configs/quickstart.yaml", *COMMON, *extra, f"train.out_dir={run}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_saves_a_checkpoint_exits_75_and_the_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "stopped by SIGINT" in err and "rerun the same command to resume" in err
    latest = (run / "checkpoints" / "latest").read_text()
    assert 3 <= int(latest.split("_")[1]) < 12
    assert (run / "checkpoints" / latest / "megarnn.json").is_file()
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.out_dir={run}")
    assert f"resumed from {run / 'checkpoints' / latest}" in proc.stdout
    assert sorted(read_metrics(run, "train/loss")) == list(range(1, 13))


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path):
    """Both interrupts land while the run builds its model and engine (config.yaml is written just
    before), seconds before its first step could end."""
    run = tmp_path / "run"
    proc = _start(run)
    deadline = time.time() + 120
    while not (run / "config.yaml").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # longer than RELAYED_SIGINT_SECONDS: a second Ctrl-C, not a launcher's relay of the first
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.time() - t0 < 10
    assert "interrupted again: exiting now without saving a checkpoint" in err
    assert "Traceback" not in err, err[-2000:]
    assert not (run / "checkpoints" / "latest").exists()


def test_ctrl_c_before_training_starts_is_one_line_and_130(tmp_path):
    """SIGINT during setup, before the trainer's handlers (1 s in: past the interpreter's own
    start-up, where a SIGINT inside `import torch` can surface as a RecursionError, and before the
    first step): no traceback."""
    proc = _start(tmp_path / "run")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 75:  # a very fast machine reached the training loop: that is fine too
        return
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "megarnn train: interrupted"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGINT to rank 1 only: rank 0 stops after the same step (the flag is all-reduced every step),
    the checkpoint of that step is complete, and both ranks exit 75."""
    run = tmp_path / "run"
    proc = _start(run, "train.max_steps=200", "train.micro_batch_size=2", launcher="torchrun.sh")
    _wait_for_step(run, 3, proc, timeout=300)
    workers = {int(_env_of(p).get("RANK", -1)): p for p in _children(proc.pid)}
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    latest = (run / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    assert 3 <= step < 200, err[-3000:]
    assert (run / "checkpoints" / latest / "megarnn.json").is_file()
    assert f"stopped by a signal on another rank after step {step}" in err, err[-3000:]  # rank 0
    assert f"stopped by SIGINT after step {step}" in err, err[-3000:]  # rank 1
    # torchrun's summary lists each rank's exit code: both ranks exited 75.
    assert err.count("exitcode  : 75") == 2, err[-3000:]
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == step
