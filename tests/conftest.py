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


@pytest.fixture(scope="session")
def books_run(shared_data, tmp_path_factory) -> Path:
    """A tiny BERT (2 x 128, 4 heads) pretrained on two shared books (A Tale of Two Cities, Huckleberry Finn) past
    the unigram plateau: 2,000 steps of 64 x 32 tokens at lr 3e-3, about 100 s on 2 cores, validation MLM
    accuracy near 25% (unigram 5%). Shared by the embedding and fine-tuning tests. Shorter sequences leave the
    plateau in fewer steps than 64 tokens do, and dropout only slows so short a run (docs/benchmarks.md)."""
    import subprocess
    import sys

    from data_prep.config import PrepareConfig
    from data_prep.pipeline import prepare
    from tests.test_trainer import LAUNCH, _env

    tmp = tmp_path_factory.mktemp("books")
    data, run = tmp / "data", tmp / "run"
    books = [shared_data / "books" / f"{b}.txt.gz" for b in BOOKS_RUN_BOOKS]
    prepare(PrepareConfig(inputs=[str(b) for b in books], output_dir=str(data), vocab_size=2000, max_seq_length=32,
                          num_workers=2, seed=1))  # fmt: skip
    model = ["model.num_attention_heads=4", "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]
    trainer = ["trainer.max_seq_length=32", "trainer.max_steps=2000", "trainer.eval_every=2000",
               "trainer.eval_batches=4", "trainer.checkpoint_every=2000", "trainer.log_every=500",
               "trainer.global_batch_size=64", "trainer.micro_batch_size=64", "optim.lr=3e-3",
               "scheduler.warmup_steps=100", "logger=none"]  # fmt: skip
    argv = [sys.executable, LAUNCH, f"data.dir={data}", f"run_dir={run}", *model, *trainer]
    env = {**_env(), "OMP_NUM_THREADS": "2"}  # one process at a time here: both cores
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run


BOOKS_RUN_BOOKS = ("tale_of_two_cities", "huckleberry_finn")


def run_main(capsys, script: Path, *argv: object) -> tuple[int, str, str]:
    """A ``launch/`` script's ``main(argv)`` in this process: exit code, stdout, stderr."""
    spec = importlib.util.spec_from_file_location(f"launch_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
