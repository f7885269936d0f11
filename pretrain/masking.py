"""Dynamic (or static) BERT masking as a DataLoader collate function.

Every random draw is a counter-based hash of ``(seed, epoch, sample index, position, stream)`` (the
splitmix64 finaliser, vectorised in int64 torch arithmetic), so the mask of a sample is a pure function of
those numbers: the same whatever the batch it lands in, the number of loader workers or the rank that reads
it, and a resumed run reads exactly the masks the uninterrupted run would have read. No per-token Python.

Selection is Bernoulli(``mlm_probability``) per eligible token (every real token except ``[CLS]``, ``[SEP]``,
``[MASK]`` and ``[PAD]``; ``[UNK]`` may be selected), or per word with ``whole_word`` (a word is a token
plus its following ``##`` continuations; all its pieces are selected together). Selected tokens become
``[MASK]`` 80%, a random non-special vocabulary token 10%, and stay unchanged 10% (per token, as in BERT).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
SPECIAL_NAMES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# splitmix64 constants as signed int64 (torch has no uint64 shifts on CPU; int64 multiply wraps mod 2**64).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_STREAM_SELECT, _STREAM_ACTION = 1, 2


def _i64(v: int) -> int:
    """A Python int reduced mod 2**64 to the signed int64 range."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (``>>`` on a signed tensor is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijection of int64 with full avalanche."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def sample_keys(seed: int, epochs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One 64-bit key per sample from (seed, epoch, index): chained mixes, so distinct tuples never collide
    by linear coincidence."""
    k = _mix(torch.full_like(indices, _i64((seed * 2 + 1) * _GOLDEN)))
    k = _mix(k ^ (epochs * _GOLDEN + 0x632BE59BD9B4E019))
    return _mix(k ^ indices)


def token_hash(keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """[B, L] int64 hash of (sample key, position, stream)."""
    return _mix(keys[:, None] + (positions * 4 + stream) * _GOLDEN)


def to_unit(h: torch.Tensor) -> torch.Tensor:
    """Top 53 bits of a hash as a float64 uniform in [0, 1)."""
    return _srl(h, 11).to(torch.float64) * (1.0 / (1 << 53))


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


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Tokens of a ``vocab.txt`` (one per line; the id is the line number)."""
    if not os.path.isfile(path):
        raise ValueError(f"vocabulary file not found: {path} (expected vocab.txt in the data directory)")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


class MaskingCollator:
    """Collate a list of samples into a padded, masked batch of torch tensors.

    Each sample is a mapping with ``input_ids`` (1-D integer numpy array, no padding), ``a_len`` (count of
    token type 0 tokens), ``nsp_label`` (0/1, or -1 without NSP), ``index`` (global sample index) and
    ``epoch``. The result holds ``input_ids``, ``token_type_ids``, ``attention_mask`` (int64 1 on tokens,
    0 on padding, as Hugging Face models expect) and ``labels`` (original id where selected, -100 elsewhere),
    all int64 ``[B, L]``, plus ``next_sentence_label`` int64 ``[B]`` when the samples carry NSP labels.
    """

    def __init__(self, vocab: Sequence[str], cfg: MaskingConfig | None = None, seed: int = 0):
        self.cfg = cfg or MaskingConfig()
        self.seed = int(seed)
        index = {tok: i for i, tok in enumerate(vocab)}
        missing = [n for n in SPECIAL_NAMES if n not in index]
        if missing:
            raise ValueError(f"vocabulary lacks special tokens {missing}; it needs all of {list(SPECIAL_NAMES)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[n] for n in SPECIAL_NAMES)
        self.vocab_size = len(vocab)
        # Ineligible for selection: every special except [UNK] (an [UNK] in the text is a real token).
        ineligible = torch.zeros(self.vocab_size, dtype=torch.bool)
        ineligible[[self.pad_id, self.cls_id, self.sep_id, self.mask_id]] = True
        self.ineligible = ineligible
        self.is_continuation = torch.tensor([t.startswith("##") for t in vocab], dtype=torch.bool)
        # Random replacements: real vocabulary only, never [PAD]/[UNK]/[CLS]/[SEP]/[MASK] nor [unusedN] etc.
        real = [i for i, t in enumerate(vocab) if not (t.startswith("[") and t.endswith("]")) and t]
        if not real:
            raise ValueError("vocabulary has no non-special tokens to draw random replacements from")
        self.replacement_ids = torch.tensor(real, dtype=torch.int64)

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, cfg: MaskingConfig | None = None, seed: int = 0):
        return cls(read_vocab(path), cfg, seed)

    def pad(self, samples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        """Padded ``input_ids``, ``token_type_ids``, ``attention_mask`` and the lengths, vectorised."""
        lengths = np.fromiter((len(s["input_ids"]) for s in samples), dtype=np.int64, count=len(samples))
        a_lens = np.fromiter((s["a_len"] for s in samples), dtype=np.int64, count=len(samples))
        m = self.cfg.pad_to_multiple_of
        width = max(int(-(-int(lengths.max(initial=1)) // m) * m), m)
        valid = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full((len(samples), width), self.pad_id, dtype=np.int64)
        ids[valid] = np.concatenate([s["input_ids"] for s in samples]) if len(samples) else []
        types = (np.arange(width)[None, :] >= a_lens[:, None]) & valid
        return (torch.from_numpy(ids), torch.from_numpy(types.astype(np.int64)),
                torch.from_numpy(valid.astype(np.int64)), torch.from_numpy(lengths))

    def mask(self, ids: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked copy of padded ``ids`` [B, L] and the labels, from per-sample keys [B]."""
        cfg = self.cfg
        pos = torch.arange(ids.shape[1], dtype=torch.int64).expand_as(ids)
        eligible = ~self.ineligible[ids]
        if cfg.whole_word:
            # A word starts at a non-## token, or at a ## token that follows a special (it has no head).
            prev_ok = torch.ones_like(eligible)
            prev_ok[:, 1:] = eligible[:, :-1]
            start = ~self.is_continuation[ids] | ~prev_ok
            head = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
            u = to_unit(token_hash(keys, head, _STREAM_SELECT))
        else:
            u = to_unit(token_hash(keys, pos, _STREAM_SELECT))
        selected = eligible & (u < cfg.mlm_probability)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        h = token_hash(keys, pos, _STREAM_ACTION)
        # Low 24 bits choose the action, high 40 bits the random token (independent bits of one hash).
        action = (h & 0xFFFFFF).to(torch.float64) * (1.0 / (1 << 24))
        to_mask = selected & (action < cfg.mask_token_prob)
        to_random = selected & ~to_mask & (action < cfg.mask_token_prob + cfg.random_token_prob)
        random_ids = self.replacement_ids[_srl(h, 24) % len(self.replacement_ids)]
        out = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out = torch.where(to_random, random_ids, out)
        return out, labels

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        ids, types, attention, _ = self.pad(samples)
        indices = torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64)
        epochs = torch.zeros_like(indices) if self.cfg.static else torch.tensor(
            [int(s.get("epoch", 0)) for s in samples], dtype=torch.int64)
        masked, labels = self.mask(ids, sample_keys(self.seed, epochs, indices))
        batch = {"input_ids": masked, "token_type_ids": types, "attention_mask": attention, "labels": labels}
        nsp = [int(s["nsp_label"]) for s in samples]
        if min(nsp) >= 0:
            batch["next_sentence_label"] = torch.tensor(nsp, dtype=torch.int64)
        elif max(nsp) >= 0:
            raise ValueError("batch mixes samples with and without NSP labels (BERT and RoBERTa shards in one split)")
        return batch
