"""Shards stage, BERT mode: sentence pairs with IsNext/NotNext labels, and the sample machinery both modes share.

Documents are split into train/validation by a seeded permutation (``split_documents``); where whole documents
cannot come within a point of ``validation_fraction`` (a corpus of few long documents: 2 books of 13 held out are
10% to 33% of it), the last ``validation_fraction`` of every document's sentences is held out instead
(``tail_cuts``), so no sentence is in both splits. A split is a list of units, ``(document, first sentence, end
sentence)``: whole documents, or their heads (train) and tails (validation). BERT mode follows Google's
``create_instances_from_document`` (random NotNext segments come from the whole split, not the shard), except that
the target length is drawn for every chunk rather than once per document: on a corpus of books a short target drawn
once shortens a whole book (and its one-sentence chunks are all NotNext), so NotNext stays near 50% and short
targets near ``short_seq_prob`` only with a draw per chunk. The manifest counts, per split, NotNext pairs, samples
whose target was drawn short (``short_target``) and samples shorter than ``max_seq_length / 2`` tokens
(``short_rows``, specials included).
RoBERTa mode (full sentences packed, no NSP) is in ``data_prep.packing``; the stage's driver, ``run_shards``, in
``data_prep.shards``.
"""

from __future__ import annotations

import array
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from data_prep.config import PrepareConfig
from data_prep.holdout import Bounds, split_units


class Corpus(Protocol):
    """What the shards stage needs of a tokenized corpus (``data_prep.tokenize.TokenStore`` provides it):
    ``doc_offsets`` (sentence boundaries of documents) and ``sentence_offsets`` (token boundaries of sentences),
    each ``n + 1`` boundaries from 0; empty sentences and documents are skipped. An optional
    ``sentences_tokens(s0, s1)`` (one slice for a sentence range) is used when present."""

    num_docs: int
    doc_offsets: np.ndarray
    sentence_offsets: np.ndarray

    def sentence_tokens(self, s: int) -> np.ndarray: ...


def open_token_store(path: str) -> Corpus:
    from data_prep.tokenize import TokenStore

    return TokenStore(path)


@dataclass(frozen=True)
class Params:
    """Everything a worker needs, picklable: it opens the corpus itself (memory-mapped) with ``opener``."""

    opener: Callable[[], Corpus]
    out: str
    seed: int
    max_seq_length: int
    nsp: bool
    short_seq_prob: float
    dupe_factor: int
    validation_fraction: float
    cls_id: int
    sep_id: int
    dtype: str


class Worker:
    """A corpus opened in this process, with the split into units (recomputed: it is cheap and deterministic)."""

    def __init__(self, p: Params, corpus: Corpus | None = None):
        self.p, self.c = p, corpus if corpus is not None else p.opener()
        nd = int(self.c.num_docs)
        self.docs = Bounds(self.c.doc_offsets, nd)
        ns = int(self.docs.span(nd, nd)[0]) if nd else 0
        self.sents = Bounds(self.c.sentence_offsets, ns)
        doc_bounds = self.docs.span(0, nd) if nd else np.zeros(1, np.int64)
        self.doc_tokens = np.diff(self.sents.take(doc_bounds)) if nd else np.zeros(0, np.int64)
        self.units, self.holdout = split_units(
            doc_bounds, self.sents, self.doc_tokens, p.validation_fraction, p.seed, p.max_seq_length
        )
        self.unit_tokens = [self.sents.take(u[:, 2]) - self.sents.take(u[:, 1]) for u in self.units]
        self._range = getattr(self.c, "sentences_tokens", None)

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        if self._range is not None:
            return self._range(lo, hi)
        return np.concatenate([self.c.sentence_tokens(s) for s in range(lo, hi)])


