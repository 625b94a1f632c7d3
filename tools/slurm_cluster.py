"""A throwaway Slurm cluster on this machine: two compute "nodes" as network namespaces.

    with SlurmCluster(Path("/tmp/x")) as cluster:       # ~1.5 s up, < 1 s down
        subprocess.run(cluster.client("sbatch", "launch/slurm/train.sbatch", ...), env=cluster.env)

    python tools/slurm_cluster.py [DIR]      # bring one up by hand, print how to use it, Ctrl-C ends it

What it builds (root only; Debian's slurmctld, slurmd, slurm-client, munge: tools/install_slurm.sh):

- munged with its own key and socket under DIR/munge; Slurm is pointed at that socket
  (AuthInfo=socket=...), so it neither uses nor disturbs a system munge.
- Three network namespaces created here: a controller namespace holding a bridge, and one
  per node joined to it by a veth pair, each with its own address on 10.213.0.0/24. No
  interface, address or route is added to the machine's own namespace, and all traffic
  (slurmctld <-> slurmd <-> srun, and gloo between the training tasks) stays inside them.
- Every daemon runs in its namespace (`nsenter --net`; `ip netns exec` remounts /sys and
  slurmd then dies without cgroupfs) under `unshare --uts --mount`, with the node's own
  hostname and a private /etc/hosts bind-mounted from DIR that names all three hosts.
  Job steps inherit both, so the sbatch script's MASTER_ADDR (the first node's hostname)
  resolves to that node's address on both nodes.
- Fake GPUs for gres scheduling (character devices made with mknod in DIR/dev), so an
  sbatch script that asks for --gpus-per-node is scheduled as on a GPU cluster.
- Two partitions over the same nodes: `ci` (the default) and `urgent`, whose jobs preempt
  `ci` jobs with PreemptMode=REQUEUE (SIGTERM to the tasks, GraceTime seconds, then requeue).
- AuthInfo cred_expire=10: Slurm holds a requeued job until its old credentials expire
  (120 s by default); 5 works too, 10 leaves room for step launches on a loaded machine.
- Client commands (sbatch, scontrol, squeue, scancel) run in the controller namespace:
  `cluster.client(...)` builds that command line, `cluster.env` carries SLURM_CONF.

Teardown, by PID only: jobs are cancelled, then every process whose network namespace is one
of ours (job steps, tasks, slurmd, slurmctld) is sent SIGTERM and then SIGKILL, then munged;
then the namespaces are deleted. Nothing is ever killed by name.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.213.0"
CONTROLLER = "mrctl"
BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "squeue", "scancel",
            "sinfo", "ip", "nsenter", "unshare", "mknod", "hostname")
PACKAGES = "slurmctld slurmd slurm-client munge iproute2 util-linux"


class ClusterError(RuntimeError):
    """The cluster did not come up; the message holds the failing command or daemon log."""


def unavailable_reason() -> str | None:
    """Why a cluster cannot be built here, or None when it can."""
    if sys.platform != "linux":
        return f"needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (network namespaces, munged and slurmd run as root)"
    if not Path("/etc/debian_version").is_file():
        return "needs Debian's Slurm and munge packages (no /etc/debian_version here)"
    missing = [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return f"missing {' '.join(missing)}: run tools/install_slurm.sh (apt-get install {PACKAGES})"
    probe = subprocess.run([_which("unshare"), "--net", "--mount", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here (unshare --net: {probe.stderr.strip()})"
    return None


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM to the daemon if the process that started it dies without stop()
    (a killed test run), so no daemon outlives it. Job steps already running are not covered."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class SlurmCluster:
    """slurmctld plus `nodes` slurmd, each node with `cpus` CPUs and `gpus` fake GPUs.

    The defaults are shaped like the GPU node launch/slurm/train.sbatch asks for (8 GPUs,
    8 tasks x 8 CPUs would not fit, but 2 tasks x 8 CPUs do), so the script's #SBATCH lines
    stand as they are; the CPU counts are Slurm's bookkeeping (config_overrides), not the machine's.

    Attributes: base (the state directory), conf (slurm.conf), env (os.environ + SLURM_CONF),
    nodes (node names), daemons (name -> Popen).
    """

    def __init__(self, base: Path, nodes: int = 2, cpus: int = 16, gpus: int = 8, cred_expire: int = 10,
                 grace_time: int = 60):
        self.base = Path(base).resolve()
        self.tag = f"mr{os.getpid()}x{time.monotonic_ns() % 10**6}"  # unique namespace names
        self.nodes = [f"mrnode{i + 1}" for i in range(nodes)]
        self.cpus, self.gpus, self.cred_expire, self.grace_time = cpus, gpus, cred_expire, grace_time
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.netns: list[str] = []

    # ---- handles --------------------------------------------------------------------------------
    def ns_path(self, host: str) -> str:
        return f"/run/netns/{self.tag}-{host}"

    def client(self, *args) -> list[str]:
        """A Slurm client command line that runs in the controller's namespace."""
        return [_which("nsenter"), f"--net={self.ns_path(CONTROLLER)}", *map(str, args)]

    def run(self, *args, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a client command (with SLURM_CONF set) and return its result."""
        proc = subprocess.run(self.client(*args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def log(self, name: str, lines: int = 40) -> str:
        """The last lines of a daemon's log: "munge", "mrctl" (slurmctld) or a node name (slurmd)."""
        path = self.base / name / {"munge": "munged.log", CONTROLLER: "slurmctld.log"}.get(name, "slurmd.log")
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else f"(no {path})"

    # ---- bring up -------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)  # munged refuses a socket directory others may write
        self._network()
        self._files()
        self._munge()
        self._daemon(CONTROLLER, [_which("slurmctld"), "-D", "-c", "-f", self.conf], self.base / CONTROLLER)
        for node in self.nodes:
            self._daemon(node, [_which("slurmd"), "-D", "-f", self.conf, "-N", node], self.base / node)
        self._wait_idle(timeout)

    def _addr(self, host: str) -> str:
        return f"{SUBNET}.1" if host == CONTROLLER else f"{SUBNET}.{11 + self.nodes.index(host)}"

    def _network(self) -> None:
        """Controller namespace with a bridge; each node namespace joined to it by a veth pair."""
        ip = _which("ip")
        for host in (CONTROLLER, *self.nodes):
            _run(ip, "netns", "add", f"{self.tag}-{host}")
            self.netns.append(f"{self.tag}-{host}")
            _run(ip, "-n", f"{self.tag}-{host}", "link", "set", "lo", "up")
        ctl = f"{self.tag}-{CONTROLLER}"
        _run(ip, "-n", ctl, "link", "add", "br0", "type", "bridge")
        _run(ip, "-n", ctl, "addr", "add", f"{self._addr(CONTROLLER)}/24", "dev", "br0")
        _run(ip, "-n", ctl, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            ns = f"{self.tag}-{node}"
            _run(ip, "-n", ctl, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run(ip, "-n", ctl, "link", "set", f"veth{i}", "master", "br0")
            _run(ip, "-n", ctl, "link", "set", f"veth{i}", "up")
            _run(ip, "-n", ns, "addr", "add", f"{self._addr(node)}/24", "dev", "eth0")
            _run(ip, "-n", ns, "link", "set", "eth0", "up")

    def _files(self) -> None:
        b = self.base
        for d in ("munge", CONTROLLER, "dev", *self.nodes, *(f"{n}/spool" for n in self.nodes)):
            (b / d).mkdir(exist_ok=True)
        hosts = ["127.0.0.1 localhost"] + [f"{self._addr(h)} {h}" for h in (CONTROLLER, *self.nodes)]
        (b / "hosts").write_text("\n".join(hosts) + "\n")
        for g in range(self.gpus):  # fake GPUs: gres needs a device file per GPU
            dev = b / "dev" / f"gpu{g}"
            if not dev.exists():
                _run(_which("mknod"), dev, "c", "195", str(g))
        nodes = ",".join(self.nodes)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "ClusterName=megarnn-ci",
            f"SlurmctldHost={CONTROLLER}({self._addr(CONTROLLER)})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # The default cred_expire (120 s) holds a requeued job that long before it may start again.
            f"AuthInfo=socket={b / 'munge' / 'munge.sock'},cred_expire={self.cred_expire}",
            f"StateSaveLocation={b / CONTROLLER / 'state'}",
            f"SlurmctldPidFile={b / CONTROLLER / 'slurmctld.pid'}",
            f"SlurmctldLogFile={b / CONTROLLER / 'slurmctld.log'}",
            f"SlurmdSpoolDir={b}/%n/spool", f"SlurmdPidFile={b}/%n/slurmd.pid", f"SlurmdLogFile={b}/%n/slurmd.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # take CPUs / Gres from here, not from the machine
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "ReturnToService=2", "JobRequeue=1", f"MailProg={_which('true')}",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
            "MessageTimeout=10", "SlurmdTimeout=60", "InactiveLimit=0", "MinJobAge=600",
            "GresTypes=gpu",
        ]
        lines += [f"NodeName={n} NodeAddr={self._addr(n)} NodeHostname={n} CPUs={self.cpus} RealMemory=1000"
                  f"{gres} State=UNKNOWN" for n in self.nodes]
        # Jobs in `ci` can be preempted (requeued) by jobs in `urgent`: SIGTERM, then GraceTime
        # seconds to checkpoint before Slurm kills and requeues them.
        lines += ["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
                  f"PartitionName=ci Nodes={nodes} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                  f"PreemptMode=REQUEUE GraceTime={self.grace_time}",
                  f"PartitionName=urgent Nodes={nodes} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"]
        self.conf.write_text("\n".join(lines) + "\n")
        gres_conf = ["AutoDetect=off"]
        if self.gpus:
            gres_conf.append(f"NodeName={nodes} Name=gpu File={b / 'dev'}/gpu[0-{self.gpus - 1}]")
        (b / "gres.conf").write_text("\n".join(gres_conf) + "\n")

    def _munge(self) -> None:
        d = self.base / "munge"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munge", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                              f"--socket={d / 'munge.sock'}", f"--pid-file={d / 'munged.pid'}",
                              f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"], d)
        deadline = time.time() + 10
        while not (d / "munge.sock").exists():
            self._check_alive("munge")
            if time.time() > deadline:
                raise ClusterError(f"munged made no socket in 10 s:\n{self.log('munge')}")
            time.sleep(0.05)

    def _daemon(self, host: str, cmd: list, cwd: Path) -> None:
        """Run cmd in host's network namespace, with its own hostname and /etc/hosts."""
        inner = (f"hostname {host} && mount --bind {self.base / 'hosts'} /etc/hosts && exec "
                 + " ".join(map(str, cmd)))
        self._spawn(host, [_which("nsenter"), f"--net={self.ns_path(host)}", _which("unshare"), "--uts", "--mount",
                           "--propagation", "private", "sh", "-c", inner], cwd)

    def _spawn(self, name: str, cmd: list, cwd: Path) -> None:
        with open(cwd / "stdout.txt", "ab") as out:
            # nsenter (without --pid) and unshare (without --fork) exec, and so does sh: the Popen's
            # pid is the daemon's own, which is what stop() signals.
            self.daemons[name] = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=self.env, stdout=out,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  preexec_fn=_die_with_parent)

    def _check_alive(self, name: str) -> None:
        proc = self.daemons[name]
        if proc.poll() is not None:
            out = (self.base / name / "stdout.txt").read_text(errors="replace")
            raise ClusterError(f"{name} exited {proc.returncode}:\n{out[-2000:]}\n{self.log(name)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            for name in self.daemons:
                self._check_alive(name)
            proc = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.time() > deadline:
                raise ClusterError(f"nodes not idle after {timeout} s: {states or proc.stderr.strip()}\n"
                                   f"{self.log(CONTROLLER)}")
            time.sleep(0.2)

    # ---- tear down ------------------------------------------------------------------------------
    def _our_pids(self) -> list[int]:
        """Processes living in one of our network namespaces: daemons, job steps, tasks."""
        inodes = set()
        for ns in self.netns:
            try:
                inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
            except OSError:
                pass
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        """Cancel jobs, end every process we started (by PID), delete the namespaces. Idempotent."""
        if self.daemons.get(CONTROLLER) and self.daemons[CONTROLLER].poll() is None:
            subprocess.run(self.client(_which("scancel"), "--full", "--user=root"), env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.time() + 10
            while time.time() < deadline:
                q = subprocess.run(self.client(_which("squeue"), "--noheader", "--states=all", "--format=%T"),
                                   env=self.env, capture_output=True, text=True, timeout=30)
                if q.returncode != 0 or not set(q.stdout.split()) & {"RUNNING", "COMPLETING", "CONFIGURING"}:
                    break
                time.sleep(0.2)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = self._our_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids and time.time() < deadline:
                for p in self.daemons.values():
                    p.poll()  # reap our direct children
                pids = self._our_pids()
                time.sleep(0.05)
        munge = self.daemons.get("munge")
        if munge and munge.poll() is None:
            munge.terminate()
            try:
                munge.wait(5)
            except subprocess.TimeoutExpired:
                munge.kill()
                munge.wait()
        for p in self.daemons.values():
            if p.poll() is None:  # a daemon that left our namespaces cannot exist; be safe anyway
                p.kill()
                p.wait()
        for ns in self.netns:
            subprocess.run([_which("ip"), "netns", "delete", ns], capture_output=True)
        self.netns = []


def main() -> None:
    import tempfile

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT is ignored when started with `&`
        signal.signal(sig, interrupt)
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="slurm-"))
    with SlurmCluster(base) as c:
        print(f"cluster up under {base}; nodes {', '.join(c.nodes)}; in another shell:\n"
              f"  export SLURM_CONF={c.conf}\n  nsenter --net={c.ns_path(CONTROLLER)} sinfo\n"
              "Ctrl-C tears it down.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
