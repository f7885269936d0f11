"""Token and span tasks: NER (a label on each word's first piece; entity spans back from piece predictions) and
extractive QA (overlapping context windows; answers back to character spans of the context).

``encode_ner`` and ``encode_qa`` return one dict per row or window, as ``tasks.encode_pairs`` does, with the
metadata (lists or ints) that ``decode_ner`` / ``postprocess_qa`` use afterwards; ``tasks.collate`` pads them.
The ``ner`` and ``qa`` kinds (``kinds.NER``, ``kinds.QA``) call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.finetune.tasks import IGNORE, LabelMap, Specials, TaskError, _plain, _text

# ---------------------------------------------------------------------------------------------------------- NER


def encode_ner(
    tokenizer: Any,
    specials: Specials,
    rows: Sequence[dict[str, Any]],
    label_map: LabelMap | None,
    max_length: int = 128,
    truncate: bool = True,
    source: str = "input",
) -> list[dict[str, Any]]:
    """One dict per sentence (rows with ``tokens``: words, and ``tags``: one tag per word, optional).

    ``input_ids``/``token_type_ids`` (``[CLS] pieces [SEP]``), ``labels`` int64 (only when the row has tags and
    ``label_map`` is given): the word's tag index on its FIRST piece, -100 on its other pieces and on the specials
    (as HF's run_ner), ``word_ids``: list, the word index of each position (None for specials), ``num_words``.
    A sentence longer than ``max_length`` pieces is cut (its last words get no prediction; ``decode_ner`` tags
    them O) or, with ``truncate=False``, is a ``TaskError``."""
    words = []
    for i, r in enumerate(rows, 1):
        toks = r.get("tokens")
        if not isinstance(toks, (list, tuple)):
            raise TaskError(f"{source}: row {i}: tokens is {type(toks).__name__}, not a list of words")
        words.append([_text(w, source, i, "a word") for w in toks])
        tags = r.get("tags")
        if tags is not None and len(tags) != len(toks):
            raise TaskError(f"{source}: row {i}: {len(toks)} words but {len(tags)} tags")
    encodings = _plain(tokenizer).encode_batch(words, is_pretokenized=True, add_special_tokens=False)
    room = max_length - 2
    out = []
    for i, (r, enc) in enumerate(zip(rows, encodings, strict=True), 1):
        ids, wids = enc.ids, enc.word_ids
        if len(ids) > room:
            if not truncate:
                raise TaskError(
                    f"{source}: row {i}: {len(ids) + 2} tokens with [CLS]/[SEP], more than max_length={max_length}; "
                    "split the sentence, raise the length or turn truncation on"
                )
            ids, wids = ids[:room], wids[:room]
        feat: dict[str, Any] = {
            "input_ids": np.array([specials.cls, *ids, specials.sep], dtype=np.int64),
            "token_type_ids": np.zeros(len(ids) + 2, dtype=np.int64),
            "word_ids": [None, *wids, None],
            "num_words": len(r["tokens"]),
        }
        if label_map is not None and r.get("tags") is not None:
            tag_ids = [label_map.index(t, source, i) for t in r["tags"]]
            labels = np.full(len(ids) + 2, IGNORE, dtype=np.int64)
            prev = None
            for pos, w in enumerate(wids, 1):
                if w is not None and w != prev:  # the first piece of a word carries its tag
                    labels[pos] = tag_ids[w]
                prev = w
            feat["labels"] = labels
        out.append(feat)
    return out


def decode_ner(
    pred_ids_per_row: Sequence[Sequence[int]] | np.ndarray,
    word_ids: Sequence[Sequence[int | None]],
    label_map: LabelMap,
    num_words: Sequence[int] | None = None,
    fill: str = "O",
) -> list[list[str]]:
    """Tags per word from per-position predicted ids (e.g. ``logits.argmax(-1)``, padded rows welcome): each word
    takes the prediction at its first piece; words without a piece (cut by truncation, or spelled by nothing the
    tokenizer keeps) get ``fill``. ``num_words`` (the ``num_words`` of ``encode_ner``'s rows) counts those."""
    out = []
    for k, (preds, wids) in enumerate(zip(pred_ids_per_row, word_ids, strict=True)):
        n = num_words[k] if num_words is not None else 1 + max((w for w in wids if w is not None), default=-1)
        tags = [fill] * n
        seen = set()
        for pos, w in enumerate(wids):
            if w is not None and w not in seen:
                seen.add(w)
                tags[w] = label_map.labels[int(preds[pos])]
        out.append(tags)
    return out


# ----------------------------------------------------------------------------------------------------------- QA


def _answer_chars(row: dict[str, Any], context: str, source: str, i: int) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the row's first gold answer in ``context``; None when it has none."""
    answers = row["answers"]
    if isinstance(answers, list):  # [{"text", "answer_start"}, ...] as some JSON files hold them
        answers = {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
    if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
        raise TaskError(f"{source}: row {i}: answers must be {{'text': [...], 'answer_start': [...]}} (SQuAD style)")
    if len(answers["text"]) == 0:
        return None
    text, start = str(answers["text"][0]), int(answers["answer_start"][0])
    if not text.strip():
        raise TaskError(f"{source}: row {i}: the answer text is empty")
    if context[start : start + len(text)] != text:
        # Some files count answer_start a few characters off (stripped whitespace): take the nearest occurrence.
        found, k = [], context.find(text)
        while k >= 0:
            found.append(k)
            k = context.find(text, k + 1)
        if not found:
            raise TaskError(f"{source}: row {i}: answer {text[:40]!r} is not in the context")
        start = min(found, key=lambda k: abs(k - start))
    return start, start + len(text)


def _max_context(starts: list[int], room: int, n: int) -> np.ndarray:
    """For each context token, the window in which it has the most context on both sides (BERT's run_squad rule:
    ``min(left, right) + 0.01 * window length``, first window on ties). Answers may only start there, so a token
    seen by two windows is judged where the model saw most around it."""
    best, score = np.zeros(n, dtype=np.int64), np.full(n, -np.inf)
    for k, s in enumerate(starts):
        e = min(s + room, n)
        p = np.arange(s, e)
        sc = np.minimum(p - s, e - 1 - p) + 0.01 * (e - s)
        better = sc > score[s:e]
        score[s:e][better], best[s:e][better] = sc[better], k
    return best


def encode_qa(
    tokenizer: Any,
    specials: Specials,
    rows: Sequence[dict[str, Any]],
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    source: str = "input",
) -> list[dict[str, Any]]:
    """Features of extractive QA rows (``question``, ``context``, optional ``answers`` SQuAD style): one per window.

    The question (cut to ``max_query_length`` tokens) is repeated in every window; the context is cut into windows
    of the room left (``max_length - len(question) - 3``), consecutive windows sharing ``doc_stride`` tokens (the
    overlap, as HF's run_qa passes it to the tokenizer). Each feature holds ``input_ids`` and ``token_type_ids``
    (``[CLS] question [SEP] window [SEP]``, 0 then 1) as int64 arrays; ``example_index`` (the row's index in
    ``rows``); ``offsets``: list, the character span ``(start, end)`` in the context of each window token, None for
    the question and specials; ``max_context``: list of bools, where an answer may start (see ``_max_context``); and
    when the row has ``answers``: ``start_positions``/``end_positions``, the token positions of the first answer
    inside this window, or 0 ([CLS]) when the answer is not wholly in it (or the row has no answer)."""
    room_min = max_length - max_query_length - 3
    if not 0 <= doc_stride < room_min:
        raise TaskError(
            f"doc_stride={doc_stride} must be below the context room of a window, max_length - max_query_length - 3 "
            f"= {room_min}"
        )
    tok = _plain(tokenizer)
    questions = [_text(r.get("question"), source, i, "question") for i, r in enumerate(rows, 1)]
    contexts = [_text(r.get("context"), source, i, "context") for i, r in enumerate(rows, 1)]
    q_encs = tok.encode_batch(questions, add_special_tokens=False)
    c_encs = tok.encode_batch(contexts, add_special_tokens=False)
    feats = []
    for i, (row, context, q, c) in enumerate(zip(rows, contexts, q_encs, c_encs, strict=True)):
        q_ids = q.ids[:max_query_length]
        head, room, n = len(q_ids) + 2, max_length - len(q_ids) - 3, len(c.ids)
        starts = [0]
        while starts[-1] + room < n:
            starts.append(starts[-1] + room - doc_stride)
        best = _max_context(starts, room, n)
        labelled = row.get("answers") is not None
        span = None
        chars = _answer_chars(row, context, source, i + 1) if labelled else None
        if chars is not None:
            offsets = np.array(c.offsets, dtype=np.int64).reshape(n, 2)
            first = int(np.searchsorted(offsets[:, 1], chars[0], side="right"))  # first token ending after it starts
            last = int(np.searchsorted(offsets[:, 0], chars[1], side="left")) - 1  # last token starting before its end
            if first > last:
                raise TaskError(f"{source}: row {i + 1}: the answer covers no token of the context")
            span = (first, last)
        for k, s in enumerate(starts):
            e = min(s + room, n)
            feat: dict[str, Any] = {
                "input_ids": np.array([specials.cls, *q_ids, specials.sep, *c.ids[s:e], specials.sep], dtype=np.int64),
                "token_type_ids": np.array([0] * head + [1] * (e - s + 1), dtype=np.int64),
                "example_index": i,
                "offsets": [None] * head + [tuple(o) for o in c.offsets[s:e]] + [None],
                "max_context": [False] * head + (best[s:e] == k).tolist() + [False],
            }
            if labelled:
                inside = span is not None and s <= span[0] and span[1] < e
                feat["start_positions"] = span[0] - s + head if inside else 0
                feat["end_positions"] = span[1] - s + head if inside else 0
            feats.append(feat)
    return feats


def postprocess_qa(
    examples: Sequence[dict[str, Any]],
    features: Sequence[dict[str, Any]],
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[int, str]:
    """``{example index: predicted answer text}`` for every example (``""`` when no window offers a valid span).

    ``start_logits[j]``/``end_logits[j]`` belong to ``features[j]`` (1-D, padded beyond the feature is fine). Over
    all windows of an example, among the ``n_best`` highest start and end logits of each, the span with the highest
    start + end logit wins, where both ends lie in the context, end >= start, it is at most ``max_answer_length``
    tokens and its start token has its maximum context in that window; its text is the context's characters
    from the start token's first to the end token's last."""
    best: dict[int, tuple[float, str]] = {}
    for f, s_logits, e_logits in zip(features, start_logits, end_logits, strict=True):
        i, offs = f["example_index"], f["offsets"]
        length = len(f["input_ids"])
        s_log = np.asarray(s_logits, dtype=np.float64)[:length]
        e_log = np.asarray(e_logits, dtype=np.float64)[:length]
        max_context = f.get("max_context") or [True] * length
        top_ends = np.argsort(-e_log, kind="stable")[:n_best]
        for a in np.argsort(-s_log, kind="stable")[:n_best]:
            if offs[a] is None or not max_context[a]:
                continue
            for b in top_ends:
                if offs[b] is None or b < a or b - a + 1 > max_answer_length:
                    continue
                score = float(s_log[a] + e_log[b])
                if i not in best or score > best[i][0]:
                    best[i] = (score, examples[i]["context"][offs[a][0] : offs[b][1]])
    return {i: best[i][1] if i in best else "" for i in range(len(examples))}
