"""Corpus readers (data_prep/corpora.py) and cleaners: kind detection, streaming readers, bad inputs, cleaning."""

from __future__ import annotations

import bz2
import gzip
import json
import re

import pytest

from data_prep.corpora import InputSpec, expand_units, looks_like_sentence_per_line, parse_input
from data_prep.errors import DataPrepError
from data_prep.sentences import RawDoc, clean_book, clean_document, clean_wikitext, split_sentences
from tests.helpers import read_documents

WIKI = "wikipedia/enwiki-sample-pages-articles.xml.bz2"


def sentences_of(doc: RawDoc, cap: int = 100_000) -> list[str]:
    return split_sentences(clean_document(doc), cap)


def wiki_page(title: str, text: str, ns: int = 0, page_id: int = 1, redirect: str | None = None) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{page_id}</id>{red}"
            f'<revision><id>9</id><text xml:space="preserve">{esc}</text></revision></page>\n')  # fmt: skip


HEAD = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n<siteinfo><sitename>W</sitename></siteinfo>\n'
ARTICLE = """{{Infobox city|name=Town|population=5}}
'''Town''' is a [[city]] in [[Ruritania|the Kingdom]] &amp; its capital.<ref name="a">{{cite web|url=x}}</ref>
It lies on a river.<!-- hidden -->
[[File:Town.jpg|thumb|A picture [[caption]].]]

== History ==
The town was founded in 1200 by [[monk]]s.&nbsp;It grew quickly.
{| class="wikitable"
! Year !! People
|-
| 1900 || 500
|}
* short item
* This list item is a real sentence with enough words to keep.

== See also ==
* [[Other town]]
The see also section has prose that must be dropped entirely.

== References ==
{{reflist}}
[[Category:Towns]]
[[de:Stadt]]
"""


def test_parse_input_detects_kinds_and_prefixes(tmp_path):
    for name, kind in [("a.xml.bz2", "wiki"), ("a.xml", "wiki"), ("a.txt", "text"), ("a.txt.gz", "text"),
                       ("a.jsonl", "jsonl"), ("a.json.gz", "jsonl"), ("a.parquet", "parquet")]:  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
        assert parse_input(str(tmp_path / name)).kind == kind
    assert parse_input(f"books:{tmp_path / 'a.txt'}") == InputSpec("books", str(tmp_path / "a.txt"))
    assert parse_input(f"jsonl:{tmp_path / 'a.txt'}").kind == "jsonl"
    assert parse_input("hf:wikitext:wikitext-2-raw-v1") == InputSpec("hf", "wikitext", "wikitext-2-raw-v1")
    assert parse_input("hf:bookcorpus") == InputSpec("hf", "bookcorpus", None)
    assert parse_input("builtin:pydocs").kind == "builtin"
    assert parse_input(str(tmp_path)).kind == "text"
    (tmp_path / "odd.csv").write_text("x")
    with pytest.raises(DataPrepError, match=r"odd\.csv.*prefix"):
        parse_input(str(tmp_path / "odd.csv"))
    with pytest.raises(DataPrepError, match=r"input not found: .*nope\.txt"):
        parse_input(str(tmp_path / "nope.txt"))
    with pytest.raises(DataPrepError, match="builtin:pydocs"):
        parse_input("builtin:nothing")


def test_directory_expands_recursively_sorted(tmp_path):
    for rel in ["b.txt", "a/z.txt.gz", "a/y.txt", "skip.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [u.path for u in expand_units(str(tmp_path))] == [
        str(tmp_path / r) for r in ["a/y.txt", "a/z.txt.gz", "b.txt"]
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPrepError, match="no input files"):
        expand_units(str(tmp_path / "empty"))


