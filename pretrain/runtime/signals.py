"""Preemption signals: SIGUSR1 (SLURM ``--signal=USR1@120``) and SIGTERM make a run checkpoint at its next step
boundary and exit 75, instead of dying. torch is imported lazily: ``catch_preempt_signals`` runs at the top of an
entry point, before any heavy import.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

from pretrain.runtime.distributed import all_reduce

if TYPE_CHECKING:
    import torch

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_early_signals: list[str] = []  # preemption signals that arrived before the trainer's StopFlag existed


def _remember_signal(signum: int, frame: Any) -> None:
    _early_signals.append(signal.Signals(signum).name)


def catch_preempt_signals() -> None:
    """Record SIGUSR1/SIGTERM from now on instead of dying (their default action): SLURM may signal a job while
    it is still importing torch; ``StopFlag`` picks the signal up and the run checkpoints at its first step."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, _remember_signal)


def _ours(handler: Any) -> bool:
    return handler is _remember_signal or isinstance(getattr(handler, "__self__", None), StopFlag)


def ignore_preempt_signals() -> None:
    """Once the run is over (finished, or checkpointed for exit 75): ignore further SIGUSR1/SIGTERM. Python puts
    the default action (terminate) back while it shuts down, so a late signal would turn exit 75 into a death
    by signal, which SLURM does not requeue; an ignored signal stays ignored. Only where our handlers are
    installed (a training entry point): an ignored signal is inherited by every process started later, and a
    tool's worker pool must still be able to terminate its workers."""
    for sig in PREEMPT_SIGNALS:
        if _ours(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_IGN)


class StopFlag:
    """SIGUSR1 (SLURM ``--signal=USR1@120``) and SIGTERM set a local flag; ``agreed`` all-reduces it (MAX) so
    every rank stops at the same step boundary, whichever rank got the signal. A signal caught earlier by
    ``catch_preempt_signals`` counts as received here; later signals (a second one during the save) only set the
    flag again."""

    def __init__(self) -> None:
        self.local = False
        self.signal_name: str | None = None
        for sig in PREEMPT_SIGNALS:  # install first, then drain: a signal in between lands in _handler
            signal.signal(sig, self._handler)
        if _early_signals:
            self.local, self.signal_name = True, _early_signals[0]
            _early_signals.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        self.local = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self, extra: bool, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (or ``extra``, e.g. a time limit, is set anywhere)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if (self.local or extra) else 0.0], device=device)
        return bool(all_reduce(t, dist.ReduceOp.MAX).item() > 0)
