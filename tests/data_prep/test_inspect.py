"""``python -m data_prep.inspect``: samples of hand-made shards; ``--stats`` on shards the pipeline prepared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.config import PrepareConfig
from data_prep.inspect import main
from data_prep.pipeline import prepare
from data_prep.report import Report
from data_prep.stats import compute_stats, length_histogram
from data_prep.store import write_shard
from data_prep.vocab import SPECIALS, load_tokenizer, run_vocab

ROOT = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------------------------- --stats


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus through the real pipeline, BERT mode, 64 tokens (about 2 s)."""
    out = tmp_path_factory.mktemp("stats") / "bert"
    prepare(PrepareConfig(inputs=["builtin:pydocs"], output_dir=str(out), vocab_size=1000, max_seq_length=64,
                          num_workers=1, seed=3))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def prepared_roberta(prepared: Path) -> Path:
    """The same corpus in RoBERTa mode (packed sentences, no NSP), 128 tokens, with the BERT run's vocabulary."""
    out = prepared.parent / "roberta"
    prepare(PrepareConfig(inputs=["builtin:pydocs"], output_dir=str(out), vocab=str(prepared / "vocab.txt"),
                          max_seq_length=128, nsp=False, num_workers=1, seed=3))  # fmt: skip
    return out


def shard_arrays(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's tokens and the index rows of a split, read with plain np.load (not through the stats code)."""
    names = sorted(p.name[: -len(".index.npy")] for p in (out / split).glob("*.index.npy"))
    tokens = [np.load(out / split / f"{n}.tokens.npy") for n in names]
    index = [np.load(out / split / f"{n}.index.npy") for n in names]
    samples = [t[o : o + n] for t, ix in zip(tokens, index, strict=True) for o, n in ix[:, :2]]
    return np.concatenate(samples), np.concatenate(index)


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 10_000
    pixels = np.asarray(Image.open(path).convert("L"))
    assert (pixels < 200).mean() > 0.02, f"{path} looks empty"
    return Image.open(path).size


def stat_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(label))


def test_stats_agree_with_the_shards(prepared: Path) -> None:
    s = compute_stats(prepared, "train")
    tokens, index = shard_arrays(prepared, "train")
    manifest = json.loads((prepared / "manifest.json").read_text())
    n, total = len(index), int(index[:, 1].sum())
    assert s.samples == n == manifest["splits"]["train"]["samples"]
    assert s.tokens == total == len(tokens) == manifest["splits"]["train"]["tokens"] == int(s.freq.sum())
    assert s.max_seq_length == 64 and s.length_source == "manifest" and index[:, 1].max() <= 64
    assert s.padding_fraction == pytest.approx(1 - total / (n * 64))
    assert sum(c for _, _, c in length_histogram(s)) == n
    assert 0.4 <= s.is_next / n <= 0.6 and s.is_next == int((index[:, 3] == 0).sum())
    assert s.not_next == manifest["splits"]["train"]["not_next"]
    # token frequencies, counted independently
    ids, counts = np.unique(tokens, return_counts=True)
    freq = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    vocab = (prepared / "vocab.txt").read_text().splitlines()
    special = {vocab.index(t) for t in SPECIALS}
    unk = vocab.index("[UNK]")
    text_total = sum(c for i, c in freq.items() if i not in special) + freq.get(unk, 0)
    assert 0.0 <= s.unk_rate <= 1.0 and s.unk_rate == pytest.approx(freq.get(unk, 0) / text_total)
    assert s.freq[vocab.index("[CLS]")] == n and s.freq[vocab.index("[SEP]")] == 2 * n  # [CLS] A [SEP] B [SEP]
    head = s.head()
    expected = sorted(((c, i) for i, c in freq.items() if i not in special), key=lambda x: (-x[0], x[1]))[:20]
    assert [(tok, count) for tok, count, _ in head] == [(vocab[i], c) for c, i in expected]
    assert all(0 < share < 1 for _, _, share in head)
    ordinary = [i for i in range(len(vocab)) if i not in special]
    assert s.never == sum(freq.get(i, 0) == 0 for i in ordinary) and s.once == sum(
        freq.get(i, 0) == 1 for i in ordinary
    )


