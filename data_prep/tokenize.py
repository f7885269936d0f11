"""Tokenize stage: the read stage's sentences to a memory-mapped token store, in parallel, deterministically.

Input: ``OUTDIR/work/documents/part-K.txt`` (one sentence per line, one blank line after each document) and
``part-K.docs.jsonl`` (one line per document, written last: the part's completion marker).

Output, per part K, in ``OUTDIR/work/tokens/`` (K as in the input part, five digits):

- ``part-K.tokens.bin``: every sentence's token ids back to back, raw ``store.token_dtype(vocab_size)``
  (little-endian ``uint16``/``uint32``), no special tokens, no truncation;
- ``part-K.sentences.npy``: ``int64 [num_sentences]``, end offset of each sentence in ``tokens.bin``;
- ``part-K.json``: vocabulary sha256, dtype and counts (a part made with another vocabulary is redone);
- ``part-K.docs.npy``: ``int64 [num_documents]``, end offset of each document in the part's sentences;
  written last, it marks the part complete.

When every part is done, ``OUTDIR/work/sentence_offsets.npy`` (``int64 [num_sentences + 1]``, the corpus-wide
token offset of every sentence) is written with ``sentence_offsets.json`` (the parts it was built from):
``TokenStore`` memory-maps it, so the shards stage's processes share one page-cache copy instead of each building
an 8-bytes-a-sentence array (1.4 GB each for a 20 GB corpus). It is deleted when the stage starts.

Corpus text is encoded as text: ``tokenizer.json`` keeps ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[PAD]`` and ``[UNK]``
as added special tokens (so a prompt's ``[MASK]`` is the mask for fill-mask), which ``tokenizers`` matches in the
raw text before normalization; the corpus is encoded without them (``corpus_tokenizer``), as Google's BERT
tokenizer does: a literal ``[SEP]`` in a book is ``[``, ``sep``, ``]`` (uncased), never a separator. Such literals
are counted (``special_token_literals``, and per token ``special_token_literals_[SEP]``...).

Sentences that tokenize to nothing are dropped (counted as ``empty_sentences``); documents are all kept, so
document ``d`` of the store is line ``d`` of the ``docs.jsonl`` files (a document may have zero sentences).

Chunks of whole documents go to a pool of ``num_workers`` processes through an ordered ``imap``, so the
files are byte-identical whatever the number of workers. A document much longer than a chunk (a 50 MB line cut
into sentences) is cut between sentences instead, so that no task holds it whole. ``TokenStore`` reads the
result back.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from data_prep.errors import DataPrepError

from .atomic import AtomicFile, atomic_path, save_npy, write_json
from .config import PrepareConfig, task_dir
from .procs import die_with_parent
from .report import Report
from .store import sha256_file, token_dtype
from .vocab import SPECIALS, completed_parts

log = logging.getLogger("data_prep")

TOKENS_DIR = Path("work") / "tokens"
OFFSETS = Path("work") / "sentence_offsets"  # .npy and .json
# Bytes of text per task: large enough that per-task IPC and bookkeeping vanish next to tokenization (about a
# second of work), small enough to keep both cores busy on small corpora. Chunks end at document boundaries.
CHUNK_BYTES = 1 << 20
LONG_DOC_CHUNKS = 4  # a document is cut between sentences once it spans this many chunks without ending
STARTUP_TIMEOUT_S = 120
_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}  # one worker = one core
LITERALS = [t.encode() for t in SPECIALS]  # special tokens' strings, counted where the corpus spells them out
ENCODING = "specials-as-text"  # in each part's meta: parts encoded with the special tokens active are redone

_tok: Tokenizer | None = None
_dtype: np.dtype = np.dtype(np.uint16)
_unk_id = -1


def corpus_tokenizer(tokenizer_json: str | os.PathLike) -> Tokenizer:
    """The saved tokenizer without its added tokens, for corpus text: the same normalizer, pre-tokenizer and
    WordPiece vocabulary, but ``[SEP]`` written in the text is punctuation and a word, as in Google's BERT."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def _init_worker(tokenizer_json: str, dtype: str, unk_id: int) -> None:
    global _tok, _dtype, _unk_id
    die_with_parent()
    os.environ.update(_ENV)
    _tok, _dtype, _unk_id = corpus_tokenizer(tokenizer_json), np.dtype(dtype), unk_id


