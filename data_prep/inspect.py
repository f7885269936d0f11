"""Print training samples of a prepared data folder as JSON lines, decoded, to check what the model will see.

    python -m data_prep.inspect OUT_DIR [--split train] [--n 5] [--random] [--seed 0]
    python -m data_prep.inspect OUT_DIR --stats [--split train] [--max-seq-length N] [--png PATH]

Each line: ``input_ids``, ``token_type_ids``, ``next_sentence_label`` (0 IsNext, 1 NotNext; null in RoBERTa
mode), ``doc_a``/``doc_b`` (corpus document indices) and the decoded ``text_a``/``text_b`` (BERT mode: A is
between ``[CLS]`` and the first ``[SEP]``, B after it up to the final ``[SEP]``; RoBERTa mode: ``text_a`` is
the whole sample and ``text_b`` null).

``--stats`` prints statistics of the split instead (``data_prep/stats.py``: sample lengths, IsNext balance,
token-frequency head and tail, ``[UNK]`` rate, padding at ``max_seq_length``) and plots them to a PNG (default
``OUT_DIR/stats_SPLIT.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError

from .stats import compute_stats, format_stats, plot_stats
from .store import SplitReader
from .vocab import load_tokenizer


def describe(sample, tokenizer) -> dict:
    ids = sample.input_ids.tolist()
    bert = sample.nsp_label != -1
    if bert:
        sep = tokenizer.token_to_id("[SEP]")
        first = ids.index(sep) if sep in ids else len(ids)
        end = len(ids) - 1 if ids and ids[-1] == sep else len(ids)
        text_a = tokenizer.decode(ids[1:first], skip_special_tokens=False)
        text_b = tokenizer.decode(ids[first + 1 : end], skip_special_tokens=False) if first < end else ""
    else:
        text_a, text_b = tokenizer.decode(ids, skip_special_tokens=False), None
    return {
        "input_ids": ids,
        "token_type_ids": sample.token_type_ids.tolist(),
        "next_sentence_label": sample.nsp_label if bert else None,
        "doc_a": sample.doc_a,
        "doc_b": sample.doc_b,
        "text_a": text_a,
        "text_b": text_b,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description=__doc__.splitlines()[0] + " With --stats: statistics of the split, printed and plotted.",
    )
    parser.add_argument("out_dir", help="output_dir of a data-prep run (holds tokenizer.json and split folders)")
    parser.add_argument("--split", default="train", help="train (default) or validation")
    parser.add_argument("--n", type=int, default=5, help="number of samples")
    parser.add_argument("--random", action="store_true", help="N samples at random instead of the first N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", action="store_true", help="print statistics of the split and plot them to a PNG")
    parser.add_argument(
        "--max-seq-length", type=int, metavar="N", help="--stats: padding at this length (default: the manifest's)"
    )
    parser.add_argument(
        "--png", metavar="PATH", help="--stats: where to write the plot (default OUT_DIR/stats_SPLIT.png)"
    )
    args = parser.parse_args(argv)
    try:
        out = Path(args.out_dir)
        if not out.is_dir():
            raise DataPrepError(f"{out}: no such folder")
        if not (out / args.split).is_dir():
            splits = sorted(p.name for p in out.iterdir() if p.is_dir() and any(p.glob("*.index.npy")))
            raise DataPrepError(f"{out / args.split}: no such split (available: {', '.join(splits) or 'none'})")
        if args.stats:
            stats = compute_stats(out, args.split, args.max_seq_length)
            png = plot_stats(stats, Path(args.png) if args.png else out / f"stats_{args.split}.png")
            print(format_stats(stats, png))
            return 0
        tokenizer = load_tokenizer(out)
        reader = SplitReader(out, args.split)
        n = min(args.n, len(reader))
        if args.random:
            picks = np.sort(np.random.default_rng(args.seed).choice(len(reader), size=n, replace=False))
        else:
            picks = np.arange(n)
        for i in picks:
            print(json.dumps({"index": int(i), **describe(reader[int(i)], tokenizer)}, ensure_ascii=False))
    except (DataPrepError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