def plan_shards(doc_tokens: np.ndarray, cfg: PrepareConfig) -> list[tuple[int, int]]:
    """Cut a split's documents (token counts in split order) into ``[lo, hi)`` position ranges of about
    ``samples_per_shard`` samples each, estimated in integer token units so the cut is stable everywhere."""
    n = len(doc_tokens)
    if n == 0:
        return []
    if cfg.nsp:  # a document gives at least one sample; targets are max_num_tokens, sometimes shorter
        m = cfg.max_seq_length - 3
        per = max(1, round(m * (1 - cfg.short_seq_prob) + cfg.short_seq_prob * (m + 2) / 2))
        weight = cfg.dupe_factor * np.maximum(doc_tokens, per)
    else:  # packed samples hold max_seq_length - 2 tokens, one of them [SEP] per document
        per, weight = cfg.max_seq_length - 2, doc_tokens + 1
    cum = np.cumsum(weight)
    step = cfg.samples_per_shard * per
    ends = np.searchsorted(cum, np.arange(step, int(cum[-1]) + step, step), side="left") + 1
    ends = np.unique(np.minimum(ends, n))
    starts = np.concatenate(([0], ends[:-1]))
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if b > a]


def _trim(la: int, lb: int, limit: int, rng: random.Random) -> tuple[int, int, int, int]:
    """Google's ``truncate_seq_pair`` in closed form: (front_a, back_a, front_b, back_b) tokens to drop.

    It removes one token at a time from the longer segment (B on ties), from the front or back with 50% each;
    so the counts per segment follow from the lengths and each segment's front count is Binomial(k, 1/2).
    """
    excess = la + lb - limit
    if excess <= 0:
        return 0, 0, 0, 0
    ta = min(excess, la - lb) if la > lb else 0
    tb = min(excess, lb - la) if lb >= la else 0
    rest = excess - ta - tb
    ta, tb = ta + rest // 2, tb + (rest + 1) // 2
    fa = rng.getrandbits(ta).bit_count() if ta else 0
    fb = rng.getrandbits(tb).bit_count() if tb else 0
    return fa, ta - fa, fb, tb - fb


