"""Worker-process hygiene shared by the stages' process pools."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Called first in a pool worker: have Linux SIGKILL it when the process that started it dies.

    A ``multiprocessing`` pool worker holds both ends of its task queue, so when the launcher is SIGKILLed (the
    OOM killer, a scheduler, ``kill -9``) the worker never sees end-of-file: it finishes its task, then waits
    for the next one forever, an orphan holding its memory (a corpus chunk, a tokenizer) while the re-run
    starts a new pool beside it. A no-op outside Linux and in the main process (a pool of one runs in-process).
    """
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: keep the old behaviour rather than fail the run
        return
    if os.getppid() != parent.pid:  # the parent died before prctl took effect: no signal will come
        os._exit(1)
