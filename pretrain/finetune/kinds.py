"""Task kinds of fine-tuning, one object per kind: everything that differs between classification, regression,
NER and extractive QA, in one place. ``KINDS`` maps each kind's name to its object; every other module looks the
kind up there instead of branching on its name, so a new kind is one more class here and one more entry in
``KINDS``.

A kind (``TaskKind``) holds:

- ``name``; ``metric``, the default validation metric that picks the best checkpoint (a key of ``score``'s
  result);
- reading: ``columns(task)`` (configured column -> the key its encoder reads), ``gold`` (the key prediction input
  may lack), ``read``;
- labels and encoding: ``classes`` (whether there is a class map), ``label_map`` (the class map, or None),
  ``num_labels``, ``encode`` (rows into features, ``tasks.encode_pairs`` and ``spans.encode_ner``/``encode_qa``),
  ``collate`` (features into padded arrays);
- the head: ``level`` (what it reads: one vector per text, every token, every token as a span end), ``hf_task``
  (transformers' class is ``<Family>For<hf_task>``), ``head_size`` (outputs of its output layer) and ``loss`` (from
  the logits). How the head is laid out and computes its logits is the family's, not the kind's: each family's task
  model (``heads.TASK_MODELS``) does it as its own HF classes do, so one kind serves BERT and ModernBERT alike;
- results: ``decode`` (validation or prediction logits -> one prediction per input row) and ``score`` (predictions
  and the gold rows -> metrics).

``task`` arguments are the config's task section (``config.TaskConfig``, or the same fields in a namespace).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.finetune import metrics as M
from pretrain.finetune import spans as S
from pretrain.finetune import tasks as T

Rows = list[dict[str, Any]]


class TaskKind:
    """One fine-tuning task kind. Subclasses set the class attributes and override what differs."""

    name: str
    metric: str  # default validation metric (picks the best checkpoint): a key of ``score``'s result
    hf_task: str  # transformers' task class is <Family>For<hf_task> (config.json's ``architectures``)
    level: str  # what the head reads: "sequence" (one vector per text), "token" (every token), "span" (start, end)
    gold: str  # the encoders' key of the gold column: dropped from prediction input, which need not have it
    texts: tuple[str, ...] = ()  # the encoders' keys of the text columns: a row with an empty one is dropped
    labelled = False  # one label per row in ``gold`` (classification, regression): an empty or NaN one is refused
    classes = False  # a class map (``label_map``): config.json's id2label names the classes, prediction reads them

    def __repr__(self) -> str:
        return f"<task kind {self.name}>"

    # ------------------------------------------------------------------------------------------------ reading

    def columns(self, task: Any) -> dict[str, str]:
        """Configured column name -> the key the encoders read."""
        raise NotImplementedError

    def read(self, task: Any, source: str, split: str | None, labelled: bool = True) -> Rows:
        """Rows of ``source`` (``tasks.read_table``) keyed as the encoders read them; ``labelled`` False for
        prediction input, where the gold column may be absent."""
        cols = self.columns(task)
        if not labelled:
            cols = {k: v for k, v in cols.items() if v != self.gold}
        rows = T.read_table(source, split, list(cols))
        return [{cols[k]: v for k, v in r.items() if k in cols} for r in rows]

    # ---------------------------------------------------------------------------------------------- encoding

    def label_map(self, task: Any, train_rows: Rows) -> T.LabelMap | None:
        """The class map (declared by ``task.labels`` or inferred from the training rows); None without classes."""
        return None

    def num_labels(self, labels: T.LabelMap | None) -> int:
        """The task model's ``num_labels`` (config.json's, ``Prepared.num_labels``)."""
        return labels.num_labels

    def encode(
        self,
        task: Any,
        rows: Rows,
        labels: T.LabelMap | None,
        tokenizer: Any,
        specials: T.Specials,
        max_length: int,
        where: str,
        labelled: bool = True,
    ) -> Rows:
        """Features of ``rows`` (unpadded int64 arrays, targets and metadata); ``labelled`` False for prediction
        input (no targets); ``where`` names the data in errors."""
        raise NotImplementedError

    def collate(self, feats: Sequence[dict[str, Any]], pad_id: int, with_labels: bool = True) -> dict[str, np.ndarray]:
        """A batch of features padded into the model's keyword arguments (``tasks.collate``)."""
        return T.collate(feats, pad_id, with_labels)

    # -------------------------------------------------------------------------------------------------- head

    def head_size(self, num_labels: int) -> int:
        """Outputs of the head's output layer."""
        return num_labels

    def loss(
        self,
        logits: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(loss, logits)`` from the head's output layer (loss None without targets; the logits as the task
        model returns them)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- results

    def decode(self, task: Any, labels: T.LabelMap | None, rows: Rows, feats: Rows, logits: list[np.ndarray]) -> list:
        """One prediction per input row from the logits of its features (one array per feature)."""
        raise NotImplementedError

    def score(self, labels: T.LabelMap | None, rows: Rows, preds: list) -> dict[str, float]:
        """Metrics of ``decode``'s predictions against the gold ``rows``."""
        raise NotImplementedError


