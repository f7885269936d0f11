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
