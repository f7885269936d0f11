"""Vocab and tokenize stages on hand-written read-stage parts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_prep import tokenize as tokenize_mod
from data_prep.errors import DataPrepError
from data_prep.report import Report
from data_prep.store import sha256_file
from data_prep.tokenize import TokenStore, run_tokenize
from data_prep.vocab import SPECIALS, load_tokenizer, run_vocab
from tests.helpers import cfg_for, random_parts, small_vocab, write_parts


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    write_parts(tmp_path, random_parts())
    run_vocab(cfg_for(tmp_path), Report())
    return tmp_path


def test_trained_vocab_specials_and_size(trained: Path) -> None:
    lines = (trained / "vocab.txt").read_text().splitlines()
    assert lines[:5] == SPECIALS
    assert len(lines) <= 200 and len(set(lines)) == len(lines)
    tok = load_tokenizer(trained)
    assert tok.get_vocab_size() == len(lines)
    assert tok.encode("the fox", "a dog").tokens[0] == "[CLS]" and tok.encode("the fox", "a dog").type_ids[-1] == 1


def test_cased_vs_uncased(tmp_path: Path) -> None:
    results = {}
    for lowercase in (True, False):
        out = tmp_path / str(lowercase)
        write_parts(out, random_parts())
        results[lowercase] = run_vocab(cfg_for(out, lowercase=lowercase), Report())
        vocab = set((out / "vocab.txt").read_text().splitlines()) - set(SPECIALS)
        assert any(c.isupper() for t in vocab for c in t) is (not lowercase)
        assert load_tokenizer(out).normalizer.normalize_str("Zürich") == ("zurich" if lowercase else "Zürich")
    assert results[True]["lowercase"] and not results[False]["lowercase"]


def test_given_vocab_used_verbatim(tmp_path: Path) -> None:
    src = small_vocab(tmp_path / "my_vocab.txt")
    out = tmp_path / "out"
    info = run_vocab(cfg_for(out, vocab=str(src)), Report())
    assert (out / "vocab.txt").read_bytes() == src.read_bytes()
    assert info["vocab_sha256"] == sha256_file(src) and info["trained"] is False
    assert info["special_tokens"] == {"[PAD]": 0, "[UNK]": 6, "[CLS]": 7, "[SEP]": 8, "[MASK]": 9}
    enc = load_tokenizer(out).encode("the dog")
    assert enc.ids[0] == 7 and enc.ids[-1] == 8


def test_vocab_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(DataPrepError, match=r"bad\.txt.*\[MASK\]"):
        run_vocab(cfg_for(tmp_path / "o", vocab=str(bad)), Report())
    with pytest.raises(DataPrepError, match="nope.txt: file not found"):
        run_vocab(cfg_for(tmp_path / "o", vocab=str(tmp_path / "nope.txt")), Report())
    with pytest.raises(DataPrepError, match="stage=read"):
        run_vocab(cfg_for(tmp_path / "empty"), Report())


def test_auto_tokenizer_loads_output(trained: Path) -> None:
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(trained))
    ours = load_tokenizer(trained)
    for text, pair in (("The quick brown Fox, in Zürich!", None), ("tea and cakes", "every morning")):
        assert hf(text, pair)["input_ids"] == ours.encode(text, pair).ids
    # positional: ``vocab_file`` in transformers 4, ``vocab`` (a path or a dict) in 5
    from_vocab = transformers.BertTokenizerFast(str(trained / "vocab.txt"), do_lower_case=True)
    assert from_vocab("Café owners")["input_ids"] == ours.encode("Café owners").ids


def test_token_store_matches_encode(trained: Path) -> None:
    docs = random_parts()
    report = Report()
    out = run_tokenize(cfg_for(trained), report)
    tok = load_tokenizer(trained)
    store = TokenStore(trained)
    flat = [doc for part in docs for doc in part]
    assert store.num_docs == len(flat) == out["documents"]
    s = 0
    for d, doc in enumerate(flat):
        assert store.doc_sentences(d) == (s, s + len(doc))
        for sentence in doc:
            expected = tok.encode(sentence, add_special_tokens=False).ids
            assert store.sentence_tokens(s).tolist() == expected
            s += 1
        assert store.doc_num_tokens(d) == store.doc_num_tokens_all()[d]
    assert report.counts["tokens"] == store.num_tokens == int(store.sentence_offsets[-1])
    assert report.counts["sentences_tokenized"] == store.num_sentences == s
    assert store.dtype == np.uint16 and out["parts"] == ["part-00000", "part-00001", "part-00002"]
    # a range spanning two parts still reads correctly
    a, b = store.sentence_offsets[store.doc_offsets[11]], store.sentence_offsets[store.doc_offsets[13]]
    assert (
        store.tokens(int(a), int(b)).tolist()
        == np.concatenate(
            [store.sentence_tokens(i) for i in range(store.doc_offsets[11], store.doc_offsets[13])]
        ).tolist()
    )


def test_workers_give_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenize_mod, "CHUNK_BYTES", 512)  # many chunks per part, so order matters
    digests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        write_parts(out, random_parts(n_parts=2, n_docs=40, seed=3))
        run_vocab(cfg_for(out, vocab=str(small_vocab(tmp_path / "v.txt", specials_first=True))), Report())
        run_tokenize(cfg_for(out, num_workers=workers), Report())
        files = sorted((out / "work" / "tokens").iterdir())
        digests.append({f.name: sha256_file(f) for f in files})
    assert len(digests[0]) == 8 and digests[0] == digests[1]


def test_interrupted_part_redone_and_vocab_change(trained: Path) -> None:
    run_tokenize(cfg_for(trained), Report())
    tdir = trained / "work" / "tokens"
    good = (tdir / "part-00001.tokens.bin").read_bytes()
    (tdir / "part-00001.docs.npy").unlink()  # interrupted before its commit marker
    (tdir / "part-00001.tokens.bin").write_bytes(b"garbage")
    out = run_tokenize(cfg_for(trained), Report())
    assert out["parts_skipped"] == ["part-00000", "part-00002"]
    assert (tdir / "part-00001.tokens.bin").read_bytes() == good
    # another vocabulary: every part is redone
    run_vocab(cfg_for(trained, vocab=str(small_vocab(trained / "v.txt", specials_first=True))), Report())
    assert run_tokenize(cfg_for(trained), Report())["parts_skipped"] == []
    assert TokenStore(trained).vocab_sha256 == sha256_file(trained / "v.txt")


def test_unk_warning_and_empty_sentences(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a cased corpus against an uncased-only vocabulary run with lowercase=False: capitals become [UNK];
    # "\u200b" (zero-width space) normalizes to nothing: an empty sentence.
    docs = [[["Hello World", "the dog"], ["\u200b"], ["QQQ ZZZ", "\u200b", "a b"]]]
    write_parts(tmp_path, docs)
    vocab = small_vocab(tmp_path / "v.txt", specials_first=True)
    run_vocab(cfg_for(tmp_path, vocab=str(vocab), lowercase=False), Report())
    report = Report()
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        out = run_tokenize(cfg_for(tmp_path, lowercase=False), report)
    assert out["empty_sentences"] == report.counts["empty_sentences"] == 2
    assert report.counts["unk_tokens"] > 0
    assert any("[UNK]" in w and "lowercase=False" in w for w in report.warnings)
    store = TokenStore(tmp_path)
    assert store.num_docs == 3 and store.doc_sentences(1) == (2, 2)  # the all-empty document is kept, empty
    assert store.num_sentences == 4
    # an uncased run of the same corpus stays under the warning rate
    quiet = Report()
    run_tokenize(cfg_for(tmp_path, unk_warning_rate=0.99), quiet)
    assert not quiet.warnings


def test_mismatched_jsonl_is_an_error(tmp_path: Path) -> None:
    write_parts(tmp_path, random_parts(n_parts=1))
    run_vocab(cfg_for(tmp_path), Report())
    jsonl = tmp_path / "work" / "documents" / "part-00000.docs.jsonl"
    jsonl.write_text(jsonl.read_text().split("\n", 1)[1])  # one document fewer than the .txt
    with pytest.raises(DataPrepError, match="re-run stage=read"):
        run_tokenize(cfg_for(tmp_path), Report())


def test_special_token_strings_in_the_corpus_are_text(tmp_path: Path) -> None:
    # every special token spelled out in the text, glued to words and to each other
    docs = [
        [["the [MASK] dog and the fox", "tea [SEP] cakes [CLS] coffee"], ["[PAD][UNK] old school", "the dog"]],
        [["[CLS] [SEP] [MASK] [PAD] [UNK]", "every morning[SEP]children play"]],
    ]
    write_parts(tmp_path, docs)
    vocab_file = small_vocab(tmp_path / "v.txt", specials_first=True)
    vocab_file.write_text(vocab_file.read_text() + "[\n]\n")
    run_vocab(cfg_for(tmp_path, vocab=str(vocab_file)), Report())
    report = Report()
    out = run_tokenize(cfg_for(tmp_path), report)
    expected = {"[PAD]": 2, "[UNK]": 2, "[CLS]": 2, "[SEP]": 3, "[MASK]": 2}
    assert out["special_token_literals"] == expected and report.counts["special_token_literals"] == 11
    assert {k: report.counts[f"special_token_literals_{k}"] for k in expected} == expected
    store = TokenStore(tmp_path)
    ids = store.tokens(0, store.num_tokens)
    assert not np.isin(ids, range(5)).any()  # no special id at all: not even [UNK] (every letter is in the vocab)
    tok = load_tokenizer(tmp_path)  # the saved tokenizer keeps its special tokens: a prompt's [MASK] is the mask
    assert tok.encode("the [MASK] dog", add_special_tokens=False).tokens == ["the", "[MASK]", "dog"]
    vocab = (tmp_path / "vocab.txt").read_text().split("\n")
    first = store.sentence_tokens(0).tolist()
    assert [vocab[i] for i in first] == ["the", "[", "m", "##a", "##s", "##k", "]", "dog", "and", "the", "fox"]
    corpus_tok = tokenize_mod.corpus_tokenizer(tmp_path / "tokenizer.json")
    assert first == corpus_tok.encode("the [MASK] dog and the fox", add_special_tokens=False).ids
    # a part tokenized before this encoding (special tokens matched in the text) is redone, not reused
    meta = tmp_path / "work" / "tokens" / "part-00001.json"
    old = json.loads(meta.read_text())
    del old["encoding"]
    meta.write_text(json.dumps(old))
    assert run_tokenize(cfg_for(tmp_path), Report())["parts_skipped"] == ["part-00000"]
