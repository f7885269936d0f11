"""launch/embed.py and pretrain/tools/embed.py: every pooling to .npy and .parquet against hidden states computed here,
input order kept through length-sorted batches, table inputs, truncation, one-line errors, the run dir and its
HF export giving the same vectors, and (slow) a model pretrained on the shared books telling contexts apart."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pretrain.checkpoint.hf import weight_keys
from pretrain.checkpoint.weights import ModelSource, load_model
from pretrain.tools.embed import run_embed
from tests.helpers import ROOT, run_env, run_main

EMBED = ROOT / "launch" / "embed.py"
# Lengths out of order on purpose (the tool sorts them), a blank line in the middle; words of tiny_run's corpus.
SENTENCES = [
    "the river came over the old stone house.",
    "wind.",
    "the quiet green city went under the north light and the wind came over the river stone.",
    "",
    "a house.",
    "the old city came over the river.",
    "north wind over the green quiet city went under the light.",
]
TEXTS = [s for s in SENTENCES if s]
LINES = [i + 1 for i, s in enumerate(SENTENCES) if s]  # 1-based lines of the non-blank ones


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    return tiny_run


@pytest.fixture(scope="module")
def source(trained) -> ModelSource:
    return load_model(trained[1])


@pytest.fixture()
def sentences(tmp_path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, EMBED, *argv)


def _states(source: ModelSource, text: str, layer: int = -1) -> np.ndarray:
    """[n, H] hidden states of one sentence run alone: no padding, no batch neighbours."""
    ids = torch.tensor([source.tokenizer.encode(text).ids])
    with torch.no_grad():
        return source.model.hidden_states(ids)[layer][0].numpy()


def _vectors(path: Path) -> np.ndarray:
    """The embedding column of an output parquet as [rows, H]."""
    return np.stack(pq.read_table(path).column("embedding").to_pylist()).astype(np.float32)


def test_hidden_states_are_every_layer_and_end_with_encode(source):
    model = source.model
    encodings = [source.tokenizer.encode(t).ids for t in TEXTS]
    ids = torch.tensor([e[:8] for e in encodings if len(e) >= 8])
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding in one row: the mask reaches every layer
    with torch.no_grad():
        states = model.hidden_states(ids, None, mask)
        last = model.encode(ids, None, mask)
        embeddings = model.bert.embeddings(ids, None)
    assert len(states) == model.config.num_hidden_layers + 1
    assert all(s.shape == (len(ids), 8, model.config.hidden_size) for s in states)
    assert torch.equal(states[0], embeddings) and torch.allclose(states[-1], last, atol=1e-6)
    assert not torch.allclose(states[0], states[-1])


@pytest.mark.parametrize("pooling", ["mean", "cls", "tokens"])
def test_each_pooling_to_npy_and_parquet_equals_hidden_states_computed_alone(source, trained, sentences, tmp_path,
                                                                             capsys, pooling):  # fmt: skip
    H = source.model.config.hidden_size
    npy, parquet = tmp_path / "out.npy", tmp_path / "out.parquet"
    summaries = [run_embed(str(trained[1]), str(sentences), str(out), pooling=pooling, batch_size=3, device="cpu")
                 for out in (npy, parquet)]  # fmt: skip
    out = capsys.readouterr().out
    alone = [_states(source, t) for t in TEXTS]  # in input order, one at a time
    if pooling == "mean":  # every real token, [CLS] and [SEP] included, padding excluded
        expected = np.stack([s.mean(0) for s in alone])
    elif pooling == "cls":
        expected = np.stack([s[0] for s in alone])
    else:
        expected = np.concatenate(alone)
    a = np.load(npy)
    table = pq.read_table(parquet)
    if pooling == "tokens":
        assert a.dtype.names == ("sentence", "line", "position", "token", "embedding")
        tokens = [source.tokenizer.encode(t).tokens for t in TEXTS]
        assert a["token"].tolist() == table.column("token").to_pylist() == [t for ts in tokens for t in ts]
        assert a["position"].tolist() == [p for ts in tokens for p in range(len(ts))]
        assert a["sentence"].tolist() == [i for i, ts in enumerate(tokens) for _ in ts]
        assert a["line"].tolist() == table.column("line").to_pylist() == [LINES[i] for i in a["sentence"]]
        vectors = a["embedding"]
    else:
        assert table.column_names == ["sentence", "line", "text", "embedding"]
        assert table.column("text").to_pylist() == TEXTS and table.column("line").to_pylist() == LINES
        vectors = a
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (len(expected), H)
    assert len(expected) == (len(TEXTS) if pooling != "tokens" else sum(len(s) for s in alone))
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # batched with padding = alone
    assert np.array_equal(_vectors(parquet), vectors)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert all(s["sentences"] == len(TEXTS) and s["blank"] == 1 and s["shape"] == vectors.shape for s in summaries)
    assert "embed: batch 2/2" in out  # stdout is not a terminal here: plain progress lines
    assert f"embedded {len(TEXTS)} sentences (1 blank line skipped): {pooling} pooling of layer 1/1" in out


def test_mean_pooling_is_the_masked_mean_of_the_chosen_layer(source, trained, sentences, tmp_path):
    out = tmp_path / "layer0.npy"
    run_embed(str(trained[1]), str(sentences), str(out), layer=0, batch_size=64, device="cpu")
    # One batch of all sentences, padded to the longest: the masked mean computed here from hidden_states.
    enc = [source.tokenizer.encode(t).ids for t in TEXTS]
    L = max(map(len, enc))
    ids = torch.tensor([e + [0] * (L - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (L - len(e)) for e in enc])
    with torch.no_grad():
        h = source.model.hidden_states(ids, None, mask)[0]
    manual = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(np.load(out), manual.numpy(), atol=1e-6)
    unmasked = h.mean(1).numpy()  # what including the padding would give: far off for the short sentences
    assert np.abs(np.load(out) - unmasked).max() > 1e-2


def test_input_order_is_kept_whatever_the_batch_size(trained, sentences, tmp_path):
    outs = []
    for bs in (1, 2, 64):
        out = tmp_path / f"bs{bs}.npy"
        run_embed(str(trained[1]), str(sentences), str(out), batch_size=bs, device="cpu")
        outs.append(np.load(out))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    reversed_file = tmp_path / "reversed.txt"
    reversed_file.write_text("\n".join(reversed(TEXTS)) + "\n")
    run_embed(str(trained[1]), str(reversed_file), str(tmp_path / "rev.npy"), batch_size=2, device="cpu")
    np.testing.assert_allclose(np.load(tmp_path / "rev.npy")[::-1], outs[0], atol=1e-5)


def test_csv_jsonl_and_parquet_columns_give_the_text_files_vectors(trained, sentences, tmp_path):
    reference = tmp_path / "ref.npy"
    run_embed(str(trained[1]), str(sentences), str(reference), device="cpu")
    rows = [{"id": i, "text": t or None} for i, t in enumerate(SENTENCES)]  # the blank line: a missing cell
    csv = tmp_path / "in.csv"
    csv.write_text("id,text\n" + "".join(f'{r["id"]},"{r["text"] or ""}"\n' for r in rows))
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    csv_gz = tmp_path / "in.csv.gz"
    csv_gz.write_bytes(gzip.compress(csv.read_bytes()))
    for k, table in enumerate((csv, csv_gz, jsonl, parquet)):
        out = tmp_path / f"out{k}.parquet"
        summary = run_embed(str(trained[1]), str(table), str(out), column="text", device="cpu")
        assert summary["blank"] == 1 and summary["sentences"] == len(TEXTS), table
        assert pq.read_table(out).column("line").to_pylist() == LINES  # the record number of each text
        np.testing.assert_allclose(_vectors(out), np.load(reference), atol=1e-6, err_msg=str(table))


def test_long_text_is_truncated_and_counted_or_named_with_no_truncate(source, trained, tmp_path, capsys):
    long = " ".join(["the old river came over the stone house"] * 8)
    path = tmp_path / "long.txt"
    path.write_text(f"{TEXTS[0]}\n\n{long}\n{TEXTS[1]}\n")
    n_long = len(source.tokenizer.encode(long).ids)
    assert n_long > 40
    out = tmp_path / "tokens.parquet"
    code, stdout, err = _main(capsys, trained[1], "--input", path, "--output", out, "--pooling", "tokens",
                              "--max-length", 16, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "(1 blank line skipped, 1 truncated to 16 tokens)" in stdout
    t = pq.read_table(out).to_pydict()
    kept = [tok for s, tok in zip(t["sentence"], t["token"], strict=True) if s == 1]
    assert kept == source.tokenizer.encode(long).tokens[:15] + ["[SEP]"]  # cut by tokenizers, [SEP] kept
    assert t["sentence"].count(0) == len(source.tokenizer.encode(TEXTS[0]).ids)  # the others are whole
    code, stdout, err = _main(capsys, trained[1], "--input", path, "--output", tmp_path / "x.npy", "--max-length", 16,
                              "--no-truncate")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"line 3: {n_long} tokens, longer than the maximum 16" in lines[0]
    assert not (tmp_path / "x.npy").exists() and "embedded" not in stdout


def test_bad_input_is_one_line_and_exit_2(trained, sentences, tmp_path, capsys):
    run = trained[1]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    table = tmp_path / "t.csv"
    table.write_text("id,sentence\n1,the river\n")
    out = tmp_path / "out.npy"
    cases = [
        ((tmp_path / "missing_run", "--input", sentences), "missing_run: not found"),
        ((run, "--input", tmp_path / "nope.txt"), "nope.txt: file not found"),
        ((run, "--input", blank), "nothing to embed"),
        ((run, "--input", table, "--column", "text"), "no column 'text'; its columns are: id, sentence"),
        ((run, "--input", table), "name its text column with --column"),
        ((run, "--input", sentences, "--column", "text"), "only for tables"),
        ((run, "--input", sentences, "--layer", "2"), "--layer 2: the model has 1 layers"),
        ((run, "--input", sentences, "--max-length", "600"), "--max-length 600"),
    ]
    for argv, expected in cases:
        code, stdout, err = _main(capsys, *argv, "--output", out)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, err)
        assert not out.exists() and "embedded" not in stdout
    # As a user runs it: a real process, an unknown output extension, no traceback.
    argv = [sys.executable, str(EMBED), str(run), "--input", str(sentences), "--output", str(tmp_path / "out.csv")]
    r = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --output {tmp_path / 'out.csv'}: unknown extension '.csv'; use .npy or .parquet"
    ]


def test_run_dir_checkpoint_and_hf_export_give_the_same_vectors(trained, sentences, tmp_path):
    run = trained[1]
    got = {}
    for name, model in (("run", run), ("tag", run / "checkpoints" / "step00000004"), ("hf", run / "hf")):
        run_embed(str(model), str(sentences), str(tmp_path / f"{name}.npy"), pooling="tokens", device="cpu")
        got[name] = np.load(tmp_path / f"{name}.npy")
    assert np.array_equal(got["run"], got["tag"])
    assert got["hf"]["token"].tolist() == got["run"]["token"].tolist()
    np.testing.assert_allclose(got["hf"]["embedding"], got["run"]["embedding"], atol=1e-5)


def test_hidden_states_and_mean_pooling_match_transformers_on_the_export(trained, sentences, tmp_path, capsys):
    """Every layer equals transformers' output_hidden_states, and the tool's mean pooling is the masked mean a
    sentence-transformers pipeline computes on the export (importing transformers takes about 6 s). The encoder
    saved alone by transformers (no MLM/NSP heads, as sentence-embedding models ship) embeds the same, and the
    tool says nothing about the heads it does not use."""
    from transformers import AutoTokenizer, BertModel

    hf_dir = trained[1] / "hf"
    run_embed(str(hf_dir), str(sentences), str(tmp_path / "mean.npy"), batch_size=4, device="cpu")
    tokenizer, hf = AutoTokenizer.from_pretrained(hf_dir), BertModel.from_pretrained(hf_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch, output_hidden_states=True).hidden_states
        ours = load_model(hf_dir).model.hidden_states(batch["input_ids"], None, batch["attention_mask"])
    assert len(ours) == len(theirs) == 2
    real = batch["attention_mask"].bool()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    m = batch["attention_mask"][..., None].float()
    sentence_transformers_mean = (theirs[-1] * m).sum(1) / m.sum(1).clamp(min=1e-9)
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy"), sentence_transformers_mean.numpy(), atol=1e-5)

    headless = tmp_path / "headless"
    hf.save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    assert not any(k.startswith("cls.") for k in weight_keys(headless))
    code, out, err = _main(capsys, headless, "--input", sentences, "--output", tmp_path / "headless.npy")
    assert code == 0 and "warning" not in err and "freshly initialised" not in out + err, err
    np.testing.assert_allclose(np.load(tmp_path / "headless.npy"), np.load(tmp_path / "mean.npy"), atol=1e-5)


# ------------------------------------------------------------------------------- a model pretrained on books

# "bank" at the same position after the same words: its layer-0 vectors are equal, what differs is context only.
BANK = ("the bank of the river was muddy.", "the bank lent him the money.")
# (sentence, a lightly reworded copy, an unrelated sentence)
TRIPLES = [
    ("the old man walked slowly down to the river in the evening.",
     "the old man walked down slowly to the river in the evening.",
     "she wrote a long letter to her sister about the ball."),
    ("he opened the door and looked out at the dark garden.",
     "he opened the door and looked out into the dark garden.",
     "the price of bread had risen again that winter."),
    ("i was very tired, so i went to bed early that night.",
     "i was so tired that i went to bed early that night.",
     "the ship sailed north along the coast for many days."),
]  # fmt: skip


def _word_vector(table: dict, sentence_index: int, text: str, word: str, offsets: list) -> np.ndarray:
    """Mean of the vectors of the pieces of ``word`` (its first occurrence) in sentence ``sentence_index``."""
    start = text.index(word)
    pieces = [p for p, (a, b) in enumerate(offsets) if b > a and start <= a and b <= start + len(word)]
    rows = {p: v for s, p, v in zip(table["sentence"], table["position"], table["embedding"], strict=True)
            if s == sentence_index}  # fmt: skip
    assert pieces, (word, text)
    return np.mean([rows[p] for p in pieces], axis=0)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@pytest.mark.long
def test_books_model_gives_words_context_and_paraphrases_their_neighbours(books_run, tmp_path):
    """On the tiny model pretrained on two books (Dickens' banks, Twain's river; conftest's ``books_run``): "bank"
    after the same words has the same vector in layer 0 and a different one in the last layer when the rest of the
    sentence is about a river or about money (cosine 0.80 here); and each sentence lies closer to a reworded copy
    of itself than to an unrelated one."""
    run = books_run
    tokenizer = load_model(run / "hf").tokenizer
    bank_file = tmp_path / "bank.txt"
    bank_file.write_text("\n".join(BANK) + "\n")
    offsets = [tokenizer.encode(t).offsets for t in BANK]
    cosines = {}
    for layer in (0, -1):
        out = tmp_path / f"bank{layer}.parquet"
        run_embed(str(run), str(bank_file), str(out), pooling="tokens", layer=layer, device="cpu")
        t = pq.read_table(out).to_pydict()
        river, money = (_word_vector(t, i, BANK[i], "bank", offsets[i]) for i in range(2))
        cosines[layer] = _cos(river, money)
    assert cosines[0] > 0.9999, cosines  # no context yet: the same token at the same position
    assert cosines[-1] < 0.99, cosines

    triples = tmp_path / "triples.txt"
    triples.write_text("\n".join(s for triple in TRIPLES for s in triple) + "\n")
    run_embed(str(run), str(triples), str(tmp_path / "triples.npy"), device="cpu")
    v = np.load(tmp_path / "triples.npy").reshape(len(TRIPLES), 3, -1)
    for (sentence, reworded, unrelated), text in zip(v, TRIPLES, strict=True):
        assert _cos(sentence, reworded) > _cos(sentence, unrelated), text
