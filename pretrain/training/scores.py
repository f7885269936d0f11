"""One evaluation pass for every tool: the trainer's validation, ``launch/evaluate.py`` and fine-tuning's epochs.

``evaluation_pass`` runs a model (ours, or a DeepSpeed engine around it) in eval mode over batches, with the RNG streams
left as they were, and lets a ``score`` function add each batch's figures into named float64 sums; ``reduce``
(an all-reduce across ranks, or nothing in one process) combines them at the end. Under several ranks every rank
runs the same number of batches (ZeRO-3 gathers parameters collectively). ``pretraining_scores`` is the score of
a pretraining model (MLM and NSP/SOP); ``pretraining_metrics`` turns its sums into losses and accuracies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.store import SplitReader
from pretrain.models.bert import IGNORE_INDEX
from pretrain.training.data import fork_rng, to_device
from pretrain.training.masking import MaskingCollator

_CHUNK = 1 << 24  # tokens per bincount: np.bincount makes an intp copy of its input, keep it to 128 MB
PRETRAINING_SUMS = ("mlm_loss", "mlm_correct", "masked", "unigram_correct", "nsp_loss", "nsp_correct", "nsp_count",
                    "is_next", "samples")  # fmt: skip


class Sums:
    """Named float64 accumulators on one device, reduced together as one tensor."""

    def __init__(self, names: Iterable[str], device: torch.device) -> None:
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.values = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, name: str, value: Any) -> None:
        self.values[self.index[name]] += value

    def reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, float]:
        values = reduce(self.values) if reduce is not None else self.values
        return dict(zip(self.names, values.tolist(), strict=True))


@torch.no_grad()
def evaluation_pass(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    score: Callable[[Any, dict[str, torch.Tensor], Sums], None],
    names: Iterable[str],
    max_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    agree: Callable[[int], int] | None = None,
    progress: Callable[[Sums], None] | None = None,
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Run ``model`` over at most ``max_batches`` of ``batches`` (``agree``: the count every rank runs, e.g. the
    MIN over ranks), ``score(out, batch, sums)`` after each, and return the sums, reduced, with ``batches``."""
    sums = Sums([*names, "batches"], device)
    limit = agree(max_batches) if agree is not None else max_batches
    was_training = model.training
    model.eval()
    try:
        with fork_rng(device):  # a loader iterator draws a seed from the global streams: leave them as they were
            for i, batch in enumerate(batches):
                if limit is not None and i >= limit:
                    break
                batch = to_device(batch, device)
                if prepare is not None:
                    batch = prepare(batch)
                score(model(**batch), batch, sums)
                sums.add("batches", 1)
                if progress is not None:
                    progress(sums)
    finally:
        model.train(was_training)
    return sums.reduce(reduce)


def pretraining_scores(unigram_id: int | None) -> Callable[[Any, dict[str, torch.Tensor], Sums], None]:
    """The score of a pretraining model's batch: MLM loss/correct/count at the masked positions, the unigram
    baseline (always answering ``unigram_id``) at the same positions, NSP (or SOP) loss/correct over labelled
    rows and the IsNext count for the majority baseline."""

    def score(out: Any, batch: dict[str, torch.Tensor], s: Sums) -> None:
        s.add("samples", batch["input_ids"].size(0))
        if out.mlm_logits is not None and out.num_masked:
            logits, labels = out.mlm_logits.float(), out.mlm_labels
            s.add("mlm_loss", F.cross_entropy(logits, labels, reduction="sum").double())
            s.add("mlm_correct", (logits.argmax(-1) == labels).sum())
            s.add("masked", out.num_masked)
            if unigram_id is not None:
                s.add("unigram_correct", (labels == unigram_id).sum())
        if out.nsp_logits is not None and "next_sentence_label" in batch:
            label = batch["next_sentence_label"]
            s.add("nsp_loss", F.cross_entropy(out.nsp_logits.float(), label, reduction="sum").double())
            valid = label != IGNORE_INDEX  # SOP: NotNext rows carry no pair label
            s.add("nsp_correct", ((out.nsp_logits.argmax(-1) == label) & valid).sum())
            s.add("nsp_count", valid.sum())
            s.add("is_next", (label == 0).sum())

    return score


def pretraining_metrics(s: dict[str, float], unigram: bool = True) -> dict[str, float]:
    """Losses and accuracies from ``pretraining_scores``' sums (keys without a prefix)."""
    res: dict[str, float] = {}
    if s["masked"]:
        res.update(mlm_loss=s["mlm_loss"] / s["masked"], mlm_acc=s["mlm_correct"] / s["masked"],
                   perplexity=math.exp(min(s["mlm_loss"] / s["masked"], 700)))  # fmt: skip
        if unigram:
            res["unigram_acc"] = s["unigram_correct"] / s["masked"]
    if s["nsp_count"]:
        n = s["nsp_count"]
        res.update(nsp_loss=s["nsp_loss"] / n, nsp_acc=s["nsp_correct"] / n,
                   nsp_majority_acc=max(s["is_next"], n - s["is_next"]) / n)  # fmt: skip
    return res


# ------------------------------------------------------------------------------ the unigram baseline


def token_counts(data_dir: str | os.PathLike, split: str = "train", max_tokens: int | None = None) -> np.ndarray:
    """Occurrences of every token id in a split's shards (int64, up to the largest id present): ``np.bincount``
    over the memory-mapped token arrays, a chunk at a time, so nothing has to fit in RAM. ``max_tokens``: read at
    most that many, the same share from the start of every shard (an estimate for corpora of billions)."""
    shards = SplitReader(data_dir, split).shards
    per_shard = None if max_tokens is None else -(-max_tokens // max(1, len(shards)))
    counts = np.zeros(0, dtype=np.int64)
    for shard in shards:
        end = len(shard.tokens) if per_shard is None else min(len(shard.tokens), per_shard)
        for start in range(0, end, _CHUNK):
            c = np.bincount(np.asarray(shard.tokens[start : min(end, start + _CHUNK)]))
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[: len(c)] += c
    return counts


def most_frequent_token(
    data_dir: str | os.PathLike,
    split: str = "train",
    exclude: Iterable[int] | None = None,
    max_tokens: int | None = None,
) -> int:
    """Id of the most frequent token of a split (the unigram baseline's only answer). ``exclude`` defaults to
    the special tokens masking never selects ([PAD], [CLS], [SEP], [MASK], read from ``data_dir/vocab.txt``):
    every sample has a [CLS] and a [SEP], and a baseline that answers one is never scored."""
    counts = token_counts(data_dir, split, max_tokens)
    if exclude is None:
        exclude = np.flatnonzero(MaskingCollator.from_vocab_file(Path(data_dir) / "vocab.txt").ineligible)
    drop = [i for i in exclude if i < len(counts)]
    counts[drop] = -1
    if not len(counts) or counts.max() <= 0:
        raise ValueError(f"{Path(data_dir) / split}: no tokens that masking could select")
    return int(counts.argmax())
