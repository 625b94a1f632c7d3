"""A real Slurm runs launch/slurm/train.sbatch on two nodes; the job is stopped twice, requeued,
resumed from its checkpoints, and finishes with the losses of one process.

tools/slurm_cluster.py builds the cluster: Debian's slurmctld and munge, and two slurmd "nodes"
as network namespaces with their own addresses and hostnames. The job is the script as users
submit it, `sbatch --nodes 2 --ntasks-per-node 2` (its #SBATCH GPU lines stand: the nodes have
fake GPUs), so 4 gloo ranks train data parallel with ZeRO 1 across the two nodes. It is stopped
  1. by `scancel --batch --signal=USR1` (what --signal=B:USR1@300 does before a time limit): the
     script forwards USR1 to srun, every task saves a checkpoint and exits 75, the script requeues;
  2. by a real preemption: a job in the higher-priority partition `urgent` needs the nodes, Slurm
     sends SIGTERM to the tasks, which save and exit 75, and the script requeues.

Runs as root on Debian where network namespaces can be made (installing Slurm and munge with
tools/install_slurm.sh when they are missing); elsewhere it skips and says why. ~2 minutes.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

STEPS = 150  # ~0.1 s a step on 4 ranks here: time enough for each stop request to land mid-run
TASKS = 4  # 2 nodes x 2 tasks
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.save_interval=1000", "train.eval_interval=1000",
          "data.holdout=[]"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _tool():
    spec = importlib.util.spec_from_file_location("slurm_cluster", ROOT / "tools" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slurm_cluster = _tool()


def _unavailable() -> str | None:
    reason = slurm_cluster.unavailable_reason()
    if reason and reason.startswith("missing"):  # root on Debian: install (idempotent, ~10 s)
        proc = subprocess.run([str(ROOT / "tools" / "install_slurm.sh")], capture_output=True, text=True,
                              timeout=600)
        reason = slurm_cluster.unavailable_reason()
        if reason:
            reason += f" (tools/install_slurm.sh exited {proc.returncode}: {proc.stderr.strip()[-500:]})"
    return reason


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(f"real Slurm cluster test: {reason}")
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _steps(run) -> list[int]:
    """Steps with a logged train/loss so far (complete lines only: the file is being written)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [m["step"] for m in map(json.loads, lines) if m["tag"] == "train/loss"]


def _latest_step(run) -> int:
    return int((run / "checkpoints" / "latest").read_text().split("_")[1])


