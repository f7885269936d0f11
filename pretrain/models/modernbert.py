"""ModernBERT encoder for pretraining, in one readable file (nanoGPT style).

The architecture of Warner et al. 2024 ("Smarter, Better, Faster, Longer"), as Hugging Face's
``ModernBertForMaskedLM`` implements it: rotary positions (no position table), pre-norm LayerNorms without bias,
no linear biases, a GeGLU feed-forward, global attention every ``global_attn_every_n_layers``-th layer and a sliding
window of ``local_attention`` tokens in the others. Parameter names are exactly HF's, so export is a copy (minus
the vocabulary padding rows) and the same ``PretrainingOutput`` as ``pretrain.models.bert`` comes back, so the
training loop, evaluation and tools treat both families alike.

Unpadded execution (the paper's): the real tokens of a padded or packed batch are gathered into one sequence
[T, H] (``pretrain.models.attention.unpad``); embeddings, norms, MLPs and projections never see padding, and
attention runs per sample (FlashAttention varlen on GPU, an exact SDPA fallback elsewhere). The MLM head runs only
at the masked positions, as BERT's does.

Shapes: B batch, L row length, T real tokens, H hidden size, nh heads, hs head size (H // nh), I intermediate
size, V (padded) vocabulary, M masked positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.attention import Unpadded, apply_rotary, attention, rotary_cos_sin, unpad
from pretrain.models.bert import IGNORE_INDEX, PretrainingOutput

# Plain functions / partials, not lambdas, so a whole model still pickles. Names as HF's ACT2FN.
_ACTS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
# Keys of our state dict that hold vocabulary rows (padded in memory, true size in HF's files), and those that are
# views of other parameters (the decoder is tied to the token embeddings): a checkpoint may lack them.
VOCAB_KEYS = ("model.embeddings.tok_embeddings.weight", "decoder.weight", "decoder.bias")
TIED_ALIASES = ("decoder.weight",)


@dataclass
class ModernBertConfig:
    """Model shape; field names and defaults (ModernBERT-base) as ``transformers.ModernBertConfig``'s."""

    vocab_size: int | None = 50368
    """True vocabulary size (rows that can be predicted); ``null`` in the YAMLs = taken from the shards' vocabulary."""
    hidden_size: int = 768
    """Width H of the embeddings and of every layer."""
    intermediate_size: int = 1152
    """Width I of the GeGLU feed-forward (``Wi`` projects to 2 * I: the input and its gate)."""
    num_hidden_layers: int = 22
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide hidden_size, into an even head size (RoPE rotates pairs)."""
    hidden_activation: str = "gelu"
    """Activation of the GeGLU input half: ``gelu`` (exact, erf), ``gelu_new`` / ``gelu_pytorch_tanh``, ``relu``
    or ``silu``."""
    max_position_embeddings: int = 8192
    """Longest row accepted (RoPE has no table; this is the length the model is meant for)."""
    initializer_range: float = 0.02
    """Std of the truncated-normal init of input projections and embeddings; output projections use
    initializer_range / sqrt(2 * num_hidden_layers)."""
    initializer_cutoff_factor: float = 2.0
    """The truncated normal is cut at +- this many stds."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    norm_bias: bool = False
    """Whether the LayerNorms have a bias (ModernBERT: no)."""
    pad_token_id: int | None = 0
    """Id of [PAD] (our tokenizers' 0; ModernBERT's own is 50283): its embedding gets no gradient from the input."""
    bos_token_id: int | None = 2
    """Written to config.json for HF's tools; our [CLS] (2). The model itself does not read it."""
    eos_token_id: int | None = 3
    """Written to config.json for HF's tools; our [SEP] (3). The model itself does not read it."""
    cls_token_id: int | None = 2
    """Written to config.json for HF's tools: [CLS]."""
    sep_token_id: int | None = 3
    """Written to config.json for HF's tools: [SEP]."""
    attention_bias: bool = False
    """Biases on ``Wqkv`` and the attention ``Wo``."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities and on the attention output (as HF). Above 0 in training the
    FlashAttention varlen kernel (no dropout) gives way to the SDPA fallback."""
    global_rope_theta: float = 160000.0
    """RoPE base of the global-attention layers."""
    local_rope_theta: float = 10000.0
    """RoPE base of the sliding-window layers."""
    local_attention: int = 128
    """Total sliding window: a token in a local layer reads keys at most local_attention // 2 positions away on
    either side (HF's ``sliding_window``), itself included."""
    global_attn_every_n_layers: int = 3
    """Layer i attends globally when i % n == 0 (layer 0 always), locally otherwise."""
    embedding_dropout: float = 0.0
    """Dropout after the embedding LayerNorm."""
    mlp_bias: bool = False
    """Biases on the feed-forward ``Wi`` and ``Wo``."""
    mlp_dropout: float = 0.0
    """Dropout between the GeGLU product and ``Wo``."""
    decoder_bias: bool = True
    """Bias of the (tied) vocabulary projection."""
    classifier_activation: str = "gelu"
    """Activation of the MLM head's transform (HF's name: the head is shared with its classifiers)."""
    classifier_bias: bool = False
    """Bias on the MLM head's dense layer."""
    classifier_pooling: str = "cls"
    """Fine-tuning's sequence heads (HF's ``ModernBertForSequenceClassification``): the text's vector is its first
    token's (``cls``) or the mean over its real tokens (``mean``, what the published ModernBERT checkpoints name).
    Pretraining does not read it; kept so a published model's choice carries over to fine-tuning and export."""
    classifier_dropout: float = 0.0
    """Fine-tuning's task heads: dropout between the prediction head and the classifier (HF's ``drop``)."""
    family: str = "modernbert"
    """Model family (BERT's config says ``bert``): which module the training code builds."""
    nsp: bool = False
    """Interface parity with BERT: must stay False (ModernBERT has no sentence-pair head)."""
    pad_vocab_size_multiple: int = 64
    """Pad the vocabulary rows up to a multiple of this (ModernBERT's 50368 is 64 x 787); 1 = off. Padding rows
    are never predicted (their logits are -inf) and are dropped on export."""

    # The fields that fix the weights' shapes and what they compute: a Hugging Face directory's own win over the
    # YAML's when pretraining continues from it (dropout and initialisation stay the run's choice).
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "hidden_activation", "max_position_embeddings", "norm_eps", "norm_bias", "attention_bias", "global_rope_theta",
        "local_rope_theta", "local_attention", "global_attn_every_n_layers", "mlp_bias", "decoder_bias",
        "classifier_activation", "classifier_bias",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.nsp:
            raise ValueError("nsp=true: ModernBERT has no next-sentence head (ModernBertForMaskedLM); use nsp=false")
        if self.family != "modernbert":
            raise ValueError(f"family={self.family!r}: ModernBertConfig is the 'modernbert' family")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} / num_attention_heads={self.num_attention_heads} must be an even "
                "whole head size (RoPE rotates pairs of dimensions)"
            )
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in _ACTS:
                raise ValueError(f"{name}={getattr(self, name)!r}: use one of {sorted(_ACTS)}")
        if self.global_attn_every_n_layers < 1 or self.local_attention < 2:
            raise ValueError(
                f"global_attn_every_n_layers={self.global_attn_every_n_layers} must be >= 1 and "
                f"local_attention={self.local_attention} >= 2"
            )
        if self.pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple={self.pad_vocab_size_multiple}: must be >= 1 (1 = off)")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling={self.classifier_pooling!r}: use cls or mean")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / decoder table: vocab_size rounded up to pad_vocab_size_multiple."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is null: fill it in from the shards' vocabulary before building")
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def is_global(self, layer: int) -> bool:
        return layer % self.global_attn_every_n_layers == 0

    @property
    def layer_types(self) -> list[str]:
        """Per layer, as HF 5.x writes it: ``full_attention`` or ``sliding_attention``."""
        return ["full_attention" if self.is_global(i) else "sliding_attention" for i in range(self.num_hidden_layers)]

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` content that ``transformers.ModernBertConfig`` reads (true vocab size): both the 5.x keys
        (layer_types, rope_parameters) and the 4.x ones (global_attn_every_n_layers, *_rope_theta)."""
        ours = ("family", "nsp", "pad_vocab_size_multiple")  # not HF fields
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ours}
        rope = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        return {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", **d,
                "layer_types": self.layer_types, "rope_parameters": rope, "tie_word_embeddings": True}  # fmt: skip

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> ModernBertConfig:
        """Build from a Hugging Face ``config.json`` dict, 4.x style (global_rope_theta, local_attention,
        global_attn_every_n_layers) or 5.x (rope_parameters, layer_types, sliding_window); 5.x keys win, as in
        transformers. Layer patterns and RoPE types this model cannot reproduce are refused."""
        if d.get("model_type", "modernbert") != "modernbert":
            raise ValueError(f"model_type={d.get('model_type')!r}: only 'modernbert' configs map onto this model")
        names = {f.name for f in fields(cls)} - {"family", "nsp"}
        kw = {k: v for k, v in d.items() if k in names}
        if "local_attention" not in d and d.get("sliding_window") is not None:
            kw["local_attention"] = 2 * int(d["sliding_window"])  # HF: sliding_window = local_attention // 2
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling={d['rope_scaling']!r}: only default RoPE is supported")
        for kind, key in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            p = (d.get("rope_parameters") or {}).get(kind) or {}
            if p.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters[{kind!r}] rope_type={p['rope_type']!r}: only 'default' is supported")
            if "rope_theta" in p:
                kw[key] = float(p["rope_theta"])
        types = d.get("layer_types")
        if types:
            full = [i for i, t in enumerate(types) if t == "full_attention"]
            n = full[1] if len(full) > 1 else len(types)  # only layer 0 global: any n >= num layers
            if len(types) != d.get("num_hidden_layers", len(types)) or [i % n == 0 for i in range(len(types))] != [
                t == "full_attention" for t in types
            ]:
                raise ValueError(f"layer_types={types}: only 'layer i global when i % n == 0' patterns are supported")
            kw["global_attn_every_n_layers"] = n
        kw.update(overrides)
        return cls(**kw)


def _norm(c: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)


class ModernBertEmbeddings(nn.Module):
    """Token embedding -> LayerNorm -> dropout; no position table (RoPE acts inside attention)."""

    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.padded_vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.norm = _norm(c)
        self.drop = nn.Dropout(c.embedding_dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(ids)))  # [T] -> [T, H]


class ModernBertAttention(nn.Module):
    def __init__(self, c: ModernBertConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.is_global = c.is_global(layer)
        # HF masks |i - j| <= local_attention // 2 (its eager/SDPA masks and FlashAttention agree on this).
        self.window = None if self.is_global else c.local_attention // 2
        self.dropout_p = c.attention_dropout
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.Wo = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self.out_drop = nn.Dropout(c.attention_dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], u: Unpadded) -> torch.Tensor:
        T, H = x.shape
        q, k, v = self.Wqkv(x).view(T, 3, self.n_head, self.head_dim).unbind(1)  # 3 x [T, nh, hs]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attention(q, k, v, u, self.window, self.dropout_p if self.training else 0.0)  # [T, nh, hs]
        return self.out_drop(self.Wo(y.reshape(T, H)))


class ModernBertMLP(nn.Module):
    """GeGLU: one GEMM to [T, 2I], act(input) * gate, back to H."""

    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.act = _ACTS[c.hidden_activation]
        self.drop = nn.Dropout(c.mlp_dropout)
        self.Wo = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)  # 2 x [T, I]
        return self.Wo(self.drop(self.act(inp) * gate))


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, c: ModernBertConfig, layer: int) -> None:
        super().__init__()
        # Layer 0 reads the embeddings, which end in a LayerNorm already: no second norm (HF: Identity).
        self.attn_norm = nn.Identity() if layer == 0 else _norm(c)
        self.attn = ModernBertAttention(c, layer)
        self.mlp_norm = _norm(c)
        self.mlp = ModernBertMLP(c)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], u: Unpadded) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, u)  # pre-norm residuals: [T, H]
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nn.Module):
    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.config = c
        self.embeddings = ModernBertEmbeddings(c)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.final_norm = _norm(c)
        self.checkpoint_layers = False  # keep only each layer's input; recompute the layer in backward (memory)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        all_states: bool = False,
    ) -> tuple[torch.Tensor | list[torch.Tensor], Unpadded]:
        """Final-normed hidden states of the real tokens [T, H] and where they are; ``all_states``: a list of
        num_hidden_layers + 1 such tensors as HF's ``output_hidden_states`` (embeddings, each layer's output, the
        last one final-normed)."""
        c = self.config
        if input_ids.size(1) > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.size(1)} exceeds max_position_embeddings={c.max_position_embeddings}"
            )
        u = unpad(input_ids, attention_mask, position_ids)
        x = self.embeddings(input_ids.reshape(-1).index_select(0, u.idx))  # [T, H]
        hs = c.hidden_size // c.num_attention_heads
        # one cos/sin table per layer type, shared by its layers: [T, hs] each
        ropes = {g: rotary_cos_sin(u.positions, hs, c.global_rope_theta if g else c.local_rope_theta)
                 for g in {c.is_global(i) for i in range(c.num_hidden_layers)}}  # fmt: skip
        states = [x]
        for layer in self.layers:
            rope = ropes[layer.attn.is_global]
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, u, use_reentrant=False)  # same dropout masks: RNG state is replayed
            else:
                x = layer(x, rope, u)
            states.append(x)
        x = self.final_norm(x)
        if all_states:
            return [*states[:-1], x], u
        return x, u


class ModernBertPredictionHead(nn.Module):
    def __init__(self, c: ModernBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.classifier_bias)
        self.act = _ACTS[c.classifier_activation]
        self.norm = _norm(c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class ModernBertForMaskedLM(nn.Module):
    """ModernBERT with its MLM head; state-dict keys exactly HF ``ModernBertForMaskedLM``'s."""

    tied_aliases = TIED_ALIASES  # state-dict keys that alias other parameters
    vocab_keys = VOCAB_KEYS  # state-dict keys with padded vocabulary rows
    loss_part_names = ("mlm",)  # the ``loss_parts`` every forward with labels returns

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is null: fill it in from the shards' vocabulary before building")
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight  # tied (counted once)
        # -inf on padding rows: they get zero probability and zero gradient. Not saved (derived from the config).
        vocab_mask = torch.zeros(config.padded_vocab_size)
        vocab_mask[config.vocab_size :] = float("-inf")
        self.register_buffer("vocab_mask", vocab_mask, persistent=False)
        self._init_weights()

    @property
    def checkpoint_layers(self) -> bool:
        """Activation checkpointing of every encoder layer (``model.checkpoint_layers``)."""
        return self.model.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, on: bool) -> None:
        self.model.checkpoint_layers = on

    @torch.no_grad()
    def _init_weights(self) -> None:
        """As HF's ``_init_weights`` (the paper's): truncated normals cut at initializer_cutoff_factor stds, std
        initializer_range for embeddings and input projections (Wqkv, Wi), initializer_range / sqrt(2 * layers) for
        output projections (both Wo, the head's dense); zero biases, LayerNorms 1. The tied decoder keeps the
        embedding init (as HF's result). The [PAD] row stays random as in HF (its embedding never gets a gradient,
        and padding is dropped before the model runs); the vocabulary padding rows are zero."""
        c = self.config
        cut = c.initializer_cutoff_factor if c.initializer_cutoff_factor is not None else 3.0
        std_in, std_out = c.initializer_range, c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)

        def trunc(w: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-cut * std, b=cut * std)

        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
        emb = self.model.embeddings.tok_embeddings.weight
        trunc(emb, std_in)
        emb[c.vocab_size :].zero_()  # padding rows: never used, never predicted
        for layer in self.model.layers:
            trunc(layer.attn.Wqkv.weight, std_in)
            trunc(layer.mlp.Wi.weight, std_in)
            trunc(layer.attn.Wo.weight, std_out)
            trunc(layer.mlp.Wo.weight, std_out)
        trunc(self.head.dense.weight, std_out)

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once (``parameters()`` already deduplicates)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, mlm_fraction: float = 1.0) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

        ``6 * N + 12 * H * sum over layers of the keys each query reads``: 6N for every weight matmul (N = all
        parameters, the tied token table counted once because the decoder GEMM uses it), plus the attention scores
        and weighted sum. A global layer reads seq_len keys; a local layer at most local_attention (the window is
        local_attention + 1 tokens wide, counted as local_attention; the FlashAttention kernel skips the blocks
        outside it, so the work really is bounded). ``mlm_fraction`` < 1 counts the MLM head (dense + decoder)
        only at that fraction of tokens, the work the sparse head really does; 1.0 gives the usual "model FLOPs".
        """
        c = self.config
        head = c.hidden_size * c.hidden_size + c.padded_vocab_size * c.hidden_size
        n = self.num_parameters() - (1.0 - mlm_fraction) * head
        keys = sum(seq_len if c.is_global(i) else min(seq_len, c.local_attention) for i in range(c.num_hidden_layers))
        return 6.0 * n + 12.0 * c.hidden_size * keys

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, L] -> final-normed hidden states [B, L, H] (zeros at padding), or [K, H] at the flat
        positions ``keep`` (row x L + column). ``attention_mask``: 1 (True) for real tokens; packed rows give
        ``position_ids`` and each token's sample number in ``attention_mask`` (1, 2, ...; 0 = padding).
        ``token_type_ids`` is ignored (no segment embeddings)."""
        h, u = self.model(input_ids, attention_mask, position_ids)  # [T, H]
        return u.pad(h) if keep is None else u.select(h, keep)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Every layer's output for feature extraction, as HF's ``output_hidden_states`` for ModernBERT: a list of
        ``num_hidden_layers + 1`` tensors [B, L, H] (zeros at padding): the embeddings output, each layer's output,
        and last the final-normed one (what ``encode`` returns; HF's last entry is final-normed too)."""
        states, u = self.model(input_ids, attention_mask, None, all_states=True)
        return [u.pad(s) for s in states]

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., padded V] logits, -inf on the padding rows (one GEMM over a tensor-core-friendly V)."""
        h = self.head(hidden)
        mask = self.vocab_mask.to(h.dtype)
        bias = mask if self.decoder.bias is None else self.decoder.bias + mask
        return F.linear(h, self.decoder.weight, bias)

    def mlm_logits_dense(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits at every position, [B, L, H] -> [B, L, vocab_size] (for HF comparisons and fill-mask)."""
        return self.mlm_logits(hidden)[..., : self.config.vocab_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cls_index: torch.Tensor | None = None,
    ) -> PretrainingOutput:
        """BERT's forward (``BertForPreTraining.forward``): labels [B, L] target ids, -100 where nothing is
        predicted; packed rows as ``encode`` reads them. ``token_type_ids``, ``next_sentence_label`` and
        ``cls_index`` are ignored (no segments, no pair head: sentence-pair shards train MLM on both segments, as a
        BERT with nsp=false does)."""
        if labels is None:
            self.encode(input_ids, None, attention_mask, position_ids)  # nothing to score; still a full pass
            return PretrainingOutput(None, None, None, None, None, None, 0)
        idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # [M] the masked positions
        # final_norm runs on every token; the head (H x H dense + H x V decoder) only on the M masked ones, so the
        # [B, L, V] logits tensor never exists.
        hidden = self.encode(input_ids, None, attention_mask, position_ids, keep=idx)  # [M, H]
        mlm_labels = labels.reshape(-1).index_select(0, idx)  # [M]
        logits = self.mlm_logits(hidden)  # [M, padded V]
        if idx.numel():
            mlm_loss = F.cross_entropy(logits.float(), mlm_labels)
        else:  # mean over nothing would be NaN; keep the graph so backward / DDP still see every parameter
            mlm_loss = logits.sum() * 0.0
        mlm_logits = logits[:, : self.config.vocab_size]  # view without the padding rows
        return PretrainingOutput(mlm_loss, mlm_loss, None, mlm_logits, mlm_labels, None, idx.numel())
