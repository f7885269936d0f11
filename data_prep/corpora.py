"""Corpus readers: input specs, kind detection and streaming iteration over raw documents.

Readers only decode and split inputs into documents (``RawDoc``); cleaning and sentence splitting run in
worker processes (``sentences.py``). User data problems are skipped and recorded in the ``Report`` (an
error with ``strict=true``), never a traceback.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib
import inspect
import io
import itertools
import json
import pkgutil
import re
import sys
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_prep.config import PrepareConfig
from data_prep.encodings import EncodingError, as_utf8
from data_prep.errors import DataPrepError
from data_prep.report import Report
from data_prep.sentences import RawDoc, is_gutenberg

__all__ = ["InputSpec", "RawDoc", "Unit", "parse_input", "expand_units", "iter_unit_documents"]

# Kinds a prefix can force on a path, and the file names each kind reads (directories are searched for them).
EXTENSIONS = {
    "wiki": (".xml", ".xml.bz2"),
    "text": (".txt", ".txt.gz", ".txt.bz2"),
    "books": (".txt", ".txt.gz", ".txt.bz2"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.bz2"),
    "parquet": (".parquet",),
    "arrow": (),
}
DETECT_ORDER = ("wiki", "text", "jsonl", "parquet")
STREAM_ERRORS = (EOFError, OSError, zlib.error)
HEAD_BYTES = 1 << 20  # sample read to detect Gutenberg books and the one-sentence-per-line format


@dataclass(frozen=True)
class InputSpec:
    kind: str  # wiki, books, text, jsonl, parquet, arrow, hf, builtin
    path_or_name: str
    config: str | None = None  # hub dataset config (hf only)


@dataclass(frozen=True)
class Unit:
    """One unit of reading work (a file, an arrow folder, a hub dataset, the builtin corpus): one part file."""

    spec: InputSpec
    path: str | None  # None for hf/builtin

    @property
    def name(self) -> str:
        if self.path is not None:
            return self.path
        s = self.spec
        return f"{s.kind}:{s.path_or_name}" + (f":{s.config}" if s.config else "")


def parse_input(spec: str) -> InputSpec:
    """``hf:NAME[:CONFIG]``, ``builtin:pydocs``, ``KIND:PATH`` or a PATH whose kind is detected from its name."""
    spec = str(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "hf":
        name, _, config = rest.partition(":")
        if not name:
            raise DataPrepError(f"input {spec!r}: missing dataset name; write hf:NAME or hf:NAME:CONFIG")
        return InputSpec("hf", name, config or None)
    if sep and prefix == "builtin":
        if rest != "pydocs":
            raise DataPrepError(f"input {spec!r}: unknown builtin corpus; the only one is builtin:pydocs")
        return InputSpec("builtin", "pydocs")
    kind, path = (prefix, rest) if sep and prefix in EXTENSIONS else (None, spec)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataPrepError(f"input not found: {path} (check the path in inputs=[...], relative to the working dir)")
    if kind is None:
        kind = _detect_kind(p)
    if kind == "arrow" and not p.is_dir():
        raise DataPrepError(f"{p}: arrow:PATH must be a folder written by datasets' save_to_disk")
    return InputSpec(kind, str(p))


def _detect_kind(p: Path) -> str:
    if p.is_dir():
        return "arrow" if (p / "state.json").exists() or (p / "dataset_dict.json").exists() else "text"
    name = p.name.lower()
    for kind in DETECT_ORDER:
        if name.endswith(EXTENSIONS[kind]):
            return kind
    raise DataPrepError(
        f"{p}: cannot tell the kind of input from its name; force one with a prefix, e.g. text:{p} "
        "(wiki:, books:, text:, jsonl:, parquet:, arrow:)"
    )


def expand_units(spec: InputSpec | str) -> list[Unit]:
    """The units of one input: a directory becomes its matching files (recursively, sorted)."""
    spec = parse_input(spec) if isinstance(spec, str) else spec
    if spec.kind in ("hf", "builtin"):
        return [Unit(spec, None)]
    p = Path(spec.path_or_name)
    if not p.is_dir() or spec.kind == "arrow":
        return [Unit(spec, str(p))]
    exts = EXTENSIONS[spec.kind]
    files = sorted(
        (f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(exts)), key=lambda f: f.as_posix()
    )
    if not files:
        raise DataPrepError(f"{p}: no input files ({', '.join('*' + e for e in exts)}) in this directory")
    return [Unit(spec, str(f)) for f in files]


def input_files(unit: Unit) -> list[Path]:
    """Files a unit reads (for checksums and byte counts); none for hub and builtin corpora."""
    if unit.path is None:
        return []
    p = Path(unit.path)
    return sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.as_posix()) if p.is_dir() else [p]


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file for streaming reads, decompressing ``.gz``/``.bz2`` on the fly."""
    name = str(path).lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def iter_unit_documents(unit: Unit, cfg: PrepareConfig, report: Report, hf_loader: Callable | None = None):
    kind = unit.spec.kind
    if kind == "builtin":
        yield from _read_pydocs()
        return
    if kind == "hf":
        yield from _read_hf(unit, cfg, report, hf_loader)
        return
    readers = {"wiki": _read_wiki, "text": _read_text, "books": _read_text, "jsonl": _read_jsonl}
    readers.update(parquet=_read_parquet, arrow=_read_arrow)
    n = 0
    try:
        for doc in readers[kind](unit, cfg, report):
            n += 1
            yield doc
    except EncodingError as e:
        report.skip("file", unit.name, str(e), f"after {n} documents")
    except STREAM_ERRORS:
        compressed = unit.name.lower().endswith((".gz", ".bz2"))
        what = "truncated or corrupt compressed stream" if compressed else "read error"
        report.skip("file", unit.name, what, f"after {n} documents")
    except ET.ParseError as e:
        report.skip("file", unit.name, "malformed XML", f"after {n} documents, line {e.position[0]}")


