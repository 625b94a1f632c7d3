"""The hang watchdog (megarnn/train/watchdog.py): a rank without progress for train.hang_timeout
seconds writes the step, the phase and its last torch.distributed call, then every thread's
stack, to stderr and log.txt, and exits 75 (what launch/slurm/train.sbatch requeues on)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megarnn.config import load_config
from megarnn.errors import ConfigError
from megarnn.train import watchdog
from tests.conftest import ROOT, TINY
from tests.e2e.test_interrupt import _children, _env_of
from tests.e2e.test_preemption import _wait_for_step

HANG = 10


def test_collective_timeout_outlasts_the_longest_allowance():
    assert watchdog.collective_timeout(0) is None
    t = watchdog.collective_timeout(HANG).total_seconds()
    assert t > watchdog.SLOW_FACTOR * HANG
    assert load_config("configs/quickstart.yaml").train.hang_timeout == 300
    with pytest.raises(ConfigError, match="train.hang_timeout=-1"):
        load_config("configs/quickstart.yaml", ["train.hang_timeout=-1"])


def test_allowance_is_longer_in_slow_phases_and_the_first_step():
    wd = watchdog.Watchdog(10, rank=0)
    wd.beat("step", step=1)
    wd.beat("forward")
    assert wd.allowance() == 30  # the first step may compile kernels
    wd.beat("step", step=2)
    wd.beat("forward")
    assert wd.allowance() == 10
    wd.beat("save", slow=True)
    assert wd.allowance() == 30


def test_collectives_are_recorded_only_while_it_runs(tmp_path):
    import torch.distributed as dist
    original = dist.all_reduce
    wd = watchdog.start(1000, rank=0, log_path=tmp_path / "log.txt")
    try:
        assert dist.all_reduce is not original and dist.all_reduce.__wrapped__ is original
        assert "no torch.distributed call yet" in wd.report(1.0)
        with pytest.raises(Exception):
            dist.barrier()  # no process group here: it raises, but was entered
        assert wd.collective[0] == "barrier" and wd.collective[2] is None
        assert "last torch.distributed call: barrier, entered" in wd.report(1.0)
    finally:
        watchdog.stop()
    assert dist.all_reduce is original


SCRIPT = """
import sys, time
from megarnn.train import watchdog
watchdog.start(float(sys.argv[2]), rank=3, log_path=sys.argv[1])
watchdog.beat("step", step=1)
watchdog.beat("step", step=2)
watchdog.beat("backward")
def stuck_in_backward():
    time.sleep(60)
stuck_in_backward()
"""


def test_a_stalled_process_dumps_its_stacks_and_exits_75(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("earlier lines\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1.5"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == watchdog.HANG_EXIT_CODE == 75, proc.stderr
    assert time.time() - t0 < 30
    text = log.read_text()
    assert text.startswith("earlier lines\n")  # appended, nothing lost
    for out in (text, proc.stderr):
        assert "megarnn watchdog: rank 3 made no progress for" in out
        assert "in step 2, phase 'backward'" in out and "train.hang_timeout=1.5" in out
        assert "stuck_in_backward" in out and "Current thread" in out and "Thread 0x" in out


@pytest.mark.timeout(400)
def test_a_stopped_rank_makes_the_other_dump_its_stack_and_exit(tmp_path):
    """2 gloo ranks under launch/torchrun.sh; rank 1 is SIGSTOPped mid-run. Rank 0 waits for it in a
    collective, and its watchdog reports and exits 75 within ~2x train.hang_timeout."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(ROOT / "launch" / "torchrun.sh"), "2", "configs/quickstart.yaml", *TINY,
                             "train.max_steps=2000", "train.warmup_steps=5", "train.micro_batch_size=2",
                             "train.save_interval=10000", "train.eval_interval=10000", "data.holdout=[]",
                             f"train.hang_timeout={HANG}", f"train.out_dir={run}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = {}
    try:
        _wait_for_step(run, 3, proc, timeout=300)
        workers = {int(_env_of(p).get("RANK", -1)): p for p in _children(proc.pid)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.time()
        while _alive(workers[0]) and time.time() - t0 < 4 * HANG:
            time.sleep(0.1)
        took = time.time() - t0
        assert not _alive(workers[0]), "rank 0 still running 4x train.hang_timeout after rank 1 stopped"
    finally:
        if 1 in workers and _alive(workers[1]):
            os.kill(workers[1], signal.SIGKILL)  # stopped: torchrun's SIGTERM would wait 30 s
        out, err = proc.communicate(timeout=120)
    assert took < 2 * HANG + 2, f"rank 0 took {took:.1f} s to exit (train.hang_timeout={HANG})"
    log = (run / "log.txt").read_text()
    report = [x for x in log.splitlines() if x.startswith("megarnn watchdog:")]
    assert len(report) == 1 and report[0].startswith("megarnn watchdog: rank 0 made no progress for"), log[-3000:]
    assert "last torch.distributed call: " in report[0] and "not returned" in report[0], report
    assert re.search(r"in step \d+, phase '(forward|backward|optimizer|loss all-reduce|stop flag all-reduce)'",
                     report[0]), report
    stacks = log.split(report[0], 1)[1]
    # the main thread waits in the training loop: inside train_step, or in the stop flag's all-reduce
    # between steps (where rank 1 was stopped decides which)
    assert "Current thread" in stacks and "megarnn/train/loop.py" in stacks, stacks
    inside = "train_step" in stacks or ("stop flag all-reduce" in report[0] and " in requested" in stacks)
    assert inside, (report[0], stacks)
    assert report[0] in err  # and on stderr
    assert "exitcode  : 75" in err, err[-3000:]  # torchrun's summary of rank 0


def _alive(pid: int) -> bool:
    """Running (or stopped), not exited: a zombie waiting for torchrun to reap it counts as exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


FAILED_COLLECTIVE = """
import sys, time
import torch.distributed as dist
from megarnn.train import watchdog
wd = watchdog.start(100, rank=1, log_path=sys.argv[1])
watchdog.beat("step", step=3); watchdog.beat("step", step=4)
dist.barrier() if sys.argv[2] == "fresh" else None  # raises at once: a plain error, not a hang
"""


def test_a_collective_that_fails_after_a_long_wait_is_reported_as_the_hang(tmp_path):
    """A peer's watchdog exit breaks the collective this rank waited in: the same report and 75,
    not a traceback and 1; a collective failing at once stays an ordinary error."""
    log = tmp_path / "log.txt"
    fresh = subprocess.run([sys.executable, "-c", FAILED_COLLECTIVE, str(log), "fresh"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 1 and "Traceback" in fresh.stderr and not log.exists(), fresh.stderr
    stale = FAILED_COLLECTIVE.replace('watchdog.beat("step", step=4)',
                                      'watchdog.beat("step", step=4); wd.last -= 60')
    proc = subprocess.run([sys.executable, "-c", stale, str(log), "fresh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    line = log.read_text().splitlines()[0]
    assert line.startswith("megarnn watchdog: rank 1 made no progress for 6") and "in step 4" in line
    assert "last torch.distributed call: barrier" in line and "(then failed: ValueError" in line, line
