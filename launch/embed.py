"""Contextual embeddings from a trained model, to .npy or .parquet:

    python launch/embed.py MODEL --input FILE [--column NAME] --output OUT.npy|OUT.parquet
        [--pooling mean|cls|tokens] [--layer -1] [--batch-size 64] [--max-length N] [--no-truncate] [--device DEV]

MODEL is a run directory (its newest complete checkpoint), a checkpoint (RUN_DIR/checkpoints/stepNNNNNNNN) or a
Hugging Face directory (RUN_DIR/hf, or any BERT directory with config.json, weights and vocab.txt or
tokenizer.json). FILE is a text file with one sentence per line (blank lines skipped) or a table (.csv, .tsv,
.jsonl, .parquet) whose text column --column names. Rows come out in input order; the layouts are described in
pretrain/tools/embed.py. Exit codes: 0 done, 2 a mistake in the input (one ``error:`` line), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pretrain.cli import guard  # noqa: E402
from pretrain.tools.embed import POOLINGS, run_embed  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/embed.py",
        description="Sentence vectors (mean of the tokens or [CLS]) or per-token vectors from any layer of a model.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory")
    p.add_argument("--input", required=True, metavar="FILE", help="text file (a sentence per line) or table")
    p.add_argument("--column", metavar="NAME", help="text column of a .csv/.tsv/.jsonl/.parquet input")
    p.add_argument("--output", required=True, metavar="OUT", help="OUT.npy or OUT.parquet (written atomically)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="mean: average of the real tokens, [CLS] and [SEP] included; cls: the [CLS] vector; "
                   "tokens: one vector per token (default: mean)")  # fmt: skip
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden states of this layer: 0 = embeddings output, 1..n the encoder layers, -1 the last "
                   "(default: -1)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="sentences per batch (default: 64)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="tokens per sentence, [CLS] and [SEP] included (default: the model's maximum)")  # fmt: skip
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut longer sentences to --max-length and count them (default); --no-truncate: an "
                   "error naming the line")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where there is one)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)

    def run() -> int:
        run_embed(a.model, a.input, a.output, a.column, a.pooling, a.layer, a.batch_size, a.max_length, a.truncate,
                  a.device)  # fmt: skip
        return 0

    return guard(run)


def run() -> None:
    """The console script ``bert-embed`` (pyproject.toml) and ``python launch/embed.py``."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