class Builder:
    """Copies each sample's tokens into one growing array as it is added, and its index row into a flat array.

    About 2 bytes a token and 48 a sample: a list of per-piece memmap views and row tuples, assembled at the
    end, cost ~1.4 kB a sample (160 MB for a 113k-sample shard, in every worker at once)."""

    def __init__(self, w: Worker, capacity: int = 1 << 16):
        self.w, self.offset, self.dropped, self.short = w, 0, 0, 0
        self.tokens = np.empty(max(capacity, 1 << 10), np.dtype(w.p.dtype))
        self.rows = array.array("q")

    def _put(self, ids: np.ndarray | int, n: int) -> None:
        end = self.offset + n
        if end > len(self.tokens):  # grow by half: amortised O(1) a token, at most 1.5x the shard in memory
            grown = np.empty(max(end, len(self.tokens) * 3 // 2), self.tokens.dtype)
            grown[: self.offset] = self.tokens[: self.offset]
            self.tokens = grown
        self.tokens[self.offset : end] = ids
        self.offset = end

    def add(self, parts: list, a_len: int, label: int, doc_a: int, doc_b: int) -> None:
        """``parts``: ``(lo, hi, front, back)`` sentence ranges with trims, or ``None`` for a [SEP]."""
        w, start = self.w, self.offset
        self._put(w.p.cls_id, 1)
        for part in parts:
            if part is None:
                self._put(w.p.sep_id, 1)
            else:
                t = w.tokens(part[0], part[1])
                self._put(t[part[2] : len(t) - part[3]], len(t) - part[2] - part[3])
        self._put(w.p.sep_id, 1)
        length = self.offset - start
        self.rows.extend((start, length, a_len if a_len >= 0 else length, label, doc_a, doc_b))

    def finish(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        index = np.frombuffer(self.rows, dtype=np.int64).reshape(-1, 6)
        # Google shuffles instances; shuffling rows here mixes dupe passes and documents within a shard.
        return self.tokens[: self.offset], index[np.random.default_rng(list(key)).permutation(len(index))]


def _target(rng: random.Random, m: int, short_seq_prob: float) -> tuple[bool, int]:
    """(drawn short, target length) as the original draws it: ``short_seq_prob`` a length in [2, m], else m."""
    if rng.random() < short_seq_prob:
        return True, rng.randint(2, m)
    return False, m


def bert_doc(w: Worker, b: Builder, rng: random.Random, units: np.ndarray, u: int) -> None:
    """``create_instances_from_document`` for unit ``u`` of ``units`` (the split's units, the NotNext pool), with
    a target length drawn for every chunk."""
    m, p = w.p.max_seq_length - 3, w.p.short_seq_prob
    d, s0, s1 = (int(x) for x in units[u])
    lens = np.diff(w.sents.span(s0, s1))
    nz = np.flatnonzero(lens)
    ids, ls = (nz + s0).tolist(), lens[nz].tolist()
    n, n_units = len(ids), len(units)
    short, target = _target(rng, m, p)
    start = i = cur = 0
    while i < n:
        cur += ls[i]
        if i == n - 1 or cur >= target:
            k = i - start + 1
            a_end = rng.randint(1, k - 1) if k >= 2 else 1
            la = sum(ls[start : start + a_end])
            a = (ids[start], ids[start + a_end - 1] + 1)
            if (k == 1 or rng.random() < 0.5) and n_units > 1:
                for _ in range(10):  # as the original: retry to avoid the same document
                    r = rng.randrange(n_units)
                    if int(units[r, 0]) != d:
                        break
                else:
                    r = (r + 1) % n_units  # deterministic fallback: a split holds a document in one unit at most
                db, r0, r1 = (int(x) for x in units[r])
                bounds = w.sents.span(r0, r1)  # token boundaries of the unit's sentences (never outside its split)
                j0 = rng.randrange(r1 - r0)
                if bounds[j0 + 1] == bounds[j0]:  # an empty sentence: start at a random non-empty one instead
                    nz = np.flatnonzero(np.diff(bounds))
                    j0 = int(nz[rng.randrange(len(nz))])
                # B: sentences from j0 until it holds target - la tokens (at least one sentence), as the original
                j1 = int(np.searchsorted(bounds, bounds[j0] + max(target - la, 1), side="left"))
                j1 = min(max(j1, j0 + 1), r1 - r0)
                bl, bh, lb = r0 + j0, r0 + j1, int(bounds[j1] - bounds[j0])
                label = 1
                i -= k - a_end  # the unused sentences are put back for the next chunk
            elif k == 1:  # a one-document split cannot give NotNext pairs, and one sentence no IsNext pair
                b.dropped += 1
                start, cur, i = i + 1, 0, i + 1
                short, target = _target(rng, m, p)
                continue
            else:
                bl, bh, lb, db, label = ids[start + a_end], ids[i] + 1, sum(ls[start + a_end : i + 1]), d, 0
            fa, ba, fb, bb = _trim(la, lb, m, rng)
            assert la - fa - ba >= 1 and lb - fb - bb >= 1
            b.add([(a[0], a[1], fa, ba), None, (bl, bh, fb, bb)], la - fa - ba + 2, label, d, db)
            b.short += short
            start, cur = i + 1, 0
            short, target = _target(rng, m, p)  # per chunk, not per document: see the module docstring
        i += 1


STAT_KEYS = ("is_next", "not_next", "short_target", "short_rows")


def split_figures(counts: dict, samples: int) -> dict:
    """A split's counts of ``STAT_KEYS`` (those present) with their fractions of its samples: ``not_next_fraction``
    (NotNext pairs), ``short_target_fraction`` (target length drawn short, probability ``short_seq_prob``),
    ``short_rows_fraction`` (samples under ``max_seq_length / 2`` tokens, specials included)."""
    out = dict(counts)
    for key in ("not_next", "short_target", "short_rows"):
        if key in counts:
            out[f"{key}_fraction"] = round(counts[key] / max(1, samples), 4)
    return out
