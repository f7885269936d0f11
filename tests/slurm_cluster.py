"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd started on this machine.

``slurm_cluster`` (session scope, since starting the daemons takes a while) installs ``slurm-wlm`` and
``munge`` with apt when ``sbatch`` is missing (root only; otherwise the tests skip with the reason), writes a
private ``slurm.conf`` and munge key under a temporary folder, starts the three daemons and waits until
``sinfo`` shows the node idle. Everything is private to the session: its own munge socket, free ports, state
and spool folders, and ``SLURM_CONF`` pointing at its config (jobs inherit it, so ``scontrol requeue`` inside
a job reaches this controller). The system's ``/etc/slurm`` and ``/etc/munge`` are not touched.

Job bookkeeping uses ``scontrol show job`` with ``MinJobAge`` of a day (0 is refused by 22.05), which reports the
final state, exit code and restart count of a requeued job; accounting (``sacct``) needs slurmdbd and a
database, which a test machine does not have. ``jobcomp/filetxt`` additionally logs every completion,
requeued runs included, to ``jobcomp.log`` for post-mortems.
"""

from __future__ import annotations

import os
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

# States after which a job never runs again (a requeued job goes back to PENDING instead).
TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "TIMEOUT",
}  # fmt: skip
# Seconds a requeued job waits before it may start again (AuthInfo cred_expire; SLURM's default is 120).
CRED_EXPIRE_S = 10
START_TIMEOUT_S = 90


@dataclass
class JobInfo:
    job_id: str
    state: str  # JobState, e.g. COMPLETED, FAILED, PENDING
    exit_code: int  # exit status of the batch script (ExitCode=rc:signal)
    exit_signal: int
    restarts: int  # how often the job was requeued
    reason: str
    fields: dict[str, str]


NEEDS_ROOT = "needs root"  # the reason prefix of a skip that CI=true turns into a failure (conftest.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when missing; fail, saying why, where that is impossible (SLURM
    scripts are part of the product: their tests run, or they fail)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        pytest.fail("SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root")
    if not shutil.which("apt-get"):
        pytest.fail("SLURM is not installed and there is no apt-get to install slurm-wlm and munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not shutil.which("sbatch"):
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        pytest.fail(f"could not install SLURM with apt-get install slurm-wlm munge: {' | '.join(tail)}")


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    """Handle on the running test cluster: submit, inspect, signal and wait for jobs."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pid_files = {name: root / f"{name}.pid" for name in ("slurmd", "slurmctld", "munged")}

    # -- bring-up ---------------------------------------------------------------------------------------
    def write_config(self) -> None:
        root = self.root
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # Declared resources are trusted (config_overrides): 2-CPU CI machines still fit 2 tasks plus an
        # array task, and RealMemory only has to be plausible since memory is not a consumable here.
        cpus = max(4, os.cpu_count() or 1)
        memory = max(1024, _memory_mb() - 512)
        self.conf.write_text(
            f"""# Generated by tests/slurm_cluster.py for a throwaway one-node test cluster.
ClusterName=pytest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={self._pid_files["slurmctld"]}
SlurmdPidFile={self._pid_files["slurmd"]}
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
MinJobAge=86400
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
ReturnToService=2
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
"""
        )

    def start(self) -> None:
        root = self.root
        self._run(
            [
                "munged", "--force", f"--socket={root}/munge.socket", f"--key-file={root}/munge.key",
                f"--pid-file={self._pid_files['munged']}", f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/munged.seed",
            ]
        )  # fmt: skip
        # -c: cold start (no saved state); -i: ignore state that could not be recovered.
        self._run(["slurmctld", "-c", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer scontrol ping")
        self._run(["slurmd", "-f", str(self.conf)])
        self._wait_for(self._node_idle, f"node {self.host} to become idle in sinfo")

    def stop(self) -> None:
        """Stop slurmd, slurmctld and munged by their pid files: SIGTERM to all, SIGKILL after 10 s."""
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(self._pid_files[name].read_text().strip())
                os.kill(pid, _signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError):  # no pid file, or the daemon is already gone
                continue
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, _signal.SIGKILL)

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()}\n{self.logs()}")

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 20) -> str:
        """Last lines of the daemons' logs, for error messages."""
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- jobs -------------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id (for an array job, the array's id)."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        env: Mapping[str, str] | None = None,
        options: tuple[str, ...] | list[str] = (),
        cwd: str | os.PathLike | None = None,
    ) -> str:
        """Submit ``script`` with sbatch ``options`` (before the script) and script ``args`` (after it)."""
        return self.sbatch(*options, str(script), *args, env=env, cwd=cwd)

    def job_ids(self, job_id: str) -> list[str]:
        """Ids of the job, or of every task of an array job."""
        result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return [_parse(line)["JobId"] for line in result.stdout.splitlines() if line.strip()]

    def info(self, job_id: str) -> JobInfo:
        result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.strip():
            raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        fields = _parse(result.stdout.splitlines()[0])
        rc, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return JobInfo(
            job_id=fields["JobId"],
            state=fields["JobState"],
            exit_code=int(rc or 0),
            exit_signal=int(sig or 0),
            restarts=int(fields.get("Restarts", "0")),
            reason=fields.get("Reason", ""),
            fields=fields,
        )

    def wait(self, job_id: str, timeout: float = 300, poll: float = 1.0) -> JobInfo:
        """Wait until the job (every task of an array) reaches a final state; returns the last one seen.

        A requeued job passes through REQUEUED and PENDING again, which are not final, so this returns
        only once the last run has ended.
        """
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.info(j) for j in self.job_ids(job_id)]
            if all(i.state in TERMINAL_STATES for i in infos):
                failed = [i for i in infos if i.state != "COMPLETED"]
                return failed[0] if failed else infos[-1]
            if time.monotonic() > deadline:
                scancel = ["scancel", job_id]
                subprocess.run(scancel, env=self.env, capture_output=True)
                states = ", ".join(f"{i.job_id}={i.state}({i.reason})" for i in infos)
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {states} (cancelled)")
            time.sleep(poll)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120, poll: float = 0.5) -> JobInfo:
        """Wait until the job is in one of ``states`` (for example RUNNING)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if info.state in states:
                return info
            if info.state in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} ended ({info.state}, exit {info.exit_code}) before reaching {states}")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s")

    def signal(self, job_id: str, sig: str = "USR1", target: str = "steps") -> None:
        """Send ``sig`` to a job: ``steps`` (its srun steps, like ``--signal=USR1@T``), ``batch`` (the batch
        shell only, like ``--signal=B:USR1@T``) or ``full`` (batch shell, its children and steps)."""
        flags = {"steps": [], "batch": ["--batch"], "full": ["--full"]}[target]
        result = subprocess.run(
            ["scancel", f"--signal={sig}", *flags, job_id], env=self.env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"scancel --signal={sig} {job_id} failed: {result.stderr.strip()}")

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _parse(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` of ``scontrol -o show job`` (values never contain spaces except Command etc.)."""
    fields: dict[str, str] = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node cluster (partition ``debug``), shared by the session; stopped at the end. Starting
    slurmctld, slurmd and munged (and installing them) needs root: a user without it skips, with the reason (under
    ``CI=true`` that skip fails the run: conftest.py)."""
    if os.geteuid() != 0:
        pytest.skip(f"{NEEDS_ROOT}: the SLURM tests install and start slurmctld, slurmd and munged (run as root)")
    _ensure_installed()
    # A short path: the munge socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    cluster = SlurmCluster(root)
    cluster.write_config()
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        pytest.fail(f"could not start the test SLURM cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("KEEP_SLURM_DIR"):
            shutil.rmtree(root, ignore_errors=True)
