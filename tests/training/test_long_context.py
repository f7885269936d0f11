"""Long context: RoBERTa-mode (packed full-sentence) shards of 8,192 tokens from a real book, and a ModernBERT
trained on them at that length, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep import store
from tests.helpers import ROOT, run_env

LENGTH = 8192


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env={**run_env(), "OMP_NUM_THREADS": "2"}, timeout=600, cwd=ROOT)  # fmt: skip


@pytest.mark.slow
@pytest.mark.long  # CI time (about a minute): `make test-all` runs it
def test_modernbert_trains_on_8192_token_rows_of_a_book(shared_data, tmp_path):
    data = tmp_path / "data"
    book = shared_data / "books" / "alice_in_wonderland.txt.gz"
    r = _run("prepare_data.py", f"inputs=[{book}]", f"output_dir={data}", "nsp=false", f"max_seq_length={LENGTH}",
             "vocab_size=2000", "validation_fraction=0.1", "seed=1")  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((data / "manifest.json").read_text())["config"]["max_seq_length"] == LENGTH
    lengths = np.concatenate([np.load(p)[:, store.LENGTH] for p in sorted((data / "train").glob("*.index.npy"))])
    assert lengths.max() <= LENGTH and np.median(lengths) > 0.9 * LENGTH  # full rows: the book fills them
    r = _run("pretrain.py", "model=modernbert-tiny", f"data.dir={data}", f"run_dir={tmp_path / 'run'}",
             f"trainer.max_seq_length={LENGTH}", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
             "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.eval_every=2",
             "data.masking.mlm_probability=0.3")  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x.get("kind") == "train"]
    assert train and train[-1]["step"] == 2 and np.isfinite(train[-1]["loss"])
    assert train[-1]["tokens"] > 2 * 2 * 0.9 * LENGTH  # two steps of two rows of about 8k real tokens
    assert any(x.get("kind") == "eval" and np.isfinite(x["val_mlm_loss"]) for x in records)
