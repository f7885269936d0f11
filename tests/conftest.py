"""Shared fixtures: the path to ../shared/data and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (the Wikipedia sample and 13 Gutenberg books); skips where it is absent."""
    if not (SHARED_DATA / "books").is_dir() or not (SHARED_DATA / "wikipedia").is_dir():
        pytest.skip(f"shared corpora not found at {SHARED_DATA} (CI provides ../shared beside the clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def deepspeed_cpu_comm() -> None:
    """DeepSpeed's CPU communication op, JIT-compiled once before tests whose ranks run under short collective
    timeouts: on a fresh machine its first build (about 2 minutes here) happens inside the ranks' start-up, and
    the rank that waits for it would be reported lost."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