def _encode_chunk(task: tuple[int, bool, bytes]) -> tuple:
    """Tokenize one chunk of a part (UTF-8, whole documents or a piece of a very long one) into flat arrays.

    Returns ``(k, last, ids, sentence_lengths, doc_sentence_counts, stats, open_end)``; numpy arrays keep the result
    small to pickle and avoid a Python object per token in the parent. A chunk cut inside a long document
    (it ends with a sentence, not a blank line) counts that document's sentences so far as its last entry,
    and the next chunk's first entry continues it (``_TokenPart.add`` joins the two).
    """
    k, last, data = task
    lines = data.decode("utf-8").split("\n")
    lines.pop()  # the text after the final newline: empty
    blank = np.flatnonzero(np.fromiter(map(len, lines), np.int64, len(lines)) == 0)
    doc_counts = np.diff(blank, prepend=-1) - 1  # sentences between consecutive blank lines
    if lines and lines[-1]:  # cut inside a document: its sentences so far
        doc_counts = np.append(doc_counts, len(lines) - 1 - (blank[-1] if len(blank) else -1))
    sentences = list(filter(None, lines))
    # encode_batch_fast skips the character offsets we never use: about 15% faster than encode_batch,
    # which itself matches one encode() per sentence on one core (measured; see docs/benchmarks.md).
    id_lists = [e.ids for e in _tok.encode_batch_fast(sentences, add_special_tokens=False)]
    lengths = np.fromiter(map(len, id_lists), np.int64, len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), _dtype, int(lengths.sum()))
    empty = lengths == 0
    n_empty = int(empty.sum())
    if n_empty:
        doc_of_sentence = np.repeat(np.arange(len(doc_counts)), doc_counts)
        doc_counts = doc_counts - np.bincount(doc_of_sentence[empty], minlength=len(doc_counts))
        lengths = lengths[~empty]
    literals = tuple(data.count(t) for t in LITERALS)  # sentences are lines: a literal never spans two
    stats = (len(data), len(sentences), n_empty, int(np.count_nonzero(ids == _unk_id)), *literals)
    return k, last, ids, lengths.astype(np.uint32), doc_counts.astype(np.uint32), stats, bool(lines and lines[-1])


def _chunks(k: int, txt: Path, chunk_bytes: int) -> Iterator[tuple[int, bool, bytes]]:
    """Split a part into runs of whole documents of about ``chunk_bytes`` (a document over ``LONG_DOC_CHUNKS``
    chunks is cut between its sentences); the last one is flagged."""
    pending, buf = None, b""
    with open(txt, "rb") as f:
        while block := f.read(chunk_bytes):
            buf += block  # at most LONG_DOC_CHUNKS + 1 chunks long
            cut = buf.rfind(b"\n\n") + 2  # just after a blank line: a document boundary
            if cut == 1:
                cut = 1 if buf.startswith(b"\n") else 0  # an empty document at the very start
            if cut == 0 and len(buf) >= LONG_DOC_CHUNKS * chunk_bytes:
                cut = buf.rfind(b"\n") + 1  # a very long document: cut between two of its sentences
            if cut == 0:
                continue  # one document longer than a chunk: read on
            if pending is not None:
                yield k, False, pending
            pending, buf = buf[:cut], buf[cut:]
    if buf:
        raise DataPrepError(f"{txt}: does not end with a blank line (truncated?); re-run stage=read")
    yield k, True, pending if pending is not None else b""


