"""BERT / RoBERTa-style encoder for pretraining, in one readable file (nanoGPT style).

Parameter names are exactly those of Hugging Face's ``BertForPreTraining`` (``nsp=True``) or ``BertForMaskedLM``
(``nsp=False``), so checkpoints move both ways with ``pretrain.checkpoint.hf`` (``load_hf`` / ``export_hf``) and no key
renaming.
Two things make it faster than the reference implementation:

- the MLM head runs only at the ~15% masked positions (hidden states are gathered *before* the transform and the
  vocabulary projection, as NVIDIA's and DeepSpeed's BERTs do), so the ``[B, L, V]`` logits never exist;
- attention is ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on GPU).

Shapes: B batch, L sequence length, H hidden size, nh heads, hs head size (H // nh), V (padded) vocabulary,
M number of masked positions in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of positions that are not predicted (Hugging Face convention)
# Plain functions / partials, not lambdas, so a whole model still pickles.
_ACTS = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    """Model shape; field names and defaults (BERT-base) as in ``transformers.BertConfig``."""

    vocab_size: int | None = 30522
    """True vocabulary size (rows that can be predicted); ``null`` in the YAMLs = taken from the shards' vocabulary."""
    hidden_size: int = 768
    """Width H of the embeddings and of every layer."""
    num_hidden_layers: int = 12
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward block (usually 4 * hidden_size)."""
    hidden_act: str = "gelu"
    """Feed-forward / MLM-transform activation: ``gelu`` (exact, erf), ``gelu_new`` (tanh approximation) or ``relu``."""
    hidden_dropout_prob: float = 0.1
    """Dropout on embeddings and on every residual branch."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on the attention probabilities (training only)."""
    max_position_embeddings: int = 512
    """Longest sequence the learned absolute position table covers."""
    type_vocab_size: int = 2
    """Number of token types (segments A/B); 1 is enough when no sentence pairs are used (RoBERTa)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of every Linear / Embedding weight."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT 1e-12, RoBERTa 1e-5)."""
    pad_token_id: int | None = 0
    """Id of [PAD]: its embedding row starts at zero and gets no gradient from the input side."""
    nsp: bool = True
    """Next-sentence-prediction head and pooler; False = RoBERTa-style, MLM only (``BertForMaskedLM`` keys)."""
    pad_vocab_size_multiple: int = 8
    """Pad the vocabulary rows up to a multiple of this (tensor-core friendly GEMMs); 1 = off. Padding rows are
    never predicted (their logits are -inf) and are dropped by ``export_hf``."""
    family: str = "bert"
    """Model family (``pretrain/models/__init__.py``): which module the training code builds. Fixed per schema."""

    # The fields that fix the shape of the weights: a Hugging Face directory's own win over the YAML's when
    # pretraining continues from it (dropout and initialisation stay the run's choice).
    ARCHITECTURE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.family != "bert":
            raise ValueError(f"family={self.family!r}: BertConfig is the 'bert' family")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}; pick sizes that divide"
            )
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: use one of {sorted(_ACTS)}")
        if self.pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple={self.pad_vocab_size_multiple}: must be >= 1 (1 = off)")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding / decoder table: vocab_size rounded up to pad_vocab_size_multiple."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is null: fill it in from the shards' vocabulary before building")
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` content that ``transformers.BertConfig`` reads (true vocab size, no padding rows)."""
        ours = ("nsp", "pad_vocab_size_multiple", "family")  # not HF fields
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ours}
        arch = "BertForPreTraining" if self.nsp else "BertForMaskedLM"
        return {"architectures": [arch], "model_type": "bert", **d, "tie_word_embeddings": True}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dict; ``nsp`` follows ``architectures`` unless overridden."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type={d.get('model_type')!r}: only 'bert' configs map onto this model")
        names = {f.name for f in fields(cls)} - {"family"}
        kw = {k: v for k, v in d.items() if k in names}
        archs = d.get("architectures") or []
        if "nsp" not in kw and archs:
            kw["nsp"] = not any("MaskedLM" in a for a in archs)
        kw.update(overrides)
        return cls(**kw)


# Keys of a state dict that are views of other parameters (the decoder is tied to the word embeddings and to
# ``cls.predictions.bias``): a checkpoint may lack them, a load must not call them missing.
TIED_ALIASES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
VOCAB_KEYS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")  # rows padded in memory only


@dataclass
class PretrainingOutput:
    """What ``BertForPreTraining.forward`` returns; logits are only computed where they are needed."""

    loss: torch.Tensor | None  # mlm_loss + nsp_loss (None without labels)
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None  # None when nsp is off or no next_sentence_label
    mlm_logits: torch.Tensor | None  # [M, vocab_size] at masked positions only (None without labels)
    mlm_labels: torch.Tensor | None  # [M]
    nsp_logits: torch.Tensor | None  # [B, 2], None when nsp is off
    num_masked: int

    @property
    def loss_parts(self) -> dict[str, torch.Tensor]:
        """The named parts of ``loss`` (what a training loop logs beside it; it knows no names of its own)."""
        return {k: v for k, v in (("mlm", self.mlm_loss), ("nsp", self.nsp_loss)) if v is not None}


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.padded_vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        L = input_ids.size(1)
        if position_ids is None:
            x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]  # [B, L, H] + [L, H]
        else:  # packed rows: positions restart at every sample
            x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:  # all segment A: add row 0 without a gather
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.n_head, self.dropout_p = c.num_attention_heads, c.attention_probs_dropout_prob
        # Separate q/k/v Linears keep Hugging Face's parameter names; forward still runs one fused GEMM.
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, H = x.shape
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # [3H, H]
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(x, w, b).view(B, L, 3, self.n_head, H // self.n_head)  # [B, L, 3, nh, hs]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, nh, L, hs]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, L, H)  # [B, L, H]


class BertSelfOutput(nn.Module):
    """Linear + dropout + residual + LayerNorm (post-LN); also the feed-forward output (``BertOutput``)."""

    def __init__(self, c: BertConfig, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H]; with ``keep`` (flat row indices [K] into B*L) -> [K, H]: every position is
        attended to, but only the kept positions go on through the output projection (and the feed-forward)."""
        y = self.self(x, mask)  # [B, L, H]
        if keep is not None:
            y, x = y.reshape(-1, y.size(-1)).index_select(0, keep), x.reshape(-1, x.size(-1)).index_select(0, keep)
        return self.output(y, x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = _ACTS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # [B, L, I]


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, mask, keep)  # [B, L, H], or [K, H] with keep
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.checkpoint_layers = False  # keep only each layer's input; recompute the layer in backward (memory)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] -> [B, L, H]; with ``keep`` (flat indices into B*L of the positions the heads read) the last
        layer's output projection and feed-forward run on those rows only -> [K, H]. Nothing after the last
        layer's attention mixes positions, so the kept rows are exactly what the full pass gives them."""
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            k = keep if i == last else None
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, k, use_reentrant=False)  # same dropout masks: RNG state is replayed
            else:
                x = layer(x, mask, k)
        return x


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))  # [N, H] from each sample's [CLS]


class BertModel(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        self.pooler = BertPooler(c) if c.nsp else None

    def attention_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """[B, L] attention_mask (1 or True for real tokens) -> boolean [B, 1, 1, L], True = attend; for packed rows
        (``position_ids`` given, each token's sample number in its row, 0 = padding) block-diagonal [B, 1, L, L].
        Also refuses rows longer than the position table."""
        L, max_len = input_ids.size(1), self.embeddings.position_embeddings.num_embeddings
        if L > max_len:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings={max_len}")
        if attention_mask is None:
            return None
        if position_ids is None:
            return attention_mask[:, None, None, :].bool()  # broadcasts over heads and queries
        same = attention_mask[:, :, None] == attention_mask[:, None, :]
        real = attention_mask[:, None, :] > 0
        eye = torch.eye(L, dtype=torch.bool, device=input_ids.device)
        return ((same & real) | eye)[:, None]  # a padding query attends to itself: no all-masked row (NaN)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, L, H] (or [K, H] at the flat positions ``keep``); ``attention_mask`` [B, L] as
        ``attention_mask()`` reads it."""
        mask = self.attention_mask(input_ids, attention_mask, position_ids)
        return self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), mask, keep)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.act = _ACTS[c.hidden_act]
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, c: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.vocab_size = c.vocab_size
        self.transform = BertPredictionHeadTransform(c)
        self.decoder = nn.Linear(c.hidden_size, c.padded_vocab_size)
        self.bias = nn.Parameter(torch.zeros(c.padded_vocab_size))
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT (counted once)
        self.decoder.bias = self.bias  # tied, as in Hugging Face: both names appear in the state dict
        # -inf on padding rows: they get zero probability and zero gradient. Not saved (derived from the config).
        vocab_mask = torch.zeros(c.padded_vocab_size)
        vocab_mask[c.vocab_size :] = float("-inf")
        self.register_buffer("vocab_mask", vocab_mask, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., padded V] logits, -inf on padding rows (one GEMM over tensor-core-friendly V)."""
        bias = self.bias + self.vocab_mask.to(self.bias.dtype)
        return F.linear(self.transform(h), self.decoder.weight, bias)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, c: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(c, word_embeddings)
        self.seq_relationship = nn.Linear(c.hidden_size, 2) if c.nsp else None


class BertForPreTraining(nn.Module):
    """BERT with MLM head (and NSP head + pooler when ``config.nsp``); keys as HF BertForPreTraining/ForMaskedLM."""

    tied_aliases = TIED_ALIASES  # state-dict keys that alias other parameters
    vocab_keys = VOCAB_KEYS  # state-dict keys with padded vocabulary rows

    @property
    def checkpoint_layers(self) -> bool:
        """Activation checkpointing of every encoder layer (``trainer.activation_checkpointing``)."""
        return self.bert.encoder.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, on: bool) -> None:
        self.bert.encoder.checkpoint_layers = on

    @property
    def loss_part_names(self) -> tuple[str, ...]:
        """The ``loss_parts`` every forward with labels returns (the same on every rank: logged and reduced)."""
        return ("mlm", "nsp") if self.config.nsp else ("mlm",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is null: fill it in from the shards' vocabulary before building")
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, m: nn.Module) -> None:
        """As HF ``_init_weights``: N(0, initializer_range) weights, zero biases, LayerNorm 1/0, zero [PAD] row."""
        std = self.config.initializer_range
        if m is self.cls.predictions.decoder:  # tied to the word embeddings and the head bias: initialised there
            return
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if m is self.bert.embeddings.word_embeddings:
                m.weight[self.config.vocab_size :].zero_()  # padding rows: never used, never predicted
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, BertLMPredictionHead):
            m.bias.zero_()

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once (``parameters()`` already deduplicates)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, mlm_fraction: float = 1.0) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

        ``6 * N + 12 * n_layers * H * seq_len``: 6N for every weight matmul (N = all parameters, the tied word table
        counted once because the decoder GEMM uses it; the embedding lookups themselves are free), plus the
        attention scores and weighted sum (2 matmuls of L x H per token per layer, times 2 FLOPs times 3).
        ``mlm_fraction`` < 1 counts the MLM head (transform + decoder) only at that fraction of tokens, which is
        the work the sparse head really does; 1.0 gives the usual "model FLOPs" for MFU comparisons.
        """
        c = self.config
        head = c.hidden_size * c.hidden_size + c.padded_vocab_size * c.hidden_size
        n = self.num_parameters() - (1.0 - mlm_fraction) * head
        return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, L] -> final hidden states [B, L, H]; attention_mask [B, L] is 1 (or True) for real tokens.

        Packed rows (several samples in one row, ``position_ids`` given): ``attention_mask`` holds each token's
        sample number in its row (1, 2, ...; 0 = padding) and attention stays inside each sample. ``keep`` [K]:
        flat positions (row x L + column) to return, [K, H], computing the last layer's tail at those only."""
        return self.bert(input_ids, token_type_ids, attention_mask, position_ids, keep)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Every layer's output for feature extraction, as Hugging Face's ``output_hidden_states``: a list of
        ``num_hidden_layers + 1`` tensors [B, L, H], the embeddings output first and the last layer's output (what
        ``encode`` returns) last. attention_mask [B, L] is 1 (or True) for real tokens."""
        mask = self.bert.attention_mask(input_ids, attention_mask, None)  # [B, 1, 1, L]
        x = self.bert.embeddings(input_ids, token_type_ids)  # [B, L, H]
        states = [x]
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)  # [B, L, H]
            states.append(x)
        return states

    def mlm_logits_dense(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits at every position, [B, L, H] -> [B, L, vocab_size] (for HF comparisons and fill-mask)."""
        return self.cls.predictions(hidden)[..., : self.config.vocab_size]

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
        """labels [B, L]: target ids, -100 where nothing is predicted. next_sentence_label [N]: 0 = IsNext, one per
        sample. Packed rows (see ``encode``) also give ``position_ids`` [B, L] and ``cls_index`` [N], the flat
        index (row x L + column) of each sample's [CLS]: NSP is read there, once per sample."""
        B, L = input_ids.shape
        nsp = self.config.nsp
        cls = None
        if nsp:  # each sample's [CLS]: one per row, or given per packed sample
            cls = cls_index if cls_index is not None else torch.arange(B, device=input_ids.device) * L  # [N]
        idx = None
        if labels is not None:  # the masked positions: the MLM head reads only these
            idx = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
        # The heads read N + M positions; the last layer computes its output projection and feed-forward for
        # those only (about 80% of that layer's FLOPs skipped at 15% masking). Without labels: every position.
        keep = None if idx is None else torch.cat([cls, idx]) if nsp else idx
        hidden = self.encode(input_ids, token_type_ids, attention_mask, position_ids, keep)  # [N + M, H] or [B, L, H]
        n_cls = 0 if cls is None else cls.numel()
        nsp_logits = nsp_loss = None
        if nsp:
            cls_hidden = hidden[:n_cls] if keep is not None else hidden.reshape(-1, hidden.size(-1))[cls]  # [N, H]
            nsp_logits = self.cls.seq_relationship(self.bert.pooler(cls_hidden))  # [N, 2]
            if next_sentence_label is not None:  # -100: no pair label (SOP's NotNext rows); a batch of none: 0
                label = next_sentence_label.view(-1)
                nsp_loss = F.cross_entropy(nsp_logits.float(), label, reduction="sum") / label.ne(
                    IGNORE_INDEX
                ).sum().clamp(min=1)
        mlm_logits = mlm_labels = mlm_loss = None
        num_masked = 0
        if idx is not None:
            # The head (H x H transform + H x V decoder) runs on M rows instead of B*L, and the [B, L, V] logits
            # tensor is never built.
            num_masked = idx.numel()
            mlm_labels = labels.reshape(-1).index_select(0, idx)  # [M]
            logits = self.cls.predictions(hidden[n_cls:])  # [M, padded V]
            if num_masked:
                mlm_loss = F.cross_entropy(logits.float(), mlm_labels)
            else:  # mean over nothing would be NaN; keep the graph so backward / DDP still see every parameter
                mlm_loss = logits.sum() * 0.0
            mlm_logits = logits[:, : self.config.vocab_size]  # view without the padding rows
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return PretrainingOutput(loss, mlm_loss, nsp_loss, mlm_logits, mlm_labels, nsp_logits, num_masked)