# --------------------------------------------------------------------------- sequence kinds: one output per text


class SequenceKind(TaskKind):
    """A text or a text pair (``[CLS] A [SEP] (B [SEP])``) -> one vector (the family's pooling) -> ``classifier``."""

    hf_task, level = "SequenceClassification", "sequence"
    gold = "label"
    texts = ("text", "pair")
    labelled = True

    def columns(self, task: Any) -> dict[str, str]:
        cols = {task.text_column: "text", task.label_column: "label"}
        if task.text_pair_column:
            cols[task.text_pair_column] = "pair"
        return cols

    def targets(self, values: Sequence[Any], labels: T.LabelMap | None, where: str) -> np.ndarray:
        """The label column as the head's targets."""
        raise NotImplementedError

    def encode(self, task, rows, labels, tokenizer, specials, max_length, where, labelled=True):
        y = self.targets([r["label"] for r in rows], labels, where) if labelled else None
        pairs = [r["pair"] for r in rows] if task.text_pair_column else None
        texts = [r["text"] for r in rows]
        return T.encode_pairs(tokenizer, specials, texts, pairs, max_length, task.truncate, y, where)


class Classification(SequenceKind):
    """One class per text (pair): cross-entropy over ``num_labels`` logits; accuracy, MCC (and F1 for two)."""

    name, metric, classes = "classification", "accuracy", True

    def label_map(self, task, train_rows):
        return T.LabelMap.build(task.labels, [r["label"] for r in train_rows])

    def targets(self, values, labels, where):
        return labels.encode(values, where)

    def loss(self, logits, attention_mask, labels=None, start_positions=None, end_positions=None):
        return (None if labels is None else F.cross_entropy(logits.float(), labels)), logits  # logits [B, labels]

    def decode(self, task, labels, rows, feats, logits):
        return labels.decode([int(x.argmax()) for x in logits])  # a class name per row

    def score(self, labels, rows, preds):
        gold = [labels.labels.index(T._label_key(r["label"])) for r in rows]
        return M.classification_metrics([labels.labels.index(p) for p in preds], gold, labels.num_labels)


class Regression(SequenceKind):
    """A number per text (pair), STS-B style: one output, mean squared error; Pearson, Spearman."""

    name, metric = "regression", "pearson"

    def num_labels(self, labels):
        return 1

    def head_size(self, num_labels):
        return 1

    def targets(self, values, labels, where):
        return T.regression_targets(values, where)

    def loss(self, logits, attention_mask, labels=None, start_positions=None, end_positions=None):
        logits = logits.squeeze(-1)  # [B, 1] -> [B]
        return (None if labels is None else F.mse_loss(logits.float(), labels.float())), logits

    def decode(self, task, labels, rows, feats, logits):
        return [float(x) for x in logits]

    def score(self, labels, rows, preds):
        return M.regression_metrics(preds, [float(r["label"]) for r in rows])


