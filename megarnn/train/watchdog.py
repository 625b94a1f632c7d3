"""A hang watchdog for training: a rank that stops making progress says where, and exits.

Every rank beats a heartbeat (a timestamp in memory, and the phase of the step it is in:
forward / backward / optimizer / save / eval ...) as the loop goes; a daemon thread reads it.
A rank with no beat for `train.hang_timeout` seconds (three times that while saving, evaluating
or taking its first step, which may compile kernels) writes, to stderr and to the run's
log.txt, one line (step, phase, seconds without progress, the last torch.distributed call it
entered and whether that returned), then the Python stacks of all its threads
(faulthandler), and exits at once with HANG_EXIT_CODE.

That code is 75, the status launch/slurm/train.sbatch requeues on: the requeued job resumes
from the last checkpoint (train.resume=auto). The stopped or deadlocked rank is usually not
the one that speaks: its peers wait for it in a collective and time out first; the line
names the collective they wait in.

The collective timeout of every process group (engine.setup_distributed) comes from the
same key, collective_timeout(): longer than the watchdog's longest allowance, so the
watchdog speaks first and torch's timeout is the backstop for a rank whose Python is stuck.

    watchdog.start(hang_timeout, rank, run_dir / "log.txt")
    watchdog.beat("step", step=7)        # then beat("forward"), beat("save", slow=True) ...
    watchdog.stop()

`train.hang_timeout=0` turns it off (and leaves torch's default collective timeouts).
"""
from __future__ import annotations

import datetime
import faulthandler
import functools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch.distributed as dist

HANG_EXIT_CODE = 75  # EX_TEMPFAIL, as a stop on a signal: the sbatch script requeues the job
SLOW_FACTOR = 3  # allowance while saving, evaluating or in the first step
COLLECTIVE_MARGIN_S = 60.0
# torch.distributed entry points whose last call the dump names (looked up at call time by our
# code and DeepSpeed's comm layer, so replacing the module attributes sees them).
COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
               # not isend / irecv: dist.P2POp checks them by identity (batch_isend_irecv records them)
               "send", "recv", "batch_isend_irecv", "all_gather_object",
               "broadcast_object_list", "monitored_barrier")
# DeepSpeed's comm layer keeps its own reference to torch's all-gather / reduce-scatter (ZeRO's
# parameter gathers): these entry points of deepspeed.comm are recorded too, when it is loaded.
DEEPSPEED_COLLECTIVES = ("allgather_fn", "reduce_scatter_fn", "all_gather_into_tensor", "reduce_scatter_tensor",
                         "all_gather_coalesced", "all_reduce_coalesced")


def collective_timeout(hang_timeout: float) -> datetime.timedelta | None:
    """The timeout of torch.distributed's collectives for train.hang_timeout (None: torch's default):
    longer than the watchdog's longest allowance (SLOW_FACTOR x hang_timeout), so it speaks first."""
    if hang_timeout <= 0:
        return None
    return datetime.timedelta(seconds=SLOW_FACTOR * hang_timeout + COLLECTIVE_MARGIN_S)


