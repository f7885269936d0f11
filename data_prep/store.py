"""On-disk shard format: memory-mapped token arrays with an index, written atomically.

A split (``train`` or ``validation``) is a folder of shards. Shard ``NAME`` is two files:

- ``NAME.tokens.npy``: every sample's token ids back to back, ``uint16`` when the vocabulary has at most
  65,536 entries, else ``uint32``. Samples already hold ``[CLS] A [SEP] B [SEP]`` (BERT mode) or packed
  sentences (RoBERTa mode); no padding, no masking (masking is dynamic, at load time).
- ``NAME.index.npy``: ``int64 [num_samples, 6]``, one row per sample, columns ``INDEX_COLUMNS``:
  ``offset`` and ``length`` into the token array; ``a_len``, the number of tokens with token type 0
  (``[CLS] A [SEP]``; equal to ``length`` in RoBERTa mode); ``nsp_label`` (0 IsNext, 1 NotNext, as in
  Hugging Face's ``next_sentence_label``; -1 in RoBERTa mode); ``doc_a`` and ``doc_b``, the corpus-wide
  document indices segments A and B came from (provenance for inspection and tests; -1 where unused).

Both files are plain ``.npy`` so ``np.load(..., mmap_mode="r")`` opens them without reading them: a split
never has to fit in RAM. A shard is written under a temporary name and renamed into place only when
complete, tokens first and index last, so a reader never sees a half-written shard as complete.

``manifest.json`` lists every shard with its sample and token counts and the sha256 of both files;
``verify_data`` checks a data directory against it (``ShardError``, one line naming the file, when it does not
hold), and opening a shard (``Shard``) fails the same way on a truncated or corrupt file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_prep.atomic import save_npy

if TYPE_CHECKING:
    from data_prep.manifest import Manifest

INDEX_COLUMNS = ("offset", "length", "a_len", "nsp_label", "doc_a", "doc_b")
OFFSET, LENGTH, A_LEN, NSP_LABEL, DOC_A, DOC_B = range(len(INDEX_COLUMNS))
SUFFIXES = (".tokens.npy", ".index.npy")
SPLITS = ("train", "validation")
TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))
REDO = "re-run data preparation (launch/prepare_data.py, same settings) or restore the file from a backup"


class ShardError(ValueError):
    """A shard file is missing, truncated, corrupt, unlisted or disagrees with ``manifest.json``; the message is
    one line naming the file, what is wrong and what to do."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size`` entries."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(split_dir: str | os.PathLike, name: str, tokens: np.ndarray, index: np.ndarray) -> dict:
    """Write one shard atomically and return its manifest entry (name, samples, tokens, sha256 of both files)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    if index.ndim != 2 or index.shape[1] != len(INDEX_COLUMNS):
        raise ValueError(f"shard index must be int64 [n, {len(INDEX_COLUMNS)}], got {index.shape}")
    tokens_path, index_path = split_dir / f"{name}.tokens.npy", split_dir / f"{name}.index.npy"
    # The index is the commit marker: it is renamed last, so a shard with an index has complete tokens.
    index_path.unlink(missing_ok=True)
    save_npy(tokens_path, np.ascontiguousarray(tokens))
    save_npy(index_path, np.ascontiguousarray(index, dtype=np.int64))
    return {
        "name": name,
        "samples": int(index.shape[0]),
        "tokens": int(tokens.shape[0]),
        "sha256": {"tokens": sha256_file(tokens_path), "index": sha256_file(index_path)},
    }


def shard_complete(split_dir: str | os.PathLike, name: str) -> bool:
    split_dir = Path(split_dir)
    return (split_dir / f"{name}.index.npy").exists() and (split_dir / f"{name}.tokens.npy").exists()


@dataclass
class Sample:
    input_ids: np.ndarray  # [length] int64
    token_type_ids: np.ndarray  # [length] int64, 0 for [CLS] A [SEP], 1 for B [SEP]
    nsp_label: int  # 0 IsNext, 1 NotNext, -1 none (RoBERTa mode)
    doc_a: int
    doc_b: int


def load_npy(path: Path) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``, with ``ShardError`` naming the file where numpy's own error would not
    (a truncated file gives "mmap length is greater than file size"; a grown one no error at all)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0  # fmt: skip
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except FileNotFoundError:
        raise ShardError(f"{path}: file missing; {REDO}") from None
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        why = str(e).splitlines()[0][:100].encode("ascii", "backslashreplace").decode() if str(e).strip() else \
            type(e).__name__  # fmt: skip
        raise ShardError(f"{path}: not a readable .npy file ({why}): truncated or corrupt; {REDO}") from None
    size = path.stat().st_size
    if size != expected:  # np.load ignores trailing bytes: a file that grew is as suspect as one that shrank
        what = "truncated" if size < expected else "corrupt"
        raise ShardError(f"{path}: {size} bytes where its header implies {expected}: {what}; {REDO}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # changed under our feet, or an object array
        raise ShardError(f"{path}: not a readable .npy file ({str(e)[:100]}): truncated or corrupt; {REDO}") from None


def open_shard(split_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one shard's (tokens, index) and check what costs nothing: headers, sizes, dtypes, shapes."""
    tokens_path, index_path = (split_dir / f"{name}{suffix}" for suffix in SUFFIXES)
    tokens, index = load_npy(tokens_path), load_npy(index_path)
    if tokens.ndim != 1 or tokens.dtype not in TOKEN_DTYPES:
        raise ShardError(f"{tokens_path}: holds {tokens.dtype} {list(tokens.shape)}, not 1-D uint16/uint32 token ids;"
                         f" {REDO}")  # fmt: skip
    if index.ndim != 2 or index.shape[1] != len(INDEX_COLUMNS) or index.dtype != np.dtype(np.int64):
        raise ShardError(f"{index_path}: holds {index.dtype} {list(index.shape)}, not int64 [n, {len(INDEX_COLUMNS)}];"
                         f" {REDO}")  # fmt: skip
    return tokens, index