class _TokenPart:
    """Collects one part's results in order and commits it atomically (``docs.npy`` last)."""

    def __init__(self, tdir: Path, k: int, meta: dict):
        self.base, self.meta = tdir / f"part-{k:05d}", meta
        (tdir / f"part-{k:05d}.docs.npy").unlink(missing_ok=True)  # the commit marker goes first
        self.tokens = AtomicFile(self.base.with_name(self.base.name + ".tokens.bin"), "wb")
        self.f = self.tokens.f
        self.lengths: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.stats = np.zeros(4 + len(LITERALS), np.int64)
        self.open = False  # the last chunk ended inside a document: the next one's first count continues it

    def add(self, ids: np.ndarray, lengths: np.ndarray, docs: np.ndarray, stats: tuple, open_end: bool) -> None:
        self.f.write(ids.data)
        self.lengths.append(lengths)
        if self.open:
            docs = docs.copy()
            docs[0] += self.docs[-1][-1]
            self.docs[-1] = self.docs[-1][:-1]
        self.docs.append(docs)
        self.open = open_end
        self.stats += stats

    def finish(self, expected_docs: int, expected_sentences: int, jsonl: Path) -> dict:
        sentence_ends = np.cumsum(np.concatenate([np.zeros(0, np.int64), *self.lengths]), dtype=np.int64)
        doc_ends = np.cumsum(np.concatenate([np.zeros(0, np.int64), *self.docs]), dtype=np.int64)
        _, n_sentences, n_empty, n_unk, *literals = (int(v) for v in self.stats)
        if len(doc_ends) != expected_docs or n_sentences != expected_sentences:
            self.tokens.discard()
            raise DataPrepError(
                f"{jsonl}: lists {expected_docs} documents / {expected_sentences} sentences but the "
                f".txt holds {len(doc_ends)} / {n_sentences}; re-run stage=read"
            )
        self.tokens.commit()
        save_npy(self.base.with_name(self.base.name + ".sentences.npy"), sentence_ends)
        meta = {
            **self.meta,
            "documents": len(doc_ends),
            "sentences": len(sentence_ends),
            "tokens": int(sentence_ends[-1]) if len(sentence_ends) else 0,
            "unk_tokens": n_unk,
            "empty_sentences": n_empty,
            "special_token_literals": dict(zip(SPECIALS, literals, strict=True)),
        }
        write_json(self.base.with_name(self.base.name + ".json"), meta, indent=1)
        save_npy(self.base.with_name(self.base.name + ".docs.npy"), doc_ends)
        return meta


def _part_done(tdir: Path, k: int, meta: dict) -> dict | None:
    """The part's recorded counts if it is complete and was made from the same text with the same vocabulary."""
    info = tdir / f"part-{k:05d}.json"
    if not (tdir / f"part-{k:05d}.docs.npy").exists() or not info.exists():
        return None
    done = json.loads(info.read_text())
    return done if all(done.get(key) == value for key, value in meta.items()) else None


def _jsonl_counts(jsonl: Path) -> tuple[int, int]:
    docs = sentences = 0
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs += 1
                sentences += int(json.loads(line)["sentences"])
    return docs, sentences


