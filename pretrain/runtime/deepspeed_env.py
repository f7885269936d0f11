"""DeepSpeed's footprint on a machine, kept in check: its import without per-rank chatter, the build lock of its
JIT-compiled CPU communication op, and the shared-memory buffers that op leaves in /dev/shm."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from data_prep.errors import UserError


def import_deepspeed(verbose: bool = False) -> Any:
    """``import deepspeed``, without its per-rank chatter (accelerator detection, engine and op-build notes) unless
    ``verbose``: every rank would print it, and the start-up block says what matters once. Errors still show."""
    import logging

    extensions_dir()
    if verbose:
        import deepspeed

        return deepspeed
    if "deepspeed" not in sys.modules:
        logging.disable(logging.WARNING)  # the accelerator warning is logged while deepspeed imports
        try:
            import deepspeed  # noqa: F401
        finally:
            logging.disable(logging.NOTSET)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    return deepspeed


STALE_BUILD_LOCK_S = 600  # the CPU comm op builds in about 2 minutes; a lock this old has no builder behind it


def extensions_dir() -> str:
    """Where torch JIT-builds C++ ops for this environment: ``TORCH_EXTENSIONS_DIR`` where set, else
    ``<sys.prefix>/torch_extensions`` where that is writable (put in ``os.environ``, so ranks and their children
    agree), else torch's default.

    torch's default, ``~/.cache/torch_extensions``, is one folder for every environment of a user: two venvs
    with different torch paths rebuild the op over each other under one lock file, and a process killed while it
    holds that lock leaves every other environment waiting forever (a CI run on a fresh clone hung 90 minutes on
    a lock a killed clone had left there)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.dirname(_get_build_directory("deepspeed_shm_comm", False))


def _build_lock() -> str:
    return os.path.join(extensions_dir(), "deepspeed_shm_comm", "lock")


def check_cpu_comm_build_lock(now: float | None = None) -> None:
    """Refuse to start, in one line, where DeepSpeed's CPU communication op has a stale build lock.

    Every DeepSpeed process on CPU loads ``deepspeed_shm_comm`` through torch's JIT loader, which takes a lock
    file even when there is nothing to build; a process killed holding it leaves the lock, and every later run
    then waits on it forever, silently (torch's FileBaton has no timeout). ``make`` builds the op at install
    time, so ranks hold the lock for a no-op build only."""
    lock = _build_lock()
    try:
        age = (time.time() if now is None else now) - os.stat(lock).st_mtime
    except OSError:
        return
    if age > STALE_BUILD_LOCK_S:
        raise UserError(
            f"{lock}: left {age / 60:.0f} min ago by a build of DeepSpeed's CPU communication op that "
            f"was killed; every run would wait on it forever: delete it if no build is running, then "
            f"rerun the same command"
        )


def build_cpu_comm_op() -> None:
    """Build DeepSpeed's CPU communication op into this environment's extensions folder (``make`` runs this at
    install time, so no rank builds it under a collective timeout). A stale lock (older than any build takes) is
    removed first, with a line saying so: at install time the folder is this environment's alone."""
    lock = _build_lock()
    try:
        age = time.time() - os.stat(lock).st_mtime
    except OSError:
        age = 0.0
    if age > STALE_BUILD_LOCK_S:
        print(f"removing {lock}: left {age / 60:.0f} min ago by a killed build", flush=True)
        os.unlink(lock)
    import_deepspeed()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
    print(f"DeepSpeed's CPU communication op is built in {extensions_dir()}", flush=True)


def shm_buffer_path(rank: int) -> Path:
    """This rank's buffer of DeepSpeed's CPU shared-memory all-reduce (``deepspeed_shm_comm``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's shared-memory all-reduce buffer (69 MB); call it once every rank has mapped it: after
    any collective that follows ``deepspeed.init_distributed`` (``deepspeed.initialize`` runs some), as every rank
    maps every other rank's buffer inside ``init_distributed``. No-op without a buffer.

    DeepSpeed creates one per rank under /dev/shm when all ranks share a node and never unlinks it, so every CPU
    run (and every killed one) left its buffers behind: 22 GB of /dev/shm after a day of test runs here, until
    the machine ran out of memory. The mappings stay valid after the unlink (POSIX), so the run is unaffected and
    nothing is left behind, whatever way the processes end."""
    shm_buffer_path(rank).unlink(missing_ok=True)


if __name__ == "__main__":
    build_cpu_comm_op()