def check_index(index_path: Path, index: np.ndarray, num_tokens: int) -> None:
    """Every row of a shard index is usable: its span lies inside the token array, its segment A length inside
    the span, its NSP label one of -1/0/1. Reads the whole index (48 bytes a sample), not the tokens."""
    rows = np.asarray(index)
    off, length, a_len, label = (rows[:, c] for c in (OFFSET, LENGTH, A_LEN, NSP_LABEL))
    bad = (off < 0) | (length < 1) | (off > num_tokens - length) | (a_len < 1) | (a_len > length)
    bad |= (label < -1) | (label > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ShardError(f"{index_path}: row {i} of {len(rows)} (offset {int(off[i])}, length {int(length[i])}, "
                         f"a_len {int(a_len[i])}, label {int(label[i])}) does not fit {num_tokens} tokens: corrupt; "
                         f"{REDO}")  # fmt: skip


def _names_on_disk(split_dir: Path) -> list[str]:
    names = {p.name[: -len(suffix)] for suffix in SUFFIXES for p in split_dir.glob(f"*{suffix}")}
    return sorted(names)


def _listed(splits: object, split: str, root: Path) -> list[dict]:
    """The manifest's shard entries of ``split`` (none when it does not list the split), checked for shape."""
    section = splits.get(split, {}) if isinstance(splits, dict) else None
    entries = section.get("shards", []) if isinstance(section, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                for e in entries):  # fmt: skip
        raise ShardError(f"{root / 'manifest.json'}: splits.{split}.shards is not a list of shard entries with a "
                         "name; re-run data preparation, or restore the manifest")  # fmt: skip
    return entries


def verify_data(
    data_dir: str | os.PathLike,
    manifest: Manifest | dict | None = None,
    checksums: bool = True,
    threads: int | None = None,
) -> dict:
    """Check the shards of ``data_dir`` against ``manifest`` (``data_prep.manifest``; a plain dict of
    ``manifest.json``'s content as well) before training.

    Always (cheap: headers and indexes only): both files of every shard present and readable, dtypes and
    shapes right, every index row inside its token array, and, when the manifest lists shards
    (``splits.SPLIT.shards``), the same shards on disk as listed with the listed sample and token counts.
    With ``checksums``, the sha256 of every file against the manifest as well (reads every byte; files hash
    in ``threads`` threads, hashlib releasing the GIL). A manifest without ``splits`` (hand-made test data)
    gets the structural checks only. Raises ``ShardError``; returns ``{"shards", "samples", "bytes_hashed",
    "seconds"}``.
    """
    start, root = time.perf_counter(), Path(data_dir)
    listed = manifest.get("splits") if isinstance(manifest, dict) else manifest.splits if manifest else None
    splits = sorted(set(SPLITS) | set(listed or {}), key=lambda s: (s not in SPLITS, s))
    shards, samples, to_hash = 0, {}, []
    for split in splits:
        split_dir = root / split
        on_disk = _names_on_disk(split_dir) if split_dir.is_dir() else []
        entries = _listed(listed, split, root) if listed is not None else None
        if entries is not None:
            names = [e["name"] for e in entries]
            if missing := sorted(set(names) - set(on_disk)):
                raise ShardError(f"{split_dir / missing[0]}.index.npy: listed in manifest.json but missing "
                                 f"({len(missing)} shard(s) missing); {REDO}")  # fmt: skip
            if unlisted := sorted(set(on_disk) - set(names)):
                stray = next(p for p in (split_dir / f"{unlisted[0]}{x}" for x in SUFFIXES[::-1]) if p.exists())
                raise ShardError(f"{stray}: shard not listed in manifest.json (left from "
                                 "another run?); delete it, or re-run data preparation")  # fmt: skip
        else:
            entries = [{"name": n} for n in on_disk]
        samples[split] = 0
        for entry in entries:
            name = entry["name"]
            tokens, index = open_shard(split_dir, name)
            tokens_path, index_path = (split_dir / f"{name}{suffix}" for suffix in SUFFIXES)
            for key, path, value in (("samples", index_path, len(index)), ("tokens", tokens_path, len(tokens))):
                if key in entry and int(entry[key]) != value:
                    raise ShardError(f"{path}: holds {value} {key} where manifest.json lists {entry[key]}; {REDO}")
            check_index(index_path, index, len(tokens))
            shards, samples[split] = shards + 1, samples[split] + len(index)
            sha = entry.get("sha256") or {}
            if checksums:
                to_hash += [(path, sha[key]) for key, path in (("tokens", tokens_path), ("index", index_path))
                            if key in sha]  # fmt: skip
    hashed = 0
    if to_hash:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for (path, expected), actual in zip(to_hash, pool.map(lambda t: sha256_file(t[0]), to_hash), strict=True):
                if actual != expected:
                    pool.shutdown(cancel_futures=True)
                    raise ShardError(f"{path}: sha256 {actual} does not match manifest.json's {expected}: the file "
                                     f"is corrupt; {REDO}")  # fmt: skip
                hashed += path.stat().st_size
    return {
        "shards": shards,
        "samples": samples,
        "bytes_hashed": hashed,
        "seconds": round(time.perf_counter() - start, 3),
    }


class Shard:
    """Read-only, memory-mapped view of one shard (``ShardError`` when a file is missing, truncated or corrupt)."""

    def __init__(self, split_dir: str | os.PathLike, name: str):
        self.name = name
        self.tokens, self.index = open_shard(Path(split_dir), name)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> Sample:
        offset, length, a_len, label, doc_a, doc_b = (int(v) for v in self.index[i])
        ids = np.asarray(self.tokens[offset : offset + length], dtype=np.int64)
        types = np.zeros(length, dtype=np.int64)
        types[a_len:] = 1
        return Sample(ids, types, label, doc_a, doc_b)


class SplitReader:
    """All shards of one split as one random-access sequence of samples, in manifest order."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", shard_names: list[str] | None = None):
        split_dir = Path(data_dir) / split
        if shard_names is None:
            shard_names = sorted(p.name[: -len(".index.npy")] for p in split_dir.glob("*.index.npy"))
        self.shards = [Shard(split_dir, n) for n in shard_names]
        self.cumulative = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def locate(self, i: int) -> tuple[Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.cumulative, i, side="right")) - 1
        return self.shards[s], i - int(self.cumulative[s])

    def __getitem__(self, i: int) -> Sample:
        shard, j = self.locate(i)
        return shard[j]

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            for j in range(len(shard)):
                yield shard[j]
