"""``python -m data_prep.inspect`` on hand-made shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.config import PrepareConfig
from data_prep.inspect import main
from data_prep.report import Report
from data_prep.store import write_shard
from data_prep.vocab import SPECIALS, load_tokenizer, run_vocab

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def out(tmp_path: Path) -> Path:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in SPECIALS + ["the", "dog", "runs", "a", "cat", "sleeps", "."]))
    run_vocab(PrepareConfig(output_dir=str(tmp_path / "out"), vocab=str(vocab)), Report())
    return tmp_path / "out"


def enc(out: Path, text: str) -> list[int]:
    return load_tokenizer(out).encode(text, add_special_tokens=False).ids


def test_bert_mode(out: Path, capsys: pytest.CaptureFixture) -> None:
    a, b, c = enc(out, "the dog runs ."), enc(out, "a cat sleeps ."), enc(out, "the cat")
    samples = [[2, *a, 3, *b, 3], [2, *c, 3, *a, 3]]
    tokens = np.array([t for s in samples for t in s], np.uint16)
    index = np.array(
        [[0, len(samples[0]), len(a) + 2, 0, 4, 4], [len(samples[0]), len(samples[1]), len(c) + 2, 1, 7, 2]], np.int64
    )
    write_shard(out / "train", "shard-00000", tokens, index)
    assert main([str(out), "--n", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    assert rows[0]["text_a"] == "the dog runs." and rows[0]["text_b"] == "a cat sleeps."
    assert rows[0]["next_sentence_label"] == 0 and rows[1]["next_sentence_label"] == 1
    assert rows[1]["doc_a"] == 7 and rows[1]["doc_b"] == 2 and rows[1]["text_a"] == "the cat"
    assert rows[0]["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert rows[1]["input_ids"] == samples[1]
    assert main([str(out), "--n", "1", "--random", "--seed", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_roberta_mode(out: Path, capsys: pytest.CaptureFixture) -> None:
    ids = enc(out, "the dog runs . a cat sleeps .")
    index = np.array([[0, len(ids), len(ids), -1, 5, -1]], np.int64)
    write_shard(out / "validation", "shard-00000", np.array(ids, np.uint16), index)
    assert main([str(out), "--split", "validation"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["next_sentence_label"] is None and row["text_b"] is None
    assert row["text_a"] == "the dog runs. a cat sleeps." and row["token_type_ids"] == [0] * len(ids)


def test_errors_exit_2_without_traceback(out: Path, tmp_path: Path) -> None:
    for args in ([str(tmp_path / "missing")], [str(out), "--split", "nosuch"]):
        proc = subprocess.run(
            [sys.executable, "-m", "data_prep.inspect", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert ("missing" in proc.stderr) or ("nosuch" in proc.stderr)
