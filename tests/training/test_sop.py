"""ALBERT's sentence-order prediction (``objective=sop``), drawn at load time from the NSP shards: the swap rate,
its seeding per (epoch, sample), no pair across documents, the loss with unlabelled rows, and a training run whose
logs say SOP and whose HF export loads in transformers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.models.bert import IGNORE_INDEX
from pretrain.training.data import ShardDataset, build_dataloader
from pretrain.training.masking import MaskingCollator, sample_keys
from tests.helpers import CLS_ID, MASKING_VOCAB, ROOT, SEP_ID, SMALL, make_sample, run_env


def _ordered(collator: MaskingCollator, samples: list[dict]) -> list[dict]:
    keys = sample_keys(collator.seed, [s["epoch"] for s in samples], [s["index"] for s in samples])
    return collator.order_pairs(samples, keys)


def test_half_of_the_isnext_pairs_are_swapped_and_notnext_pairs_lose_their_second_segment():
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, i) for i in range(8000)]  # nsp_label = index % 2: half IsNext, half NotNext
    out = _ordered(MaskingCollator(MASKING_VOCAB, seed=3, sentence_order=True), samples)
    isnext = [(s, o) for s, o in zip(samples, out, strict=True) if s["nsp_label"] == 0]
    swapped = np.mean([o["nsp_label"] == 1 for _, o in isnext])
    assert abs(swapped - 0.5) < 0.03, swapped
    for s, o in zip(samples, out, strict=True):
        ids, a = s["input_ids"], s["a_len"]
        if s["nsp_label"] == 1:  # B came from another document: [CLS] A [SEP] only, no pair label
            assert o["nsp_label"] == IGNORE_INDEX and o["a_len"] == a
            np.testing.assert_array_equal(o["input_ids"], ids[:a])
        elif o["nsp_label"] == 1:  # [CLS] B [SEP] A [SEP]
            b = ids[a:-1]
            assert o["a_len"] == len(b) + 2 and len(o["input_ids"]) == len(ids)
            np.testing.assert_array_equal(o["input_ids"][1 : o["a_len"] - 1], b)
            np.testing.assert_array_equal(o["input_ids"][o["a_len"] :], ids[1:a].tolist()[:-1] + [SEP_ID])
            assert o["input_ids"][0] == CLS_ID and o["input_ids"][o["a_len"] - 1] == SEP_ID
        else:
            assert o is s


def test_swaps_are_seeded_per_epoch_and_sample_not_per_batch():
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, 2 * i) for i in range(2000)]  # all IsNext
    collator = MaskingCollator(MASKING_VOCAB, seed=5, sentence_order=True)
    whole = [o["nsp_label"] for o in _ordered(collator, samples)]
    pieces = [o["nsp_label"] for k in range(0, 2000, 7) for o in _ordered(collator, samples[k : k + 7][::-1])[::-1]]
    assert whole == pieces  # the same sample draws the same order, whatever batch it is in
    later = [o["nsp_label"] for o in _ordered(collator, [{**s, "epoch": 1} for s in samples])]
    assert 0.4 < np.mean(np.array(whole) != np.array(later)) < 0.6  # a new epoch draws afresh
    other = [o["nsp_label"] for o in _ordered(MaskingCollator(MASKING_VOCAB, seed=6, sentence_order=True), samples)]
    assert whole != other


def test_pair_loss_skips_unlabelled_rows_and_a_batch_of_none_is_zero():
    from pretrain.models.bert import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32)).eval()  # fmt: skip
    ids = torch.randint(5, 50, (4, 10))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    pair = torch.tensor([0, 1, IGNORE_INDEX, IGNORE_INDEX])
    out = model(ids, labels=labels, next_sentence_label=pair)
    ref = torch.nn.functional.cross_entropy(out.nsp_logits[:2].float(), pair[:2])
    torch.testing.assert_close(out.nsp_loss, ref)
    none = model(ids, labels=labels, next_sentence_label=torch.full((4,), IGNORE_INDEX))
    assert none.nsp_loss.item() == 0.0


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run


def test_sop_batches_from_real_shards_pair_only_consecutive_segments(tiny):
    """Every sample of the sentence-pair shards through the SOP loader: labelled pairs are the shards' IsNext pairs
    (same tokens, kept or swapped), NotNext rows come as their first segment alone."""
    data, _ = tiny
    shards = ShardDataset(data, "train")
    loader, _ = build_dataloader(data, "train", 8, seed=2, sentence_order=True, drop_last=False, shuffle=False)
    seen = 0
    for batch_index, batch in enumerate(loader):
        for row in range(batch["input_ids"].shape[0]):
            src = shards[batch_index * 8 + row]
            n = int(batch["attention_mask"][row].sum())
            label = int(batch["next_sentence_label"][row])
            types = batch["token_type_ids"][row, :n]
            if src["nsp_label"] == 1:
                assert label == IGNORE_INDEX and n == src["a_len"] and int(types.sum()) == 0
            else:
                assert label in (0, 1) and n == len(src["input_ids"])
                a = src["a_len"] if label == 0 else n - src["a_len"] + 1
                assert int((types == 0).sum()) == a
            seen += 1
    assert seen == len(shards)


@pytest.mark.slow
def test_sop_run_says_sop_and_its_export_loads_in_transformers(tiny, tmp_path):
    from transformers import BertForPreTraining

    data, _ = tiny
    run = tmp_path / "run"
    args = [f"data.dir={data}", f"run_dir={run}", *SMALL, "objective=sop", "trainer.max_steps=4", "trainer.log_every=2",
            "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.eval_batches=2"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], capture_output=True, text=True,
                       env=run_env(), timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "MLM + SOP heads" in r.stdout and " SOP loss " in r.stdout and "NSP" not in r.stdout
    assert "(mlm " in r.stdout and ", sop " in r.stdout
    model, info = BertForPreTraining.from_pretrained(run / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.cls.seq_relationship.weight.shape == (2, model.config.hidden_size)  # the SOP head, NSP's name
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), str(run), "--batches", "2"],
                       capture_output=True, text=True, env=run_env(), timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and "SOP accuracy" in r.stdout and "NSP" not in r.stdout, r.stdout + r.stderr[-2000:]
    bad = [f"data.dir={data}", f"run_dir={tmp_path / 'bad'}", *SMALL, "objective=sop", "model.nsp=false"]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *bad], capture_output=True, text=True,
                       env=run_env(), timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "objective=sop needs sentence pairs and the pair head" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
