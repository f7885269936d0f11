"""pretrain.models.bert: equivalence with Hugging Face BERT, checkpoint round trips, sparse MLM loss, init, configs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency: the reference implementation
from omegaconf import OmegaConf

from pretrain.checkpoint.hf import export_hf, fill_mask, load_hf
from pretrain.models.bert import BertConfig, BertForPreTraining

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1001  # not a multiple of 8: load_hf pads it to 1008 rows
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


def _hf_model(cls_name: str, seed: int = 0):
    """A Hugging Face model whose every parameter (biases and LayerNorms included) is random, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(seed: int = 1):
    """Two sequences, the second with 5 padding positions, about 30% of real positions masked."""
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 16
    input_ids = torch.randint(5, VOCAB, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, -5:] = 0
    input_ids[1, -5:] = 0
    token_type_ids = torch.zeros(B, L, dtype=torch.long)
    token_type_ids[:, 8:] = 1
    labels = torch.where(
        (torch.rand(B, L, generator=g) < 0.3) & attention_mask.bool(),
        torch.randint(0, VOCAB, (B, L), generator=g),
        torch.full((B, L), -100),
    )
    labels[0, 0] = 7  # at least one masked position
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask), labels


def _ours(model: BertForPreTraining, inputs: dict, labels: torch.Tensor):
    with torch.no_grad():
        return model.encode(**inputs), model(**inputs, labels=labels)


def _theirs(hf, inputs: dict):
    with torch.no_grad():
        return hf(**inputs, output_hidden_states=True)