def skip_document(report: Report, name: str, reason: str, detail: str = "") -> None:
    """A document a reader saw but cannot use: counted as read too, so that documents_read = documents_written +
    documents_skipped holds whichever step (reader or cleaner) skipped it."""
    report.count("documents_read")
    report.skip("document", name, reason, detail)


# ------------------------------------------------------------------------------------------------- wiki

# Disambiguation and set-index templates ({{disambiguation}}, {{dab}}, {{hndis}}, {{school disambiguation}}...);
# the name must end at '|' or '}}' so inline maintenance tags such as {{disambiguation needed}} do not match.
_DISAMBIG = re.compile(
    r"\{\{\s*(?:[\w ]+ )?(?:disambiguation|disambig|disamb|dab|hndis|geodis|numberdis|set index article|sia|"
    r"shipindex|mountainindex|roadindex|surname|given name)\s*(?:\|[^{}]*)?\}\}",
    re.I,
)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _Read1:
    """``read`` as ``read1``: one decompression step per call, so when a stream is cut short the pages decoded
    before the cut reach the parser (a buffered ``read(n)`` would drop them with the error)."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read1(n) if hasattr(self.f, "read1") else self.f.read(n)


def _read_wiki(unit: Unit, cfg: PrepareConfig, report: Report) -> Iterator[RawDoc]:
    """Articles of a MediaWiki XML export, streamed with iterparse; elements are cleared as they go."""
    with open_binary(unit.path) as f:
        context = ET.iterparse(_Read1(f), events=("start", "end"))
        _, root = next(context)
        for event, elem in context:
            if event != "end" or _local(elem.tag) != "page":
                continue
            fields, redirect = {}, False
            for child in elem:
                tag = _local(child.tag)
                if tag == "redirect":
                    redirect = True
                elif tag == "revision":
                    text = next((c for c in child if _local(c.tag) == "text"), None)
                    fields["text"] = (text.text or "") if text is not None else ""
                else:
                    fields[tag] = child.text or ""
            root.clear()  # the page is copied out: free it (and its siblings) so memory stays flat
            text, title = fields.get("text", ""), fields.get("title", "")
            if fields.get("ns", "0").strip() != "0":
                report.count("wiki_non_article_dropped")
            elif redirect or text.lstrip()[:9].upper() == "#REDIRECT":
                report.count("wiki_redirects_dropped")
            elif title.endswith("(disambiguation)") or _DISAMBIG.search(text):
                report.count("wiki_disambiguation_dropped")
            else:
                yield RawDoc(unit.name, fields.get("id", title).strip(), "wiki", text)


# ------------------------------------------------------------------------------------------------- text


def looks_like_sentence_per_line(sample: str) -> bool:
    """BERT's format: one sentence per line, blank lines between documents (so blocks of many lines that
    mostly end in sentence punctuation), unlike hard-wrapped prose or one-paragraph-per-line text."""
    lines = sample.splitlines()[:-1] or sample.splitlines()  # the sample's last line may be cut
    nonblank = [ln.strip() for ln in lines if ln.strip()]
    n_blocks = sum(1 for a, b in itertools.pairwise([""] + lines) if not a.strip() and b.strip())
    if len(nonblank) < 4 or n_blocks == 0:
        return False
    ends = sum(ln.endswith((".", "!", "?", '"', "'", "”", "’", ")")) for ln in nonblank)
    return ends >= 0.8 * len(nonblank) and len(nonblank) / n_blocks >= 3


def _decode(data: bytes, name: str, report: Report, what: str = "file", offset: int = 0) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(what, name, "not valid UTF-8", f"byte offset {offset + e.start}")
        return None


def _read_text(unit: Unit, cfg: PrepareConfig, report: Report) -> Iterator[RawDoc]:
    path = Path(unit.path)
    with open_binary(path) as raw:
        f = as_utf8(raw)
        head = f.read(HEAD_BYTES)
        bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        if not head[bom:].strip():
            report.skip("file", unit.name, "empty file")
            return
        sample = head[bom:].decode("utf-8", "ignore")  # detection only; the real decode below is strict
        book = unit.spec.kind == "books" or is_gutenberg(sample)
        mode = "file" if book else cfg.text_documents
        if mode == "auto":
            mode = "blank_line" if looks_like_sentence_per_line(sample) else "file"
        if mode == "file":
            text = _decode(head[bom:] + f.read(), unit.name, report, offset=bom)
            if text is not None:
                yield RawDoc(unit.name, path.name, "books" if book else "text", text)
            return
        yield from _blank_line_documents(unit, head + f.readline(), f, bom, report)


def _blank_line_documents(unit: Unit, head: bytes, rest: BinaryIO, bom: int, report: Report) -> Iterator[RawDoc]:
    """Blank-line separated documents, streamed line by line (a document with invalid UTF-8 is skipped)."""
    lines: list[str] = []
    offset, start_line, bad = bom, 1, None
    for lineno, raw in enumerate(itertools.chain(io.BytesIO(head[bom:]), rest), 1):
        if raw.strip():
            if not lines and bad is None:
                start_line = lineno
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad = bad if bad is not None else offset + e.start
        elif lines or bad is not None:
            yield from _finish_block(unit, lines, start_line, bad, report)
            lines, bad = [], None
        offset += len(raw)
    yield from _finish_block(unit, lines, start_line, bad, report)


def _finish_block(unit: Unit, lines: list[str], start_line: int, bad: int | None, report: Report):
    if bad is not None:
        skip_document(report, f"{unit.name}:{start_line}", "not valid UTF-8", f"byte offset {bad}")
    elif lines:
        yield RawDoc(unit.name, f"line{start_line}", "text", "".join(lines))


# ------------------------------------------------------------------------------------- records (jsonl...)


def _read_jsonl(unit: Unit, cfg: PrepareConfig, report: Report) -> Iterator[RawDoc]:
    field = cfg.text_field
    with open_binary(unit.path) as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                skip_document(report, unit.name, "bad JSON", f"line {lineno}")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skip_document(report, unit.name, f"no text field '{field}'", f"line {lineno}")
                continue
            yield RawDoc(unit.name, str(record.get("id", f"line{lineno}")), "jsonl", text)


def iter_records(records: Iterable[dict], source: str, kind: str, field: str, report: Report) -> Iterator[RawDoc]:
    """Documents of dict records (parquet rows, ``datasets`` examples); a dataset without the field is skipped."""
    for i, record in enumerate(records):
        text = record.get(field)
        if i == 0 and field not in record:
            columns = ", ".join(sorted(record))
            report.skip("file", source, f"no text field '{field}' (set text_field=...)", f"fields: {columns}")
            return
        if not isinstance(text, str):
            skip_document(report, source, f"text field '{field}' is not a string", f"record {i}")
            continue
        doc_id = record.get("id")
        yield RawDoc(source, str(doc_id) if doc_id is not None else str(i), kind, text)


def _read_parquet(unit: Unit, cfg: PrepareConfig, report: Report) -> Iterator[RawDoc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
    except (pa.ArrowException, OSError) as e:
        report.skip("file", unit.name, "not a readable parquet file", type(e).__name__)
        return
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        report.skip("file", unit.name, f"no text column '{cfg.text_field}'", f"columns: {', '.join(names)}")
        return
    columns = [cfg.text_field] + (["id"] if "id" in names else [])
    rows = (row for batch in pf.iter_batches(batch_size=1024, columns=columns) for row in batch.to_pylist())
    yield from iter_records(rows, unit.name, "parquet", cfg.text_field, report)


def _read_arrow(unit: Unit, cfg: PrepareConfig, report: Report) -> Iterator[RawDoc]:
    import datasets

    try:
        ds = datasets.load_from_disk(unit.path)
    except (FileNotFoundError, ValueError, OSError) as e:
        report.skip("file", unit.name, "not a dataset saved with save_to_disk", type(e).__name__)
        return
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise DataPrepError(f"{unit.name}: no split '{cfg.hf_split}' (splits: {', '.join(ds)}); set hf_split=...")
        ds = ds[cfg.hf_split]
    ds = ds.select_columns([c for c in (cfg.text_field, "id") if c in ds.column_names] or ds.column_names[:1])
    yield from iter_records(ds, unit.name, "arrow", cfg.text_field, report)


def _read_hf(unit: Unit, cfg: PrepareConfig, report: Report, loader: Callable | None) -> Iterator[RawDoc]:
    """A hub dataset, streamed (``loader`` defaults to ``datasets.load_dataset``; tests pass a local one)."""
    spec = unit.spec
    if loader is None:
        import datasets

        loader = datasets.load_dataset
    n = 0
    try:
        ds = loader(spec.path_or_name, spec.config, split=cfg.hf_split, streaming=True)
        for doc in iter_records(ds, unit.name, "hf", cfg.text_field, report):
            n += 1
            yield doc
    except DataPrepError:
        raise
    except Exception as e:  # network, auth, unknown name/config/split: the user's to fix
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataPrepError(
            f"{unit.name}: hub dataset failed after {n} documents ({type(e).__name__}: {first}); check the name, "
            "config, hf_split and network access, then re-run"
        ) from None


# ----------------------------------------------------------------------------------------------- pydocs

# Modules with side effects on import (browsers, printing, GUI, running tests, writing caches) or no prose.
PYDOCS_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "pydoc_data", "__hello__", "__phello__", "__main__", "readline", "rlcompleter", "distutils", "tests",
}  # fmt: skip


def _skipped_module(name: str) -> bool:
    return any(p in PYDOCS_SKIP or p.startswith(("_test", "_xx", "xx")) for p in name.split("."))


def _quiet_import(name: str):
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):
            return None


def pydocs_modules() -> list[str]:
    """Importable standard-library modules and submodules, sorted (the order of the builtin corpus)."""
    names = set()
    for top in sorted(sys.stdlib_module_names):
        if _skipped_module(top) or (module := _quiet_import(top)) is None:
            continue
        names.add(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), top + ".", onerror=lambda _: None):
            if not _skipped_module(info.name) and _quiet_import(info.name) is not None:
                names.add(info.name)
    return sorted(names)


def module_docstrings(module) -> str:
    """Docstrings of a module and of the classes, functions and methods it defines, blank-line separated."""
    docs = [module.__doc__]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__)
            docs.extend(getattr(member, "__doc__", None) for _, member in sorted(vars(obj).items()) if callable(member)
                        or isinstance(member, (property, staticmethod, classmethod)))  # fmt: skip
        elif inspect.isroutine(obj):
            docs.append(obj.__doc__)
    return "\n\n".join(inspect.cleandoc(d) for d in docs if isinstance(d, str) and d.strip())


def _read_pydocs() -> Iterator[RawDoc]:
    """``builtin:pydocs``: one document per standard-library module, then one per pydoc help topic."""
    for name in pydocs_modules():
        module = sys.modules.get(name)
        text = module_docstrings(module) if module is not None else ""
        if text:
            yield RawDoc("builtin:pydocs", name, "pydocs", text)
    with contextlib.suppress(ImportError):
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield RawDoc("builtin:pydocs", f"topic:{key}", "pydocs", topics[key])
