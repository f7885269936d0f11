"""Task data for fine-tuning: read tables, map labels, encode texts into model inputs, and map predictions back.

- ``read_table``: rows from ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet`` files (or a folder holding
  ``<split>.<ext>``), or a hub dataset through ``datasets``; ``read_conll`` reads NER text files.
- ``LabelMap`` (classes, declared or inferred) and ``regression_targets`` (floats).
- ``encode_pairs`` (``[CLS] A [SEP] (B [SEP])``) returns one dict per row: model inputs as unpadded int64 arrays
  and labels; ``collate`` pads a batch of them into the arrays the model takes. NER and QA encoders, which also
  keep metadata to map predictions back to words and character spans, are in ``spans.py``; which encoder, labels
  and metrics a task uses is its kind's object (``kinds.py``).

Bad data raises ``TaskError``: one line naming the file (or dataset), the row or column, and what to do.
Special ids come from the vocabulary (``Specials``), never from a tokenizer's post-processor, so a tokenizer.json
with or without BERT's template encodes the same way.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.vocab import SPECIAL_TOKENS, special_ids

IGNORE = -100  # label of pieces the loss skips (continuation pieces, specials, padding): torch's ignore_index
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
CONLL_SUFFIXES = (".txt", ".conll")  # NER text files (word TAB tag per line), read by read_conll
# Hub datasets whose "NAME/CONFIG" means a config of a canonical dataset rather than an "owner/name" repo.
CONFIG_DATASETS = frozenset({"glue", "super_glue", "xtreme", "tweet_eval", "blimp", "xnli", "paws-x"})


class TaskError(ValueError):
    """Bad task data or settings; its message is one line naming the file, row or column and what to do."""


# ----------------------------------------------------------------------------------------------------- reading


def _missing_columns(where: str, columns: Sequence[str], available: Sequence[str]) -> None:
    for col in columns:
        if col not in available:
            raise TaskError(
                f"{where}: no column {col!r} (columns: {', '.join(map(str, available))}); "
                "set the task's column names to match"
            )


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    # GLUE's .tsv files hold bare quotes inside sentences: quotes are text there, not CSV quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        rows, _ = [], reader.fieldnames
        last = reader.line_num
        for i, row in enumerate(reader, 1):
            if reader.line_num > last + 1:  # a quoted field ran over line breaks: an unclosed quote, usually
                raise TaskError(
                    f"{path}: line {last + 1}: a quoted field runs on to line {reader.line_num} (an unclosed "
                    "quote?); close the quote on its line, or take the line breaks out of the field"
                )
            last = reader.line_num
            if None in row or None in row.values():  # extra fields land under key None, missing ones as None
                n = len([v for k, v in row.items() if k is not None and v is not None]) + len(row.get(None) or [])
                raise TaskError(
                    f"{path}: row {i} (line {reader.line_num}) has {n} fields, the header {len(reader.fieldnames)}"
                )
            rows.append(row)
    return rows


def _squad_rows(doc: dict) -> list[dict[str, Any]]:
    """The official SQuAD JSON (data -> paragraphs -> qas) flattened to one row per question, as the hub has it."""
    rows = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                rows.append({
                    "id": qa.get("id"), "title": article.get("title"), "context": para["context"],
                    "question": qa["question"], "answers": {"text": [a["text"] for a in answers],
                                                            "answer_start": [a["answer_start"] for a in answers]},
                })  # fmt: skip
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":  # a whole JSON document (a list of rows, or SQuAD's), else JSON lines
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            return _squad_rows(doc)
        if isinstance(doc, (list, dict)):
            text = "\n".join(json.dumps(r) for r in (doc if isinstance(doc, list) else [doc]))
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: line {line_no} is not JSON ({e.msg}); one object per line expected") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}: line {line_no} is a {type(row).__name__}, not an object with named fields")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise TaskError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _hub_name(source: str) -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]``, ``glue/sst2`` (a config of a canonical dataset), ``owner/name[/CONFIG]`` or ``name``."""
    source = source.removeprefix("hf:")
    if ":" in source:
        name, config = source.split(":", 1)
        return name, config or None
    parts = source.split("/")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2]
    if len(parts) == 2 and parts[0] in CONFIG_DATASETS:
        return parts[0], parts[1]
    return source, None


