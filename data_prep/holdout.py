"""Which text is held out for validation: whole documents where they come within a point of
``validation_fraction``, else the tail of every document (corpora of few long documents, such as books). The
two splits never share a sentence; the choice depends only on the token counts and the seed, so every worker
process makes the same one."""

from __future__ import annotations

import numpy as np

from data_prep.errors import DataPrepError

# Whole documents are held out while their share of the tokens is this close to validation_fraction (a point).
HOLDOUT_TOLERANCE = 0.01


class Bounds:
    """Boundaries ``b[0..n]`` (``n + 1`` entries) of a memory-mapped array, read as int64 slices, never whole."""

    def __init__(self, arr: np.ndarray, n: int):
        if len(arr) != n + 1:
            raise DataPrepError(f"token store: offsets array has {len(arr)} entries for {n} items; re-run tokenize")
        self.arr = arr

    def span(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.arr[lo : hi + 1], dtype=np.int64)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.arr[idx], dtype=np.int64)


def split_documents(doc_tokens: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) document indices: a seeded permutation of the non-empty documents.

    ``fraction`` of them go to validation (when ``fraction > 0``), but at least two whenever there are four or
    more, so that validation has NotNext pairs too, and at least one when there are two or three; train always
    keeps at least one.
    """
    usable = np.flatnonzero(doc_tokens > 0)
    n = len(usable)
    floor = 2 if n >= 4 else 1
    n_val = 0 if n < 2 or fraction <= 0 else min(n - 1, max(floor, round(fraction * n)))
    perm = np.random.default_rng([seed, 0x5917]).permutation(n)
    return np.sort(usable[perm[n_val:]]), np.sort(usable[perm[:n_val]])


def tail_cuts(doc_bounds: np.ndarray, sents: Bounds, fraction: float, min_tail: float = 0.0) -> np.ndarray:
    """First sentence of each document's validation tail (its end sentence where it has none).

    A tail is the last ``fraction`` of the document's tokens, rounded to the nearest sentence boundary; the
    rounding error is carried to the next document, so the tails add up to ``fraction`` of the corpus within
    about half a sentence even when each document's share is under a sentence. A share under ``min_tail``
    tokens is carried over too (no tail of a sentence or two that would only make one-sentence NotNext chunks).
    A document keeps at least its first sentence for training. Plain Python floats in corpus order: the same
    cuts in every process.
    """
    cuts = np.array(doc_bounds[1:], dtype=np.int64)
    carry = 0.0
    for d in range(len(cuts)):
        s0, s1 = int(doc_bounds[d]), int(doc_bounds[d + 1])
        if s1 == s0:
            continue
        b = sents.span(s0, s1)
        end = int(b[-1])
        want = fraction * (end - int(b[0])) + carry
        if s1 - s0 >= 2 and want >= min_tail:
            pos = end - want  # the cut's token offset: b[k - 1] < pos <= b[k]
            k = min(max(int(np.searchsorted(b, pos)), 1), s1 - s0)
            if k > 1 and pos - b[k - 1] < b[k] - pos:
                k -= 1
            cuts[d] = s0 + k
        carry = want - (end - int(b[cuts[d] - s0]))
    return cuts


def split_units(
    doc_bounds: np.ndarray, sents: Bounds, doc_tokens: np.ndarray, fraction: float, seed: int, seq_length: int
) -> tuple[list[np.ndarray], str]:
    """The (train, validation) units, each ``int64 [n, 3]`` rows ``(document, first sentence, end sentence)`` in
    corpus order, and how validation was held out: ``"documents"`` or ``"document_tails"``.

    Whole documents (``split_documents``) while their share of the tokens is within ``HOLDOUT_TOLERANCE`` of
    ``fraction``; else every document's tail (``tail_cuts``: tails of at least two samples of ``seq_length``
    tokens, or a quarter of the validation tokens on a small corpus) goes to validation and its head to train,
    when that comes closer to ``fraction`` and holds any text. Units without tokens are left out.
    """
    train, val = split_documents(doc_tokens, fraction, seed)

    def whole(docs: np.ndarray) -> np.ndarray:
        return np.stack([docs, doc_bounds[docs], doc_bounds[docs + 1]], axis=1).astype(np.int64).reshape(-1, 3)

    units, total = [whole(train), whole(val)], int(doc_tokens.sum())
    if fraction <= 0 or total == 0:
        return units, "documents"
    miss = abs(int(doc_tokens[val].sum()) / total - fraction)
    if miss <= HOLDOUT_TOLERANCE:
        return units, "documents"
    docs = np.arange(len(doc_tokens), dtype=np.int64)
    cuts = tail_cuts(doc_bounds, sents, fraction, min(2 * seq_length, fraction * total / 4))
    starts, ends = doc_bounds[:-1].astype(np.int64), doc_bounds[1:]
    head_tokens, tail_tokens = sents.take(cuts) - sents.take(starts), sents.take(ends) - sents.take(cuts)
    if tail_tokens.sum() == 0 or abs(int(tail_tokens.sum()) / total - fraction) >= miss:
        return units, "documents"
    heads, tails = np.stack([docs, starts, cuts], axis=1), np.stack([docs, cuts, ends], axis=1)
    return [heads[head_tokens > 0], tails[tail_tokens > 0]], "document_tails"
