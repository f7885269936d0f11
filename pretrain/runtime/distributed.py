"""Launcher detection, process-group set-up and lost-rank detection (preemption signals: pretrain/runtime/signals.py).

The same script runs under ``deepspeed``, ``torchrun`` and ``srun``: DeepSpeed's launcher and torchrun export
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under ``srun`` we derive them from SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS and the first host of SLURM_JOB_NODELIST before the process group starts.

Faults: the rendezvous and every collective are bounded by ``trainer.collective_timeout_minutes``; each rank
beats a heartbeat into the rendezvous store, so when a collective fails the survivors name the rank that died or
froze (``explain_failure``) instead of hanging or printing a backend traceback.

torch is imported lazily: the entry points import this module before any heavy import.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from data_prep.errors import first_line
from pretrain.runtime import deepspeed_env, exits

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------- launcher env


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # deepspeed/torchrun (env), srun, or single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # No scontrol (e.g. a container): expand the simplest forms, "node[01-04,07]" or "a,b".
    head = nodelist.split(",")[0]
    if "[" in nodelist:
        prefix, rest = nodelist.split("[", 1)
        head = prefix + rest.split("]")[0].split(",")[0].split("-")[0]
    return head


def detect_env() -> DistEnv:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the launcher's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher, torchrun
        env.setdefault("LOCAL_RANK", "0")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # one srun task per rank
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        # The same port on every task: derived from the job id, not picked at random.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        launcher = "srun"
    else:
        env.update(RANK="0", WORLD_SIZE="1")
        env.setdefault("LOCAL_RANK", "0")
        launcher = "single"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port() if env["WORLD_SIZE"] == "1" else 29500)
    return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), launcher)


def local_world_size() -> int:
    """Ranks on this node, from the launcher: torchrun, DeepSpeed's launcher, srun; 1 for a plain process."""
    e = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if e.get(key):
            return max(1, int(e[key].split("(")[0].split(",")[0]))  # SLURM writes "2(x3)" for 2 tasks on 3 nodes
    return 1


