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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_COLUMNS = ("offset", "length", "a_len", "nsp_label", "doc_a", "doc_b")
OFFSET, LENGTH, A_LEN, NSP_LABEL, DOC_A, DOC_B = range(len(INDEX_COLUMNS))
TMP_SUFFIX = ".tmp"


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


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(split_dir: str | os.PathLike, name: str, tokens: np.ndarray, index: np.ndarray) -> dict:
    """Write one shard atomically and return its manifest entry (name, samples, tokens, sha256 of both files)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    if index.ndim != 2 or index.shape[1] != len(INDEX_COLUMNS):
        raise ValueError(f"shard index must be int64 [n, {len(INDEX_COLUMNS)}], got {index.shape}")
    tokens_path, index_path = split_dir / f"{name}.tokens.npy", split_dir / f"{name}.index.npy"
    # The index is the commit marker: it is renamed last, so a shard with an index has complete tokens.
    index_path.unlink(missing_ok=True)
    _save_atomic(tokens_path, np.ascontiguousarray(tokens))
    _save_atomic(index_path, np.ascontiguousarray(index, dtype=np.int64))
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


class Shard:
    """Read-only, memory-mapped view of one shard."""

    def __init__(self, split_dir: str | os.PathLike, name: str):
        split_dir = Path(split_dir)
        self.name = name
        self.tokens = np.load(split_dir / f"{name}.tokens.npy", mmap_mode="r")
        self.index = np.load(split_dir / f"{name}.index.npy", mmap_mode="r")

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
