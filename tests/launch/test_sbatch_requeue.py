"""launch/slurm/train.sbatch's requeue decision, with stand-ins for srun and scontrol on PATH
(the real-Slurm job is tests/launch/test_slurm.py): it requeues on 75 until the job has been
restarted MEGARNN_MAX_REQUEUES times, then ends with the status and says why."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, status: int, restarts: int, max_requeues: str | None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {status}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "MASTER_ADDR": "node1", "SLURM_RESTART_COUNT": str(restarts)}
    if max_requeues is not None:
        env["MEGARNN_MAX_REQUEUES"] = max_requeues
    proc = subprocess.run(["bash", str(ROOT / "launch/slurm/train.sbatch"), "configs/quickstart.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    log = tmp_path / "scontrol.log"
    return proc, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("status,restarts,max_requeues,requeued", [
    (75, 0, None, True), (75, 19, None, True), (75, 20, None, False), (75, 3, "3", False), (75, 2, "3", True),
    (0, 0, None, False), (1, 0, None, False)])
def test_requeue_on_75_up_to_the_limit(tmp_path, status, restarts, max_requeues, requeued):
    proc, calls = _run(tmp_path, status, restarts, max_requeues)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert ("requeue 42" in calls) == requeued, (calls, proc.stdout)
    if status == 75 and not requeued:
        assert f"restarted {restarts} times" in proc.stdout and "resubmit it" in proc.stdout