def test_wiki_synthetic_drops_and_cleaning(tmp_path):
    pages = [
        wiki_page("Town", ARTICLE, page_id=1),
        wiki_page("Talk:Town", "Talk page text.", ns=1, page_id=2),
        wiki_page("Old", "#REDIRECT [[Town]]", page_id=3),
        wiki_page("Old2", "#redirect [[Town]]", page_id=4, redirect="Town"),
        wiki_page("Town (disambiguation)", "'''Town''' may be:\n* [[Town]]", page_id=5),
        wiki_page("Mercury", "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n{{disambig}}", page_id=6),
        wiki_page("Smith", "Smith is a surname.\n{{hndis|Smith}}", page_id=7),
        wiki_page("Kept", "Kept is an article that cites [[x]].{{disambiguation needed|date=May}} Yes.", page_id=8),
    ]
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress((HEAD + "".join(pages) + "</mediawiki>\n").encode()))
    docs, report = read_documents(str(path))
    assert [d.doc_id for d in docs] == ["1", "8"] and {d.kind for d in docs} == {"wiki"}
    assert report.counts["wiki_non_article_dropped"] == 1
    assert report.counts["wiki_redirects_dropped"] == 2
    assert report.counts["wiki_disambiguation_dropped"] == 3
    assert not report.skipped_counts  # drops are counts, not skips
    text = "\n".join(sentences_of(docs[0]))
    assert "Town is a city in the Kingdom & its capital." in text
    assert "The town was founded in 1200 by monks." in text and "It grew quickly." in text
    assert "This list item is a real sentence with enough words to keep." in text
    for junk in ["{{", "}}", "[[", "<ref", "&amp;", "&nbsp;", "{|", "1900", "short item", "History", "see also",
                 "Other town", "Category", "Stadt", "hidden", "picture", "cite"]:  # fmt: skip
        assert junk not in text, junk


def test_wiki_sample(shared_data):
    docs, report = read_documents(str(shared_data / WIKI))
    assert len(docs) == 31 and report.counts["wiki_redirects_dropped"] == 11
    assert report.counts["wiki_disambiguation_dropped"] == 2
    assert report.counts["wiki_redirects_dropped"] + report.counts["wiki_disambiguation_dropped"] + len(docs) == 44
    all_sentences = [s for d in docs for s in sentences_of(d)]
    assert len(all_sentences) > 2000
    text = "\n".join(all_sentences)
    for junk in ["{{", "}}", "[[", "]]", "<ref", "&amp;", "{|", "\ue000", "\ue001"]:
        assert junk not in text, junk
    lines = set(all_sentences)
    for heading in ["History", "See also", "References", "External links", "Geography", "Further reading"]:
        assert heading not in lines
    assert "Pretoria is named after Andries Pretorius." in lines


def test_books_gutenberg_header_footer_and_wrapping(shared_data):
    books = sorted((shared_data / "books").glob("*.txt.gz"))
    assert len(books) == 13
    for path in books:
        raw = gzip.open(path).read().decode("utf-8-sig")
        text = "\n".join(clean_book(raw))
        assert "PROJECT GUTENBERG" not in text and "*** START OF" not in text and "gutenberg.org" not in text, path
    docs, _ = read_documents(str(shared_data / "books" / "alice_in_wonderland.txt.gz"))
    assert len(docs) == 1 and docs[0].kind == "books" and not docs[0].text.startswith("\ufeff")
    sentences = sentences_of(docs[0])
    assert sentences[0].startswith("Alice was beginning to get very tired of sitting by her sister on the bank")
    assert (
        "So she was considering in her own mind (as well as she could, for the hot day made her feel very sleepy "
        "and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of getting up and "
        "picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her." in sentences
    )
    assert not any(re.match(r"CHAPTER [IVX]+", s) for s in sentences)
    assert "Down the Rabbit-Hole" not in sentences and "THE END" not in sentences