def set_threads() -> str:
    """Intra-op threads of this rank: the cores it may use divided by the ranks on its node, unless the user set
    OMP_NUM_THREADS. Without this every rank starts one thread per core, and two ranks on two cores ran at a
    quarter of one rank's speed (22.6 vs 92.3 sequences/s, tiny model); returns the choice, to print."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    n = max(1, len(os.sched_getaffinity(0)) // local_world_size())
    torch.set_num_threads(n)
    return f"{n} (cores / ranks on this node; OMP_NUM_THREADS overrides)"


# ---------------------------------------------------------------------------------------------- process group


class RendezvousError(Exception):
    """Not every rank joined the rendezvous in time (one never started, or MASTER_ADDR/MASTER_PORT is wrong)."""


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` on a daemon thread; TimeoutError after ``seconds``. A store whose host is frozen (SIGSTOP, a hung
    node) accepts connections and never answers, and TCPStore's reads have no timeout of their own. After a
    timeout the thread stays behind in C++: leave with ``os._exit`` (interpreter shutdown would abort in it)."""
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    thread = threading.Thread(target=run, name="store-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


class _Heartbeat:
    """A daemon thread that beats ``heartbeat/<rank>`` = "<count> <unix time>" into the rendezvous store every
    ``interval`` seconds, over its own connection, and watches the others. It beats while the main thread waits
    in a collective (the backends release the GIL) and stops when the process dies or is frozen (SIGSTOP).

    Rank 0 watches every heartbeat: one that has not changed for ``timeout_s`` (on rank 0's own clock) is a lost
    rank; rank 0 posts the verdict under ``abort`` for the others and every rank exits with it. The other ranks
    watch for the verdict, rank 0's heartbeat and the store itself: one that has not answered for ``timeout_s``
    means rank 0 (its host) is lost. This bounds the wait even where a collective's own timeout does not apply:
    DeepSpeed creates its groups with ``new_group()``, whose default timeout is torch's 30 minutes, not the world
    group's."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.timeout_s, self.interval = timeout_s, min(5.0, max(0.5, timeout_s / 30))
        self.call_s = max(3.0, 2 * self.interval)  # one store round trip gives up after this
        self.store = self._client()
        self.seen: dict[int, tuple[bytes, float]] = {}  # rank 0: last heartbeat value, monotonic time it changed
        self.count, self.last_ok = 0, time.monotonic()
        self._beat()  # before the first collective: every rank has a heartbeat to compare
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _client(self) -> Any:
        import torch.distributed as dist

        store = dist.TCPStore(
            self.host, self.port, is_master=False, timeout=timedelta(seconds=self.call_s), wait_for_workers=False
        )
        return dist.PrefixStore("pretrain/heartbeat", store)

    def _beat(self) -> None:
        self.count += 1
        self.store.set(str(self.rank), f"{self.count} {time.time():.3f}")

    def _round(self) -> str | None:
        self._beat()
        if self.rank != 0 and self.store.check(["abort"]):
            return self.store.get("abort").decode()
        # rank 0 watches everyone; the others watch rank 0 (under torchrun the store outlives a frozen rank 0)
        now, watched = time.monotonic(), range(self.world_size) if self.rank == 0 else [0]
        for r in watched:
            value = self.store.get(str(r)) if self.store.check([str(r)]) else b""
            if r != self.rank and (r not in self.seen or self.seen[r][0] != value):
                self.seen[r] = (value, now)
        lost = [(r, now - t) for r, (_, t) in sorted(self.seen.items()) if now - t > self.timeout_s]
        return _lost_message(lost) if lost else None

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                verdict = _within(self.call_s, self._round)
                self.last_ok = time.monotonic()
            except Exception:  # the store does not answer: rank 0, its host, died or froze
                down, verdict = time.monotonic() - self.last_ok, None
                if down > self.timeout_s:
                    who = "torchrun's agent" if _agent_store() else "rank 0"
                    verdict = (
                        f"lost {who} (the rendezvous store it hosts at {self.host}:{self.port} has not "
                        f"answered for {down:.0f} s: it was killed or frozen, or its node died)"
                    )
            if verdict and not self.stopped.is_set():
                if self.rank == 0:
                    self.store.set("abort", verdict)
                    time.sleep(1.5 * self.interval + 0.5)  # the others read it before this store goes away
                exit_lost_rank(verdict)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.call_s + 1)

    def diagnose(self) -> str | None:
        """After a collective failed: the verdict rank 0 posted, else the ranks whose heartbeat does not advance
        over ~2.5 intervals (a killed rank breaks its connections at once, long before ``timeout_s``)."""
        keys = [str(r) for r in range(self.world_size)]

        def sample() -> str | None:
            with _quiet_cpp_stderr():
                store = self._client()
            if store.check(["abort"]):
                return store.get("abort").decode()
            first = {r: store.get(k) for r, k in enumerate(keys) if store.check([k])}
            time.sleep(2.5 * self.interval + 0.5)
            second = {r: store.get(k) for r, k in enumerate(keys) if store.check([k])}
            now = time.time()
            lost = [
                (r, now - float(second[r].split()[1]) if r in second else float("nan"))
                for r in range(self.world_size)
                if r != self.rank and second.get(r, b"") == first.get(r, b"")
            ]
            return _lost_message(lost) if lost else None

        try:
            return _within(2.5 * self.interval + 0.5 + 3 * self.call_s, sample)
        except Exception:
            who = "torchrun's agent" if _agent_store() else "rank 0"
            return (
                f"lost {who} (the rendezvous store it hosts at {self.host}:{self.port} does not answer: it "
                f"was killed or frozen, or its node died)"
            )


def _lost_message(lost: list[tuple[int, float]]) -> str:
    ranks, age = ", ".join(str(r) for r, _ in lost), max(a for _, a in lost)
    since = f"no heartbeat for {age:.0f} s" if age == age else "no heartbeat at all"
    return (
        f"lost rank{'s' if len(lost) > 1 else ''} {ranks} ({since}; it crashed, was killed or frozen, or its "
        f"node died: see its own output)"
    )


_exit_lock = threading.Lock()
_failure_hint: Callable[[], str] | None = None  # set by the entry point: where to resume from
_heartbeat: _Heartbeat | None = None
_store: Any = None  # rank 0's TCPStore server lives as long as this reference


def set_failure_hint(hint: Callable[[], str]) -> None:
    """``hint()`` gives the tail of the lost-rank error line (the last complete checkpoint, how to resume)."""
    global _failure_hint
    _failure_hint = hint


def exit_lost_rank(message: str) -> None:
    """Print ``error: <message>: <hint>`` once per process and exit ``exits.LOST_RANK`` at once: tearing down a
    process group whose peer is gone can block, and so can joining threads stuck in a collective."""
    with _exit_lock:  # the heartbeat thread and the main thread may both get here
        try:
            tail = f": {_failure_hint()}" if _failure_hint else ""
        except Exception:
            tail = ""
        sys.stdout.flush()
        print(f"error: {message}{tail}", file=sys.stderr, flush=True)
        os._exit(exits.LOST_RANK)


@contextmanager
def _quiet_fd(fd: int) -> Iterator[None]:
    """Silence a file descriptor (1 or 2) at the OS level, C++ and child processes included."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        stream.flush()  # what Python printed meanwhile goes to /dev/null too, not out later
        os.dup2(saved, fd)
        os.close(saved)


def _quiet_cpp_stderr() -> contextlib.AbstractContextManager[None]:
    """Silence stderr while a store client connects: torch's C++ side logs every retry with a stack trace (and
    cannot be told otherwise once loaded); a failure becomes our own one-line error instead."""
    return _quiet_fd(2)


def _agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent hosts it


def _rendezvous(env: DistEnv, timeout_s: float) -> Any:
    """Rank 0 hosts the TCPStore and waits for every rank; the others connect. Both give up after ``timeout_s``
    with a RendezvousError naming MASTER_ADDR:MASTER_PORT (torch's own default wait is 30 minutes)."""
    import torch.distributed as dist

    host, port, agent = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), _agent_store()
    master = env.rank == 0 and not agent
    t0 = time.time()

    def connect() -> Any:
        while True:  # clients: short attempts, as a client's own connect loop overruns its timeout up to 2.5x
            left = t0 + timeout_s - time.time()
            try:
                return dist.TCPStore(
                    host,
                    port,
                    world_size=None if agent else env.world_size,
                    is_master=master,
                    timeout=timedelta(seconds=timeout_s if master else max(1.0, min(5.0, left))),
                    wait_for_workers=not agent,
                    multi_tenant=True,
                )
            except (RuntimeError, OSError):
                if master or time.time() - t0 >= timeout_s:
                    raise

    try:
        with _quiet_cpp_stderr():
            return _within(timeout_s + 30, connect)
    except (RuntimeError, OSError, ValueError) as e:  # DistStoreError, DistNetworkError, TimeoutError, socket
        took, why = time.time() - t0, first_line(e)
        if master and "clients joined" in why:
            joined = why.split("clients joined")[0].split()[-1]  # "1/2"
            what = f"{joined} ranks joined: start every rank, and give them the same MASTER_ADDR/MASTER_PORT"
        elif master:
            what = f"rank 0 cannot serve it ({why}): free the port or choose another MASTER_PORT"
        else:
            what = (
                f"rank {env.rank} cannot reach rank 0 there ({why}): is rank 0 running, and are "
                f"MASTER_ADDR/MASTER_PORT its address?"
            )
        raise RendezvousError(
            f"rendezvous at {host}:{port} failed after {took:.0f} s (trainer.collective_timeout_minutes): {what}"
        ) from None


