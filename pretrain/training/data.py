"""Training data: memory-mapped shard dataset, resumable distributed batch sampler, length bucketing.

Design: :class:`ResumableDistributedSampler` is the DataLoader's ``batch_sampler``. It yields, for this rank,
lists of ``(epoch, index)`` pairs; :class:`ShardDataset` reads a whole micro-batch at once
(``__getitems__``) and tags every sample with its global index and epoch, and the
:class:`~pretrain.training.masking.MaskingCollator` (the ``collate_fn``, run inside the worker) masks from those
numbers alone. So batches and masks are identical for any ``num_workers``, and resuming is exact.

Resuming: the DataLoader prefetches, so the sampler cannot know what the model has consumed. The training
loop calls ``sampler.advance()`` once per micro-batch it has trained on; ``sampler.state_dict()``
(``{"epoch", "batches_consumed", ...}``) goes into the checkpoint, and after ``load_state_dict`` a new
iterator over the loader starts at exactly the next micro-batch. ``set_epoch(e)`` for a new epoch resets
the count (calling it with the current epoch, as a resumed loop does, keeps it), and an iterator started
on a fully consumed epoch moves on to the next one by itself, so a step-based ``while`` loop works too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.errors import UserError
from data_prep.store import A_LEN, LENGTH, NSP_LABEL, OFFSET, SplitReader
from pretrain.models.bert import IGNORE_INDEX
from pretrain.training.masking import MaskingCollator, MaskingConfig

if TYPE_CHECKING:
    from pretrain.training.config import DataConfig

BatchIndex = list[tuple[int, int]]


def _split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data directory not found: {data_dir} (run data preparation first or fix data_dir)")
    split_dir = data_dir / split
    if not any(split_dir.glob("*.index.npy")):
        raise ValueError(f"no shards (*.index.npy) in {split_dir}: split {split!r} is missing or empty")
    return split_dir


class ShardDataset(Dataset):
    """Map-style dataset over the shards of one split, via :class:`data_prep.store.SplitReader`.

    Items are dicts ``{"input_ids": uint16/uint32 array (a read-only view of the memory map), "a_len",
    "nsp_label", "index", "epoch"}``. Accepts an ``int`` or an ``(epoch, index)`` pair. Memory maps are
    opened lazily in each process and never pickled, so worker start-up stays cheap.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.split_dir = _split_dir(data_dir, split)
        self.data_dir, self.split = Path(data_dir), split
        self._open()

    def _open(self) -> None:
        # Shard() checks headers, sizes, dtypes and shapes: a truncated or corrupt file raises ShardError (a
        # ValueError, one line naming the file and what to do), which the trainer reports as a data error.
        reader = SplitReader(self.data_dir, self.split)
        self.cumulative = reader.cumulative.astype(np.int64)
        # Plain ndarray views of the memmaps: slicing an np.memmap costs ~10x more than slicing an ndarray.
        self._tokens = [np.asarray(s.tokens) for s in reader.shards]
        self._index = [np.asarray(s.index) for s in reader.shards]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_tokens"], state["_index"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def lengths(self) -> np.ndarray:
        """Token count of every sample (int32 [len]), for length bucketing."""
        return np.concatenate([ix[:, LENGTH].astype(np.int32) for ix in self._index])

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index rows (int64 [n, 6]) and shard numbers of global sample indices, one fancy-index per shard."""
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in {self.split_dir}")
        shard = np.searchsorted(self.cumulative, indices, side="right") - 1
        local = indices - self.cumulative[shard]
        if len(self._index) == 1:
            return self._index[0][local], shard
        rows = np.empty((len(indices), self._index[0].shape[1]), dtype=np.int64)
        for s in np.unique(shard):
            where = shard == s
            rows[where] = self._index[s][local[where]]
        return rows, shard

    def __getitems__(self, items: Sequence[tuple[int, int] | int]) -> list[dict[str, Any]]:
        pairs = [(0, i) if isinstance(i, int | np.integer) else i for i in items]
        epochs = [int(e) for e, _ in pairs]
        indices = np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))
        rows, shard = self.rows(indices)
        tokens = self._tokens
        return [
            {"input_ids": tokens[s][o : o + n], "a_len": a, "nsp_label": y, "index": i, "epoch": e}
            for s, o, n, a, y, i, e in zip(
                shard.tolist(),
                rows[:, OFFSET].tolist(),
                rows[:, LENGTH].tolist(),
                rows[:, A_LEN].tolist(),
                rows[:, NSP_LABEL].tolist(),
                indices.tolist(),
                epochs,
                strict=True,
            )
        ]

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        return self.__getitems__([item])[0]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def bucket_by_length(
    order: np.ndarray, lengths: np.ndarray, batch: int, window: int, rng: np.random.Generator | None
) -> np.ndarray:
    """``order`` regrouped so that each batch of ``batch`` holds samples of similar length: every run of ``window``
    batches is sorted by length and cut into batches, whose order within the run ``rng`` then shuffles (none:
    longest first). Megabatch sorting, as fairseq and Hugging Face's ``group_by_length`` do; the same samples,
    deterministic from the order and the generator."""
    pieces = []
    for start in range(0, len(order), batch * window):
        chunk = order[start : start + batch * window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
        full = len(batches) - (len(batches[-1]) < batch)  # a partial batch stays last, keeping ranks aligned
        perm = rng.permutation(full) if rng is not None else np.arange(full)
        pieces += [batches[i] for i in perm] + batches[full:]
    return np.concatenate(pieces)


class ResumableDistributedSampler(Sampler[BatchIndex]):
    """Batch sampler over global micro-batches: this rank's lists of ``(epoch, sample index)``.

    Each epoch the global order is a permutation seeded by ``(seed, epoch)`` (or ``arange`` without
    shuffle), cut into global batches of ``micro_batch_size * world_size``; rank r takes every
    ``world_size``-th sample of each (``order[r::world_size]``), so ranks are disjoint and together cover the
    epoch. ``drop_last`` drops the remainder so every rank has the same number of steps; without it (for
    validation) the last batch is partial and ranks may differ by one step.

    With ``lengths`` (bucketing), each window of ``bucket_window`` global batches is sorted by length and
    cut into global batches, whose order is then shuffled within the window (megabatch sorting, as fairseq
    and Hugging Face's ``group_by_length``): deterministic from seed and epoch, and every rank's micro-batch
    at a step has similar lengths. ``len()`` is this rank's batches per epoch; see the module docstring for
    ``advance`` / ``state_dict`` / ``load_state_dict`` / ``set_epoch``.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        lengths: np.ndarray | None = None,
        bucket_window: int = 100,
    ):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= rank < world_size, got "
                f"micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}"
            )
        if drop_last and num_samples < micro_batch_size * world_size:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} x world_size={world_size} is larger than the "
                f"dataset ({num_samples} samples): lower micro_batch_size or add data"
            )
        if num_samples < world_size:
            raise ValueError(f"dataset has {num_samples} samples, fewer than world_size={world_size}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.lengths, self.bucket_window = lengths, max(1, bucket_window)
        self.epoch, self.batches_consumed = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def global_order(self, epoch: int) -> np.ndarray:
        """Sample indices of one epoch in global-batch order (before the split between ranks)."""
        n, g = self.num_samples, self.micro_batch_size * self.world_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: n // g * g]
        if self.lengths is None:
            return order
        return bucket_by_length(order, self.lengths, g, self.bucket_window, rng if self.shuffle else None)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for an epoch, batch after batch (cached for the current epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_order(epoch)[self.rank :: self.world_size])
        return self._cache[1]

    def __len__(self) -> int:
        n, b, w = self.num_samples, self.micro_batch_size, self.world_size
        if self.drop_last:
            return n // (b * w)
        return -(-len(range(self.rank, n, w)) // b)

    def __iter__(self) -> Iterator[BatchIndex]:
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        epoch, start, b = self.epoch, self.batches_consumed, self.micro_batch_size
        mine = self.rank_order(epoch)
        for k in range(start, len(self)):
            yield [(epoch, i) for i in mine[k * b : (k + 1) * b].tolist()]

    def advance(self, num_batches: int = 1) -> None:
        """Record that the training loop has consumed ``num_batches`` more micro-batches of this epoch."""
        self.batches_consumed += num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; a no-op when it is the current epoch (keeps a resumed count)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "global_batch_size": self.micro_batch_size * self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``. With another global batch size (world size or micro batch changed) the position
        is carried over in samples, rounded up to whole batches (exact without bucketing when it divides)."""
        if "num_samples" in state and int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples but the data has "
                f"{self.num_samples}: resume with the same data directory"
            )
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        old, new = int(state.get("global_batch_size", 0)), self.micro_batch_size * self.world_size
        if old and old != new:
            self.batches_consumed = -(-self.batches_consumed * old // new)
            warnings.warn(
                f"sampler: global batch size {old} -> {new}; resuming at batch {self.batches_consumed} "
                f"of epoch {self.epoch}",
                stacklevel=2,
            )


class PackingCollator:
    """Masks a micro-batch as ``MaskingCollator`` does (same masks per sample), then packs its samples into as few
    rows of the batch's width as first-fit in sample order allows: padding is compute that learns nothing.

    The batch keeps every sample (the sampler's position and the sequences per step are unchanged); rows carry
    ``position_ids`` restarting at each sample, ``attention_mask`` with each token's sample number in its row
    (1, 2, ...; 0 = padding: the model keeps attention inside each sample), and ``cls_index`` [N], the flat index
    of each sample's [CLS] (NSP is read there). Deterministic: the same samples give the same rows."""

    def __init__(self, collator: MaskingCollator) -> None:
        self.collator = collator

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(samples)
        real = batch["attention_mask"].numpy().astype(bool)
        lengths, width = real.sum(1), real.shape[1]
        free: list[int] = []  # room left in each row
        place = []  # (row, start) of each sample
        for n in lengths.tolist():
            r = next((r for r, f in enumerate(free) if f >= n), len(free))
            if r == len(free):
                free.append(width)
            place.append((r, width - free[r]))
            free[r] -= n
        rows = len(free)
        out = {k: np.zeros((rows, width), np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
        out["input_ids"][:] = self.collator.pad_id
        out["labels"] = np.full((rows, width), IGNORE_INDEX, np.int64)
        out["position_ids"] = np.zeros((rows, width), np.int64)
        count = [0] * rows
        cls_index = np.empty(len(samples), np.int64)
        for i, ((r, start), n) in enumerate(zip(place, lengths.tolist(), strict=True)):
            dst, src = slice(start, start + n), slice(0, n)
            for k in ("input_ids", "token_type_ids", "labels"):
                out[k][r, dst] = batch[k][i, src].numpy()
            count[r] += 1
            out["attention_mask"][r, dst] = count[r]
            out["position_ids"][r, dst] = np.arange(n)
            cls_index[i] = r * width + start
        packed = {k: torch.from_numpy(v) for k, v in out.items()}
        packed["cls_index"] = torch.from_numpy(cls_index)
        if "next_sentence_label" in batch:
            packed["next_sentence_label"] = batch["next_sentence_label"]
        return packed


def real_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token count of every sample of a batch, packed or not: [N]."""
    mask = batch["attention_mask"]
    if "position_ids" not in batch:
        return mask.sum(1)
    k, width = int(mask.max()) + 1, mask.size(1)
    keys = torch.arange(mask.size(0), device=mask.device)[:, None] * k + mask  # (row, sample number in row)
    counts = torch.bincount(keys.reshape(-1), minlength=mask.size(0) * k)
    cls = batch["cls_index"]
    return counts[(cls // width) * k + mask.reshape(-1)[cls]]  # in sample order


def build_dataloader(
    data_dir: str | os.PathLike,
    split: str,
    micro_batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    masking: MaskingConfig | None = None,
    bucket: bool = False,
    shuffle: bool = True,
    drop_last: bool = True,
    bucket_window: int = 100,
    pack: bool = False,
    sentence_order: bool = False,
) -> tuple[DataLoader, ResumableDistributedSampler]:
    """DataLoader of masked micro-batches for this rank, and its sampler (for ``advance``/state/epochs).

    Validation: ``shuffle=False, drop_last=False``; masks are then static (epoch 0), so validation losses are
    comparable across evaluations. The vocabulary is ``data_dir/vocab.txt``.
    """
    masking = masking or MaskingConfig()
    if not shuffle:
        masking = replace(masking, static=True)
    dataset = ShardDataset(data_dir, split)
    sampler = ResumableDistributedSampler(
        len(dataset),
        micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        lengths=dataset.lengths() if bucket else None,
        bucket_window=bucket_window,
    )
    collator: Any = MaskingCollator.from_vocab_file(Path(data_dir) / "vocab.txt", masking, seed, sentence_order)
    if pack:
        collator = PackingCollator(collator)
    # No worker_init_fn and no loader generator: nothing in a worker is random; every draw is a hash.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


def run_loaders(
    data: DataConfig, micro_batch_size: int, seed: int, rank: int, world_size: int, validation: bool,
    pack: bool | None = None,
) -> tuple[DataLoader, ResumableDistributedSampler, DataLoader | None]:  # fmt: skip
    """A pretraining run's loaders as ``data`` (the ``data`` section) describes them: the training loader and its
    sampler, and with ``validation`` the static-mask validation loader. ``pack`` overrides ``data.pack`` (the
    benchmark's reference runs padded). A shard that cannot be read is one line naming ``data.dir``."""
    common = dict(rank=rank, world_size=world_size, seed=seed, num_workers=data.num_workers,
                  sentence_order=data.pair_task == "sop", masking=data.masking)  # fmt: skip
    try:
        loader, sampler = build_dataloader(data.dir, "train", micro_batch_size, bucket=data.bucket,
                                           pack=data.pack if pack is None else pack, **common)  # fmt: skip
        val = None
        if validation:
            val, _ = build_dataloader(data.dir, "validation", micro_batch_size, shuffle=False, drop_last=False,
                                      **common)  # fmt: skip
    except ValueError as e:
        raise UserError(f"data.dir={data.dir}: {e}") from None
    return loader, sampler, val


def fork_rng(device: torch.device):
    """Loader iterators draw a base seed from the global RNG and eval runs outside the training stream: keep
    both from shifting the dropout RNG, or a resumed run would diverge from an uninterrupted one."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class Batches:
    """The training micro-batches of this rank, across epochs, counting what was consumed (the checkpointed data
    position: the loader prefetches ahead) and which (epoch, micro-batch) made up the current step."""

    def __init__(self, loader: Any, sampler: Any, device: torch.device) -> None:
        self.loader, self.sampler, self.device = loader, sampler, device
        self.it = self._new_iter()
        self.positions: list[tuple[int, int]] = []

    def _new_iter(self) -> Any:
        with fork_rng(self.device):
            return iter(self.loader)

    def __call__(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.it)
        except StopIteration:  # epoch boundary: the sampler reshuffles with the new epoch
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.it = self._new_iter()
            batch = next(self.it)
        self.sampler.advance(1)
        self.positions.append((self.sampler.epoch, self.sampler.batches_consumed - 1))
        return batch

    def samples(self, micro_batch_size: int) -> list[int]:
        """This rank's sample indices of the current step (global indices into the split)."""
        b, order = micro_batch_size, self.sampler.rank_order
        return [i for e, k in self.positions for i in order(e)[k * b : (k + 1) * b].tolist()]
