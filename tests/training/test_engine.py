"""The engine in-process, with a small model on one gloo rank: seconds, not a launcher per case. What it guards:
ZeRO 0-2 train the same model to the same losses, a preemption checkpoints and exits 75 and its resume ends bit
for bit like an uninterrupted run, a step result is named parts (no positional slots), and a small model learns
on real text. The multi-rank and launcher paths of the same promises are tested by ``test_trainer.py`` and
``test_faults_*.py``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint.bundle import complete_bundles
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM
from pretrain.runtime import distributed as D
from pretrain.runtime import exits
from pretrain.runtime.signals import PREEMPT_SIGNALS, StopFlag
from pretrain.training.config import DeepSpeedSection, EngineConfig, LoopConfig, OptimConfig, SchedulerConfig
from pretrain.training.data import Batches, build_dataloader
from pretrain.training.engine import StepResult, resume_tag, start
from pretrain.training.metrics import MetricsLogger
from tests.helpers import SHARD_VOCAB, make_data


@pytest.fixture(scope="module")
def group():
    """One rank's process group in this process, torn down (environment and signal handlers back) afterwards."""
    import torch.distributed as dist

    saved_env, saved_sig = dict(os.environ), {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    env = D.detect_env()
    device = D.init(env, 2.0, 1.0)
    yield env, device
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved_env)
    for s, h in saved_sig.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("engine") / "bert")


def _engine(group, data: Path, run_dir: Path, stage: int = 0, max_steps: int = 8, resume: str = "auto",
            vocab: int = len(SHARD_VOCAB), hidden: int = 32, lr: float = 5e-3, family: str = "bert"):  # fmt: skip
    env, device = group
    loop = LoopConfig(global_batch_size=8, micro_batch_size=4, max_steps=max_steps, checkpoint_every=0, keep_last=3)
    cfg = EngineConfig(loop, OptimConfig(lr=lr), SchedulerConfig(warmup_steps=1),
                       DeepSpeedSection(zero_optimization={"stage": stage}), str(run_dir))  # fmt: skip
    tag = resume_tag(resume, run_dir / "checkpoints")
    torch.manual_seed(0)
    if family == "bert":
        model = BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=2,
                                              intermediate_size=2 * hidden, num_hidden_layers=1,
                                              max_position_embeddings=64))  # fmt: skip
    else:  # a global and a local layer, the window shorter than the rows: both attention paths
        model = ModernBertForMaskedLM(ModernBertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=2,
                                                       intermediate_size=hidden, num_hidden_layers=2,
                                                       global_attn_every_n_layers=2, local_attention=8,
                                                       attention_dropout=0.1, mlp_dropout=0.1))  # fmt: skip
    loader, sampler = build_dataloader(data, "train", 4, seed=0)
    logger = MetricsLogger(None, "test", run_dir, False, {"test": True})
    ds = start(cfg, env, model, device, tag, sampler, StopFlag(), logger, record=False)
    return ds, Batches(loader, sampler, device)


def _train(ds, batches, until: int, stop_at: int | None = None, sig: int = signal.SIGUSR1) -> list[float]:
    losses = []
    while ds.state.step < until:
        result = ds.step(batches)
        assert isinstance(result, StepResult) and set(result.parts) == set(ds.module.loss_part_names)
        stopped, loss = ds.book(result)
        assert not stopped
        losses.append(loss)
        if stop_at is not None and ds.state.step == stop_at:
            os.kill(os.getpid(), sig)  # a real signal, caught by the engine's StopFlag
        if ds.save_or_stop(ds.state.step == until):
            break
    return losses


def _weights(ds) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ds.fp32_state_dict(ds.loop.last_ckpt).items()}


def test_zero_stages_0_1_2_train_alike(group, data, tmp_path):
    losses = {}
    for stage in (0, 1, 2):
        ds, batches = _engine(group, data, tmp_path / f"zero{stage}", stage=stage, max_steps=12)
        losses[stage] = _train(ds, batches, 12)
        assert ds.zero_stage == stage
        rec = ds.close_window()
        assert rec["kind"] == "train" and rec["loss"] > 0 and rec["mlm_loss"] > 0 and rec["nsp_loss"] > 0
        assert "padded_tokens_per_s" not in rec
    assert len(losses[0]) == 12 and np.mean(losses[0][-3:]) < np.mean(losses[0][:3]), losses[0]
    for stage in (1, 2):  # ZeRO partitions the optimizer state; it does not change the arithmetic
        np.testing.assert_allclose(losses[stage], losses[0], rtol=2e-4)


@pytest.mark.parametrize("family,sig", [("bert", signal.SIGUSR1), ("modernbert", signal.SIGTERM)])
def test_preempted_then_resumed_ends_bit_for_bit_like_an_uninterrupted_run(group, data, tmp_path, family, sig):
    """Both families on the same engine, checkpoint rule and logger: ModernBERT (dropout on, unpadded, a local
    layer) stopped by SIGTERM resumes to the same weights bit for bit."""
    whole, batches = _engine(group, data, tmp_path / "whole", family=family)
    _train(whole, batches, 8)
    expected, tokens = _weights(whole), whole.state.tokens

    run = tmp_path / "run"
    first, batches = _engine(group, data, run, family=family)
    _train(first, batches, 8, stop_at=3, sig=sig)
    name = signal.Signals(sig).name
    assert first.loop.code == exits.PREEMPTED and first.state.step == 3 and f"preempted ({name})" in first.loop.status
    assert [t.name for t in complete_bundles(run / "checkpoints")] == ["step00000003"]
    second, batches = _engine(group, data, run, family=family)
    assert second.state.step == 3 and second.resume_tag.name == "step00000003"
    _train(second, batches, 8)
    got = _weights(second)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert second.state.tokens == tokens  # the counters continue, none counted twice


@pytest.mark.slow
def test_a_small_model_learns_real_text(group, shared_data, tmp_path):
    """Two Project Gutenberg books, a 2,000-token vocabulary: the MLM loss falls well below its start, and not to
    the near-zero a degenerate labelling (every label [MASK]) would allow."""
    from data_prep.config import PrepareConfig
    from data_prep.pipeline import prepare

    root = tmp_path / "data"
    books = sorted((shared_data / "books").glob("*.txt.gz"))[:2]
    prepare(PrepareConfig(inputs=[str(p) for p in books], output_dir=str(root), vocab_size=2000,
                          max_seq_length=64, num_workers=1))  # fmt: skip
    vocab = len((root / "vocab.txt").read_text(encoding="utf-8").splitlines())
    ds, batches = _engine(group, root, tmp_path / "run", max_steps=150, vocab=vocab, hidden=64, lr=2e-3)
    mlm = []
    while ds.state.step < 150:
        result = ds.step(batches)
        ds.book(result)
        mlm.append(float(result.parts["mlm"]) / ds.accum)
    first, last = np.mean(mlm[:5]), np.mean(mlm[-20:])
    assert 1.0 < last < 0.85 * first, (mlm[:5], mlm[-20:])
