"""Faults in data preparation: the launcher SIGKILLed inside each stage then re-run (output identical to an
uninterrupted run, no orphaned workers), and hostile inputs (mixed encodings, binary, a 50 MB line, empty files,
a truncated Wikipedia dump) that must neither stop the run nor blow its memory, with counts that add up."""

from __future__ import annotations

import bz2
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from data_prep.report import Report
from data_prep.tokenize import run_tokenize
from data_prep.vocab import run_vocab
from tests.helpers import (
    ROOT,
    MemCorpus,
    build_shards,
    cfg_for,
    random_parts,
    read_documents,
    small_vocab,
    tmpfs,
    write_parts,
)

LAUNCH = str(ROOT / "launch" / "prepare_data.py")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
# Tiny on purpose: the standard library's docstrings (~1.8 MB), 64-token samples, ~100 shards, so that every
# stage lasts long enough to be killed inside it and the shards stage has finished and unfinished shards.
PYDOCS = ["inputs=[builtin:pydocs]", "max_seq_length=64", "samples_per_shard=100", "num_workers=2", "seed=3"]
TIMING = ("stage_seconds", "throughput_mchars_per_s")  # the only manifest fields a resumed run may change


def launch(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCH, *overrides], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    """A WordPiece vocabulary trained once: given to every run below, so their output is deterministic."""
    out = tmp_path_factory.mktemp("vocab")
    for stage in ("read", "vocab"):
        r = launch(f"output_dir={out}", f"stage={stage}", "inputs=[builtin:pydocs]", "vocab_size=2000")
        assert r.returncode == 0, r.stderr[-2000:]
    return out / "vocab.txt"


