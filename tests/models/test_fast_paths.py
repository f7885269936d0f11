"""Every fast path gives what the plain path gives: same loss and gradients within float32 tolerance."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.training.data import PackingCollator, real_lengths
from pretrain.training.masking import MaskingCollator, MaskingConfig
from tests.helpers import LAUNCH, ROOT, SMALL, hf_weights, make_data, run_env


def _batch(cfg: BertConfig, b: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # a padded row
    labels = torch.where(torch.rand(b, length, generator=g) < 0.15, ids, -100)
    labels[0, 3] = ids[0, 3]  # at least one masked position
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 0, 1]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.long  # CI time: `make test-all` runs it
def test_compiled_model_matches_eager():
    """trainer.compile: torch.compile (inductor, as engine.compile() runs it) changes no loss and no gradient."""
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    eager = BertForPreTraining(cfg)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    batch = _batch(cfg)
    outs = []
    for m in (eager, compiled):
        out = m(**batch)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    for key in ("loss", "mlm_loss", "nsp_loss"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5, msg=n)


def test_activation_checkpointing_matches_plain_backward():
    """trainer.activation_checkpointing: each layer recomputed in backward, with the same dropout masks."""
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    plain = BertForPreTraining(cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.bert.encoder.checkpoint_layers = True
    batch = _batch(cfg)
    results = []
    for m in (plain, ckpt):
        torch.manual_seed(1)  # dropout on: the checkpointed layers must replay the same masks
        out = m(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb) and ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("nsp", [True, False])
def test_last_layer_on_read_positions_only_matches_full_pass(nsp: bool):
    """The last layer's output projection and feed-forward run only where the heads read (masked positions and
    [CLS]): same losses and gradients as heads applied to the full final hidden states."""
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nsp=nsp)  # fmt: skip
    torch.manual_seed(0)
    fast = BertForPreTraining(cfg)
    full = copy.deepcopy(fast)
    batch = _batch(cfg)
    if not nsp:
        del batch["next_sentence_label"]
    out = fast(**batch)
    out.loss.backward()
    hidden = full.encode(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # [B, L, H], no keep
    labels = batch["labels"]
    logits = full.mlm_logits_dense(hidden)[labels != -100]
    ref = torch.nn.functional.cross_entropy(logits, labels[labels != -100])
    torch.testing.assert_close(out.mlm_loss, ref, rtol=1e-6, atol=1e-6)
    if nsp:
        nsp_logits = full.cls.seq_relationship(full.bert.pooler(hidden[:, 0]))
        ref_nsp = torch.nn.functional.cross_entropy(nsp_logits, batch["next_sentence_label"])
        torch.testing.assert_close(out.nsp_loss, ref_nsp, rtol=1e-6, atol=1e-6)
        ref = ref + ref_nsp
    ref.backward()
    ga = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


def _samples(n: int = 10, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 30)) if i % 3 else 32  # full rows and short ones, as BERT data has
        ids = rng.integers(5, 120, length)
        ids[0], ids[length // 2], ids[-1] = 2, 3, 3  # [CLS] A [SEP] B [SEP]
        out.append({"input_ids": ids, "a_len": length // 2 + 1, "nsp_label": i % 2, "index": i, "epoch": 0})
    return out


def test_packed_batch_gives_each_sample_its_own_losses():
    """data.pack: a packed micro-batch gives every sample the MLM and NSP losses it gets when run alone."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    collator = MaskingCollator(vocab, MaskingConfig(mlm_probability=0.3), seed=3)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).eval()
    samples = _samples()
    packed = PackingCollator(collator)(samples)
    width = packed["input_ids"].size(1)
    assert packed["input_ids"].size(0) < len(samples)  # short samples share rows
    assert real_lengths(packed).tolist() == [len(s["input_ids"]) for s in samples]
    with torch.no_grad():
        out = model(**packed)
        ce = torch.nn.functional.cross_entropy(out.mlm_logits.float(), out.mlm_labels, reduction="none")
        flat = (packed["labels"].reshape(-1) != -100).nonzero().squeeze(1)  # the order of out.mlm_logits
        starts, checked = packed["cls_index"], 0
        for i, s in enumerate(samples):
            alone = model(**collator([s]))
            lo = int(starts[i])
            mine = (flat >= lo) & (flat < lo + len(s["input_ids"]))
            assert int(mine.sum()) == alone.num_masked  # the same masks, wherever the sample sits
            if alone.num_masked:
                checked += 1
                torch.testing.assert_close(ce[mine].mean(), alone.mlm_loss, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.nsp_logits[i], alone.nsp_logits[0], rtol=1e-4, atol=1e-5)
        assert checked >= len(samples) - 2 and int(starts.max()) < packed["input_ids"].numel() and width >= 32


@pytest.mark.slow
def test_packed_training_resumes_exactly(tmp_path):
    """Packing changes nothing of the data order: a run stopped and resumed ends with the weights of one run."""
    import subprocess
    import sys

    def launch(run_dir, *more):
        return subprocess.run([sys.executable, LAUNCH, f"run_dir={run_dir}", *args, *more], capture_output=True,
                              text=True, env=run_env(), timeout=300, cwd=ROOT)  # fmt: skip

    data = make_data(tmp_path / "data", max_len=32)
    args = [f"data.dir={data}", *SMALL, "data.pack=true", "trainer.max_steps=8", "trainer.checkpoint_every=4",
            "trainer.eval_every=8", "trainer.log_every=2"]  # fmt: skip
    r = launch(tmp_path / "one")
    startup = "ZeRO stage 0, fp32; optimizer: AdamW: PyTorch fused (CPU); packed rows"
    assert r.returncode == 0 and startup in r.stdout, r.stderr[-3000:]
    r = launch(tmp_path / "two", "trainer.stop_at_step=4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(tmp_path / "two")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = hf_weights(tmp_path / "one"), hf_weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
