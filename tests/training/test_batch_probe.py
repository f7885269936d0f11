"""trainer.micro_batch_size=auto (pretrain/training/batch_probe.py): measured activation bytes, ZeRO partitioning of the
static memory, the chosen micro-batch under a cap and a divisor of the global batch, and a real run that uses it."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from data_prep.errors import UserError
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.training.batch_probe import GIB, MARGIN, probe, saved_bytes, static_bytes
from tests.helpers import LAUNCH, ROOT, SMALL, make_data, run_env


def _model() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=256, hidden_dropout_prob=0.0))  # fmt: skip


def _cfg(global_batch: int = 48, stage: int = 0, precision: str = "fp32", seq: int = 128) -> SimpleNamespace:
    trainer = SimpleNamespace(max_seq_length=seq, precision=precision, global_batch_size=global_batch)
    return SimpleNamespace(trainer=trainer, deepspeed=SimpleNamespace(zero_optimization={"stage": stage}))


def test_static_memory_is_split_by_the_zero_stage():
    n, w = 1_000_000, 4
    assert static_bytes(n, 0, "fp32", w) == 16 * n  # weights 4 + gradients 4 + Adam 8
    assert static_bytes(n, 1, "fp32", w) == (4 + 4 + 8 / w) * n
    assert static_bytes(n, 2, "fp32", w) == (4 + 4 / w + 8 / w) * n
    assert static_bytes(n, 3, "fp32", w) == 16 * n / w
    assert static_bytes(n, 0, "bf16", 1) == (2 + 2 + 12) * n  # half weights and gradients, fp32 master in the state


def test_activation_bytes_grow_with_the_batch_and_shrink_with_checkpointing():
    model, cpu = _model(), torch.device("cpu")
    two, four, eight = (saved_bytes(model, b, 128, "fp32", cpu) for b in (2, 4, 8))
    assert two > 0 and eight - four == pytest.approx(2 * (four - two), rel=0.05)  # linear in the batch
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    model.bert.encoder.checkpoint_layers = True
    assert saved_bytes(model, 2, 128, "fp32", cpu) < 0.6 * two
    model.bert.encoder.checkpoint_layers = False
    assert saved_bytes(model, 2, 256, "fp32", cpu) > 1.9 * two  # longer sequences, more (attention: more than 2x)


def test_probe_fills_the_cap_and_divides_the_global_batch():
    model, cpu = _model(), torch.device("cpu")
    found = [probe(model, _cfg(), 1, cpu, int(cap * GIB)) for cap in (0.05, 0.1, 0.2, 0.4)]
    sizes = [f.micro_batch_size for f in found]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
    for f in found:
        assert 48 % f.micro_batch_size == 0 and f.micro_batch_size <= f.fits
        used = f.static_bytes + f.fixed_bytes + f.per_sample_bytes * f.fits
        assert used <= f.cap_bytes * (1 - MARGIN) < used + f.per_sample_bytes  # the most that fits, no more
    two_ranks = probe(model, _cfg(global_batch=48), 2, cpu, int(0.4 * GIB))
    assert 24 % two_ranks.micro_batch_size == 0
    with pytest.raises(UserError, match="not even one sample of 128 tokens fits"):
        probe(model, _cfg(), 1, cpu, int(0.001 * GIB))


@pytest.mark.slow
def test_a_run_with_auto_micro_batch_uses_the_probed_size(tmp_path):
    data, run = make_data(tmp_path), tmp_path / "run"
    args = [f"data.dir={data}", f"run_dir={run}", *SMALL, "trainer.max_steps=2", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=auto", "trainer.memory_cap_gb=0.05", "trainer.eval_every=0"]  # fmt: skip
    r = subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True, env=run_env(), timeout=300,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("micro_batch_size=auto: "))
    chosen = int(line.split()[1])
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == chosen and 16 % chosen == 0
    assert ds["gradient_accumulation_steps"] == 16 // chosen and f"gradient accumulation {16 // chosen}" in line