def test_text_bom_empty_and_invalid_utf8(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello there. A second line.\n")
    (tmp_path / "empty.txt").write_bytes(b"\xef\xbb\xbf  \n\n")
    (tmp_path / "bad.txt").write_bytes(b"Fine text here.\nBroken \xff\xfe byte.\n")
    docs, report = read_documents(str(tmp_path))
    assert [d.doc_id for d in docs] == ["bom.txt"] and docs[0].text == "Hello there. A second line.\n"
    assert report.skipped["file: empty file"] == [str(tmp_path / "empty.txt")]
    assert report.skipped["file: not valid UTF-8"] == [f"{tmp_path / 'bad.txt'} (byte offset 23)"]
    assert report.counts["files_skipped"] == 2
    with pytest.raises(DataPrepError, match=r"bad\.txt: not valid UTF-8"):
        read_documents(str(tmp_path / "bad.txt"), strict=True)


def test_text_documents_modes(tmp_path):
    bert = "\n".join("".join(f"Sentence {i} of doc {d}.\n" for i in range(5)) for d in range(3))
    wrapped = "This paragraph is hard\nwrapped over lines and\nends here.\n\nAnother paragraph follows\nit.\n"
    assert looks_like_sentence_per_line(bert) and not looks_like_sentence_per_line(wrapped)
    (tmp_path / "bert.txt").write_text(bert)
    (tmp_path / "prose.txt").write_text(wrapped)
    docs, _ = read_documents(str(tmp_path))
    assert [d.doc_id for d in docs] == ["line1", "line7", "line13", "prose.txt"]
    assert sentences_of(docs[3]) == [
        "This paragraph is hard wrapped over lines and ends here.",
        "Another paragraph follows it.",
    ]
    docs, _ = read_documents(str(tmp_path / "bert.txt"), text_documents="file")
    assert len(docs) == 1
    docs, _ = read_documents(str(tmp_path / "prose.txt"), text_documents="blank_line")
    assert len(docs) == 2
    (tmp_path / "bert.txt").write_bytes(bert.encode().replace(b"doc 1.", b"doc \xff."))
    docs, report = read_documents(str(tmp_path / "bert.txt"))
    assert [d.doc_id for d in docs] == ["line1", "line13"] and report.counts["documents_skipped"] == 1


def test_huge_single_line_is_capped(tmp_path):
    path = tmp_path / "huge.txt"
    path.write_text("word " * 2_000_000 + "end.")  # 10 MB, no sentence break
    docs, _ = read_documents(str(path))
    pieces = sentences_of(docs[0], cap=100_000)
    assert all(0 < len(p) <= 100_000 for p in pieces) and len(pieces) >= 100
    assert sum(len(p) for p in pieces) >= 10_000_000 - len(pieces)


def test_truncated_compressed_streams_keep_earlier_documents(tmp_path):
    first = HEAD + "".join(wiki_page(f"P{i}", f"Page {i} text is here.", page_id=i) for i in range(3))
    second = "".join(wiki_page(f"Q{i}", f"Later page {i}.", page_id=10 + i) for i in range(3)) + "</mediawiki>\n"
    tail = bz2.compress(second.encode())
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(bz2.compress(first.encode()) + tail[: len(tail) // 2])  # two streams, the second cut
    docs, report = read_documents(str(path))
    assert [d.doc_id for d in docs] == ["0", "1", "2"]
    assert report.skipped["file: truncated or corrupt compressed stream"] == [f"{path} (after 3 documents)"]
    with pytest.raises(DataPrepError, match=r"cut\.xml\.bz2: truncated"):
        read_documents(str(path), strict=True)
    lines = "".join(json.dumps({"text": f"Record {i}."}) + "\n" for i in range(4)).encode()
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(lines) + gzip.compress(lines)[:20])
    docs, report = read_documents(str(gz))
    assert len(docs) == 4 and report.counts["files_skipped"] == 1


def test_jsonl_and_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "recs.jsonl"
    path.write_text('{"text": "First doc.", "id": "a"}\n{bad json\n\n{"body": "no text"}\n{"text": "Last doc."}\n')
    docs, report = read_documents(str(path))
    assert [(d.doc_id, d.text, d.kind) for d in docs] == [("a", "First doc.", "jsonl"), ("line5", "Last doc.", "jsonl")]
    assert report.skipped["document: bad JSON"] == [f"{path} (line 2)"]
    assert report.skipped["document: no text field 'text'"] == [f"{path} (line 4)"]
    with pytest.raises(DataPrepError, match="line 2"):
        read_documents(str(path), strict=True)
    pq.write_table(pa.table({"content": ["Doc one.", "Doc two."], "n": [1, 2]}), tmp_path / "t.parquet")
    docs, _ = read_documents(str(tmp_path / "t.parquet"), text_field="content")
    assert [(d.doc_id, d.text, d.kind) for d in docs] == [("0", "Doc one.", "parquet"), ("1", "Doc two.", "parquet")]
    docs, report = read_documents(str(tmp_path / "t.parquet"))
    assert docs == [] and "no text column 'text'" in next(iter(report.skipped))


def test_datasets_through_arrow_and_hub_code_paths(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["Alpha doc.", "Beta doc.", "Gamma doc."], "id": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs, _ = read_documents(str(tmp_path / "saved"))
    assert [(d.doc_id, d.text) for d in docs] == [("x", "Alpha doc."), ("y", "Beta doc."), ("z", "Gamma doc.")]
    assert {d.kind for d in docs} == {"arrow"}
    local = tmp_path / "hub.jsonl"
    local.write_text("".join(json.dumps({"text": f"Hub doc {i}."}) + "\n" for i in range(3)))
    calls = []

    def loader(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.load_dataset("json", data_files=str(local), split=split, streaming=streaming)

    docs, _ = read_documents("hf:someone/corpus:en", hf=loader)
    assert calls == [("someone/corpus", "en", "train", True)]
    assert [(d.source, d.doc_id, d.text, d.kind) for d in docs] == [
        ("hf:someone/corpus:en", str(i), f"Hub doc {i}.", "hf") for i in range(3)
    ]

    def failing(*args, **kwargs):
        raise ConnectionError("hub unreachable\nmore")

    with pytest.raises(DataPrepError, match="hf:nope: hub dataset failed after 0 documents.*hub unreachable"):
        read_documents("hf:nope", hf=failing)


def test_builtin_pydocs_is_real_prose():
    docs, report = read_documents("builtin:pydocs")
    assert len(docs) > 300 and sum(len(d.text) for d in docs) > 2_000_000
    assert [d.doc_id for d in docs] == sorted(d.doc_id for d in docs if not d.doc_id.startswith("topic:")) + sorted(
        d.doc_id for d in docs if d.doc_id.startswith("topic:"))  # fmt: skip
    ids = {d.doc_id for d in docs}
    assert {"json", "collections", "posixpath"} <= ids and not ids & {"this", "antigravity", "tkinter"}
    by_id = {d.doc_id: d for d in docs}
    json_sentences = sentences_of(by_id["json"])
    assert any(s.startswith("JSON (JavaScript Object Notation)") for s in json_sentences)
    assert not any(s.startswith(">>>") for s in json_sentences)
    assert len(sentences_of(by_id["topic:assert"])) >= 5


def test_clean_wikitext_keeps_prose_of_lists_only():
    paragraphs = clean_wikitext(
        "Intro sentence here.\n* a\n* Bob\n# This numbered item is written as a full sentence.\n"
    )
    assert paragraphs == ["Intro sentence here.", "This numbered item is written as a full sentence."]


def test_split_sentences_normalises_whitespace():
    out = split_sentences(["  One  sentence\there.\nTwo\x00 here!  ", "", "   "], 1000)
    assert out == ["One sentence here.", "Two here!"]
    assert split_sentences(["abcdefghij" * 5], 20) == ["abcdefghij" * 2] * 2 + ["abcdefghij"]
