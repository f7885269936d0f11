"""Shared fixtures: the path to ../shared/data and small helpers."""

from __future__ import annotations

import importlib.util
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


def run_main(capsys, script: Path, *argv: object) -> tuple[int, str, str]:
    """A ``launch/`` script's ``main(argv)`` in this process: exit code, stdout, stderr."""
    spec = importlib.util.spec_from_file_location(f"launch_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
