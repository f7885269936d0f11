"""The read stage: every input of this task to sentence files under ``work/documents``.

Unit ``k`` (a file, an arrow folder, a hub dataset or the builtin corpus; numbered over all inputs, in the
order of ``inputs`` with directory files sorted) becomes, in ``task_dir(cfg)/work/documents``:

- ``part-{k:05d}.txt``: one sentence per line, exactly one blank line after each document, UTF-8;
- ``part-{k:05d}.meta.json``: ``{"unit", "kind", "inputs": [checksums], "report": Report.to_dict()}``, so a
  re-run that skips the part still reports its counts and skips;
- ``part-{k:05d}.docs.jsonl``: one line per written document, ``{"source", "id", "sentences", "chars"}``.

Each is written under ``NAME.tmp`` and renamed into place when the unit is complete, ``docs.jsonl`` last: it
is the completion marker, so an interrupted run leaves no part that looks complete and a re-run redoes only
incomplete parts. Cleaning and splitting run in a process pool with ordered ``imap``: the bytes written do
not depend on ``num_workers``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

from tqdm import tqdm

from data_prep.atomic import AtomicFile, write_text
from data_prep.config import PrepareConfig, task_dir
from data_prep.corpora import Unit, expand_units, input_files, iter_unit_documents, parse_input
from data_prep.errors import DataPrepError
from data_prep.procs import die_with_parent
from data_prep.report import Report
from data_prep.sentences import RawDoc, clean_document, split_sentences
from data_prep.store import sha256_file

BATCH_DOCS = 2048  # documents read ahead per batch (two batches in flight: one cleaned while the next is read)
# Characters per batch. Memory follows it (two batches of text in flight, plus their sentences): at 64 M a 50 MB
# corpus sat in memory whole and the peak grew with the corpus up to 200 MB. 8 M keeps both workers fed.
BATCH_CHARS = 8 << 20


def documents_dir(cfg: PrepareConfig) -> Path:
    return task_dir(cfg) / "work" / "documents"


def part_paths(directory: Path, k: int) -> dict[str, Path]:
    stem = f"part-{k:05d}"
    return {ext: directory / f"{stem}.{ext}" for ext in ("txt", "meta.json", "docs.jsonl")}


def _validate(cfg: PrepareConfig) -> None:
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise DataPrepError(f"task_index={cfg.task_index} must be in [0, num_tasks={cfg.num_tasks})")
    if cfg.text_documents not in ("auto", "file", "blank_line"):
        raise DataPrepError(f"text_documents={cfg.text_documents!r}: use auto, file or blank_line")
    if cfg.max_sentence_chars < 1:
        raise DataPrepError(f"max_sentence_chars={cfg.max_sentence_chars} must be at least 1")
    if not cfg.inputs:
        raise DataPrepError("inputs is empty: give at least one corpus, e.g. inputs=[builtin:pydocs]")


def plan_units(cfg: PrepareConfig) -> list[tuple[int, Unit]]:
    """(k, unit) pairs of this task: every unit of every input, then every num_tasks-th from task_index."""
    # An input named twice (or a file inside a folder also given) is read once: dict keeps first-seen order.
    units = dict.fromkeys(u for spec in cfg.inputs for u in expand_units(parse_input(spec)))
    return list(enumerate(units))[cfg.task_index :: cfg.num_tasks]


def checksums(unit: Unit) -> list[dict]:
    if unit.path is None:
        return [{"path": unit.name, "kind": unit.spec.kind, "bytes": None, "sha256": None}]
    return [
        {"path": str(f), "kind": unit.spec.kind, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in input_files(unit)
    ]


def _init_worker() -> None:
    die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def process_document(item: tuple[int, RawDoc | None], max_sentence_chars: int) -> tuple:
    """Worker: (k, raw) -> (k, source, id, kind, raw_chars, sentences, error); (k, None) marks a unit's end."""
    k, raw = item
    if raw is None:
        return (k, None)
    try:
        sentences = split_sentences(clean_document(raw), max_sentence_chars)
        return (k, raw.source, raw.doc_id, raw.kind, len(raw.text), sentences, None)
    except Exception as e:  # a document the cleaner cannot handle is skipped and recorded, not a crash
        return (k, raw.source, raw.doc_id, raw.kind, len(raw.text), [], f"cleaning failed ({type(e).__name__})")