@pytest.mark.parametrize("cls_name,nsp", [("BertForPreTraining", True), ("BertForMaskedLM", False)])
def test_matches_hugging_face(tmp_path: Path, cls_name: str, nsp: bool) -> None:
    hf = _hf_model(cls_name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.nsp is nsp and ours.config.padded_vocab_size == 1008
    assert set(ours.state_dict()) == set(hf.state_dict())  # exactly HF's names (decoder weight/bias aliases too)
    inputs, labels = _batch()
    hidden, out = _ours(ours, inputs, labels)
    ref = _theirs(hf, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    ref_logits = ref.prediction_logits if nsp else ref.logits
    masked = labels != -100
    assert out.mlm_logits.shape == (int(masked.sum()), VOCAB) and out.num_masked == int(masked.sum())
    torch.testing.assert_close(out.mlm_logits, ref_logits[masked], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mlm_labels, labels[masked])
    if nsp:
        torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    else:
        assert out.nsp_logits is None and out.nsp_loss is None and ours.bert.pooler is None
    # Same MLM loss as HF's dense cross-entropy over the whole [B, L, V] logits.
    hf_mlm = F.cross_entropy(ref_logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.mlm_loss, hf_mlm, atol=1e-5, rtol=1e-5)


def _tokenizer_dir(path: Path) -> Path:
    """A WordPiece tokenizer over VOCAB tokens saved as tokenizer.json + vocab.txt (no tokenizer_config.json)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    return path


@pytest.mark.parametrize("nsp", [True, False])
def test_export_round_trip(tmp_path: Path, nsp: bool) -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**SMALL, nsp=nsp)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # non-zero bias, so a lost bias would show
    out_dir = export_hf(model, _tokenizer_dir(tmp_path / "tok"), tmp_path / "export")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB and cfg["model_type"] == "bert"
    assert cfg["architectures"] == ["BertForPreTraining" if nsp else "BertForMaskedLM"]
    tc = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "BertTokenizer" and tc["do_lower_case"] is True
    umask = os.umask(0)
    os.umask(umask)
    assert (out_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others

    inputs, labels = _batch()
    hidden, out = _ours(model, inputs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without any warning
        again = load_hf(out_dir).eval()
    assert again.config == model.config
    hidden2, out2 = _ours(again, inputs, labels)
    assert torch.equal(hidden, hidden2) and torch.equal(out.mlm_logits, out2.mlm_logits)
    if nsp:
        assert torch.equal(out.nsp_logits, out2.nsp_logits)

    for cls_name in ("AutoModelForMaskedLM", "BertForPreTraining") if nsp else ("AutoModelForMaskedLM",):
        hf, info = getattr(transformers, cls_name).from_pretrained(out_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        # BertForMaskedLM has no pooler / NSP head, so on an NSP export those (and only those) are unexpected,
        # exactly as when it loads bert-base-uncased.
        head_only = (
            {
                "bert.pooler.dense.weight",
                "bert.pooler.dense.bias",
                "cls.seq_relationship.weight",
                "cls.seq_relationship.bias",
            }
            if nsp and cls_name == "AutoModelForMaskedLM"
            else set()
        )
        assert set(info["unexpected_keys"]) == head_only, info
        ref = _theirs(hf.eval(), inputs)
        logits = ref.logits if cls_name == "AutoModelForMaskedLM" else ref.prediction_logits
        torch.testing.assert_close(out.mlm_logits, logits[labels != -100], atol=1e-5, rtol=1e-5)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert hf_tok("The cat [MASK]")["input_ids"] == [2, 5, 6, 4, 3]


def test_encoder_only_checkpoint_warns_and_loads(tmp_path: Path) -> None:
    hf = _hf_model("BertModel")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"freshly initialised: .*cls\.predictions\.bias.*cls\.seq_relationship"):
        ours = load_hf(tmp_path)
    assert ours.config.nsp  # a pooler is present, so the NSP head is kept
    inputs, _ = _batch()
    with torch.no_grad():
        ref = hf(**inputs).last_hidden_state
        hidden = ours.eval().encode(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], ref[real], atol=1e-5, rtol=1e-5)


def test_load_hf_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path}.*config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig(**SMALL).to_dict()))
    with pytest.raises(ValueError, match=f"{tmp_path}.*no weights"):
        load_hf(tmp_path)


def _random_model(nsp: bool = True, seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(**SMALL, nsp=nsp))


def test_sparse_mlm_loss_and_grads_equal_dense() -> None:
    model = _random_model()
    inputs, labels = _batch()
    out = model.eval()(**inputs, labels=labels)
    out.mlm_loss.backward()
    sparse_grad = model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()
    model.zero_grad()
    dense = model.mlm_logits_dense(model.encode(**inputs))  # [B, L, vocab_size]
    assert dense.shape == (2, 16, VOCAB)
    dense_loss = F.cross_entropy(dense.reshape(-1, VOCAB), labels.view(-1), ignore_index=-100)
    dense_loss.backward()
    torch.testing.assert_close(out.mlm_loss, dense_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse_grad, model.bert.encoder.layer[0].attention.self.query.weight.grad)


def test_zero_masked_positions_give_zero_loss_and_finite_grads() -> None:
    model = _random_model().train()
    inputs, labels = _batch()
    out = model(**inputs, labels=torch.full_like(labels, -100), next_sentence_label=torch.tensor([0, 1]))
    assert out.num_masked == 0 and out.mlm_loss.item() == 0.0 and out.mlm_logits.shape == (0, VOCAB)
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(out.nsp_loss.item())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.cls.predictions.transform.dense.weight.grad is not None  # head stays in the graph


def test_padding_vocab_rows_are_never_predicted() -> None:
    model = _random_model()
    V, Vp = VOCAB, model.config.padded_vocab_size
    with torch.no_grad():
        model.cls.predictions.bias[V:] = 100.0  # would win every argmax if padding rows were not masked
    inputs, labels = _batch()
    full = model.cls.predictions(model.encode(**inputs))  # [B, L, Vp] straight from the head
    assert full.shape[-1] == Vp and torch.isinf(full[..., V:]).all() and torch.isfinite(full[..., :V]).all()
    assert full.softmax(-1)[..., V:].max() == 0 and full.argmax(-1).max() < V
    out = model.train()(**inputs, labels=labels, next_sentence_label=torch.tensor([1, 0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.cls.predictions.bias.grad[V:].abs().max() == 0
    assert model.bert.embeddings.word_embeddings.weight.grad[V:].abs().max() == 0


def test_bert_base_parameter_count_and_flops() -> None:
    with torch.device("meta"):
        model = BertForPreTraining(BertConfig(vocab_size=30522, pad_vocab_size_multiple=1))
    assert model.num_parameters() == 110_106_428  # transformers.BertForPreTraining, tied weights once
    n = model.num_parameters()
    assert model.flops_per_token(128) == 6 * n + 12 * 12 * 768 * 128
    assert model.flops_per_token(128, mlm_fraction=0.15) < model.flops_per_token(128)
    with torch.device("meta"):
        masked_lm = BertForPreTraining(BertConfig(vocab_size=30522, pad_vocab_size_multiple=1, nsp=False))
    assert masked_lm.num_parameters() == n - (768 * 768 + 768) - (768 * 2 + 2)  # no pooler, no NSP head


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig(vocab_size=1003, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
    )
    layer = model.bert.encoder.layer[1]
    for w in (
        layer.intermediate.dense.weight,
        layer.attention.self.key.weight,
        model.cls.seq_relationship.weight,
        model.bert.embeddings.position_embeddings.weight,
    ):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    emb = model.bert.embeddings.word_embeddings.weight
    assert emb[0].abs().max() == 0 and emb[1003:].abs().max() == 0  # [PAD] row and vocab padding rows
    assert abs(emb[1:1003].std().item() - 0.02) < 0.002
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "LayerNorm" in name:
            assert torch.all(p == 1), name


@pytest.mark.parametrize(
    "name,shape",
    [
        ("tiny", (2, 128, 2, 512)),
        ("mini", (4, 256, 4, 1024)),
        ("small", (4, 512, 8, 2048)),
        ("bert-base", (12, 768, 12, 3072)),
        ("bert-large", (24, 1024, 16, 4096)),
        ("roberta-base", (12, 768, 12, 3072)),
    ],
)
def test_model_yamls_load_into_config(name: str, shape: tuple[int, int, int, int]) -> None:
    from hydra import compose, initialize_config_dir

    import pretrain.training.config  # noqa: F401 - registers the schema: each YAML holds what differs from BertConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = OmegaConf.to_container(compose(config_name="config", overrides=[f"model={name}"]).model)
    assert raw["vocab_size"] is None  # filled in from the shards' vocabulary
    cfg = BertConfig(**{**raw, "vocab_size": 30522})
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == shape
    assert cfg.nsp is (name != "roberta-base") and cfg.padded_vocab_size == 30528
    assert transformers.BertConfig(**cfg.to_hf_dict()).hidden_size == cfg.hidden_size
    if name == "bert-base":
        with torch.device("meta"):
            model = BertForPreTraining(BertConfig(**{**raw, "vocab_size": 30522, "pad_vocab_size_multiple": 1}))
        assert model.num_parameters() == 110_106_428
    with pytest.raises(ValueError, match="vocab_size is null"):
        BertForPreTraining(BertConfig(**raw))


def test_fill_mask_returns_top_k_per_mask(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_tokenizer_dir(tmp_path / "tok") / "tokenizer.json"))
    model = _random_model().train()
    preds = fill_mask(model, tok, "the [MASK] sat on the [MASK] .", top_k=3)
    assert model.training  # mode restored
    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    for p in preds:
        probs = [prob for _, prob in p]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(tok.token_to_id(t) is not None for t, _ in p)


def test_bad_config_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="hidden_size=100 is not a multiple of num_attention_heads=3"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        _random_model().encode(torch.zeros(1, 65, dtype=torch.long))