class Watchdog:
    def __init__(self, timeout: float, rank: int, log_path: Path | None = None,
                 exit_code: int = HANG_EXIT_CODE, interval: float | None = None):
        self.timeout, self.rank, self.log_path, self.exit_code = float(timeout), rank, log_path, exit_code
        self.interval = interval if interval is not None else min(1.0, self.timeout / 10)
        self.phase, self.slow, self.step, self.first_step = "start", True, None, None
        self.last = time.monotonic()
        # (name, entered at, returned at or None) of the last torch.distributed call
        self.collective: tuple[str, float, float | None] | None = None
        self._stop, self._firing = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._run, name="megarnn-watchdog", daemon=True)

    def beat(self, phase: str, step: int | None = None, slow: bool = False) -> None:
        """Progress: now in `phase` (of step `step`, when given); `slow` allows SLOW_FACTOR x longer."""
        if step is not None:
            self.step = step
            if self.first_step is None:
                self.first_step = step
        self.phase, self.slow, self.last = phase, slow, time.monotonic()

    def allowance(self) -> float:
        first = self.step is None or self.step == self.first_step
        return self.timeout * (SLOW_FACTOR if self.slow or first else 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            idle = time.monotonic() - self.last
            if idle > self.allowance():
                self.fire(idle)

    def report(self, idle: float, cause: str | None = None) -> str:
        where = f"step {self.step}, phase '{self.phase}'" if self.step is not None else f"phase '{self.phase}'"
        if self.collective is None:
            call = "no torch.distributed call yet"
        else:
            name, entered, returned = self.collective
            now = time.monotonic()
            call = (f"last torch.distributed call: {name}, entered {now - entered:.1f} s ago, "
                    + ("not returned" if returned is None else f"returned {now - returned:.1f} s ago"))
            if cause:
                call += f" (then failed: {' '.join(cause.split())[:300]})"
        allowed = self.allowance()
        return (f"megarnn watchdog: rank {self.rank} made no progress for {idle:.1f} s (allowed {allowed:g} s: "
                f"train.hang_timeout={self.timeout:g}{' x ' + str(SLOW_FACTOR) if allowed > self.timeout else ''}) "
                f"in {where}; {call}; a rank it waits for may be stopped, dead or hung. Stacks of all threads "
                f"follow; exiting {self.exit_code} so the launcher stops the job (launch/slurm/train.sbatch "
                "requeues it and it resumes from the last checkpoint; README, 'Preemption, hangs and resume')")

    def fire(self, idle: float, cause: str | None = None) -> None:
        """Write the report and every thread's stack to stderr and log.txt, then exit at once."""
        if not self._firing.acquire(blocking=False):  # the thread and a failed collective at once:
            threading.Event().wait()  # the other one reports and ends the process
        text = self.report(idle, cause) + "\n" + _stacks()
        data = text.encode(errors="replace")
        _write_all(2, data)
        if self.log_path is not None:
            try:  # one append of the whole block, so ranks' reports do not interleave
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                _write_all(2, f"megarnn watchdog: could not append to {self.log_path}: {e}\n".encode())
        os._exit(self.exit_code)


def _stacks() -> str:
    """faulthandler's dump of all threads' Python stacks, as text."""
    try:
        with tempfile.TemporaryFile() as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            return f.read().decode(errors="replace")
    except OSError:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return "(stacks written to stderr only)\n"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


_active: Watchdog | None = None
_originals: list[tuple[object, str, object]] = []  # (module, name, function) replaced by a recorder


def _record(name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        wd = _active
        if wd is None:
            return fn(*args, **kwargs)
        entered = time.monotonic()
        wd.collective = (name, entered, None)
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            # A peer's watchdog fired and its exit broke this collective, which this rank had waited
            # in for long (a crash elsewhere breaks it at once): report the hang, as the peer did, not
            # a traceback and status 1 (Slurm would not requeue the job).
            idle = time.monotonic() - wd.last
            if idle > wd.allowance() / 2:
                wd.fire(idle, cause=f"{type(e).__name__}: {e}")
            raise
        wd.collective = (name, entered, time.monotonic())
        return out
    return call


def start(timeout: float, rank: int, log_path: Path | None = None, **kwargs) -> Watchdog | None:
    """Start watching this process (None when timeout <= 0: off). One watchdog per process."""
    global _active
    stop()
    if timeout <= 0:
        return None
    _active = Watchdog(timeout, rank, log_path, **kwargs)
    modules = [(dist, "", COLLECTIVES)]
    if "deepspeed.comm" in sys.modules:
        modules.append((sys.modules["deepspeed.comm"], "deepspeed.comm.", DEEPSPEED_COLLECTIVES))
    for module, prefix, names in modules:
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                _originals.append((module, name, fn))
                setattr(module, name, _record(prefix + name, fn))
    _active._thread.start()
    return _active


def beat(phase: str, step: int | None = None, slow: bool = False) -> None:
    """A heartbeat of the running watchdog (nothing when none runs)."""
    wd = _active
    if wd is not None:
        wd.beat(phase, step, slow)


def stop() -> None:
    """Stop the watchdog and put torch.distributed's functions back."""
    global _active
    wd, _active = _active, None
    for module, name, fn in reversed(_originals):
        setattr(module, name, fn)
    _originals.clear()
    if wd is not None:
        wd._stop.set()
        if wd._thread.is_alive() and wd._thread is not threading.current_thread():
            wd._thread.join(timeout=5)
