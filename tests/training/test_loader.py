"""Shard dataset, distributed resumable sampler, bucketing and build_dataloader over small tmp shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.store import INDEX_COLUMNS, write_shard
from pretrain.models.bert import IGNORE_INDEX
from pretrain.training.data import ResumableDistributedSampler, ShardDataset, build_dataloader
from pretrain.training.masking import MaskingConfig

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(300)] + [f"##p{i}" for i in range(50)]
CLS, SEP = 2, 3


def write_data(
    root: Path,
    sizes: tuple[int, ...] = (37, 50, 23),
    split: str = "train",
    nsp: bool = True,
    max_len: int = 64,
    seed: int = 0,
) -> Path:
    """Shards of [CLS] A [SEP] B [SEP] samples whose first real token encodes the global sample index."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    start = 0
    for k, n in enumerate(sizes):
        lengths = rng.integers(8, max_len + 1, n)
        tokens, index, offset = [], np.zeros((n, len(INDEX_COLUMNS)), dtype=np.int64), 0
        for j, length in enumerate(lengths):
            ids = rng.integers(5, len(VOCAB), length)
            a_len = int(rng.integers(3, length - 2))
            ids[0], ids[a_len - 1], ids[-1] = CLS, SEP, SEP
            ids[1] = 5 + (start + j) % 300
            tokens.append(ids)
            index[j] = (offset, length, a_len, (start + j) % 2 if nsp else -1, start + j, start + j)
            offset += length
        write_shard(root / split, f"shard-{k:05d}", np.concatenate(tokens).astype(np.uint16), index)
        start += n
    return root


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path)


def all_indices(sampler: ResumableDistributedSampler) -> list[int]:
    return [i for batch in sampler for _, i in batch]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_disjoint_and_covering(world_size: int, drop_last: bool) -> None:
    n, b = 110, 4
    samplers = [
        ResumableDistributedSampler(n, b, rank=r, world_size=world_size, seed=3, drop_last=drop_last)
        for r in range(world_size)
    ]
    per_rank = [all_indices(s) for s in samplers]
    flat = [i for part in per_rank for i in part]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert len(flat) == n // (b * world_size) * b * world_size
        assert len({len(s) for s in samplers}) == 1
        assert all(len(p) == len(s) * b for p, s in zip(per_rank, samplers, strict=True))
    else:
        assert sorted(flat) == list(range(n))
        assert [len(list(s)) for s in samplers] == [len(s) for s in samplers]
    epoch1 = ResumableDistributedSampler(n, b, rank=0, world_size=world_size, seed=3, drop_last=drop_last)
    epoch1.set_epoch(1)
    assert all_indices(epoch1) != per_rank[0]  # reshuffled per epoch


def test_dataset_items(data: Path) -> None:
    ds = ShardDataset(data, "train")
    assert len(ds) == 110
    for i in (0, 36, 37, 86, 87, 109):  # shard boundaries
        item = ds[(4, i)]
        assert item["index"] == i and item["epoch"] == 4 and item["input_ids"][1] == 5 + i % 300
        assert item["input_ids"][0] == CLS and item["input_ids"][item["a_len"] - 1] == SEP
        assert item["nsp_label"] == i % 2
    assert ds[5]["epoch"] == 0
    items = ds.__getitems__([(0, 100), (0, 3), (0, 50)])
    assert [x["index"] for x in items] == [100, 3, 50]
    with pytest.raises(IndexError):
        ds[110]


def collect(loader, sampler, count: int | None = None) -> list[dict]:
    out = []
    for batch in itertools.islice(loader, count):
        sampler.advance()
        out.append({k: v.clone() for k, v in batch.items()})
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted(data: Path, num_workers: int) -> None:
    kw = dict(seed=9, num_workers=num_workers, masking=MaskingConfig())
    loader, sampler = build_dataloader(data, "train", 8, **kw)
    full = collect(loader, sampler)  # epoch 0: 13 batches
    sampler.set_epoch(1)
    full += collect(loader, sampler)
    assert len(full) == 26
    loader, sampler = build_dataloader(data, "train", 8, **kw)
    part = collect(loader, sampler, 5)
    state = sampler.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 5
    del loader
    fresh, fresh_sampler = build_dataloader(data, "train", 8, **kw)
    fresh_sampler.load_state_dict(state)
    fresh_sampler.set_epoch(0)  # a resumed loop re-announcing the current epoch keeps its position
    part += collect(fresh, fresh_sampler)
    part += collect(fresh, fresh_sampler)  # iterating a consumed epoch moves on to the next one
    assert fresh_sampler.state_dict()["epoch"] == 1
    assert_same(part, full)
    if num_workers == 2:
        loader0, sampler0 = build_dataloader(data, "train", 8, seed=9, num_workers=0, masking=MaskingConfig())
        assert_same(collect(loader0, sampler0), full[:13])