def _batches(items: Iterable[tuple[int, RawDoc | None]]) -> Iterator[list]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[1].text) if item[1] is not None else 0
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _pipelined(pool, fn: Callable, items: Iterable, workers: int) -> Iterator:
    """Ordered results of ``fn`` over ``items``; batch i+1 is read while the pool cleans batch i, and at
    most two batches are in memory (``Pool.imap`` alone would read the whole input ahead)."""
    pending: Iterator | None = None
    for batch in _batches(items):
        chunksize = max(1, min(64, len(batch) // (4 * workers)))
        current = pool.imap(fn, batch, chunksize=chunksize) if pool is not None else map(fn, batch)
        if pending is not None:
            yield from pending
        pending = current
    if pending is not None:
        yield from pending


class _TextPart:
    """One unit's sentences (``.txt``) and document list (``docs.jsonl``), streamed under temporary names and
    committed in order with its ``meta.json``; ``docs.jsonl`` last: it is the completion marker."""

    def __init__(self, directory: Path, k: int, unit: Unit, inputs: list[dict]):
        self.paths, self.unit, self.inputs = part_paths(directory, k), unit, inputs
        for p in self.paths.values():  # an incomplete earlier attempt
            p.unlink(missing_ok=True)
        self.txt = AtomicFile(self.paths["txt"], "w", encoding="utf-8", newline="\n")
        self.docs = AtomicFile(self.paths["docs.jsonl"], "w", encoding="utf-8", newline="\n")

    def write(self, source: str, doc_id: str, sentences: list[str]) -> None:
        self.txt.f.write("\n".join(sentences) + "\n\n")
        chars = sum(len(s) for s in sentences)
        self.docs.f.write(json.dumps({"source": source, "id": doc_id, "sentences": len(sentences), "chars": chars},
                                     ensure_ascii=False) + "\n")  # fmt: skip

    def commit(self, report: Report) -> None:
        self.txt.commit()
        meta = {"unit": self.unit.name, "kind": self.unit.spec.kind, "inputs": self.inputs, "report": report.to_dict()}
        write_text(self.paths["meta.json"], json.dumps(meta, indent=1, ensure_ascii=False))
        self.docs.commit()  # last: the completion marker

    def abort(self) -> None:
        self.txt.discard()
        self.docs.discard()


def _completed(paths: dict[str, Path], unit: Unit, inputs: list[dict]) -> dict | None:
    """The meta of a complete part made from these very inputs, else None (the part is redone)."""
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        meta = json.loads(paths["meta.json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("unit") == unit.name and meta.get("inputs") == inputs else None


def run_read(cfg: PrepareConfig, report: Report, hf_loader: Callable | None = None) -> dict:
    """Read this task's inputs into sentence part files; returns ``{"inputs", "parts", "documents", ...}``."""
    _validate(cfg)
    planned = plan_units(cfg)
    if not planned:
        raise DataPrepError(f"task_index={cfg.task_index} has no input files: num_tasks={cfg.num_tasks} exceeds the "
                            "number of input files; use fewer tasks")  # fmt: skip
    out = documents_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {k: checksums(unit) for k, unit in planned}
    unit_reports: dict[int, Report] = {}
    todo = []
    for k, unit in planned:
        meta = _completed(part_paths(out, k), unit, inputs[k])
        if meta is None:
            todo.append((k, unit))
        else:
            unit_reports[k] = Report.from_dict(meta["report"])
    if unit_reports:
        report.warn(f"resuming: {len(unit_reports)} of {len(planned)} parts already complete in {out}")

    def feed() -> Iterator[tuple[int, RawDoc | None]]:
        for k, unit in todo:
            rep = unit_reports[k] = Report(strict=report.strict)
            rep._warned = report._warned  # keep the cap on printed skip warnings global
            for raw in iter_unit_documents(unit, cfg, rep, hf_loader):
                yield k, raw
            report._warned = rep._warned
            yield k, None

    workers = cfg.num_workers or os.cpu_count() or 1
    units_by_k = dict(planned)
    pool = multiprocessing.Pool(workers, initializer=_init_worker) if workers > 1 and todo else None
    bar = tqdm(desc="read", unit="doc", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    writer: _TextPart | None = None
    start, chars_in = time.monotonic(), 0
    try:
        fn = partial(process_document, max_sentence_chars=cfg.max_sentence_chars)
        for result in _pipelined(pool, fn, feed(), workers):
            k = result[0]
            if writer is None:
                writer = _TextPart(out, k, units_by_k[k], inputs[k])
            if result[1] is None:  # the unit's end: commit its part
                rep = unit_reports[k]
                rep.count("input_bytes", sum(i["bytes"] or 0 for i in inputs[k]))
                writer.commit(rep)
                writer = None
                continue
            _, source, doc_id, kind, raw_chars, sentences, error = result
            rep = unit_reports[k]
            rep.count("documents_read")
            if units_by_k[k].path is None:
                rep.count("input_bytes", raw_chars)
            chars_in += raw_chars
            bar.update(1)
            if bar.n % 256 == 0:
                bar.set_postfix_str(f"{chars_in / 1e6 / max(time.monotonic() - start, 1e-9):.1f} MB/s", refresh=False)
            if error or not sentences:
                rep.skip("document", f"{source}#{doc_id}", error or "no text after cleaning")
                continue
            writer.write(source, doc_id, sentences)
            rep.count("documents_written")
            rep.count(f"documents_{kind}")
            rep.count("sentences", len(sentences))
            rep.count("characters", sum(len(s) for s in sentences))
            rep.count("documents_single_sentence", len(sentences) == 1)
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()
            pool.join()

    totals: Counter = Counter()
    for k, _ in planned:
        report.merge(unit_reports[k])
        totals.update(unit_reports[k].counts)
    _preflight(cfg, report, totals)
    parts = [part_paths(out, k)["txt"].name for k, _ in planned]
    return {
        "task_dir": str(task_dir(cfg)),
        "documents_dir": str(out),
        "parts": parts,
        "inputs": [entry for k, _ in planned for entry in inputs[k]],
        "documents": totals["documents_written"],
        "sentences": totals["sentences"],
        "characters": totals["characters"],
    }


def _preflight(cfg: PrepareConfig, report: Report, totals: Counter) -> None:
    docs = totals["documents_written"]
    if docs == 0:
        reasons = "; ".join(f"{n} x {r}" for r, n in report.skipped_counts.most_common(3)) or "the inputs hold no text"
        raise DataPrepError(f"empty corpus: no document with text in inputs={list(cfg.inputs)} ({reasons})")
    if docs == 1:
        report.warn("the corpus is a single document: NotNext pairs need a second document; add more text")
    single = totals["documents_single_sentence"]
    if docs >= 10 and single > 0.5 * docs:
        report.warn(f"{single} of {docs} documents are a single sentence: the input likely has a blank line after "
                    "every sentence; set text_documents=file")  # fmt: skip