def run_tokenize(cfg: PrepareConfig, report: Report) -> dict:
    """Tokenize every completed read-stage part into ``OUTDIR/work/tokens``; skip parts already done.

    Adds ``tokens``, ``unk_tokens``, ``sentences_tokenized`` (sentences kept in the store),
    ``empty_sentences`` (dropped: no tokens) and ``documents_tokenized`` to the report; returns them with
    ``parts`` (part names), ``parts_skipped`` (already complete) and ``vocab_sha256``.
    """
    outdir = task_dir(cfg)
    tok_path, vocab_path = outdir / "tokenizer.json", outdir / "vocab.txt"
    if not tok_path.is_file() or not vocab_path.is_file():
        raise DataPrepError(f"{tok_path}: not found; run stage=vocab first")
    tok = Tokenizer.from_file(str(tok_path))
    dtype, unk_id = token_dtype(tok.get_vocab_size()), tok.token_to_id("[UNK]")
    vocab_sha = sha256_file(vocab_path)
    parts = completed_parts(outdir, report)
    tdir = outdir / TOKENS_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".npy"):  # the parts may change below: the offsets must not outlive them
        (outdir / OFFSETS).with_suffix(suffix).unlink(missing_ok=True)
    keep = {f"part-{k:05d}" for k, _, _ in parts}
    for stale in tdir.glob("part-*"):  # parts whose text is gone (the read stage was re-run on other inputs)
        if stale.name[:10] not in keep:
            stale.unlink()

    totals = dict.fromkeys(("tokens", "unk_tokens", "sentences", "empty_sentences", "documents"), 0)
    literals = dict.fromkeys(SPECIALS, 0)
    todo, skipped, expected = [], [], {}
    for k, txt, jsonl in parts:
        meta = {
            "vocab_sha256": vocab_sha,
            "vocab_size": tok.get_vocab_size(),
            "dtype": dtype.name,
            "source_bytes": txt.stat().st_size,
            "encoding": ENCODING,
        }
        done = _part_done(tdir, k, meta)
        if done is not None:
            skipped.append(f"part-{k:05d}")
            for key in totals:
                totals[key] += done[key]
            for key in literals:
                literals[key] += done["special_token_literals"][key]
        else:
            todo.append((k, txt, jsonl, meta))
            expected[k] = (_jsonl_counts(jsonl), jsonl)
    if skipped:
        log.info("tokenize: %d part(s) already done with this vocabulary, skipped", len(skipped))

    workers = cfg.num_workers or os.cpu_count() or 1
    tasks = chain.from_iterable(_chunks(k, txt, CHUNK_BYTES) for k, txt, _, _ in todo)
    metas = {k: meta for k, _, _, meta in todo}
    bar = tqdm(
        total=sum(m["source_bytes"] for m in metas.values()),
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=not todo,
    )
    start, writers = time.perf_counter(), {}
    for k, last, ids, lengths, docs, stats, open_end in _map_ordered(tasks, workers, str(tok_path), dtype.name,
                                                                     unk_id):  # fmt: skip
        writer = writers.get(k) or writers.setdefault(k, _TokenPart(tdir, k, metas[k]))
        writer.add(ids, lengths, docs, stats, open_end)
        bar.update(stats[0])
        if last:
            (n_docs, n_sentences), jsonl = expected[k]
            done = writers.pop(k).finish(n_docs, n_sentences, jsonl)
            for key in totals:
                totals[key] += done[key]
            for key in literals:
                literals[key] += done["special_token_literals"][key]
            bar.set_postfix_str(f"{totals['tokens'] / (time.perf_counter() - start) / 1e3:.0f}k tok/s")
    bar.close()
    write_sentence_offsets(outdir)

    for key, name in (
        ("tokens", "tokens"),
        ("unk_tokens", "unk_tokens"),
        ("sentences", "sentences_tokenized"),
        ("empty_sentences", "empty_sentences"),
        ("documents", "documents_tokenized"),
    ):
        report.count(name, totals[key])
    report.count("special_token_literals", sum(literals.values()))
    for key, n in literals.items():
        if n:
            report.count(f"special_token_literals_{key}", n)
    rate = totals["unk_tokens"] / max(totals["tokens"], 1)
    if rate > cfg.unk_warning_rate:
        report.warn(
            f"[UNK] is {rate:.2%} of all tokens (over unk_warning_rate={cfg.unk_warning_rate}): the "
            f"vocabulary ({vocab_path}) does not fit this corpus; check that lowercase={cfg.lowercase} "
            "matches it (cased vs uncased) or train a vocabulary on this corpus (unset vocab)"
        )
    elapsed = time.perf_counter() - start
    log.info(
        "tokenize: %d tokens in %d sentences, %.2f%% [UNK], %d empty sentences dropped (%.1fs, %d workers)",
        totals["tokens"],
        totals["sentences"],
        100 * rate,
        totals["empty_sentences"],
        elapsed,
        workers,
    )
    return {
        **{("sentences_tokenized" if key == "sentences" else key): v for key, v in totals.items()},
        "parts": [f"part-{k:05d}" for k, _, _ in parts],
        "parts_skipped": skipped,
        "vocab_sha256": vocab_sha,
        "special_token_literals": literals,
    }