def test_state_other_world_size_and_data(data: Path) -> None:
    one = ResumableDistributedSampler(110, 4, seed=2)
    one.advance(6)  # 24 samples of the global order consumed
    two = [ResumableDistributedSampler(110, 4, rank=r, world_size=2, seed=2) for r in range(2)]
    for s in two:
        with pytest.warns(UserWarning, match="global batch size 4 -> 8"):
            s.load_state_dict(one.state_dict())
    assert two[0].state_dict()["batches_consumed"] == 3
    rest = sorted(i for s in two for i in all_indices(s))
    assert rest == sorted(one.global_order(0)[24:104].tolist())  # same permutation, cut at 13 x 8
    with pytest.raises(ValueError, match="same data"):
        ResumableDistributedSampler(111, 4).load_state_dict(one.state_dict())


def padding_fraction(batches: list[dict]) -> float:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches
    )


def test_bucketing_less_padding_and_covers(tmp_path: Path) -> None:
    root = write_data(tmp_path, sizes=(400, 240), max_len=512)
    kw = dict(seed=1, drop_last=False, bucket_window=10)
    plain_loader, plain_sampler = build_dataloader(root, "train", 16, **kw)
    buck_loader, buck_sampler = build_dataloader(root, "train", 16, bucket=True, **kw)
    plain, bucketed = collect(plain_loader, plain_sampler), collect(buck_loader, buck_sampler)
    assert padding_fraction(bucketed) < 0.5 * padding_fraction(plain)
    assert sorted(
        all_indices(
            ResumableDistributedSampler(
                640, 16, seed=1, drop_last=False, lengths=ShardDataset(root).lengths(), bucket_window=10
            )
        )
    ) == list(range(640))
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in bucketed)
    # Deterministic, and ranks at the same step get similar lengths.
    again_loader, again_sampler = build_dataloader(root, "train", 16, bucket=True, **kw)
    assert_same(collect(again_loader, again_sampler), bucketed)
    widths = [
        [
            b["attention_mask"].sum(1).max().item()
            for b in collect(
                *build_dataloader(root, "train", 8, rank=r, world_size=2, bucket=True, seed=1, bucket_window=10)
            )
        ]
        for r in range(2)
    ]
    assert np.corrcoef(widths[0], widths[1])[0, 1] > 0.9


def test_batch_contents(data: Path) -> None:
    loader, sampler = build_dataloader(data, "train", 8, masking=MaskingConfig(mlm_probability=0.3))
    ds = ShardDataset(data)
    for batch, indices in zip(loader, sampler, strict=False):
        for row, (_, i) in enumerate(indices):
            item = ds[i]
            n, a = len(item["input_ids"]), item["a_len"]
            assert batch["token_type_ids"][row, :a].eq(0).all() and batch["token_type_ids"][row, a:n].eq(1).all()
            assert batch["attention_mask"][row].sum() == n
            original = torch.from_numpy(item["input_ids"].astype(np.int64))
            selected = batch["labels"][row, :n] != IGNORE_INDEX
            assert torch.equal(batch["labels"][row, :n][selected], original[selected])
            assert batch["next_sentence_label"][row] == i % 2
        break


def test_validation_loader_static_and_roberta(tmp_path: Path) -> None:
    root = write_data(tmp_path, sizes=(21,), split="validation", nsp=False)
    loaders = [
        build_dataloader(root, "validation", 8, rank=r, world_size=2, shuffle=False, drop_last=False) for r in range(2)
    ]
    first = [collect(loader, sampler) for loader, sampler in loaders]
    assert [len(x) for x in first] == [2, 2]  # 11 and 10 samples
    assert "next_sentence_label" not in first[0][0]
    loader, sampler = loaders[0]
    sampler.set_epoch(1)
    assert_same(collect(loader, sampler), first[0])  # same order and same masks at every evaluation


def test_errors(tmp_path: Path, data: Path) -> None:
    with pytest.raises(ValueError, match="data directory not found"):
        build_dataloader(tmp_path / "nope", "train", 8)
    with pytest.raises(ValueError, match="validation"):
        build_dataloader(data, "validation", 8)
    with pytest.raises(ValueError, match="micro_batch_size=64"):
        build_dataloader(data, "train", 64, world_size=2)
    (data / "vocab.txt").unlink()
    with pytest.raises(ValueError, match="vocab"):
        build_dataloader(data, "train", 8)
