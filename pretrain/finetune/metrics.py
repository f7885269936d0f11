"""Fine-tuning metrics, computed as the references people compare against compute them.

- classification: ``accuracy``, ``f1_binary`` (positive class = label index 1, as GLUE's MRPC/QQP F1),
  ``matthews_corrcoef`` (CoLA; the multi-class form for more than two classes);
- regression (STS-B): ``pearson``, ``spearman`` (average ranks on ties);
- NER: ``ner_metrics``, entity-level precision/recall/F1 as seqeval's default mode (conlleval's chunking: an
  entity starts at B- or S-, or at an I-/E- whose type differs from the previous tag or that follows O, E- or S-);
- QA: ``squad_metrics``, exact match and F1 as the official SQuAD v1.1 script (normalised answers, best over the
  gold answers, percentages).

All take plain sequences or numpy arrays (predictions already argmaxed) and return Python floats. Values that
are undefined (no positive class, a constant input) are 0.0 rather than NaN, so they can still rank checkpoints.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).ravel(), np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_binary(preds: Any, labels: Any, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0.0 when there is no positive anywhere."""
    p, y = _pair(preds, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation from the confusion matrix (Gorodkin's K-class form; the usual phi coefficient for two
    classes); 0.0 when a side holds a single class."""
    p, y = _pair(preds, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    yi, pi = inv[: y.size], inv[y.size :]
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1)
    s, c = conf.sum(), np.trace(conf)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)  # true and predicted counts per class
    denom = np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
    return float((c * s - t_k @ p_k) / denom) if denom > 0 else 0.0


def pearson(preds: Any, targets: Any) -> float:
    """Pearson correlation coefficient; 0.0 when either side is constant."""
    x, y = (a.astype(np.float64) for a in _pair(preds, targets))
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    return float((dx @ dy) / denom) if denom > 0 else 0.0


def rank_average(values: Any) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (what Spearman's rho needs)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def spearman(preds: Any, targets: Any) -> float:
    """Spearman's rank correlation: Pearson's on average ranks."""
    x, y = _pair(preds, targets)
    return pearson(rank_average(x), rank_average(y))


def classification_metrics(preds: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """``accuracy`` and ``mcc``, and ``f1`` (of label index 1) for two classes."""
    out = {"accuracy": accuracy(preds, labels), "mcc": matthews_corrcoef(preds, labels)}
    if num_labels == 2:
        out["f1"] = f1_binary(preds, labels)
    return out


def regression_metrics(preds: Any, targets: Any) -> dict[str, float]:
    """``pearson``, ``spearman`` and their mean ``corr`` (GLUE's STS-B figure)."""
    r, rho = pearson(preds, targets), spearman(preds, targets)
    return {"pearson": r, "spearman": rho, "corr": (r + rho) / 2}


# ---------------------------------------------------------------------------------------------------- entities


def _split_tag(tag: str) -> tuple[str, str | None]:
    if tag == "O":
        return "O", None
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is not BIO/BIOES (B-TYPE, I-TYPE, E-TYPE, S-TYPE or O)")
    return prefix, kind


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive word positions) of one sentence, chunked as conlleval does.

    A chunk ends before a tag when the previous one was E-/S-, when B-/I- is followed by B-, S- or O, or when the
    type changes; one starts at B-/S-, at I-/E- after O, E- or S-, and at any typed tag whose type differs from
    the previous one (so ``I-PER I-PER`` is one PER entity and ``B-PER I-LOC`` two)."""
    entities = []
    prev_p, prev_k, start = "O", None, 0
    for pos, tag in enumerate([*tags, "O"]):  # the sentinel O closes a chunk open at the end
        p, k = _split_tag(tag)
        ends = (
            prev_p in ("E", "S") or (prev_p in ("B", "I") and p in ("B", "S", "O")) or (prev_p != "O" and prev_k != k)
        )
        if ends:
            entities.append((prev_k, start, pos - 1))
        begins = p in ("B", "S") or (p in ("I", "E") and prev_p in ("O", "E", "S")) or (p != "O" and prev_k != k)
        if begins:
            start = pos
        prev_p, prev_k = p, k
    return entities


def _prf(correct: int, predicted: int, true: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def ner_metrics(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level micro ``precision``, ``recall``, ``f1`` over sentences of tags (an entity counts when type and
    span both match), token ``accuracy``, and ``per_type``: ``{type: {precision, recall, f1, support}}``."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold sentences but {len(y_pred)} predicted")
    gold: set[tuple[int, str, int, int]] = set()
    pred: set[tuple[int, str, int, int]] = set()
    same = total = 0
    for s, (t, p) in enumerate(zip(y_true, y_pred, strict=True)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s + 1}: {len(t)} gold tags but {len(p)} predicted")
        gold.update((s, *e) for e in get_entities(t))
        pred.update((s, *e) for e in get_entities(p))
        same += sum(a == b for a, b in zip(t, p, strict=True))
        total += len(t)
    hits = gold & pred
    precision, recall, f1 = _prf(len(hits), len(pred), len(gold))
    per_type = {}
    for kind in sorted({e[1] for e in gold | pred}):
        n_hit, n_pred, n_gold = (sum(e[1] == kind for e in group) for group in (hits, pred, gold))
        tp, tr, tf = _prf(n_hit, n_pred, n_gold)
        per_type[kind] = {"precision": tp, "recall": tr, "f1": tf, "support": n_gold}
    acc = same / total if total else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": acc, "per_type": per_type}


# -------------------------------------------------------------------------------------------------------- SQuAD

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop ASCII punctuation, drop the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers (0.0 with no token in common, both empty included, as v1.1)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent over the questions of ``references`` (``{id: [gold texts]}``), each
    question scoring its best gold answer; a question without a prediction scores 0, as the official script."""
    if not references:
        raise ValueError("no questions to score")
    em = f1 = 0.0
    for key, golds in references.items():
        if key not in predictions:
            continue
        pred = predictions[key]
        em += max((squad_exact_match(pred, g) for g in golds), default=0.0)
        f1 += max((squad_f1(pred, g) for g in golds), default=0.0)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}
