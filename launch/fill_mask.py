"""Fill-mask predictions from a trained model: python launch/fill_mask.py HF_DIR "text with [MASK]" ...

HF_DIR is a Hugging Face directory (the trainer's ``RUN_DIR/hf`` export, or any BERT checkpoint with a
``tokenizer.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tokenizers import Tokenizer  # noqa: E402

from pretrain.hf import fill_mask, load_hf  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python launch/fill_mask.py HF_DIR 'text with [MASK]' ...", file=sys.stderr)
        return 2
    hf_dir, texts = Path(argv[0]), argv[1:]
    if not (hf_dir / "tokenizer.json").is_file():
        print(f"error: {hf_dir / 'tokenizer.json'} not found; give a trainer export (RUN_DIR/hf)", file=sys.stderr)
        return 2
    try:
        model = load_hf(hf_dir).eval()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    print("fill-mask predictions:")
    for text in texts:
        predictions = fill_mask(model, tokenizer, text, top_k=5)
        shown = " | ".join(", ".join(f"{tok} ({p:.2f})" for tok, p in preds) for preds in predictions)
        print(f"  {text}\n    -> {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
