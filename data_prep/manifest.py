"""``manifest.json``, the description of a prepared data directory: its one reader and its one writer.

Written last by data preparation (``data_prep.pipeline``), so its presence says the shards are complete; read by
the trainer's pre-flight, ``data_prep.inspect`` and the merge of SLURM array tasks. A manifest of a newer
``format_version`` than this code reads is refused with one line naming the file and both versions. Fields
that older manifests (or hand-made test data) lack keep their defaults: ``None`` means "look at the data".

Version history: 1, the first; 2 adds ``holdout`` and the per-split NotNext and short-row figures (corpus text
never encodes to special tokens from version 2 on).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.atomic import write_json
from data_prep.errors import DataPrepError

MANIFEST_FILE = "manifest.json"
FORMAT = "bert-pretrain-shards"
MANIFEST_VERSION = 2


@dataclass
class Manifest:
    format: str = FORMAT
    """Always ``bert-pretrain-shards``."""
    format_version: int = 1
    """Version of this layout (``MANIFEST_VERSION`` when written by this code)."""
    mode: str | None = None
    """``bert`` (sentence pairs with NSP labels) or ``roberta`` (packed full sentences)."""
    nsp: bool | None = None
    """Whether the samples carry IsNext/NotNext labels."""
    max_seq_length: int | None = None
    """Longest sample, special tokens included."""
    vocab_size: int | None = None
    """Tokens in ``vocab.txt``."""
    vocab_sha256: str | None = None
    """sha256 of ``vocab.txt``: the shards are identical given the same vocabulary, seed and inputs."""
    vocab_trained: bool | None = None
    """Whether the vocabulary was trained here (else given with ``vocab=``)."""
    lowercase: bool | None = None
    """Uncased text (lowercased, accents stripped)."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Role -> token, as Hugging Face's ``special_tokens_map.json``."""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    """Every input file read, with its size and kind."""
    config: dict[str, Any] = field(default_factory=dict)
    """The ``PrepareConfig`` that made the data."""
    counts: dict[str, int] = field(default_factory=dict)
    """What every stage counted (documents, sentences, tokens, pairs, literal special tokens, ...)."""
    skipped: dict[str, Any] = field(default_factory=dict)
    """What was skipped, by reason, with examples."""
    warnings: list[str] = field(default_factory=list)
    """Warnings worth reading before training."""
    splits: dict[str, dict[str, Any]] | None = None
    """Per split: samples, tokens, figures, and the shard list (name, samples, tokens, sha256 of both files)."""
    holdout: str = "documents"
    """How validation was held out: ``documents`` or ``document_tails``."""
    stage_seconds: dict[str, Any] = field(default_factory=dict)
    """Wall time of each stage."""
    throughput_mchars_per_s: float | None = None
    """Millions of text characters prepared per second, all stages."""
    versions: dict[str, str | None] = field(default_factory=dict)
    """Python and library versions that made the data."""
    tasks: list[dict[str, Any]] = field(default_factory=list)
    """After a merge of SLURM array tasks: each task's own manifest."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path) -> Manifest:
        if not isinstance(d, dict):
            raise DataPrepError(f"{path}: not a manifest (a JSON object); rerun launch/prepare_data.py")
        version = d.get("format_version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise DataPrepError(
                f"{path}: manifest format_version {version}, but this code reads versions up to {MANIFEST_VERSION}; "
                "update the code to the version that prepared the data, or prepare it again with this one"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # fields of later tools within a version: ignored

    def split(self, name: str) -> dict[str, Any]:
        """One split's section (empty where the manifest has none)."""
        return (self.splits or {}).get(name, {})


def read_manifest(data_dir: str | Path) -> Manifest | None:
    """The manifest of ``data_dir`` (None where it has none); one-line ``DataPrepError`` when unreadable."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataPrepError(f"{path}: not valid JSON ({e}); rerun launch/prepare_data.py") from None
    return Manifest.from_dict(content, path)


def write_manifest(data_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(data_dir) / MANIFEST_FILE
    write_json(path, manifest.to_dict())
    return path