def test_stats_cli_prints_and_plots(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokens, index = shard_arrays(prepared, "train")
    n, total = len(index), int(index[:, 1].sum())
    assert main([str(prepared), "--stats"]) == 0
    text = capsys.readouterr().out
    assert stat_line(text, "samples").split()[-1] == f"{n:,}"
    assert stat_line(text, "tokens").split()[1] == f"{total:,}"
    assert f"{1 - total / (n * 64):.1%} of {n * 64:,} positions at max_seq_length 64 (manifest)" in text
    assert f"{int((index[:, 3] == 0).sum()):,} (" in stat_line(text, "IsNext/NotNext")
    top = text.split("top 20 tokens")[1].splitlines()[1:22]
    assert [int(line.split()[0]) for line in top[:20]] == list(range(1, 21)) and top[20].strip().startswith("plot")
    assert stat_line(text, "plot").split()[-1] == str(prepared / "stats_train.png")
    assert png_size(prepared / "stats_train.png") == (1500, 450)  # three panels
    png = tmp_path / "plots" / "val.png"
    assert main([str(prepared), "--stats", "--split", "validation", "--max-seq-length", "128", "--png", str(png)]) == 0
    text = capsys.readouterr().out
    _, vindex = shard_arrays(prepared, "validation")
    expected = 1 - int(vindex[:, 1].sum()) / (len(vindex) * 128)
    assert f"{expected:.1%} of {len(vindex) * 128:,} positions at max_seq_length 128 (--max-seq-length)" in text
    assert png_size(png) == (1500, 450)
    assert main([str(prepared), "--n", "2"]) == 0  # the samples, as before
    assert len([json.loads(line) for line in capsys.readouterr().out.splitlines()]) == 2


def test_stats_roberta_mode_and_a_shorter_length(prepared_roberta: Path, capsys: pytest.CaptureFixture) -> None:
    _, index = shard_arrays(prepared_roberta, "train")
    s = compute_stats(prepared_roberta, "train", max_seq_length=32)
    assert not s.nsp and s.is_next == s.not_next == 0 and (index[:, 3] == -1).all()
    cut = np.minimum(index[:, 1], 32)
    assert s.padding_fraction == pytest.approx(1 - cut.sum() / (len(index) * 32))
    assert s.longer_than_max == int((index[:, 1] > 32).sum()) > 0
    assert main([str(prepared_roberta), "--stats", "--max-seq-length", "32"]) == 0
    text = capsys.readouterr().out
    assert "IsNext/NotNext   n/a (RoBERTa mode)" in text and "would be cut" in text
    assert png_size(prepared_roberta / "stats_train.png") == (1000, 450)  # no NSP panel


def test_stats_of_hand_made_shards_without_manifest(out: Path) -> None:
    a, b = enc(out, "the dog runs ."), enc(out, "a cat sleeps .")
    samples = [[2, *a, 3, *b, 3], [2, *b, 3]]
    tokens = np.array([t for s in samples for t in s], np.uint16)
    index = np.array([[0, len(samples[0]), len(a) + 2, 0, 0, 1], [len(samples[0]), len(samples[1]), 5, 1, 2, 3]])
    write_shard(out / "train", "shard-00000", tokens, index)
    s = compute_stats(out, "train")
    assert s.max_seq_length == len(samples[0]) and s.length_source.startswith("longest sample")
    assert s.padding_fraction == pytest.approx(1 - len(tokens) / (2 * len(samples[0])))
    assert (s.is_next, s.not_next, s.unk) == (1, 1, 0)
    assert s.head(2) == [(".", 3, pytest.approx(3 / 12)), ("a", 2, pytest.approx(2 / 12))]
    assert s.never == 0 and s.once == 3  # the, dog, runs


def test_stats_errors_are_one_line(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (out / "validation").mkdir()
    write_shard(out / "train", "shard-00000", np.array([2, 5, 3], np.uint16), np.array([[0, 3, 3, -1, 0, -1]]))
    cases = [([str(out), "--stats", "--split", "validation"], "validation: no samples"),
             ([str(out), "--stats", "--max-seq-length", "0"], "--max-seq-length 0"),
             ([str(tmp_path / "nowhere"), "--stats"], "nowhere: no such folder")]  # fmt: skip
    for args, why in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0]