def _read_hub(source: str, split: str | None, columns: Sequence[str]) -> list[dict[str, Any]]:
    name, config = _hub_name(source)
    if not split:
        raise TaskError(f"{source}: a hub dataset needs a split (train, validation, test)")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name/config/split: datasets raises many types, all mean "cannot load"
        raise TaskError(
            f"{source}: cannot load hub dataset {name!r} (config {config!r}, split {split!r}): "
            f"{(str(e).splitlines() or [type(e).__name__])[0]}; check the name, or give a local file"
        ) from None
    _missing_columns(f"{source} ({split})", columns, ds.column_names)
    if len(ds) == 0:
        raise TaskError(f"{source} ({split}): no rows")
    if columns:
        ds = ds.select_columns(list(columns))
    # Tag sequences (NER's ner_tags) become their names: entity metrics read the B-/I- prefixes. Single class
    # labels stay integers, so their order is the dataset's own (MRPC's positive class stays 1).
    inner = {c: getattr(f, "feature", None) for c, f in ds.features.items()}
    tag_names = {c: f.names for c, f in inner.items() if isinstance(f, datasets.ClassLabel)}
    rows = ds.to_list()
    for row in rows:
        for col, names in tag_names.items():
            row[col] = [names[t] for t in row[col]]
    return rows


