"""Task data for the fine-tuning loop: read the configured splits (``tasks.read_table``), encode them with the
model's own tokenizer, and say how validation logits become the task's metrics and a file's predictions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.errors import UserError
from pretrain.finetune import metrics as M
from pretrain.finetune import spans as S
from pretrain.finetune import tasks as T


@dataclass
class Prepared:
    train: list[dict[str, Any]]  # encoded features (one per row; per window for QA)
    val: list[dict[str, Any]]
    num_labels: int
    label_names: list[str] | None
    pad_id: int
    score: Callable[[list[np.ndarray]], dict[str, float]]  # validation logits, one array per feature -> metrics

    def collate(self, rows: list[dict[str, Any]], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in T.collate(rows, self.pad_id, with_labels).items()}


def _columns(cfg: Any) -> dict[str, str]:
    """Configured column name -> the key the encoders read."""
    t = cfg.task
    if t.kind == "ner":
        return {t.tokens_column: "tokens", t.tags_column: "tags"}
    if t.kind == "qa":
        return {t.question_column: "question", t.context_column: "context", t.answers_column: "answers"}
    cols = {t.text_column: "text", t.label_column: "label"}
    if t.text_pair_column:
        cols[t.text_pair_column] = "pair"
    return cols


def read_split(cfg: Any, source: str, split: str | None, labelled: bool = True) -> list[dict[str, Any]]:
    cols = _columns(cfg)
    if not labelled:  # prediction input: the label, tags or answers column may be absent
        drop = {"label", "tags", "answers"}
        cols = {k: v for k, v in cols.items() if v not in drop}
    rows = T.read_table(source, split, list(cols))
    return [{cols[k]: v for k, v in r.items() if k in cols} for r in rows]


def encode(
    cfg: Any, src: Any, rows: list[dict[str, Any]], labels: T.LabelMap | None, where: str, labelled: bool = True
) -> list[dict]:
    """Features of ``rows`` for the task (``labels``: the class map of classification and NER); ``labelled``
    False for prediction input."""
    t, length = cfg.task, cfg.trainer.max_seq_length
    specials = T.Specials.from_vocab(src.vocab)
    if t.kind == "ner":
        return S.encode_ner(src.tokenizer, specials, rows, labels if labelled else None, length, t.truncate, where)
    if t.kind == "qa":
        if not labelled:
            rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
        return S.encode_qa(src.tokenizer, specials, rows, length, t.doc_stride, t.max_query_length, where)
    y = None
    if labelled:
        values = [r["label"] for r in rows]
        y = T.regression_targets(values, where) if t.kind == "regression" else labels.encode(values, where)
    pairs = [r["pair"] for r in rows] if t.text_pair_column else None
    return T.encode_pairs(src.tokenizer, specials, [r["text"] for r in rows], pairs, length, t.truncate, y, where)


def label_map(cfg: Any, train_rows: list[dict[str, Any]]) -> T.LabelMap | None:
    t = cfg.task
    if t.kind == "classification":
        return T.LabelMap.build(t.labels, [r["label"] for r in train_rows])
    if t.kind == "ner":
        return T.LabelMap.build(t.labels, [tag for r in train_rows for tag in r["tags"]])
    return None


def decode(cfg: Any, labels: T.LabelMap | None, rows: list[dict], feats: list[dict], logits: list[np.ndarray]) -> list:
    """Per input row: a class name (classification), a number (regression), tags per word (NER), an answer (QA)."""
    kind = cfg.task.kind
    if kind == "classification":
        return labels.decode([int(x.argmax()) for x in logits])
    if kind == "regression":
        return [float(x) for x in logits]
    if kind == "ner":
        preds = [x.argmax(-1) for x in logits]
        return S.decode_ner(preds, [f["word_ids"] for f in feats], labels, [f["num_words"] for f in feats])
    answers = S.postprocess_qa(rows, feats, [x[:, 0] for x in logits], [x[:, 1] for x in logits],
                               max_answer_length=cfg.task.max_answer_length)  # fmt: skip
    return [answers[i] for i in range(len(rows))]


def _answer_texts(answers: Any) -> list[str]:
    """Gold answer texts, SQuAD's ``{"text": [...], ...}`` or a list of ``{"text": ...}``."""
    return [a["text"] for a in answers] if isinstance(answers, list) else [str(x) for x in answers["text"]]


def prepare(cfg: Any, src: Any) -> Prepared:
    """Read, check and encode the training and validation splits; every data mistake is one ``UserError`` line."""
    t = cfg.task
    if not t.train:
        raise UserError("task.train is not set: give a data file (csv, tsv, jsonl, parquet) or a hub dataset name")
    local = any(t.train.endswith(e) for e in (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".conll"))
    if t.validation is None and local:
        raise UserError(f"task.validation is not set: give the validation file beside task.train={t.train}")
    try:
        train_rows = read_split(cfg, t.train, "train")
        val_src, val_split = (t.validation, None) if t.validation else (t.train, t.validation_split)
        val_rows = read_split(cfg, val_src, val_split)
        labels = label_map(cfg, train_rows)
        train = encode(cfg, src, train_rows, labels, t.train)
        val = encode(cfg, src, val_rows, labels, val_src)
    except T.TaskError as e:
        raise UserError(str(e)) from None
    if not train or not val:
        raise UserError(f"no {'training' if not train else 'validation'} rows in {t.train if not train else val_src}")

    def score(logits: list[np.ndarray]) -> dict[str, float]:
        preds = decode(cfg, labels, val_rows, val, logits)
        if t.kind == "classification":
            gold = [labels.labels.index(T._label_key(r["label"])) for r in val_rows]
            return M.classification_metrics([labels.labels.index(p) for p in preds], gold, labels.num_labels)
        if t.kind == "regression":
            return M.regression_metrics(preds, [float(r["label"]) for r in val_rows])
        if t.kind == "ner":
            res = M.ner_metrics([r["tags"] for r in val_rows], preds)
            return {k: v for k, v in res.items() if k != "per_type"}
        gold = {i: _answer_texts(r["answers"]) for i, r in enumerate(val_rows)}
        return M.squad_metrics(dict(enumerate(preds)), gold)

    n = {"classification": labels.num_labels if labels else 0, "regression": 1, "qa": 2}.get(t.kind)
    return Prepared(train, val, n if n is not None else labels.num_labels,
                    list(labels.labels) if labels else None, T.Specials.from_vocab(src.vocab).pad, score)  # fmt: skip
