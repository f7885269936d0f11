"""Loader throughput: samples/s of build_dataloader (read + mask + collate) at seq 128 and 512.

    python benchmarks/loader.py                      # synthetic shards in a temp dir
    python benchmarks/loader.py --data DIR --split train --workers 0 1 2

``--workers 0`` runs everything in the main process, i.e. the throughput of one loader worker. Prints
markdown rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402

from data_prep.store import A_LEN, INDEX_COLUMNS, LENGTH, NSP_LABEL, OFFSET, token_dtype, write_shard  # noqa: E402
from pretrain.training.data import build_dataloader  # noqa: E402
from pretrain.training.masking import MaskingConfig  # noqa: E402


def synthetic(root: Path, seq: int, samples: int, vocab_size: int = 30522, seed: int = 0) -> Path:
    """BERT-like shards: 90% of samples at full length, 10% shorter (short_seq_prob), a quarter ## pieces."""
    rng = np.random.default_rng(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = vocab_size - len(specials)
    vocab = specials + [f"w{i}" if i < 3 * words // 4 else f"##p{i}" for i in range(words)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    lengths = np.where(rng.random(samples) < 0.1, rng.integers(8, seq + 1, samples), seq)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = rng.integers(len(specials), vocab_size, int(lengths.sum())).astype(token_dtype(vocab_size))
    a_len = np.maximum(2, (lengths * rng.uniform(0.2, 0.8, samples)).astype(np.int64))
    tokens[offsets], tokens[offsets + a_len - 1], tokens[offsets + lengths - 1] = 2, 3, 3
    index = np.zeros((samples, len(INDEX_COLUMNS)), dtype=np.int64)
    index[:, OFFSET], index[:, LENGTH], index[:, A_LEN] = offsets, lengths, a_len
    index[:, NSP_LABEL] = rng.integers(0, 2, samples)
    half = samples // 2  # two shards, so batches cross shard boundaries
    write_shard(root / "train", "shard-00000", tokens[: offsets[half]], index[:half])
    rest = index[half:].copy()
    rest[:, OFFSET] -= offsets[half]
    write_shard(root / "train", "shard-00001", tokens[offsets[half] :], rest)
    return root


def measure(data: Path, split: str, batch: int, workers: int, whole_word: bool, bucket: bool, seconds: float):
    loader, sampler = build_dataloader(
        data, split, batch, num_workers=workers, bucket=bucket, masking=MaskingConfig(whole_word=whole_word)
    )
    it, warmup = iter(loader), 3 + 2 * workers
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            next(it)
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            it = iter(loader)
            continue
        count += batch
    rate = count / (time.perf_counter() - start)
    del it, loader
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="existing data dir (default: synthetic shards in a temp dir)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="synthetic sequence lengths")
    parser.add_argument("--batch", type=int, default=32, help="micro batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=60_000, help="synthetic samples per sequence length")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per row")
    parser.add_argument("--whole-word", action="store_true")
    parser.add_argument("--bucket", action="store_true")
    args = parser.parse_args()
    print("| seq | workers | micro batch | whole word | samples/s | samples/s per worker |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sets = (
            [("data", args.data)]
            if args.data
            else [(seq, synthetic(Path(tmp) / str(seq), seq, args.samples)) for seq in args.seq]
        )
        for seq, data in sets:
            for workers in args.workers:
                rate = measure(data, args.split, args.batch, workers, args.whole_word, args.bucket, args.seconds)
                print(
                    f"| {seq} | {workers} | {args.batch} | {args.whole_word} | {rate:,.0f} | "
                    f"{rate / max(workers, 1):,.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
