"""launch/benchmark.py: the real engine on synthetic shards, the FLOP count, the comparison with transformers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep.store import LENGTH, NSP_LABEL
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.tools.benchmark import hf_model, synthetic_data
from pretrain.training.metrics import mfu
from pretrain.training.preflight import inspect_data
from tests.helpers import ROOT, run_env

KW = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_one_mfu_definition_counts_real_tokens_for_both_implementations():
    """MFU (metrics.jsonl and the benchmark alike): training FLOPs per token of our model at the run's length x
    real tokens/s over the peak of every rank; the reference has the same parameters, so the same credit."""
    ours = BertForPreTraining(BertConfig(**KW))
    assert sum(p.numel() for p in hf_model(KW).parameters()) == pytest.approx(ours.num_parameters(), rel=0.02)
    f = ours.flops_per_token(64)
    assert f == 6 * ours.num_parameters() + 12 * 2 * 32 * 64
    assert mfu(f, 1000.0, 2.0, 2) == pytest.approx(f * 1000 / (2e12 * 2))
    assert mfu(f, 1000.0, None, 1) is None


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