@pytest.fixture(scope="module")
def reference(vocab, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    r = launch(f"output_dir={out}", f"vocab={vocab}", *PYDOCS)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def tree(out: Path) -> dict[str, bytes]:
    """Every file of an output directory by relative path, except the two that hold timings (compared apart)."""
    skip = {"manifest.json"} | {f"work/state/{s}.json" for s in ("read", "vocab", "tokenize", "shards")}
    files = {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}
    return {name: p.read_bytes() for name, p in files.items() if name not in skip}


def comparable(manifest: dict) -> dict:
    m = {k: v for k, v in manifest.items() if k not in TIMING}
    m["config"] = {k: v for k, v in m["config"].items() if k != "output_dir"}  # two runs, two folders
    m["warnings"] = [w for w in m["warnings"] if not w.startswith("resuming:")]  # records that the run resumed
    return m


def kill_inside(cmd: list[str], stage: str, ready: Callable[[], bool]) -> tuple[int, list[int]]:
    """Start ``cmd``, SIGKILL it once ``ready()`` holds after its ``stage X: starting`` line; return its exit status
    and the pids of its descendants at the moment of the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT)
    started = threading.Event()

    def watch() -> None:
        for line in proc.stdout:
            if line.startswith(f"stage {stage}: starting"):
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert started.wait(120), f"no 'stage {stage}: starting' line (exit code {proc.poll()})"
        while not ready() and proc.poll() is None:
            time.sleep(0.005)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGKILL)
        return proc.wait(30), children
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids that are still alive (and not zombies) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["read", "tokenize", "shards"])  # vocab only copies the given vocabulary
def test_sigkill_inside_a_stage_then_rerun_gives_identical_output(stage, vocab, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, LAUNCH, f"output_dir={out}", f"vocab={vocab}", *PYDOCS]
    if stage == "shards":  # as soon as the first shards are complete (the stage starts its pool first)
        ready = lambda: any((out / "train").glob("*.index.npy"))
    else:  # half-way through the stage as the reference run timed it: inside it on a slower or faster minute too
        deadline = time.monotonic() + json.loads((reference / f"work/state/{stage}.json").read_text())["seconds"] / 2
        ready = lambda: time.monotonic() > deadline
    code, children = kill_inside(cmd, stage, ready)
    assert code == -signal.SIGKILL
    state = out / "work" / "state"
    assert not (state / f"{stage}.json").exists(), f"the kill came after stage {stage} finished; nothing tested"
    assert not (out / "manifest.json").exists()
    if stage == "shards":  # some shards finished, some not: the re-run must build exactly the missing ones
        assert 0 < len(list((out / "train").glob("*.index.npy"))) < len(list((reference / "train").iterdir())) // 2
    assert not gone(children), "pool workers outlived the killed launcher"

    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    expected, actual = tree(reference), tree(out)
    assert sorted(actual) == sorted(expected)  # no leftover temporary file, nothing missing
    assert [name for name in expected if actual[name] != expected[name]] == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert comparable(manifest) == comparable(json.loads((reference / "manifest.json").read_text()))
    assert manifest["counts"]["chunks_without_pair"] >= 0 and manifest["splits"]["train"]["shards"]


@pytest.mark.faults
def test_long_document_is_tokenized_in_pieces_with_identical_output(tmp_path, monkeypatch):
    """A document much longer than a tokenize chunk (a 50 MB line becomes one) is cut between sentences so that
    no task holds it whole; the token store must come out byte-identical to the one-chunk run."""
    from data_prep import tokenize as tokenize_mod

    docs = random_parts(n_parts=1, n_docs=6, seed=5)[0]
    docs[2] = [s for doc in random_parts(n_parts=1, n_docs=30, seed=6)[0] for s in doc] + ["\u200b"]  # empty at the end
    docs[3] = ["\u200b", *docs[3]]  # and one at a start
    runs = {}
    for chunk in (1 << 20, 64):  # one chunk for the part; then a cut every ~256 bytes, inside document 2
        monkeypatch.setattr(tokenize_mod, "CHUNK_BYTES", chunk)
        out = tmp_path / str(chunk)
        write_parts(out, [docs])
        run_vocab(cfg_for(out, vocab=str(small_vocab(tmp_path / "v.txt", specials_first=True))), Report())
        run_tokenize(cfg_for(out), Report())
        runs[chunk] = {p.name: p.read_bytes() for p in sorted((out / "work" / "tokens").iterdir())}
    assert len(docs[2]) > 100 and runs[64] == runs[1 << 20]


HUGE_LINE = 50_000_000
# Bound on the largest process of the run (launcher or worker): an interpreter with its libraries (~150 MB) plus
# a few copies of the 50 MB line, which is one document (the reader's bytes and str, the worker's cleaned text
# and sentences, a tokenize chunk): 150 + 7 x 50 = 500 MB. The code before this test peaked at 1.9 GB (a list of
# every word of the line, BlingFire and the tokenizer on the whole line at once).
PEAK_RSS_BOUND = 512 << 20
WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
    "sys.exit(r.returncode)"
)  # a fresh process whose only child is the launcher: its peak alone


def hostile_inputs(root: Path, wiki: Path) -> list[str]:
    d = root / "mixed"
    d.mkdir(parents=True)
    (d / "latin1.txt").write_bytes("Café crème brûlée. Ça va très bien, merci.\n".encode("latin-1"))
    (d / "utf16.txt").write_text("Grüße aus Köln. Der Dom ist sehr hoch.\n\nZweiter Absatz hier.\n", encoding="utf-16")
    (d / "binary.txt").write_bytes(random.Random(0).randbytes(1 << 20))
    words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    (d / "huge.txt").write_bytes((words * (HUGE_LINE // len(words) + 1))[:HUGE_LINE])  # one line, no full stop
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_bytes(b" \n\n\t\n")
    records = root / "records.jsonl"
    texts = ["A fine record. It has two sentences.", "", "   ", "Another good record here."]
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "{bad json\n")
    # Re-compressed in 100 kB blocks, as a multi-GB dump has many blocks (the sample is one 900 kB block, of
    # which a cut keeps nothing), then cut in half: the pages of the whole blocks before the cut are kept.
    cut = root / "enwiki-cut.xml.bz2"
    data = bz2.compress(bz2.decompress(wiki.read_bytes()), compresslevel=1)
    cut.write_bytes(data[: len(data) // 2])
    return [str(d), str(records), str(cut)]


@pytest.mark.faults
@pytest.mark.slow
def test_hostile_inputs_complete_in_bounded_memory_and_counts_add_up(vocab, shared_data, tmp_path):
    from data_prep.store import verify_data

    inputs = hostile_inputs(tmp_path / "in", shared_data / "wikipedia" / "enwiki-sample-pages-articles.xml.bz2")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-c",
        WRAPPER,
        sys.executable,
        LAUNCH,
        f"inputs=[{','.join(inputs)}]",
        f"output_dir={out}",
        f"vocab={vocab}",
        "num_workers=2",
        "strict=false",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    peak = int(r.stderr.strip().splitlines()[-1])
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak >> 20} MiB"

    m = json.loads((out / "manifest.json").read_text())
    c, skipped = m["counts"], {k: v["count"] for k, v in m["skipped"].items()}
    assert c["documents_read"] == c["documents_written"] + c["documents_skipped"]
    assert c["documents_skipped"] == sum(n for k, n in skipped.items() if k.startswith("document: "))
    assert c["files_skipped"] == sum(n for k, n in skipped.items() if k.startswith("file: "))
    assert skipped == {
        "file: not valid UTF-8": 2,
        "file: empty file": 2,
        "document: bad JSON": 1,
        "file: truncated or corrupt compressed stream": 1,
        "document: no text after cleaning": 2,
    }
    named = " ".join(item for v in m["skipped"].values() for item in v["items"])
    assert all(name in named for name in ("latin1.txt", "binary.txt", "empty.txt", "blank.txt", "enwiki-cut"))
    assert c["documents_text"] == 2 and c["documents_jsonl"] == 2 and c["documents_wiki"] > 5  # utf16 + huge

    parts = {json.loads(p.read_text())["unit"]: p.with_name(p.name.replace(".meta.json", ".txt"))
             for p in (out / "work" / "documents").glob("*.meta.json")}  # fmt: skip
    assert "Grüße aus Köln." in parts[f"{inputs[0]}/utf16.txt"].read_text(encoding="utf-8").splitlines()
    huge = parts[f"{inputs[0]}/huge.txt"].read_text(encoding="utf-8").split("\n")
    assert max(map(len, huge)) <= 100_000 and sum(map(len, huge)) >= HUGE_LINE - len(huge) - 100
    assert verify_data(out, m)["samples"]["train"] == m["splits"]["train"]["samples"] > 0


@pytest.mark.faults
def test_rerun_after_the_shards_were_written_reports_the_same_counts(tmp_path):
    """Killed after its shards were complete but before the manifest: the re-run keeps the shards and must still
    report what it dropped while building them (chunks that make no pair), which the shard files do not hold."""

    # One long document per split: its sentences longer than a sample make chunks without a NotNext partner.
    corpus = MemCorpus([[70, 5, 5, 70, 70, 5, 5, 5] * 6 + [70, 5, 5, 70, 5] * 4], seed=1)  # one document
    first, report = build_shards(tmp_path, corpus, validation_fraction=0.5, samples_per_shard=4)
    assert report.counts["chunks_without_pair"] > 0 and len(first["splits"]["train"]["shards"]) >= 1
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "train").iterdir()}
    again, report2 = build_shards(tmp_path, corpus, validation_fraction=0.5, samples_per_shard=4)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "train").iterdir()} == mtimes  # kept, not rebuilt
    assert report2.counts == report.counts and again == first
    record = next((tmp_path / "work" / "shards").glob("train-*.json"))
    record.unlink()  # killed between the shard's rename and its record: rebuilt, same bytes, same counts
    third, report3 = build_shards(tmp_path, corpus, validation_fraction=0.5, samples_per_shard=4)
    assert report3.counts == report.counts and third == first and record.exists()


@pytest.mark.faults
def test_shared_sentence_offsets_are_used_only_for_the_parts_they_were_built_from(tmp_path):
    """The tokenize stage leaves the corpus-wide sentence offsets on disk, memory-mapped by every shards worker
    (one page-cache copy instead of one array per process); stale or missing, TokenStore builds them itself."""
    import numpy as np

    from data_prep.tokenize import OFFSETS, TokenStore

    write_parts(tmp_path, random_parts(n_parts=3, n_docs=10, seed=2))
    run_vocab(cfg_for(tmp_path, vocab=str(small_vocab(tmp_path / "v.txt", specials_first=True))), Report())
    run_tokenize(cfg_for(tmp_path), Report())
    shared = TokenStore(tmp_path).sentence_offsets
    key = (tmp_path / OFFSETS).with_suffix(".json")
    assert isinstance(shared, np.memmap)
    key.unlink()  # e.g. killed between the two files: built in memory, the same values
    built = TokenStore(tmp_path).sentence_offsets
    assert not isinstance(built, np.memmap) and np.array_equal(built, shared)
    run_tokenize(cfg_for(tmp_path), Report())  # parts already done: the offsets are written again
    (tmp_path / "work" / "tokens" / "part-00002.docs.npy").unlink()  # a part gone: the offsets are stale
    store = TokenStore(tmp_path)
    assert not isinstance(store.sentence_offsets, np.memmap) and len(store.sentence_offsets) < len(shared)
    assert np.array_equal(store.sentence_offsets, shared[: len(store.sentence_offsets)])


@pytest.mark.faults
def test_utf16_files_are_decoded_and_broken_ones_skipped(tmp_path):
    """A byte-order mark makes UTF-16/32 certain: such files are read (streamed, re-encoded to UTF-8), in both
    document modes and compressed; one whose bytes break the encoding is skipped and counted, not a crash."""
    import gzip

    bert = "".join(f"Sentence {i} of the first document.\n" for i in range(5)) + "\n" + \
        "".join(f"Zweites Dokument, Satz {i}, schön.\n" for i in range(5))  # fmt: skip
    (tmp_path / "be.txt").write_bytes(bert.encode("utf-16-be").join([b"\xfe\xff", b""]))
    (tmp_path / "le32.txt.gz").write_bytes(gzip.compress("Ein Text in UTF-32. Mit zwei Sätzen.\n".encode("utf-32")))
    (tmp_path / "bad.txt").write_bytes("Gut bis hier. ".encode("utf-16") + b"\x00\xd8\x41\x00")  # a lone surrogate
    docs, report = read_documents(str(tmp_path))
    assert [(d.doc_id, d.text.splitlines()[0]) for d in docs] == [
        ("line1", "Sentence 0 of the first document."), ("line7", "Zweites Dokument, Satz 0, schön."),
        ("le32.txt.gz", "Ein Text in UTF-32. Mit zwei Sätzen.")]  # fmt: skip
    assert report.skipped == {"file: not valid UTF-16": [f"{tmp_path / 'bad.txt'} (after 0 documents)"]}


def test_full_then_readonly_disk_one_line_and_rerun_identical(vocab, reference, tmp_path):
    """Output on a 600 kB tmpfs: one error line naming the disk problem, exit 2; read-only: the same; after the
    space is there, the same command finishes with output identical to an uninterrupted run's."""
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "size=600k"):
        out = mnt / "out"
        for problem, remount in (("No space left on device", None), ("Read-only file system", "remount,ro")):
            if remount:
                subprocess.run(["mount", "-o", remount, str(mnt)], check=True)
            r = launch(f"output_dir={out}", f"vocab={vocab}", *PYDOCS)
            errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert len(errors) == 1 and problem in errors[0] and "rerun the same command" in errors[0]
        subprocess.run(["mount", "-o", "remount,rw,size=64m", str(mnt)], check=True)
        r = launch(f"output_dir={out}", f"vocab={vocab}", *PYDOCS)
        assert r.returncode == 0, r.stderr[-3000:]
        assert tree(out) == tree(reference)
        ours, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
        assert comparable(ours)["splits"] == comparable(ref)["splits"]