# ----------------------------------------------------------------------- span kinds: the algorithms in spans.py


class NER(TaskKind):
    """A BIO tag per word: every token -> ``classifier``, the tag on each word's first piece
    (``spans.encode_ner``/``decode_ner``); entity-level precision, recall, F1 as seqeval."""

    name, metric, classes = "ner", "f1", True
    hf_task, level = "TokenClassification", "token"
    gold = "tags"
    texts = ("tokens",)

    def columns(self, task):
        return {task.tokens_column: "tokens", task.tags_column: "tags"}

    def label_map(self, task, train_rows):
        return T.LabelMap.build(task.labels, [tag for r in train_rows for tag in r["tags"]])

    def encode(self, task, rows, labels, tokenizer, specials, max_length, where, labelled=True):
        return S.encode_ner(tokenizer, specials, rows, labels if labelled else None, max_length, task.truncate, where)

    def loss(self, logits, attention_mask, labels=None, start_positions=None, end_positions=None):
        loss = None  # logits [B, L, labels]
        if labels is not None:  # -100 on continuation pieces, specials and padding
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=T.IGNORE)
        return loss, logits

    def decode(self, task, labels, rows, feats, logits):
        preds = [x.argmax(-1) for x in logits]
        return S.decode_ner(preds, [f["word_ids"] for f in feats], labels, [f["num_words"] for f in feats])

    def score(self, labels, rows, preds):
        res = M.ner_metrics([r["tags"] for r in rows], preds)
        return {k: v for k, v in res.items() if k != "per_type"}


class QA(TaskKind):
    """Extractive QA, SQuAD v1 style: every token -> start and end logits, over overlapping context windows
    (``spans.encode_qa``), answers back to context text (``spans.postprocess_qa``); exact match and F1 as the SQuAD
    script."""

    name, metric = "qa", "f1"
    hf_task, level = "QuestionAnswering", "span"
    gold = "answers"
    texts = ("question", "context")

    def columns(self, task):
        return {task.question_column: "question", task.context_column: "context", task.answers_column: "answers"}

    def num_labels(self, labels):
        return 2

    def head_size(self, num_labels):
        return 2

    def encode(self, task, rows, labels, tokenizer, specials, max_length, where, labelled=True):
        if not labelled:
            rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
        return S.encode_qa(tokenizer, specials, rows, max_length, task.doc_stride, task.max_query_length, where)

    def loss(self, logits, attention_mask, labels=None, start_positions=None, end_positions=None):
        loss = None  # logits [B, L, 2]
        if start_positions is not None and end_positions is not None:
            if attention_mask is not None:  # padding is never an answer
                logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
            start, end = logits.float().unbind(-1)
            loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return loss, logits

    def decode(self, task, labels, rows, feats, logits):
        answers = S.postprocess_qa(rows, feats, [x[:, 0] for x in logits], [x[:, 1] for x in logits],
                                   max_answer_length=task.max_answer_length)  # fmt: skip
        return [answers[i] for i in range(len(rows))]

    def score(self, labels, rows, preds):
        gold = {i: _answer_texts(r["answers"]) for i, r in enumerate(rows)}
        return M.squad_metrics(dict(enumerate(preds)), gold)


def _answer_texts(answers: Any) -> list[str]:
    """Gold answer texts, SQuAD's ``{"text": [...], ...}`` or a list of ``{"text": ...}``."""
    return [a["text"] for a in answers] if isinstance(answers, list) else [str(x) for x in answers["text"]]


KINDS: dict[str, TaskKind] = {k.name: k for k in (Classification(), Regression(), NER(), QA())}
"""The registry: kind name (``task.kind``) -> its object."""
