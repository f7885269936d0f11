"""Dynamic (or static) BERT masking as a DataLoader collate function.

Every random draw is a counter-based hash of ``(seed, epoch, sample index, position, stream)`` (the
splitmix64 finaliser, vectorised over the whole batch in uint64 numpy arithmetic), so the mask of a sample
is a pure function of those numbers: the same whatever the batch it lands in, the number of loader workers
or the rank that reads it, and a resumed run reads exactly the masks the uninterrupted run would have read.
No per-token Python; the result is torch tensors.

Selection is Bernoulli(``mlm_probability``) per eligible token (every real token except ``[CLS]``, ``[SEP]``,
``[MASK]`` and ``[PAD]``; ``[UNK]`` may be selected), or per word with ``whole_word`` (a word is a token
plus its following ``##`` continuations; all its pieces are selected together). Selected tokens become
``[MASK]`` 80%, a random non-special vocabulary token 10%, and stay unchanged 10% (per token, as in BERT).

Sentence order (ALBERT's SOP, ``sentence_order=True``) is drawn from the same NSP shards, with the same kind of
hash: an IsNext pair (two consecutive segments of one document) is kept (label 0) or swapped (label 1), 50/50 per
(seed, epoch, sample); a NotNext pair, whose second segment comes from another document, is cut to its first
segment and trains MLM only (label -100), so no input ever joins two documents.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.errors import DataPrepError
from data_prep.vocab import SPECIALS, read_vocab
from pretrain.models.bert import IGNORE_INDEX

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_STREAM_SELECT, _STREAM_ACTION, _STREAM_ORDER = 1, 2, 3


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (mod 2**64), for per-batch scalars."""
    x &= _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (a bijection with full avalanche; wraps mod 2**64), in place."""
    t = np.empty_like(x)
    for shift, mult in ((_S30, _M1), (_S27, _M2)):
        np.right_shift(x, shift, out=t)
        x ^= t
        x *= mult
    np.right_shift(x, _S31, out=t)
    x ^= t
    return x


def sample_keys(seed: int, epochs: Sequence[int], indices: Sequence[int]) -> np.ndarray:
    """uint64 [B] keys, one per sample, from (seed, epoch, index). Chained mixes, so distinct tuples never
    collide by a linear coincidence; the (seed, epoch) part is a Python scalar per distinct epoch."""
    per_epoch = {e: _mix_int(_mix_int(seed * 2 + 1) ^ (e * _GOLDEN)) for e in set(epochs)}
    base = np.fromiter((per_epoch[e] for e in epochs), dtype=np.uint64, count=len(epochs))
    return mix(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


def _threshold(p: float) -> np.uint64:
    """t with P(h < t) = p for h uniform over uint64 (exact to 2**-64)."""
    return np.uint64(min(round(p * (1 << 64)), _U64))


_HALF = _threshold(0.5)


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15
    """Probability that an eligible token (or word, with ``whole_word``) is selected for prediction."""
    mask_token_prob: float = 0.8
    """Of the selected tokens, the fraction replaced by ``[MASK]``."""
    random_token_prob: float = 0.1
    """Of the selected tokens, the fraction replaced by a random non-special token; the rest stay unchanged."""
    whole_word: bool = False
    """Select whole words (a token plus its ``##`` continuations) instead of single WordPiece tokens."""
    static: bool = False
    """Static masking: a sample's mask depends only on its index, never on the epoch (original BERT recipe).
    Validation loaders use this so losses are comparable across evaluations."""
    pad_to_multiple_of: int = 8
    """Batch length is the longest sample rounded up to a multiple of this (tensor-core friendly)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"masking.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_token_prob < 0 or self.random_token_prob < 0 or self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                "masking.mask_token_prob and masking.random_token_prob must be >= 0 and sum to at most 1, "
                f"got {self.mask_token_prob} and {self.random_token_prob}"
            )
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"masking.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")


class MaskingCollator:
    """Collate a list of samples into a padded, masked batch of torch tensors.

    Each sample is a mapping with ``input_ids`` (1-D integer numpy array, no padding), ``a_len`` (count of
    token type 0 tokens), ``nsp_label`` (0/1, or -1 without NSP), ``index`` (global sample index) and
    ``epoch``. The result holds ``input_ids``, ``token_type_ids``, ``attention_mask`` (int64 1 on tokens,
    0 on padding, as Hugging Face models expect) and ``labels`` (original id where selected, -100 elsewhere),
    all int64 ``[B, L]``, plus ``next_sentence_label`` int64 ``[B]`` when the samples carry NSP labels.
    """

    def __init__(
        self, vocab: Sequence[str], cfg: MaskingConfig | None = None, seed: int = 0, sentence_order: bool = False
    ):
        self.cfg = cfg or MaskingConfig()
        self.seed, self.sentence_order = int(seed), sentence_order
        index = {tok: i for i, tok in enumerate(vocab)}
        missing = [n for n in SPECIALS if n not in index]
        if missing:
            raise ValueError(f"vocabulary lacks special tokens {missing}; it needs all of {list(SPECIALS)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[n] for n in SPECIALS)
        self.vocab_size = len(vocab)
        # Ineligible for selection: every special except [UNK] (an [UNK] in the text is a real token).
        ineligible = np.zeros(self.vocab_size, dtype=bool)
        ineligible[[self.pad_id, self.cls_id, self.sep_id, self.mask_id]] = True
        self.ineligible = ineligible
        self.is_continuation = np.array([t.startswith("##") for t in vocab], dtype=bool)
        # Random replacements: real vocabulary only, never [PAD]/[UNK]/[CLS]/[SEP]/[MASK] nor [unusedN] etc.
        real = [i for i, t in enumerate(vocab) if not (t.startswith("[") and t.endswith("]")) and t]
        if not real:
            raise ValueError("vocabulary has no non-special tokens to draw random replacements from")
        self.replacement_ids = np.array(real, dtype=np.int64)
        self._t_select = _threshold(self.cfg.mlm_probability)
        self._t_mask = _threshold(self.cfg.mask_token_prob)
        self._t_random = _threshold(self.cfg.mask_token_prob + self.cfg.random_token_prob)
        self._offset_cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_vocab_file(
        cls, path: str | os.PathLike, cfg: MaskingConfig | None = None, seed: int = 0, sentence_order: bool = False
    ):
        try:
            return cls(read_vocab(path), cfg, seed, sentence_order)
        except DataPrepError as e:  # bad input is a ValueError here, as every other one
            raise ValueError(str(e)) from None

    def pad(self, samples: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded int64 ``input_ids``, ``token_type_ids`` and ``attention_mask`` [B, L], vectorised."""
        lengths = np.fromiter((len(s["input_ids"]) for s in samples), dtype=np.int64, count=len(samples))
        a_lens = np.fromiter((s["a_len"] for s in samples), dtype=np.int64, count=len(samples))
        m = self.cfg.pad_to_multiple_of
        width = max(int(-(-int(lengths.max(initial=1)) // m) * m), m)
        valid = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(samples), width), self.pad_id, dtype=np.int64)
        ids[valid] = np.concatenate([s["input_ids"] for s in samples]) if len(samples) else []
        types = (np.arange(width)[None, :] >= a_lens[:, None]) & valid
        return ids, types.astype(np.int64), valid.astype(np.int64)

    def _offsets(self, width: int, stream: int) -> np.ndarray:
        """Per-position hash offsets ``(4 * pos + stream) * golden`` (uint64) for a batch width, cached."""
        key = (width, stream)
        if key not in self._offset_cache:
            self._offset_cache[key] = np.array(
                [((4 * p + stream) * _GOLDEN) & _U64 for p in range(width)], dtype=np.uint64
            )
        return self._offset_cache[key]

    def mask(self, ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masked copy of padded int64 ``ids`` [B, L] and the labels, from uint64 per-sample keys [B].

        Whole-batch numpy ops on uint64 (logical shifts and wrapping multiplies are native there, and a
        numpy op on a batch costs a third of a torch CPU op); hashes are compared against integer
        thresholds, ``h < t`` having probability exactly p.
        """
        cfg, width = self.cfg, ids.shape[1]
        eligible = ~self.ineligible[ids]
        h = mix(keys[:, None] + self._offsets(width, _STREAM_SELECT)[None, :])
        if cfg.whole_word:
            # A word starts at a non-## token, or at a ## token that follows a special (it has no head);
            # every piece uses the draw at its word's first position.
            start = ~self.is_continuation[ids]
            start[:, 1:] |= ~eligible[:, :-1]
            head = np.maximum.accumulate(np.where(start, np.arange(width), 0), axis=1)
            h = np.take_along_axis(h, head, axis=1)
        selected = eligible & (h < self._t_select)
        labels = np.where(selected, ids, IGNORE_INDEX)
        h = mix(keys[:, None] + self._offsets(width, _STREAM_ACTION)[None, :])
        # The high bits choose the action, the low 32 bits the random token (independent for this hash).
        random_ids = self.replacement_ids[(h & np.uint64(0xFFFFFFFF)) % np.uint64(len(self.replacement_ids))]
        out = np.where(selected & (h < self._t_mask), self.mask_id, ids)
        out = np.where(selected & (h >= self._t_mask) & (h < self._t_random), random_ids, out)
        return out, labels

    def order_pairs(self, samples: Sequence[dict[str, Any]], keys: np.ndarray) -> list[dict[str, Any]]:
        """Sentence-order samples from NSP samples (see the module docstring), from uint64 per-sample keys [B].
        ``input_ids`` is ``[CLS] A [SEP] B [SEP]`` with ``a_len = len([CLS] A [SEP])``."""
        if any(int(s["nsp_label"]) < 0 for s in samples):
            raise ValueError("sentence order needs sentence-pair shards (RoBERTa-mode shards have no pairs)")
        swap = mix(keys + np.uint64(_STREAM_ORDER * _GOLDEN & _U64)) < _HALF
        out = []
        for s, flip in zip(samples, swap.tolist(), strict=True):
            ids, a = s["input_ids"], int(s["a_len"])
            if int(s["nsp_label"]) == 1:  # NotNext: the second segment is from another document
                out.append({**s, "input_ids": ids[:a], "nsp_label": IGNORE_INDEX})
            elif flip:  # [CLS] B [SEP] A [SEP]
                swapped = np.concatenate([ids[:1], ids[a:-1], ids[a - 1 : a], ids[1 : a - 1], ids[-1:]])
                out.append({**s, "input_ids": swapped, "a_len": len(ids) - a + 1, "nsp_label": 1})
            else:
                out.append(s)
        return out

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        indices = [int(s["index"]) for s in samples]
        epochs = [0] * len(samples) if self.cfg.static else [int(s.get("epoch", 0)) for s in samples]
        keys = sample_keys(self.seed, epochs, indices)
        if self.sentence_order:
            samples = self.order_pairs(samples, keys)
        ids, types, attention = self.pad(samples)
        masked, labels = self.mask(ids, keys)
        nsp = [int(s["nsp_label"]) for s in samples]
        # One storage for the whole batch: a worker then hands one shared-memory block to the main process
        # instead of five (the per-tensor transfer cost dominates at these sizes).
        buf = np.empty(4 * masked.size + len(nsp), dtype=np.int64)
        parts = buf[: 4 * masked.size].reshape(4, *masked.shape)
        parts[0], parts[1], parts[2], parts[3] = masked, types, attention, labels
        buf[4 * masked.size :] = nsp
        tensor = torch.from_numpy(buf)
        views = tensor[: 4 * masked.size].view(4, *masked.shape)
        batch = {"input_ids": views[0], "token_type_ids": views[1], "attention_mask": views[2], "labels": views[3]}
        if min(nsp) >= 0 or self.sentence_order:  # SOP: -100 where a NotNext pair trains MLM only
            batch["next_sentence_label"] = tensor[4 * masked.size :]
        elif max(nsp) >= 0:
            raise ValueError("batch mixes samples with and without NSP labels (BERT and RoBERTa shards in one split)")
        return batch