def _map_ordered(tasks: Iterator, workers: int, tokenizer_json: str, dtype: str, unk_id: int) -> Iterator[tuple]:
    """``_encode_chunk`` over ``tasks`` in order: in-process for one worker, else an ordered ``Pool.imap``."""
    if workers <= 1:
        saved = {key: os.environ.get(key) for key in _ENV}
        try:
            _init_worker(tokenizer_json, dtype, unk_id)
            yield from map(_encode_chunk, tasks)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return
    # Pool.imap feeds tasks as fast as it can read them: a semaphore keeps at most a few chunks in flight
    # so memory stays bounded. Spawned (not forked) workers: forking after the vocab stage's Rust threads
    # is what tokenizers warns about.
    window, stop = threading.Semaphore(4 * workers), threading.Event()

    def throttled() -> Iterator:
        for task in tasks:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield task

    main_file = getattr(sys.modules["__main__"], "__file__", None)  # spawn re-imports it: impossible for stdin
    ctx = mp.get_context("fork" if main_file and not os.path.exists(main_file) else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, dtype, unk_id)) as pool:
        try:
            try:  # a worker that cannot start is replaced forever by Pool: fail loudly instead of hanging
                pool.apply_async(os.getpid).get(timeout=STARTUP_TIMEOUT_S)
            except mp.TimeoutError:
                raise DataPrepError(
                    f"tokenize: {workers} worker processes did not start within "
                    f"{STARTUP_TIMEOUT_S}s (see the errors above); try num_workers=1"
                ) from None
            for result in pool.imap(_encode_chunk, throttled()):
                window.release()
                yield result
        finally:
            stop.set()


def _part_metas(tdir: Path) -> tuple[list[str], list[dict]]:
    names = sorted(p.name[: -len(".docs.npy")] for p in tdir.glob("part-*.docs.npy"))
    if not names:
        raise DataPrepError(f"{tdir}: no tokenized parts; run stage=tokenize first")
    return names, [json.loads((tdir / f"{n}.json").read_text()) for n in names]


def _sentence_offsets(tdir: Path, names: list[str], metas: list[dict], out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (``num_sentences + 1``) with every sentence's corpus-wide start offset, part after part."""
    out[0], s, base = 0, 1, 0
    for n, meta in zip(names, metas, strict=True):
        ends = np.load(tdir / f"{n}.sentences.npy", mmap_mode="r")
        np.add(ends, base, out=out[s : s + len(ends)])
        s, base = s + len(ends), base + int(meta["tokens"])
    return out


def _offsets_key(names: list[str], metas: list[dict]) -> list:
    return [[n, m["sentences"], m["tokens"], m["vocab_sha256"]] for n, m in zip(names, metas, strict=True)]


def write_sentence_offsets(outdir: Path) -> None:
    """``work/sentence_offsets.npy`` for the complete token store, written atomically, its key last."""
    tdir, path = outdir / TOKENS_DIR, outdir / OFFSETS
    names, metas = _part_metas(tdir)
    total = sum(int(m["sentences"]) for m in metas) + 1
    with atomic_path(path.with_suffix(".npy")) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(total,))  # page cache, not heap
        _sentence_offsets(tdir, names, metas, out).flush()
        del out
    write_json(path.with_suffix(".json"), {"parts": _offsets_key(names, metas)}, indent=None)


