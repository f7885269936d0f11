"""Launcher detection, process-group set-up and coordinated preemption signals.

The same script runs under ``deepspeed``, ``torchrun`` and ``srun``: DeepSpeed's launcher and torchrun export
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under ``srun`` we derive them from SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS and the first host of SLURM_JOB_NODELIST before ``deepspeed.init_distributed``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint saved, requeue the job with the same run dir to continue
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def strip_local_rank_arg(argv: list[str] | None = None) -> None:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (added by the DeepSpeed launcher) from argv, setting
    LOCAL_RANK from it, so Hydra only sees its own overrides. Runs before ``@hydra.main`` parses argv."""
    argv = sys.argv if argv is None else argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            del argv[i]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            del argv[i : i + 2]
        else:
            i += 1


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
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
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


def init(env: DistEnv) -> torch.device:
    """Start the process group (nccl on GPU, gloo on CPU) through DeepSpeed; return this rank's device.

    The device follows DeepSpeed's accelerator detection, so ``DS_ACCELERATOR=cpu`` runs on the CPU (gloo) even
    where a GPU is visible, as DeepSpeed's own launcher and ops do."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return device


def barrier() -> None:
    if dist.is_initialized():  # NCCL: name this rank's GPU, or torch guesses it (and warns on every call)
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def shutdown() -> None:
    """Release the process group at a normal exit (NCCL warns of leaked communicators otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


class StopFlag:
    """SIGUSR1 (SLURM ``--signal=USR1@120``) and SIGTERM set a local flag; ``agreed`` all-reduces it (MAX) so
    every rank stops at the same step boundary, whichever rank got the signal."""

    def __init__(self) -> None:
        self.local = False
        self.signal_name: str | None = None
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.local = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, extra: bool, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (or ``extra``, e.g. a time limit, is set anywhere)."""
        t = torch.tensor([1.0 if (self.local or extra) else 0.0], device=device)
        return bool(all_reduce(t, dist.ReduceOp.MAX).item() > 0)
