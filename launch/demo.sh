#!/usr/bin/env bash
# `make demo`: the whole pipeline on the built-in corpus (Python's standard-library docstrings), on CPU if there
# is no GPU, no download: data preparation, a short pretraining of a tiny BERT (validation MLM accuracy beside
# the unigram baseline, NSP beside chance), fill-mask predictions and a run report. W&B logs offline; the summary
# prints the `wandb sync` command that publishes the run. Trainer overrides pass through:
#   bash launch/demo.sh trainer.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-demo}
export WANDB_MODE=${WANDB_MODE:-offline}

# A 2,000-token vocabulary and 64-token samples: a tiny model learns the local context of this 1.8 MB corpus
# within minutes (docs/benchmarks.md, "Demo recipe", has what else was tried).
python launch/prepare_data.py inputs=[builtin:pydocs] output_dir="$OUT/data" vocab_size=2000 \
    max_seq_length=64 samples_per_shard=40000 validation_fraction=0.05
python launch/pretrain.py experiment=demo-cpu data.dir="$OUT/data" run_dir="$OUT/run" "$@"
python launch/fill_mask.py "$OUT/run" \
    "return a new [MASK] of the list." \
    "this function is [MASK] to read data from a file." \
    "an [MASK] is raised if the key is missing." \
    "if the [MASK] is not found, return none." \
    "the [MASK] argument is the name of the file."
python launch/report.py "$OUT/run"
