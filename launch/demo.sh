#!/usr/bin/env bash
# `make demo`: the whole pipeline on the built-in corpus (Python's standard-library docstrings), on CPU if
# there is no GPU, no download: data preparation, a short pretraining of a tiny BERT, validation accuracy and
# a few fill-mask predictions. Overrides for the trainer pass through: bash launch/demo.sh trainer.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-demo}
export WANDB_MODE=${WANDB_MODE:-offline}

python launch/prepare_data.py inputs=[builtin:pydocs] output_dir="$OUT/data" vocab_size=8000 \
    max_seq_length=128 samples_per_shard=20000 validation_fraction=0.05
python launch/pretrain.py experiment=demo-cpu data.dir="$OUT/data" run_dir="$OUT/run" "$@"
python launch/fill_mask.py "$OUT/run/hf" \
    "the [MASK] function returns a new list." \
    "raise a [MASK] if the file does not exist." \
    "this module provides [MASK] for working with dates and times."
