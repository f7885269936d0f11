"""Evaluate a trained model: MLM loss, accuracy and perplexity, NSP loss and accuracy, beside their baselines.

    python launch/evaluate.py MODEL [--data DATA_DIR | --text FILE.txt] [--split validation] [--batches N]
        [--batch-size B] [--seed S] [--max-seq-length L] [--device DEV] [--no-log]

MODEL is a run directory (its newest complete checkpoint), a checkpoint (RUN_DIR/checkpoints/stepNNNNNNNN) or a
Hugging Face directory (RUN_DIR/hf, or any BERT directory with config.json, weights and vocab.txt or
tokenizer.json). A run's checkpoint is evaluated on its own training data's validation split unless --data or
--text says otherwise; a result for a run or one of its checkpoints is also appended to RUN_DIR/metrics.jsonl
({"kind": "evaluate", ...}). Exit codes: 0 done, 2 a mistake in the input (one ``error:`` line), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pretrain.cli import guard  # noqa: E402
from pretrain.tools.evaluate import run_evaluate  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        description="MLM loss/accuracy, perplexity and NSP loss/accuracy of a model, with the unigram baseline "
        "(always the most frequent token of the training split) scored at the same masked positions.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DATA_DIR", help="prepared shards (launch/prepare_data.py output)")
    src.add_argument("--text", metavar="FILE", help="a text file, prepared on the fly with the model's vocabulary")
    p.add_argument("--split", default="validation", help="split of --data to evaluate (default: validation)")
    p.add_argument("--batches", type=int, default=None, metavar="N", help="at most N batches (default: all)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="samples per batch (default: 32)")
    p.add_argument("--seed", type=int, default=None, help="masking seed (default: the run's own seed, else 1234)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="L",
                   help="sample length for --text (default: the run's, else 128)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where there is one)")
    p.add_argument("--no-log", action="store_true", help="do not append the result to the run's metrics.jsonl")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)

    def run() -> int:
        run_evaluate(
            a.model, a.data, a.text, a.split, a.batches, a.batch_size, a.seed, a.max_seq_length, not a.no_log, a.device
        )
        return 0

    return guard(run)


def run() -> None:
    """The console script ``bert-evaluate`` (pyproject.toml) and ``python launch/evaluate.py``."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
