"""launch/benchmark.py: the real engine on synthetic shards, the FLOP count, the comparison with transformers (BERT
and ModernBERT, with the exact-arithmetic bound of the latter)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.store import LENGTH, NSP_LABEL
from pretrain.models.attention import attention, scores_computed, unpad, use_band
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.modernbert import ModernBertConfig
from pretrain.tools.benchmark import BatchShape, hf_model, modernbert_step_flops, synthetic_data
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


# layer 0 global, layer 1 local (window 2); vocabulary 100, 128 rows in memory
MB = dict(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
          local_attention=4, global_attn_every_n_layers=2)  # fmt: skip


def test_modernbert_flop_count_by_hand():
    """The bound's arithmetic: per token a layer multiplies-adds 4 H^2 + 3 H I = 544 (Wqkv, Wo, Wi, Wo), the head
    H^2 + H V; 12 H per attention score; transformers at every position of the rows, ours at the real tokens and the
    head at the masked ones (padded V), its scores as the path it takes computes them."""
    c = ModernBertConfig(**MB)
    rows = BatchShape(rows=2, width=8, real=13, masked=3, lengths=(8, 5))
    hf, ours = modernbert_step_flops(c, [rows], True), modernbert_step_flops(c, [rows], False)
    assert hf == {"layers": 6 * 16 * 2 * 544, "head": 6 * 16 * (64 + 8 * 100), "attention": 12 * 8 * 2 * 2 * 64}
    # rows of 8 are shorter than four blocks of the window: the full masked fallback, 2 samples x 8 x 8 per layer
    assert ours == {"layers": 6 * 13 * 2 * 544, "head": 6 * 3 * (64 + 8 * 128), "attention": 12 * 8 * 2 * 2 * 64}
    assert sum(hf.values()) / sum(ours.values()) == pytest.approx(211968 / 129024)
    long = BatchShape(rows=1, width=40, real=40, masked=6, lengths=(40,))  # the band: blocks of 4 x 8 keys
    assert modernbert_step_flops(c, [long], False)["attention"] == 12 * 8 * (40 * 40 + 10 * 4 * 8)
    assert modernbert_step_flops(c, [long], True)["attention"] == 12 * 8 * 2 * 40 * 40
    assert modernbert_step_flops(c, [long], False, varlen=True)["attention"] == 12 * 8 * (40 * 40 + 40 * 5)
    assert scores_computed([40, 30], 2) == 2 * 10 * 4 * 8 and scores_computed([8, 5], 2) == 2 * 8 * 8
    packed = {"attention_mask": torch.tensor([[1, 1, 1, 2, 2, 0]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
              "labels": torch.tensor([[-100, 7, -100, 9, 4, -100]]), "cls_index": torch.tensor([0, 3])}  # fmt: skip
    assert BatchShape.of(packed) == BatchShape(rows=1, width=6, real=5, masked=3, lengths=(3, 2))


def test_banded_fallback_is_exact_attention():
    """The local layers' band path (what the count credits ours with) gives plain softmax attention over the keys
    within the window of each sample, values and gradients (float64, samples of unequal length)."""
    lengths, window, nh, hs = [40, 33, 5], 2, 2, 4
    assert use_band(window, max(lengths))
    mask = torch.tensor([[1] * n + [0] * (40 - n) for n in lengths])
    u = unpad(torch.zeros_like(mask), mask, None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), nh, hs, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    out = attention(q, k, v, u, window, use_varlen=False)
    ref, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        pos = torch.arange(n)
        scores = torch.einsum("ihd,jhd->hij", q[s], k[s]) / hs**0.5
        scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs()[None] > window, float("-inf"))
        ref.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[s]))
        start += n
    ref = torch.cat(ref)
    assert (out - ref).abs().max() < 1e-12
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    grads, ref_grads = torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)) < 1e-12


@pytest.mark.slow
def test_benchmark_compares_modernbert_with_transformers(tmp_path):
    """modernbert-tiny against transformers' ModernBertForMaskedLM (SDPA): both rows, the exact FLOPs of each, the
    bound, the ratio over it and the padding share."""
    args = ["model=modernbert-tiny", "model.vocab_size=512", "trainer.max_seq_length=64", "trainer.micro_batch_size=4",
            "trainer.global_batch_size=4", "bench.steps=2", "bench.warmup=0", "bench.synthetic_samples=32",
            "bench.compare=hf", f"data.dir={tmp_path / 'none'}"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), *args], capture_output=True,
                       text=True, env={**run_env(), "OMP_NUM_THREADS": "1"}, timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    for name in ("ours", "transformers"):
        assert any(x.startswith(f"| {name} | cpu") for x in lines), lines
        assert sum(x.startswith(f"| {name} | ") for x in lines) == 2, lines  # timing row and exact-FLOPs row
    m = re.fullmatch(r"seq_per_s=([\d.]+) tokens_per_s=(\d+) mfu=n/a ratio_vs_hf=([\d.]+) bound=([\d.]+) "
                     r"ratio_over_bound=([\d.]+) padding=([\d.]+)", lines[-1])  # fmt: skip
    assert m and float(m[3]) > 0 and float(m[4]) > 1 and 0 <= float(m[6]) < 1, lines[-1]
    assert float(m[5]) == pytest.approx(float(m[3]) / float(m[4]), abs=2e-3)
