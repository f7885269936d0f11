"""Task data for the fine-tuning loop: read the configured splits, encode them with the model's own tokenizer, and
say how validation logits become the task's metrics and a file's predictions. What differs between task kinds is
the kind's object (``kinds.KINDS[cfg.task.kind]``); this module only strings its steps together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_prep.errors import UserError
from pretrain.finetune import tasks as T
from pretrain.finetune.checks import usable_rows
from pretrain.finetune.kinds import KINDS, TaskKind


@dataclass
class Prepared:
    train: list[dict[str, Any]]  # encoded features (one per row; per window for QA)
    val: list[dict[str, Any]]
    num_labels: int
    label_names: list[str] | None
    pad_id: int
    score: Callable[[list[np.ndarray]], dict[str, float]]  # validation logits, one array per feature -> metrics
    kind: TaskKind
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> reason -> rows dropped

    def collate(self, rows: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.kind.collate(rows, self.pad_id, with_labels).items()}


def read_split(cfg: Any, source: str, split: str | None, labelled: bool = True) -> list[dict[str, Any]]:
    """Rows of ``source`` keyed as the task's encoder reads them; ``labelled`` False for prediction input (the
    label, tags or answers column may be absent)."""
    return KINDS[cfg.task.kind].read(cfg.task, source, split, labelled)


def encode(
    cfg: Any, src: Any, rows: list[dict[str, Any]], labels: T.LabelMap | None, where: str, labelled: bool = True
) -> list[dict]:
    """Features of ``rows`` for the task (``labels``: the class map of classification and NER); ``labelled``
    False for prediction input."""
    specials = T.Specials.from_vocab(src.vocab)
    length = cfg.trainer.max_seq_length
    return KINDS[cfg.task.kind].encode(cfg.task, rows, labels, src.tokenizer, specials, length, where, labelled)


def label_map(cfg: Any, train_rows: list[dict[str, Any]]) -> T.LabelMap | None:
    return KINDS[cfg.task.kind].label_map(cfg.task, train_rows)


def decode(cfg: Any, labels: T.LabelMap | None, rows: list[dict], feats: list[dict], logits: list[np.ndarray]) -> list:
    """Per input row: a class name (classification), a number (regression), tags per word (NER), an answer (QA)."""
    return KINDS[cfg.task.kind].decode(cfg.task, labels, rows, feats, logits)


def prepare(cfg: Any, src: Any) -> Prepared:
    """Read, check and encode the training and validation splits; every data mistake is one ``UserError`` line."""
    t = cfg.task
    kind = KINDS[t.kind]
    if not t.train:
        raise UserError("task.train is not set: give a data file (csv, tsv, jsonl, parquet) or a hub dataset name")
    local = any(t.train.endswith(e) for e in (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".conll"))
    if t.validation is None and local:
        raise UserError(f"task.validation is not set: give the validation file beside task.train={t.train}")
    try:
        val_src, val_split = (t.validation, None) if t.validation else (t.train, t.validation_split)
        dropped = {}
        train_rows, dropped["train"] = usable_rows(read_split(cfg, t.train, "train"), kind.texts, kind.labelled,
                                                     kind.gold, t.train)  # fmt: skip
        val_rows, dropped["validation"] = usable_rows(read_split(cfg, val_src, val_split), kind.texts,
                                                        kind.labelled, kind.gold, val_src)  # fmt: skip
        labels = label_map(cfg, train_rows)
        train = encode(cfg, src, train_rows, labels, t.train)
        val = encode(cfg, src, val_rows, labels, val_src)
    except T.TaskError as e:
        raise UserError(str(e)) from None
    if not train or not val:
        raise UserError(f"no {'training' if not train else 'validation'} rows in {t.train if not train else val_src}")

    def score(logits: list[np.ndarray]) -> dict[str, float]:
        return kind.score(labels, val_rows, kind.decode(t, labels, val_rows, val, logits))

    pad = T.Specials.from_vocab(src.vocab).pad
    return Prepared(train, val, kind.num_labels(labels), list(labels.labels) if labels else None, pad, score, kind,
                    dropped)  # fmt: skip
