"""launch/benchmark.py: the real engine on synthetic shards, the FLOP count, the comparison with transformers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.store import LENGTH, NSP_LABEL
from pretrain.benchmark import hf_model, parameter_split, step_flops, synthetic_data
from pretrain.config import inspect_data
from pretrain.model import BertConfig, BertForPreTraining
from tests.helpers import ROOT, run_env

KW = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_flop_count_is_the_same_for_ours_and_transformers():
    cfg = BertConfig(**KW)
    ours, theirs = parameter_split(BertForPreTraining(cfg), cfg), parameter_split(hf_model(KW), cfg)
    assert ours == theirs
    body, head = ours
    # per layer: QKV + output (4 H^2 + 4 H), FFN (2 H I + I + H), two LayerNorms (4 H); + the embedding LayerNorm
    h, i, v = 32, 64, 200
    assert body == 2 * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h) + 2 * h
    assert head == (h * h + h) + 2 * h + v + h * v  # transform dense + LayerNorm, decoder bias, tied decoder GEMM
    lengths = torch.tensor([10, 4])
    expected = 6 * body * 14 + 12 * 2 * 32 * (100 + 16) + 6 * head * 3
    assert step_flops(cfg, body, head, lengths, 3) == expected


def test_synthetic_shards_are_prepared_data(tmp_path):
    out = synthetic_data(tmp_path / "d", vocab_size=300, max_seq_length=64, samples=400, nsp=True)
    info = inspect_data(str(out))
    assert info.vocab_size == 300 and info.nsp and info.verified["samples"]["train"] == 400
    index = np.load(out / "train" / "shard-00000.index.npy")
    short = (index[:, LENGTH] < 64).mean()
    assert 0.05 < short < 0.2 and set(np.unique(index[:, NSP_LABEL])) == {0, 1}


@pytest.mark.slow
def test_benchmark_runs_the_engine_and_compares_with_transformers(tmp_path):
    args = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
            "model.num_hidden_layers=1", "model.vocab_size=512", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=16", "bench.steps=2", "bench.warmup=1", "bench.synthetic_samples=128",
            "bench.compare=hf", f"data.dir={tmp_path / 'none'}"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), *args], capture_output=True,
                       text=True, env=run_env(), timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert any(x.startswith("| ours | cpu") for x in lines) and any(x.startswith("| transformers | cpu") for x in lines)
    m = re.fullmatch(r"seq_per_s=([\d.]+) tokens_per_s=(\d+) mfu=n/a ratio_vs_hf=([\d.]+)", lines[-1])
    assert m and float(m[1]) > 0 and int(m[2]) > 0 and float(m[3]) > 0, lines[-1]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), "bench.compare=tf"],
                       capture_output=True, text=True, env=run_env(), timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "bench.compare='tf': use none or hf" in r.stderr
