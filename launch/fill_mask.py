"""Fill-mask predictions from a trained model: python launch/fill_mask.py MODEL "text with [MASK]" ... [--top-k K]

MODEL is a run directory (its newest complete checkpoint), a checkpoint (RUN_DIR/checkpoints/stepNNNNNNNN) or a
Hugging Face directory (the trainer's RUN_DIR/hf export, or any BERT directory with config.json, weights and
vocab.txt or tokenizer.json). Every [MASK] in a prompt gets its top-k tokens with their probabilities.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from data_prep.errors import UserError  # noqa: E402
from data_prep.vocab import SPECIAL_TOKENS  # noqa: E402
from pretrain.checkpoint.hf import fill_mask  # noqa: E402
from pretrain.checkpoint.weights import load_model  # noqa: E402
from pretrain.cli import guard  # noqa: E402

MASK = SPECIAL_TOKENS["mask_token"]


def predict(model: str, texts: list[str], top_k: int) -> int:
    for text in texts:
        if MASK not in text:
            raise UserError(f"prompt {text!r} has no {MASK}; put {MASK} where the model should fill in a token")
    source = load_model(model)
    print("fill-mask predictions:")
    for text in texts:
        predictions = fill_mask(source.model, source.tokenizer, text, top_k=top_k)
        shown = " | ".join(", ".join(f"{tok} ({p:.2f})" for tok, p in preds) for preds in predictions)
        print(f"  {text}\n    -> {shown}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch/fill_mask.py", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", metavar="MODEL", help="run directory, checkpoint directory or Hugging Face directory")
    p.add_argument("texts", metavar="TEXT", nargs="+", help=f"a prompt with one or more {MASK}")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="predictions per mask (default: 5)")
    a = p.parse_args(argv)
    if a.top_k < 1:
        p.error(f"--top-k {a.top_k}: must be at least 1")
    return guard(lambda: predict(a.model, a.texts, a.top_k))


def run() -> None:
    """The console script ``bert-fill-mask`` (pyproject.toml) and ``python launch/fill_mask.py``."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
