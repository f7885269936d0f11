"""Throughput suites through the one benchmark, ``launch/benchmark.py`` (real DeepSpeed engine, FLOP count and the
``transformers`` comparison live there): this file only names the cases.

    python benchmarks/train_step.py --model small --batch 8              # one case (CPU: fp32)
    python benchmarks/train_step.py --model modernbert-base --seq-len 1024 --batch 2   # vs ModernBertForMaskedLM
    python benchmarks/train_step.py --suite --batch 256                  # CUDA: bert-base/large at 128 and 512, bf16

Each case prints launch/benchmark.py's table and its last ``key=value`` line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("tiny", "mini", "small", "bert-base", "bert-large", "roberta-base", "modernbert-tiny", "modernbert-base",
          "modernbert-large")  # fmt: skip


def case(model: str, seq_len: int, batch: int, iters: int, warmup: int, cuda: bool, extra: list[str]) -> int:
    overrides = [
        f"model={model}",
        f"trainer.max_seq_length={seq_len}",
        f"trainer.micro_batch_size={batch}",
        f"trainer.global_batch_size={batch}",
        f"trainer.precision={'bf16' if cuda else 'fp32'}",
        f"bench.steps={iters}",
        f"bench.warmup={warmup}",
        "bench.compare=hf",
        *extra,
    ]
    print(f"\n### {model}, {seq_len} tokens, batch {batch}\n", flush=True)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), *overrides]).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="bert-base")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--suite", action="store_true", help="CUDA: bert-base and bert-large at 128 and 512")
    p.add_argument("overrides", nargs="*", help="more launch/benchmark.py overrides (data.dir=..., deepspeed=zero1)")
    a = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if a.suite and not cuda:
        p.error("--suite needs a CUDA device; on CPU pick one --model/--seq-len/--batch")
    cases = (
        [(m, s, a.batch if s == 128 else max(1, a.batch // 4)) for m in ("bert-base", "bert-large") for s in (128, 512)]
        if a.suite
        else [(a.model, a.seq_len, a.batch)]
    )
    codes = [case(m, s, b, a.iters, a.warmup, cuda, a.overrides) for m, s, b in cases]
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
