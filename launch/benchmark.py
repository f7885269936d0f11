"""Training throughput of the real DeepSpeed engine, with the same config groups as launch/pretrain.py.

    python launch/benchmark.py model=bert-base trainer.micro_batch_size=32 trainer.global_batch_size=32 bench.compare=hf
    python launch/benchmark.py model=modernbert-base trainer.max_seq_length=1024 trainer.micro_batch_size=2 \
        trainer.global_batch_size=2 bench.compare=hf
    deepspeed --num_gpus 1 launch/benchmark.py model=bert-base trainer.precision=bf16 trainer.micro_batch_size=256 \
        trainer.global_batch_size=256 bench.compare=hf

Runs ``bench.warmup`` untimed then ``bench.steps`` timed optimizer steps on ``data.dir`` (synthetic shards of
the same format when it holds none) and prints sequences/s, tokens/s, non-padding tokens/s, MFU, loader wait and
peak memory per implementation; with ``bench.compare=hf`` also ``transformers``' model of the family (BERT:
``BertForPreTraining`` / ``BertForMaskedLM``; ModernBERT: ``ModernBertForMaskedLM`` with SDPA attention and our
initial weights) under the same DeepSpeed config, optimizer and batches, steps interleaved. The step timed is
the training engine's own; MFU is the one definition training logs (training FLOPs per token x real tokens per
second, over the device's peak).
Peak memory: the GPU's allocator high-water mark; on CPU the process's resident high-water mark (both models
when compared). The last line: ``seq_per_s=... tokens_per_s=... mfu=... ratio_vs_hf=...``; the ratio (only when
compared) is the median over timed steps of the two implementations' per-step sequences/s, steps interleaved.
ModernBERT compared: a second table of each side's exact FLOPs per step (matrix products: transformers' at every
position of its padded rows, its dense MLM head and its full-row attention in the sliding-window layers; ours at
the real tokens, the head at the masked positions, the scores its attention path computes), and on the last line
``bound=`` (transformers' FLOPs over ours: the speed-up equal FLOP/s would give), ``ratio_over_bound=`` and
``padding=`` (the share of transformers' row positions that are padding).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = ROOT  # this folder's pretrain.py would shadow the package
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pretrain import cli  # noqa: E402

cli.strip_local_rank_arg()

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from data_prep.errors import UserError  # noqa: E402
from pretrain.training.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path=str(Path(ROOT) / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    cli.run_entry(lambda: _bench(cfg))


def _bench(cfg: DictConfig) -> int:
    from pretrain.runtime import distributed as D
    from pretrain.tools.benchmark import run

    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    env = D.detect_env()
    D.set_threads()
    lines = run(config, env)
    if env.is_main:
        print("\n".join(lines), flush=True)
    return 0


def run() -> None:
    """The console script ``bert-benchmark`` (pyproject.toml) and ``python launch/benchmark.py``."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(__doc__, end="")
        sys.exit(0)
    problem = cli.check_overrides(Path(ROOT) / "conf", "config", "pretrain/training/config.py")
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
