"""The device a single-process tool runs on (evaluate, embed): the one check of a ``--device`` a user gives."""

from __future__ import annotations

import torch

from data_prep.errors import UserError


def pick_device(device: str | None) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``) checked against this machine, or CUDA when there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here; use --device cpu")
    return dev
