"""The micro-batch that ``trainer.micro_batch_size=auto`` picks, per model, sequence length and ZeRO stage, on this
machine: a Markdown table for docs/benchmarks.md.

    python benchmarks/probe_table.py [--cap-gb 20] [--world 1] [--models bert-base bert-large] [--lengths 128 512]

The activation bytes per sample are measured once per (model, length, precision, checkpointing) by the probe
itself (a real forward and backward at 2 and 4 samples); the ZeRO stages change only the static memory, so each
stage's row comes from the same measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from data_prep.errors import UserError  # noqa: E402
from pretrain.models.bert import BertConfig, BertForPreTraining  # noqa: E402
from pretrain.training.batch_probe import GIB, choose, measure  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gb", type=float, default=20.0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=4096)
    ap.add_argument("--models", nargs="+", default=["bert-base", "bert-large"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| model | tokens | precision | checkpointing | ZeRO | ranks | cap GiB | GiB/sample | static GiB | fits "
          "| micro | probe s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for name in args.models:
        kw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        model = BertForPreTraining(BertConfig(**{**kw, "vocab_size": 30522})).to(device)
        n = sum(p.numel() for p in model.parameters())
        for seq in args.lengths:
            for ckpt in (False, True):
                model.bert.encoder.checkpoint_layers = ckpt
                t0 = time.time()
                measured = measure(model, seq, args.precision, device)
                took = time.time() - t0
                for stage in (0, 1, 2, 3):
                    trainer = SimpleNamespace(max_seq_length=seq, precision=args.precision,
                                              global_batch_size=args.global_batch)  # fmt: skip
                    cfg = SimpleNamespace(
                        trainer=trainer, deepspeed=SimpleNamespace(zero_optimization={"stage": stage})
                    )
                    try:
                        p = choose(n, measured, cfg, args.world, int(args.cap_gb * GIB))
                        cells = [f"{p.per_sample_bytes / GIB:.3f}", f"{p.static_bytes / GIB:.2f}", p.fits,
                                 p.micro_batch_size]  # fmt: skip
                    except UserError:
                        cells = [f"{measured[0] / GIB:.3f}", "", 0, "does not fit"]
                    row = [name, seq, args.precision, "on" if ckpt else "off", stage, args.world, f"{args.cap_gb:g}",
                           *cells, f"{took:.0f}"]  # fmt: skip
                    print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
