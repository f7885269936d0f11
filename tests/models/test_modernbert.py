"""pretrain.models.modernbert: equivalence with Hugging Face ModernBERT (padded and packed batches, short and long
rows), unpadded packed = padded, the sliding window, config round trips, refusals, init, counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the reference implementation

from pretrain.models.attention import rotary_cos_sin, unpad
from pretrain.models.modernbert import VOCAB_KEYS, ModernBertConfig, ModernBertForMaskedLM

VOCAB = 101  # not a multiple of 64: 128 rows in memory, 101 in HF's
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,  # layers 0 global, 1 and 2 local
    num_attention_heads=4,
    local_attention=64,  # window |i - j| <= 32: active at both 128 and 1024
    max_position_embeddings=2048,
)
BIASED = dict(SMALL, attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True, global_rope_theta=5e3,
              local_rope_theta=500.0, global_attn_every_n_layers=2, hidden_activation="gelu_pytorch_tanh")  # fmt: skip


def _ours(seed: int = 0, **kw) -> ModernBertForMaskedLM:
    """Our model with every parameter (norm weights and biases included) random, in eval mode."""
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(ModernBertConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.model.embeddings.tok_embeddings.weight[VOCAB:] = 0.0  # padding rows stay zero, as in training
    return model


def _hf_copy(model: ModernBertForMaskedLM) -> transformers.ModernBertForMaskedLM:
    """transformers' model built from our to_hf_dict, holding our weights (strict: every key matches)."""
    cfg = transformers.ModernBertConfig(**model.config.to_hf_dict())
    cfg._attn_implementation = "eager"  # the plain reference: explicit masks, fp32 softmax
    hf = transformers.ModernBertForMaskedLM(cfg).eval()
    sd = {k: v[:VOCAB] if k in VOCAB_KEYS else v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    return hf


def _labels(ids: torch.Tensor, real: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & real.bool()
    return torch.where(chosen, torch.randint(0, VOCAB, ids.shape, generator=g), torch.full_like(ids, -100))


def _padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of these lengths: input_ids (pad id 0 at padding), attention_mask 0/1."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def _pack(samples: list[torch.Tensor], rows: list[list[int]], width: int, labels: list[torch.Tensor] | None = None):
    """Packed rows as PackingCollator lays them out (``rows`` lists the samples of each row, in order): input_ids,
    attention_mask = sample number in the row (0 = padding), position_ids restarting at 0; labels -100 elsewhere."""
    out = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    packed_labels = torch.full((len(rows), width), -100)
    for r, members in enumerate(rows):
        start = 0
        for number, s in enumerate(members, 1):
            n = len(samples[s])
            out["input_ids"][r, start : start + n] = samples[s]
            out["attention_mask"][r, start : start + n] = number
            out["position_ids"][r, start : start + n] = torch.arange(n)
            if labels is not None:
                packed_labels[r, start : start + n] = labels[s]
            start += n
    if labels is not None:
        out["labels"] = packed_labels
    return out


@pytest.mark.parametrize(("L", "kw"), [(128, {}), (1024, {}), (128, BIASED)], ids=["128", "1024", "128-biased"])
def test_padded_batch_matches_hugging_face(L: int, kw: dict) -> None:
    model = _ours(**kw)
    hf = _hf_copy(model)
    assert set(model.state_dict()) == set(hf.state_dict())  # exactly HF's names (the tied decoder alias too)
    ids, mask = _padded([L, L - 37, L // 3])
    labels = _labels(ids, mask)
    with torch.no_grad():
        logits = model.mlm_logits_dense(model.encode(ids, attention_mask=mask))
        out = model(ids, attention_mask=mask, labels=labels)
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert logits.shape == ref.logits.shape
    assert (logits[real] - ref.logits[real]).abs().max() < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    assert out.num_masked == int((labels != -100).sum()) and out.mlm_logits.shape == (out.num_masked, VOCAB)
    assert out.nsp_loss is None and out.nsp_logits is None and set(out.loss_parts) == {"mlm"}


@pytest.mark.parametrize(("width", "lengths", "rows"), [(128, [60, 50, 18, 128, 97], [[0, 1, 2], [3], [4]]),
                                                        (1024, [600, 300, 124, 1024], [[0, 1, 2], [3]])])  # fmt: skip
def test_packed_rows_match_hugging_face_per_sample(width: int, lengths: list[int], rows: list[list[int]]) -> None:
    """Several samples per row: each gives what transformers gives for that sample run alone (attention and the
    sliding window stop at sample boundaries; rotary positions restart)."""
    model = _ours()
    hf = _hf_copy(model)
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(5, VOCAB, (n,), generator=g) for n in lengths]
    batch = _pack(samples, rows, width)
    labels = _labels(batch["input_ids"], batch["attention_mask"] > 0)
    with torch.no_grad():
        hidden = model.encode(**batch)  # [rows, width, H]
        logits = model.mlm_logits_dense(hidden)  # [rows, width, V]
        loss = model(**batch, labels=labels).loss
    ref_logits, ref_labels = [], []
    for r, members in enumerate(rows):
        start = 0
        for s in members:
            n = len(samples[s])
            with torch.no_grad():
                ref = hf(input_ids=samples[s][None]).logits[0]  # [n, V]
            assert (logits[r, start : start + n] - ref).abs().max() < 1e-4
            ref_logits.append(ref)
            ref_labels.append(labels[r, start : start + n])
            start += n
        assert torch.all(hidden[r, start:] == 0)  # padding positions: zeros, never computed
    ref_loss = torch.nn.functional.cross_entropy(torch.cat(ref_logits), torch.cat(ref_labels))
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_hidden_states_match_hugging_face() -> None:
    """num_layers + 1 states like HF's output_hidden_states, the last one final-normed (as HF's)."""
    model = _ours()
    hf = _hf_copy(model)
    ids, mask = _padded([128, 90])
    with torch.no_grad():
        ours = model.hidden_states(ids, None, mask)
        ref = hf.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        encoded = model.encode(ids, attention_mask=mask)
    real = mask.bool()
    assert len(ours) == len(ref) == SMALL["num_hidden_layers"] + 1
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and (a[real] - b[real]).abs().max() < 1e-4
        assert a[~real].abs().max() == 0
    assert torch.equal(ours[-1], encoded)


def test_packed_and_padded_give_the_same_loss_and_gradients() -> None:
    model = _ours()
    lengths = [70, 40, 128, 15]
    ids, mask = _padded(lengths)
    labels = _labels(ids, mask)
    samples = [ids[i, :n] for i, n in enumerate(lengths)]
    packed = _pack(samples, [[0, 1, 3], [2]], 128, labels=[labels[i, :n] for i, n in enumerate(lengths)])

    def loss_and_grads(**batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(input_ids=ids, attention_mask=mask, labels=labels)
    loss_b, grads_b = loss_and_grads(**packed)
    assert packed["input_ids"].shape == (2, 128) and int((packed["labels"] != -100).sum()) == int(
        (labels != -100).sum()
    )
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("packed", [False, True])
def test_sliding_window_limits_attention(packed: bool) -> None:
    """In a local layer, query p reads keys at most local_attention // 2 = 32 away: changing the input 33 away
    leaves p's output alone, 32 away changes it; in a packed row another sample never reaches p."""
    model = _ours()
    attn = model.model.layers[1].attn
    assert not attn.is_global and attn.window == 32
    L = 128
    mask = torch.ones(1, L, dtype=torch.long)
    pos = None
    if packed:  # samples [0, 40) and [40, 128)
        mask[0, 40:] = 2
        pos = torch.cat([torch.arange(40), torch.arange(88)])[None]
    u = unpad(torch.zeros(1, L, dtype=torch.long), mask, pos)
    rope = rotary_cos_sin(u.positions, 16, 1e4)
    x = torch.randn(L, SMALL["hidden_size"])

    def out(p: int, change: int | None = None) -> torch.Tensor:
        y = x.clone()
        if change is not None:
            y[change] += 1.0
        with torch.no_grad():
            return attn(y, rope, u)[p]

    p = 80  # p +- 33 are inside the (second) sample
    assert torch.equal(out(p, p + 33), out(p)) and torch.equal(out(p, p - 33), out(p))
    assert not torch.allclose(out(p, p + 32), out(p)) and not torch.allclose(out(p, p - 32), out(p))
    assert torch.equal(out(60, 39), out(60)) is packed  # 21 away: in the window, but in packed rows another sample
    assert not torch.allclose(out(60, 40), out(60))  # 20 away, same sample either way


def test_global_layer_reads_the_whole_sample() -> None:
    model = _ours()
    attn = model.model.layers[0].attn
    assert attn.is_global and attn.window is None
    u = unpad(torch.zeros(1, 256, dtype=torch.long), None, None)
    rope = rotary_cos_sin(u.positions, 16, 160000.0)
    x = torch.randn(256, SMALL["hidden_size"])
    y = x.clone()
    y[255] += 1.0
    with torch.no_grad():
        assert not torch.allclose(attn(x, rope, u)[0], attn(y, rope, u)[0])


def test_config_from_hugging_face_dicts() -> None:
    # 5.x: layer_types / rope_parameters, as transformers writes them
    hf = transformers.ModernBertConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                       num_attention_heads=4, local_attention=32, global_attn_every_n_layers=2,
                                       global_rope_theta=5e3, local_rope_theta=321.0, pad_token_id=7)  # fmt: skip
    c = ModernBertConfig.from_hf_dict(hf.to_dict())
    assert (c.vocab_size, c.num_hidden_layers, c.local_attention, c.pad_token_id) == (300, 5, 32, 7)
    assert (c.global_attn_every_n_layers, c.global_rope_theta, c.local_rope_theta) == (2, 5e3, 321.0)
    assert c.layer_types == hf.layer_types
    # 4.x / Hub style: the old keys only; 5.x sliding_window (half window) where local_attention is absent
    old = {"model_type": "modernbert", "num_hidden_layers": 4, "global_attn_every_n_layers": 4, "sliding_window": 8,
           "global_rope_theta": 1e5, "local_rope_theta": 1e3}  # fmt: skip
    c = ModernBertConfig.from_hf_dict(old, vocab_size=50)
    assert (c.global_attn_every_n_layers, c.local_attention, c.global_rope_theta, c.vocab_size) == (4, 16, 1e5, 50)
    assert c.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    # ours -> transformers -> ours gives the same config, and transformers builds the same layer pattern
    ours = ModernBertConfig(**BIASED)
    back = transformers.ModernBertConfig(**ours.to_hf_dict())
    assert back.layer_types == ours.layer_types and back.sliding_window == ours.local_attention // 2
    assert back.rope_parameters["full_attention"]["rope_theta"] == ours.global_rope_theta
    assert ModernBertConfig.from_hf_dict(back.to_dict()) == ours
    assert ModernBertConfig.from_hf_dict(json.loads(json.dumps(ours.to_hf_dict()))) == ours


def test_config_refusals() -> None:
    with pytest.raises(ValueError, match="nsp"):
        ModernBertConfig(nsp=True)
    with pytest.raises(ValueError, match="layer_types"):
        ModernBertConfig.from_hf_dict({"num_hidden_layers": 3, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ValueError, match="rope_type"):
        ModernBertConfig.from_hf_dict({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}})
    with pytest.raises(ValueError, match="model_type"):
        ModernBertConfig.from_hf_dict({"model_type": "bert"})
    with pytest.raises(ValueError, match="head size"):
        ModernBertConfig(hidden_size=60, num_attention_heads=4)  # head size 15: odd, RoPE cannot pair it
    with pytest.raises(ValueError, match="vocab_size is null"):
        ModernBertForMaskedLM(ModernBertConfig(vocab_size=None))


def test_model_refusals() -> None:
    model = ModernBertForMaskedLM(ModernBertConfig(**{**SMALL, "max_position_embeddings": 64}))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model.encode(torch.ones(1, 65, dtype=torch.long))
    model.encode(torch.ones(1, 64, dtype=torch.long))  # the limit itself is fine
    ids = torch.ones(1, 8, dtype=torch.long)
    pair = model(ids, labels=ids, next_sentence_label=torch.zeros(1, dtype=torch.long))  # pair shards: MLM alone
    assert pair.nsp_loss is None and torch.equal(pair.loss, model(ids, labels=ids).loss)


def test_loads_a_save_pretrained_directory(tmp_path: Path) -> None:
    """A transformers ModernBertForMaskedLM saved with save_pretrained: config.json and model.safetensors load
    into ours (vocabulary rows padded, the tied decoder filled from the embeddings) and give its logits."""
    from safetensors.torch import load_file

    torch.manual_seed(5)
    hf_cfg = transformers.ModernBertConfig(**{**SMALL, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
                                              "cls_token_id": None, "sep_token_id": None})  # fmt: skip
    hf = transformers.ModernBertForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    config = ModernBertConfig.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    model = ModernBertForMaskedLM(config).eval()
    sd = load_file(tmp_path / "model.safetensors")
    own = model.state_dict()
    assert set(own) - set(sd) <= set(model.tied_aliases) and set(sd) <= set(own)
    with torch.no_grad():
        for k, v in sd.items():
            own[k][: len(v)].copy_(v)
    ids, mask = _padded([128, 77])
    with torch.no_grad():
        ours = model.mlm_logits_dense(model.encode(ids, attention_mask=mask))
        ref = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-4


def test_zero_masked_positions_give_zero_loss_and_gradients() -> None:
    model = _ours().train()
    ids, mask = _padded([20, 12])
    out = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.num_masked == 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.all(g == 0) for g in grads)  # every parameter in the graph (DDP), all zero


def test_padding_vocab_rows_are_never_predicted() -> None:
    model = _ours()
    ids, mask = _padded([30])
    labels = _labels(ids, mask)
    out = model(ids, attention_mask=mask, labels=labels)
    assert model.config.padded_vocab_size == 128
    full = model.mlm_logits(model.encode(ids, attention_mask=mask))
    assert torch.isinf(full[..., VOCAB:]).all() and torch.isfinite(full[..., :VOCAB]).all()
    out.loss.backward()
    assert torch.all(model.model.embeddings.tok_embeddings.weight.grad[VOCAB:] == 0)
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight


def test_init_statistics_match_hugging_face() -> None:
    """Fresh weights: per tensor the std of transformers' own init (truncated normals, per-module stds)."""
    cfg = ModernBertConfig(**{**SMALL, "vocab_size": 128, "num_hidden_layers": 6, "hidden_size": 128})
    torch.manual_seed(0)
    ours = ModernBertForMaskedLM(cfg).state_dict()
    hf_cfg = transformers.ModernBertConfig(**cfg.to_hf_dict())
    theirs = transformers.ModernBertForMaskedLM(hf_cfg).state_dict()
    for k, v in theirs.items():
        a, b = ours[k].float(), v.float()
        if b.std() == 0:
            assert torch.equal(a, b), k  # LayerNorm ones, zero biases
        else:
            assert abs(a.std() / b.std() - 1) < 0.1, k
            limit = cfg.initializer_cutoff_factor * b.std() / 0.88  # cut at 2 stds of the untruncated normal
            assert a.abs().max() <= limit * 1.05, k
    padded = ModernBertForMaskedLM(ModernBertConfig(**SMALL)).model.embeddings.tok_embeddings.weight
    assert torch.all(padded[VOCAB:] == 0) and padded[:VOCAB].std() > 0.01


def test_base_shape_parameter_count_and_flops() -> None:
    with torch.device("meta"):
        ours = ModernBertForMaskedLM(ModernBertConfig())
        theirs = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig())
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 149_655_232
    c = ours.config
    n_global = sum(c.is_global(i) for i in range(c.num_hidden_layers))
    assert n_global == 8  # layers 0, 3, ..., 21
    # past the window only the global layers' attention grows with the sequence
    assert ours.flops_per_token(1024) - ours.flops_per_token(512) == 12 * c.hidden_size * n_global * 512
    assert ours.flops_per_token(128) == 6 * ours.num_parameters() + 12 * c.hidden_size * 22 * 128
    head = c.hidden_size**2 + c.padded_vocab_size * c.hidden_size
    assert ours.flops_per_token(128) - ours.flops_per_token(128, mlm_fraction=0.15) == pytest.approx(6 * 0.85 * head)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = _ours().train()
    ids, mask = _padded([64, 40])
    labels = _labels(ids, mask)
    grads = []
    for on in (False, True):
        model.checkpoint_layers = on
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.model.checkpoint_layers
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize(
    "name,shape",
    [("modernbert-tiny", (3, 128, 2, 256)), ("modernbert-base", (22, 768, 12, 1152)),
     ("modernbert-large", (28, 1024, 16, 2624))],
)  # fmt: skip
def test_model_yamls_are_the_published_sizes_in_transformers_class(name: str, shape: tuple) -> None:
    """conf/model/modernbert-*.yaml compose into ModernBertConfig (the schema their defaults list names); at
    ModernBERT's own 50,368-token vocabulary each has exactly the parameters of transformers' class of that
    config (base about 149M, large about 395M)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pretrain.training.config  # noqa: F401 - registers the schemas

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        node = compose(config_name="config", overrides=[f"model={name}"]).model
    assert OmegaConf.get_type(node) is ModernBertConfig and node.vocab_size is None
    cfg = ModernBertConfig(**{**OmegaConf.to_container(node), "vocab_size": 50368})
    c = cfg
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == shape
    assert (c.global_rope_theta, c.local_rope_theta, c.local_attention, c.max_position_embeddings) == (
        160000.0, 10000.0, 32 if name.endswith("tiny") else 128, 8192)  # fmt: skip
    with torch.device("meta"):
        ours = ModernBertForMaskedLM(cfg).num_parameters()
        theirs = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**cfg.to_hf_dict())).num_parameters()
    assert ours == theirs
    # with the MLM head; 149.0M / 394.8M without it: the paper's "149M" and "395M"
    expected = {"modernbert-base": 149_655_232, "modernbert-large": 395_881_664}
    assert ours == expected.get(name, ours)