class Job:
    """A submitted job, polled through scontrol and the run's metrics.jsonl (not `sbatch --wait`,
    which polls slowly)."""

    def __init__(self, cluster, job_id, run, log):
        self.cluster, self.id, self.run, self.log = cluster, job_id, run, log

    def wait(self, what: str, done, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while True:
            job, steps = self.cluster.job(self.id), _steps(self.run)
            if done(job, steps):
                return job
            if job.get("JobState") in ENDED or time.time() > deadline:
                raise AssertionError(f"job {self.id} never got to '{what}' (steps logged: {max(steps, default=0)})\n"
                                     + self.explain(job))
            time.sleep(0.1)

    def explain(self, job=None) -> str:
        job = job or self.cluster.job(self.id)
        out = self.log.read_text(errors="replace") if self.log.is_file() else "(no output yet)"
        keep = "\n".join(x for x in out.splitlines() if not x.startswith("step "))[-4000:]
        return (f"scontrol: {' '.join(f'{k}={job.get(k)}' for k in ('JobState', 'Reason', 'Restarts', 'ExitCode'))}"
                f"\n--- job output ---\n{keep}\n--- slurmctld ---\n{self.cluster.log('mrctl', 25)}")


def test_sbatch_two_nodes_stopped_twice_requeued_resumed_equals_one_process(cluster, tmp_path):
    single, run = tmp_path / "single", tmp_path / "run"
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"train.micro_batch_size={4 * TASKS}",
            f"train.out_dir={single}", env={"OMP_NUM_THREADS": "1"})

    env = {**cluster.env, "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sub = subprocess.run(cluster.client("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2",
                                        f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch",
                                        "configs/quickstart.yaml", *COMMON, f"train.out_dir={run}"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    job = Job(cluster, job_id, run, tmp_path / f"slurm-{job_id}.out")

    # 1. Mid-run, the signal Slurm sends before a time limit: USR1 to the batch script.
    job.wait("3 steps logged", lambda j, s: max(s, default=0) >= 3)
    cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    job.wait("requeued once", lambda j, s: j["Restarts"] == "1")
    first = _latest_step(run)

    # 2. After resuming: a real preemption by a job of the `urgent` partition that needs both nodes.
    job.wait("resumed and 3 steps on", lambda j, s: j["Restarts"] == "1" and max(s, default=0) >= first + 3)
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive",
                         f"--output={tmp_path}/urgent-%j.out", "--wrap", "hostname").stdout.strip()
    job.wait("requeued twice", lambda j, s: j["Restarts"] == "2")
    second = _latest_step(run)
    final = job.wait("completed", lambda j, s: j["JobState"] == "COMPLETED")

    explain = job.explain(final)
    assert final["Restarts"] == "2" and final["ExitCode"] == "0:0", explain
    assert final["NumNodes"] == "2" and final["NumTasks"] == str(TASKS) and final["NodeList"] == "mrnode[1-2]"
    assert cluster.job(urgent)["JobState"] == "COMPLETED"
    assert 3 <= first < second < STEPS, explain
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:06d}"

    # One output file across the requeues (--open-mode=append), one start line per run.
    text = job.log.read_text()
    starts = re.findall(r"^megarnn: job (\d+) \(restart (\d+)\) on (\S+), master (\S+):\d+$", text, re.M)
    assert starts == [(job.id, str(r), "mrnode[1-2]", "mrnode1") for r in range(3)], explain
    assert "megarnn: USR1 received" in text
    assert f"stopped by SIGUSR1 after step {first};" in text and f"stopped by SIGTERM after step {second};" in text
    assert text.count(f"megarnn: checkpoint saved, requeueing job {job.id}") == 2, explain
    log = (run / "log.txt").read_text()
    assert f"{TASKS} process(es)" in log and "'dp': 4" in log
    assert f"step_{first:06d} at step {first}" in log and f"step_{second:06d} at step {second}" in log

    # Every step logged once, with the loss of one process on the same global batch.
    assert sorted(_steps(run)) == list(range(1, STEPS + 1))
    a, b = read_metrics(single, "train/loss"), read_metrics(run, "train/loss")
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def _task_pid(job_id: str, procid: int) -> int | None:
    """The pid of task `procid` of the job's training step (the nodes share this machine's pids)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            raw = environ.read_bytes()
            cmd = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(x.decode(errors="replace").split("=", 1) for x in raw.split(b"\0") if b"=" in x)
        if (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(procid)
                and "SLURM_STEP_ID" in env and b"megarnn" in cmd and b"train" in cmd):
            return int(environ.parent.name)
    return None


def test_sbatch_a_hung_task_trips_the_watchdog_and_the_job_is_requeued_and_resumed(cluster, tmp_path):
    """Task 1 of 4 is SIGSTOPped mid-run (a hung GPU / process). The other tasks wait for it in a
    collective; their watchdogs (train.hang_timeout=10) dump their stacks and exit 75; srun ends the
    step, the script requeues the job, which resumes from the last checkpoint and completes."""
    steps, run = 40, tmp_path / "run"
    args = [*TINY, f"train.max_steps={steps}", "train.save_interval=5", "train.eval_interval=1000",
            "data.holdout=[]", "train.hang_timeout=10", f"train.out_dir={run}"]
    env = {**cluster.env, "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sub = subprocess.run(cluster.client("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2",
                                        f"--output={tmp_path}/slurm-%j.out", "launch/slurm/train.sbatch",
                                        "configs/quickstart.yaml", *args),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    job = Job(cluster, job_id, run, tmp_path / f"slurm-{job_id}.out")

    job.wait("a checkpoint and a step on", lambda j, s: (run / "checkpoints" / "latest").is_file()
             and max(s, default=0) >= 6)
    pid = _task_pid(job.id, 1)
    assert pid is not None, job.explain()
    os.kill(pid, signal.SIGSTOP)
    stopped_at = max(_steps(run))
    try:
        job.wait("requeued after the watchdog", lambda j, s: j["Restarts"] == "1", timeout=120)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    final = job.wait("completed", lambda j, s: j["JobState"] == "COMPLETED")
    explain = job.explain(final)
    assert final["Restarts"] == "1" and final["ExitCode"] == "0:0", explain

    text = job.log.read_text()
    reports = re.findall(r"^megarnn watchdog: rank (\d) made no progress .*$", text, re.M)
    # Its peers speak (Slurm's SIGCONT on ending the step may let the stopped task speak too).
    assert {"0", "2", "3"} & set(reports), explain
    assert f"megarnn: checkpoint saved, requeueing job {job.id}" in text, explain
    log = (run / "log.txt").read_text()
    assert "megarnn watchdog: rank 0 made no progress" in log and "train_step" in log
    resumed = int(re.search(r"resumed from \S+step_(\d+) at step", log).group(1))
    assert 5 <= resumed <= stopped_at, explain
    assert (run / "checkpoints" / "latest").read_text() == f"step_{steps:06d}"
    assert set(_steps(run)) == set(range(1, steps + 1))  # steps after the checkpoint ran twice
