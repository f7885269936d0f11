"""Every fast path gives what the plain path gives: same loss and gradients within float32 tolerance."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.model import BertConfig, BertForPreTraining


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
