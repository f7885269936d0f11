"""The errors a user can fix, for every tool of the project (data preparation, pretraining, fine-tuning, the
evaluation tools): a leaf module, imported by all and importing nothing of the project.

Each is printed as one ``error:`` line with no traceback and exit code 2 by the one entry wrapper
(``pretrain.cli.run_entry``); the message names the file, field or setting and what to do.
"""

from __future__ import annotations

import errno

# Errors of an output disk (full, quota, read-only, not ours): the user's to fix, reported as one line.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class UserError(Exception):
    """A mistake in the config, the data or the environment that the user can fix: one line, exit code 2."""


class DataPrepError(UserError):
    """A data-preparation mistake (a bad input file, vocabulary or option): one line, exit code 2."""


def first_line(text: object) -> str:
    """The first non-blank line of an error message, without its final full stop."""
    return next((s.strip() for s in str(text).splitlines() if s.strip()), "").rstrip(".")