def read_table(source: str, split: str | None = None, columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows (one dict per row, holding ``columns``; all columns when empty) of a table.

    ``source``: a ``.csv``/``.tsv`` (header row; values stay strings), ``.jsonl``, ``.json`` (JSON lines, a list
    of objects, or the official SQuAD file flattened to ``id, title, context, question, answers``) or
    ``.parquet`` file; a CoNLL text file (``.txt``/``.conll``, see ``read_conll``: columns ``tokens``, ``tags``); a
    folder holding ``<split>.<ext>``; or a hub dataset read with
    ``datasets.load_dataset(name, config, split=split)`` (``glue/sst2``, ``squad``, ``owner/name/config``,
    ``hf:name:config``). ClassLabel columns of hub datasets stay integers (``LabelMap`` orders them by value).
    Missing file, empty table, missing column, malformed row: ``TaskError``.
    """
    columns = list(columns)
    path = Path(source).expanduser()
    if path.is_dir():
        if not split:
            raise TaskError(f"{path}: a folder needs a split to pick the <split>.<ext> file in it")
        found = [path / f"{split}{s}" for s in TABLE_SUFFIXES + CONLL_SUFFIXES if (path / f"{split}{s}").is_file()]
        if not found:
            have = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise TaskError(f"{path}: no {split}.csv/.tsv/.jsonl/.json/.parquet/.txt in the folder (it holds {have})")
        path = found[0]
    suffix = path.suffix.lower()
    if (
        not path.exists()
        and suffix not in TABLE_SUFFIXES + CONLL_SUFFIXES
        and not str(source).startswith(("/", ".", "~"))
    ):
        return _read_hub(str(source), split, columns)
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    readers = {".csv": lambda p: _read_delimited(p, ","), ".tsv": lambda p: _read_delimited(p, "\t"),
               ".jsonl": _read_json, ".json": _read_json, ".parquet": _read_parquet,
               **dict.fromkeys(CONLL_SUFFIXES, read_conll)}  # fmt: skip
    if suffix not in readers:
        known = ", ".join(TABLE_SUFFIXES + CONLL_SUFFIXES)
        raise TaskError(f"{path}: unknown table format {suffix or '(none)'}; use one of {known}")
    try:
        rows = readers[suffix](path)
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except csv.Error as e:  # e.g. a field over csv's size limit, a NUL byte
        raise TaskError(f"{path}: unreadable CSV ({e})") from None
    if not rows:
        raise TaskError(f"{path}: no rows (the file is empty)")
    _missing_columns(str(path), columns, list(rows[0]))
    for i, row in enumerate(rows, 1):  # JSON lines may differ from row to row
        for col in columns:
            if col not in row:
                raise TaskError(f"{path}: row {i} has no field {col!r} (it has {', '.join(map(str, row))})")
    return [{c: r[c] for c in columns} for r in rows] if columns else rows


def read_conll(path: str | Path) -> list[dict[str, list[str]]]:
    """Sentences of a CoNLL-style text file as ``{"tokens": [...], "tags": [...]}`` rows.

    One word per line, its tag in the last field (``word<TAB>tag``, or CoNLL-2003's ``word POS chunk tag``), a
    blank line between sentences; ``-DOCSTART-`` lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    rows: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if not fields or not "".join(fields).strip():
                if tokens:
                    rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if fields[0] == "-DOCSTART-":
                continue
            if len(fields) < 2:
                raise TaskError(f"{path}: line {line_no} has no tag ({line.strip()!r}); expected word<TAB>tag")
            tokens.append(fields[0])
            tags.append(fields[-1].strip())
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    if not rows:
        raise TaskError(f"{path}: no sentences (the file is empty)")
    return rows


# ------------------------------------------------------------------------------------------------------ labels


def _label_key(value: Any) -> str:
    """One spelling per label: 1, 1.0 (parquet, pandas) and "1" (CSV) are the same class."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _as_int(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


@dataclass(frozen=True)
class LabelMap:
    """Class names in output-index order: ``labels[i]`` is what logit ``i`` predicts."""

    labels: tuple[str, ...]
    inferred: bool = False  # taken from the training data rather than declared (``task.labels``)

    def __post_init__(self) -> None:
        if not self.labels:
            raise TaskError("no labels: declare them or give training data with a label column")
        dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if dup:
            raise TaskError(f"labels {', '.join(dup)} declared more than once")

    @classmethod
    def declared(cls, labels: Iterable[Any]) -> LabelMap:
        """The labels a config declares, in its order."""
        return cls(tuple(_label_key(x) for x in labels))

    @classmethod
    def infer(cls, values: Iterable[Any]) -> LabelMap:
        """The distinct labels of the training data, sorted (by value where all are integers, so 2 < 10)."""
        keys = {_label_key(v) for v in values if v is not None}
        numeric = all(_as_int(k) is not None for k in keys)
        return cls(tuple(sorted(keys, key=lambda k: (_as_int(k), k) if numeric else (0, k))), inferred=True)

    @classmethod
    def build(cls, declared: Iterable[Any] | None, train_values: Iterable[Any]) -> LabelMap:
        """``declared`` when given (a config's list), else inferred from the training split's labels."""
        return cls.declared(declared) if declared is not None else cls.infer(train_values)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def index(self, value: Any, source: str, row: int) -> int:
        """Output index of ``value``; a label outside the map is a ``TaskError`` naming ``source`` and ``row``."""
        key = _label_key(value)
        try:
            return self.labels.index(key)
        except ValueError:
            shown = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            if self.inferred:  # only in validation (or prediction input): a class the model never saw
                raise TaskError(
                    f"{source}: row {row}: label {key!r} is not in the training data (whose labels are {shown}); "
                    "add training rows with it, declare task.labels, or fix the row"
                ) from None
            raise TaskError(
                f"{source}: row {row}: label {key!r} is not one of the declared labels ({shown}); "
                "fix the row or add the label"
            ) from None

    def encode(self, values: Sequence[Any], source: str) -> np.ndarray:
        """int64 ``[N]`` output indices of one label per row (rows numbered from 1 in errors)."""
        return np.array([self.index(v, source, i) for i, v in enumerate(values, 1)], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.labels[int(i)] for i in ids]


def regression_targets(values: Sequence[Any], source: str) -> np.ndarray:
    """float32 ``[N]`` targets (STS-B style); a value that is not a finite number is a ``TaskError``."""
    out = np.empty(len(values), dtype=np.float32)
    for i, v in enumerate(values):
        try:
            out[i] = x = float(v)
            ok = math.isfinite(x)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise TaskError(f"{source}: row {i + 1}: label {v!r} is not a number (regression needs float labels)")
    return out


# ---------------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Specials:
    """Ids of BERT's special tokens, taken from the vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_vocab(cls, vocab: Sequence[str], where: str = "vocabulary") -> Specials:
        """From a token list (``ModelSource.vocab``, ``read_vocab``); a missing special token is a ``TaskError``."""
        try:
            ids = special_ids(list(vocab), where)
        except DataPrepError as e:
            raise TaskError(str(e)) from None
        return cls(*(ids[SPECIAL_TOKENS[f"{k}_token"]] for k in ("pad", "unk", "cls", "sep", "mask")))


def _plain(tokenizer: Any) -> Any:
    """``tokenizer`` without truncation or padding (a tokenizer.json may enable them): lengths are ours to manage."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _text(value: Any, source: str, row: int, what: str = "text") -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (list, dict)):
        raise TaskError(f"{source}: row {row}: {what} is {'empty' if value is None else type(value).__name__}")
    return str(value)  # a number in a text column reads as its spelling


def _pair_lengths(la: int, lb: int, room: int) -> tuple[int, int]:
    """Lengths after longest-first truncation to ``room`` tokens, as ``tokenizers`` (HF's fast tokenizers) does:
    the shorter side is kept whole when the longer can give up the rest, else both get half (the originally longer,
    or the second on a tie, gets the odd token)."""
    if la + lb <= room:
        return la, lb
    short, long_ = sorted((la, lb))
    if short <= room - short:
        n_short, n_long = short, room - short
    else:
        n_short, n_long = room // 2, room - room // 2
    return (n_short, n_long) if la <= lb else (n_long, n_short)


def encode_pairs(
    tokenizer: Any,
    specials: Specials,
    texts: Sequence[Any],
    text_pairs: Sequence[Any] | None = None,
    max_length: int = 128,
    truncate: bool = True,
    labels: np.ndarray | None = None,
    source: str = "input",
) -> list[dict[str, Any]]:
    """One dict per row: ``input_ids`` ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` and ``token_type_ids``
    (0 up to the first [SEP], 1 after), int64 arrays of the row's own length ``<= max_length``; ``labels`` (a
    scalar from ``labels[i]``: int for classes, float for regression) when given.

    Too long: ``truncate=True`` cuts longest-first (pairs) or the end (single texts); ``truncate=False`` raises a
    ``TaskError`` naming ``source``, the row and its length."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
    n_special = 2 if text_pairs is None else 3
    room = max_length - n_special
    if room < 1:
        raise TaskError(f"max_length={max_length} leaves no room for text beside {n_special} special tokens")
    labels = None if labels is None else np.asarray(labels)
    tok = _plain(tokenizer)
    texts = [_text(t, source, i) for i, t in enumerate(texts, 1)]
    first = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    second = None
    if text_pairs is not None:
        pairs = [_text(t, source, i, "second text") for i, t in enumerate(text_pairs, 1)]
        second = [e.ids for e in tok.encode_batch(pairs, add_special_tokens=False)]
    rows = []
    for i, a in enumerate(first):
        b = second[i] if second is not None else []
        if len(a) + len(b) > room:
            if not truncate:
                raise TaskError(
                    f"{source}: row {i + 1}: {len(a) + len(b) + n_special} tokens with [CLS]/[SEP], more than "
                    f"max_length={max_length}; shorten it, raise the length or turn truncation on"
                )
            na, nb = _pair_lengths(len(a), len(b), room) if second is not None else (room, 0)
            a, b = a[:na], b[:nb]
        ids = [specials.cls, *a, specials.sep] + ([*b, specials.sep] if second is not None else [])
        row: dict[str, Any] = {
            "input_ids": np.array(ids, dtype=np.int64),
            "token_type_ids": np.array([0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2), dtype=np.int64),
        }
        if labels is not None:
            row["labels"] = labels[i].item()
        rows.append(row)
    return rows


MODEL_KEYS = ("input_ids", "token_type_ids")
LABEL_KEYS = ("labels", "start_positions", "end_positions")


def collate(
    rows: Sequence[dict[str, Any]], pad_id: int, with_labels: bool = True, pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray]:
    """Pad a batch of encoded rows into the model's keyword arguments (numpy; ``torch.from_numpy`` each).

    Returns ``input_ids`` ``[B, L]`` (``pad_id`` after each row), ``token_type_ids`` ``[B, L]`` (0),
    ``attention_mask`` ``[B, L]`` (1 on real tokens), all int64, L the longest row (rounded up to
    ``pad_to_multiple_of``); with ``with_labels`` the label keys the rows carry: ``labels`` ``[B]`` int64 (classes)
    or float32 (regression) or ``[B, L]`` int64 padded with -100 (NER), ``start_positions``/``end_positions``
    ``[B]`` int64 (QA). Metadata (``word_ids``, ``offsets``, ``example_index``...) stays out."""
    lengths = np.array([len(r["input_ids"]) for r in rows])
    width = int(lengths.max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, np.ndarray] = {}
    for key in MODEL_KEYS + (LABEL_KEYS if with_labels else ()):
        have = [key in r for r in rows]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(f"collate: {key!r} is in some rows of the batch but not in others")
        if isinstance(rows[0][key], np.ndarray):
            fill = pad_id if key == "input_ids" else IGNORE if key == "labels" else 0
            arr = np.full((len(rows), width), fill, dtype=np.int64)
            for i, r in enumerate(rows):
                arr[i, : len(r[key])] = r[key]
        else:
            arr = np.array([r[key] for r in rows])
            arr = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int64)
        out[key] = arr
    out["attention_mask"] = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return out