def _shared_offsets(outdir: Path, names: list[str], metas: list[dict]) -> np.ndarray | None:
    """The memory-mapped offsets when they were written for exactly these parts, else None."""
    path = outdir / OFFSETS
    try:
        if json.loads(path.with_suffix(".json").read_text())["parts"] != _offsets_key(names, metas):
            return None
        offsets = np.load(path.with_suffix(".npy"), mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    return offsets if len(offsets) == sum(int(m["sentences"]) for m in metas) + 1 else None


class TokenStore:
    """Read-only, corpus-wide view of the token store in ``OUTDIR/work/tokens`` (all parts, in order).

    Numbering is global: documents ``0..num_docs-1``, sentences ``0..num_sentences-1``, tokens
    ``0..num_tokens-1``, parts back to back. The two offset arrays describe everything without Python loops:

    - ``doc_offsets``: ``int64 [num_docs + 1]``; document ``d`` is sentences ``doc_offsets[d]:doc_offsets[d+1]``
      (possibly none: its sentences were all empty);
    - ``sentence_offsets``: ``int64 [num_sentences + 1]``; sentence ``s`` is tokens
      ``sentence_offsets[s]:sentence_offsets[s+1]`` (never empty).

    So ``np.diff(sentence_offsets)`` are the sentence lengths, and ``doc_num_tokens_all()`` every document's
    token count. Token ids come from ``tokens(start, end)`` (a zero-copy memmap slice when the range lies in
    one part, which every range inside a document does), ``sentence_tokens(s)`` or ``sentences_tokens(s0, s1)``.
    """

    def __init__(self, outdir: str | os.PathLike):
        tdir = Path(outdir) / TOKENS_DIR
        names, metas = _part_metas(tdir)
        if len({m["vocab_sha256"] for m in metas}) > 1:
            raise DataPrepError(f"{tdir}: parts were tokenized with different vocabularies; re-run stage=tokenize")
        self.part_names, self.vocab_sha256 = names, metas[0]["vocab_sha256"]
        self.vocab_size, self.dtype = metas[0]["vocab_size"], np.dtype(metas[0]["dtype"])
        self.parts: list[np.ndarray] = []
        doc_ends, sent_base = [], 0
        for n, meta in zip(names, metas, strict=True):
            bin_path = tdir / f"{n}.tokens.bin"
            size = bin_path.stat().st_size  # np.memmap refuses empty files
            self.parts.append(np.memmap(bin_path, self.dtype, mode="r") if size else np.zeros(0, self.dtype))
            doc_ends.append(np.load(tdir / f"{n}.docs.npy") + sent_base)
            sent_base += int(meta["sentences"])
        self.part_token_offsets = np.cumsum([0] + [len(t) for t in self.parts], dtype=np.int64)
        self.doc_offsets: np.ndarray = np.concatenate([np.zeros(1, np.int64), *doc_ends])
        self.sentence_offsets: np.ndarray = _shared_offsets(Path(outdir), names, metas)
        if self.sentence_offsets is None:  # written by the tokenize stage; without it, built here (in memory)
            self.sentence_offsets = _sentence_offsets(tdir, names, metas, np.empty(sent_base + 1, np.int64))

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sentence_offsets[-1])

    def doc_sentences(self, d: int) -> tuple[int, int]:
        """Global sentence range ``[start, end)`` of document ``d``."""
        return int(self.doc_offsets[d]), int(self.doc_offsets[d + 1])

    def doc_num_tokens(self, d: int) -> int:
        s0, s1 = self.doc_sentences(d)
        return int(self.sentence_offsets[s1] - self.sentence_offsets[s0])

    def doc_num_tokens_all(self) -> np.ndarray:
        """``int64 [num_docs]``: tokens in each document (vectorised)."""
        return np.diff(self.sentence_offsets[self.doc_offsets])

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids ``[start, end)`` in global token numbering (store dtype; a view when within one part)."""
        p = int(np.searchsorted(self.part_token_offsets, start, side="right")) - 1
        base, stop = int(self.part_token_offsets[p]), int(self.part_token_offsets[min(p + 1, len(self.parts))])
        if end <= stop:
            return self.parts[p][start - base : end - base]
        return np.concatenate([self.parts[p][start - base :], self.tokens(stop, end)])

    def sentence_tokens(self, s: int) -> np.ndarray:
        return self.tokens(int(self.sentence_offsets[s]), int(self.sentence_offsets[s + 1]))

    def sentences_tokens(self, s0: int, s1: int) -> np.ndarray:
        """Token ids of sentences ``s0..s1-1`` back to back."""
        return self.tokens(int(self.sentence_offsets[s0]), int(self.sentence_offsets[s1]))