def init(
    env: DistEnv, timeout_minutes: float = 30.0, rendezvous_minutes: float | None = None, verbose: bool = False
) -> torch.device:
    """Start the process group (nccl on GPU, gloo on CPU) through DeepSpeed; return this rank's device.

    ``timeout_minutes`` bounds every collective of the world group (gloo's and NCCL's timeout) and, through the
    heartbeats, the wait for a rank that died or froze; ``rendezvous_minutes`` (default: the same) bounds the
    wait for every rank to arrive; DeepSpeed's own stdout notes only with ``verbose``. The device follows
    DeepSpeed's accelerator detection, so ``DS_ACCELERATOR=cpu`` runs on the CPU (gloo) even where a GPU is
    visible, as DeepSpeed's own launcher does."""
    global _heartbeat, _store
    import torch
    import torch.distributed as dist

    deepspeed = deepspeed_env.import_deepspeed(verbose)  # without its accelerator line on every rank
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        deepspeed_env.check_cpu_comm_build_lock()
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        _store = _rendezvous(env, 60 * (timeout_minutes if rendezvous_minutes is None else rendezvous_minutes))
        _store.set_timeout(timeout)  # the backend's connection set-up waits on the store as long as a collective
        kwargs: dict[str, Any] = {}
        if backend == "nccl" and not Version("2.6.0") < Version(torch.__version__) < Version("2.7.1"):  # hang there
            kwargs["device_id"] = device  # bind the communicator to this GPU: no guessing, no warning
        dist.init_process_group(
            backend, store=_store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
    # DeepSpeed adopts the initialised group (its TorchBackend wraps torch.distributed)
    with contextlib.nullcontext() if verbose else _quiet_fd(1):  # op-compatibility compiles, "built" notes
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    if env.world_size > 1 and _heartbeat is None:
        _heartbeat = _Heartbeat(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.rank, env.world_size, timeout.total_seconds()
        )
    return device


def explain_failure(exc: BaseException) -> str | None:
    """After an exception in a multi-rank run: one line naming the rank(s) lost, or saying a collective failed
    while every rank lives; None when this is not a communication failure (a plain bug: show its traceback)."""
    import torch.distributed as dist

    if _heartbeat is None:
        return None
    lost = _heartbeat.diagnose()
    if lost:
        return lost
    if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
        return (
            f"a collective failed while every rank is alive ({first_line(exc)[:200]}); if one rank was busy "
            f"longer than trainer.collective_timeout_minutes (a long save or evaluation), raise it"
        )
    return None


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (one decision for all ranks, taken by one reader of the files)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # NCCL: name this rank's GPU, or torch guesses it (and warns on every call)
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def shutdown() -> None:
    """At a normal exit (also 75): wait for every rank, then release the process group (NCCL warns of leaked
    communicators otherwise). The barrier matters under the ``deepspeed`` launcher, which kills the other ranks
    as soon as one exits non-zero: no rank leaves before all have finished their save, logs and summary."""
    global _heartbeat
    import torch.distributed as dist

    if dist.is_initialized():
        barrier()  # heartbeats go on meanwhile: a rank waiting here for a slow rank 0 is not a lost one
        if _heartbeat is not None:  # a store lost after this barrier is rank 0 leaving, not a fault
            _heartbeat.stop()
            _heartbeat = None
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a pickling all-gather)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
