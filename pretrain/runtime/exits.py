"""The exit codes of every entry point, in one place (the table is in docs/architecture.md).

A launcher's job scheduler acts on them: 75 means "requeue me", 69 "rerun the same command", 3 "look at the data
and learning rate first", 2 "fix the command". Imports nothing: the SLURM script reads ``PREEMPTED`` before torch.
"""

DONE = 0  # finished (or stopped at trainer.stop_at_step)
USER_ERROR = 2  # a configuration, data or disk mistake (UserError, a full or read-only disk): one error: line
NONFINITE = 3  # stopped on non-finite losses (trainer.max_nonfinite_steps in a row); nothing saved after them
LOST_RANK = 69  # EX_UNAVAILABLE: a rank died, froze or never joined; rerun the same command to resume
PREEMPTED = 75  # EX_TEMPFAIL: SIGUSR1/SIGTERM or the time limit; checkpoint saved, requeue with the same run dir
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
