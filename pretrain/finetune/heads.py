"""Task models: a pretrained encoder of either family and one task head, with exactly the parameter names and the
computation of Hugging Face's task classes, so a fine-tuned model exports to a directory that transformers' own
``Auto*`` classes load and that gives the same logits.

    BERT (``BertFor{SequenceClassification,TokenClassification,QuestionAnswering}``; keys ``bert.*``):
      sequence (classification, regression): [CLS] -> pooler (tanh dense) -> dropout -> classifier [N, labels]
      token (NER):                           every token -> dropout -> classifier [B, L, labels]
      span (extractive QA):                  every token -> qa_outputs [B, L, 2] (no dropout, as HF)
    ModernBERT (``ModernBertFor...``; keys ``model.*``, ``head.*``, ``classifier``):
      sequence: [CLS] or the masked mean (``config.classifier_pooling``) -> head (dense, act, norm) -> drop
                (``config.classifier_dropout``) -> classifier
      token and span: every token -> head -> drop -> classifier ([B, L, labels] or [B, L, 2])

What differs between the task kinds (targets, loss, decoding, the head's width) is the kind's (``kinds.KINDS``); what
differs between the families (the layout above, which pretrained weights the task model starts from) is the task
model's class here (``TASK_MODELS``, by ``config.family``). ``TaskModel.forward`` is the one forward: the family's
``encode`` and ``logits``, then the kind's ``loss``. ``KINDS`` is re-exported (the names ``task.kind`` takes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pretrain.finetune.kinds import KINDS, TaskKind
from pretrain.models import family_of
from pretrain.models.bert import BertConfig, BertModel, BertPooler
from pretrain.models.modernbert import ModernBertConfig, ModernBertModel, ModernBertPredictionHead

__all__ = ["KINDS", "TASK_MODELS", "BertForTask", "ModernBertForTask", "TaskKind", "TaskModel", "TaskOutput",
           "from_pretrained", "task_model"]  # fmt: skip


@dataclass
class TaskOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [N, labels] | [N] (regression) | [B, L, labels] | [B, L, 2] (start, end)


class TaskModel(nn.Module):
    """One family's encoder and one task head (``kind``: a name of ``KINDS``). Subclasses build the layout of their
    family's HF task classes and say how the head reads the hidden states (``logits``)."""

    family: ClassVar[str]  # pretrain.models' family name (config.json's model_type)
    hf_prefix: ClassVar[str]  # transformers' class prefix: Bert, ModernBert
    vocab_keys: ClassVar[tuple[str, ...]]  # keys with vocabulary rows (padded in memory, true size on export)
    tied_aliases: ClassVar[tuple[str, ...]] = ()  # no tied decoder: the MLM head is not part of a task model

    def __init__(self, config: Any, kind: str, num_labels: int = 1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"task kind {kind!r}: use one of {', '.join(KINDS)}")
        self.config, self.kind, self.num_labels = config, kind, num_labels
        self.task_kind: TaskKind = KINDS[kind]

    @property
    def hf_class(self) -> str:
        """The transformers class of this model (config.json's ``architectures``), e.g.
        ``ModernBertForTokenClassification``."""
        return f"{self.hf_prefix}For{self.task_kind.hf_task}"

    @property
    def checkpoint_layers(self) -> bool:
        """Activation checkpointing of every encoder layer (``trainer.activation_checkpointing``)."""
        raise NotImplementedError

    def encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The encoder's last hidden states [B, L, H]."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The head's output from the hidden states, as the family's HF class computes it (by the kind's ``level``):
        [B, outputs] for sequence kinds, [B, L, outputs] for token and span kinds."""
        raise NotImplementedError

    def load_encoder(self, encoder: nn.Module) -> None:
        """Copy what a pretraining model (``pretrain.models``, same family and config) gives a task model: the
        weights HF's ``from_pretrained`` of the task class would take from that model's export."""
        raise NotImplementedError

    def hf_extra(self) -> dict[str, Any]:
        """Keys config.json needs beyond ``config.to_hf_dict()`` for this model to load back."""
        return {}

    def unread_prefixes(self) -> tuple[str, ...]:
        """Keys a saved task model may hold that this one has no use for (skipped when it is loaded)."""
        return ()

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> TaskOutput:
        hidden = self.encode(input_ids, token_type_ids, attention_mask)  # [B, L, H]
        logits = self.logits(hidden, attention_mask)
        loss, logits = self.task_kind.loss(logits, attention_mask, labels, start_positions, end_positions)
        return TaskOutput(loss, logits)


class BertForTask(TaskModel):
    """BERT: the encoder (``bert.*``, as pretrained), a pooler for the [CLS] heads only (a fresh one where the
    encoder has none: an MLM-only pretraining; none for token and span heads, as HF's ``add_pooling_layer=False``
    there), ``dropout`` and ``classifier`` (``qa_outputs`` for QA), as HF's classes."""

    family, hf_prefix = "bert", "Bert"
    vocab_keys = ("bert.embeddings.word_embeddings.weight",)

    def __init__(self, config: BertConfig, kind: str, num_labels: int = 1) -> None:
        super().__init__(config, kind, num_labels)
        level = self.task_kind.level
        self.bert = BertModel(config)
        if level == "sequence" and self.bert.pooler is None:
            self.bert.pooler = BertPooler(config)  # an MLM-only encoder has none: a new one, trained here
        elif level != "sequence":
            self.bert.pooler = None  # nothing reads it: no untrained weights in the export HF would call unexpected
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        output = nn.Linear(config.hidden_size, self.task_kind.head_size(num_labels))
        setattr(self, "qa_outputs" if level == "span" else "classifier", output)  # HF's attribute (and key prefix)
        fresh = [output]
        if self.bert.pooler is not None:
            fresh.append(self.bert.pooler.dense)  # overwritten by load_encoder where the encoder has one
        for lin in fresh:  # new layers start as BERT's do: N(0, initializer_range), zero bias
            lin.weight.data.normal_(0.0, config.initializer_range)
            lin.bias.data.zero_()

    @property
    def checkpoint_layers(self) -> bool:
        return self.bert.encoder.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, on: bool) -> None:
        self.bert.encoder.checkpoint_layers = on

    def encode(self, input_ids, token_type_ids, attention_mask):
        return self.bert(input_ids, token_type_ids, attention_mask)

    def logits(self, hidden, attention_mask):
        level = self.task_kind.level
        if level == "sequence":
            return self.classifier(self.dropout(self.bert.pooler(hidden[:, 0])))  # [B, outputs]
        if level == "token":
            return self.classifier(self.dropout(hidden))  # [B, L, labels]
        return self.qa_outputs(hidden)  # [B, L, 2]

    def load_encoder(self, encoder):
        sd = encoder.bert.state_dict()
        if self.bert.pooler is None:
            sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
        missing, unexpected = self.bert.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise ValueError(f"encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def hf_extra(self):
        return {"nsp": self.bert.pooler is not None}  # read back by BertConfig.from_hf_dict: whether there is a pooler

    def unread_prefixes(self):
        return () if self.bert.pooler is not None else ("bert.pooler.",)  # older NER/QA exports kept an unused one


class ModernBertForTask(TaskModel):
    """ModernBERT: the encoder (``model.*``), the prediction head (``head.*``: dense, act, norm; a pretrained model
    brings its MLM head's, as HF's ``from_pretrained`` of a task class does), ``drop`` and ``classifier`` for every
    kind (QA too: HF's ModernBertForQuestionAnswering names its start/end layer ``classifier``)."""

    family, hf_prefix = "modernbert", "ModernBert"
    vocab_keys = ("model.embeddings.tok_embeddings.weight",)

    def __init__(self, config: ModernBertConfig, kind: str, num_labels: int = 1) -> None:
        super().__init__(config, kind, num_labels)
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, self.task_kind.head_size(num_labels))
        # HF's init of a task classifier: truncated normal, std hidden_size ** -0.5, cut at the cutoff; zero bias
        cut = config.initializer_cutoff_factor if config.initializer_cutoff_factor is not None else 3.0
        std = config.hidden_size**-0.5
        with torch.no_grad():
            nn.init.trunc_normal_(self.classifier.weight, mean=0.0, std=std, a=-cut * std, b=cut * std)
            self.classifier.bias.zero_()
            std_out = config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers)  # a fresh head: HF's init
            nn.init.trunc_normal_(self.head.dense.weight, mean=0.0, std=std_out, a=-cut * std_out, b=cut * std_out)

    @property
    def checkpoint_layers(self) -> bool:
        return self.model.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, on: bool) -> None:
        self.model.checkpoint_layers = on

    def encode(self, input_ids, token_type_ids, attention_mask):
        h, u = self.model(input_ids, attention_mask)  # [T, H] real tokens only; no segments in ModernBERT
        return u.pad(h)  # [B, L, H], zeros at padding

    def logits(self, hidden, attention_mask):
        if self.task_kind.level == "sequence":
            if self.config.classifier_pooling == "cls":
                hidden = hidden[:, 0]
            else:  # "mean" over the real tokens, as HF (which reads no padding either: the mask zeroes it)
                mask = attention_mask
                if mask is None:
                    mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
                hidden = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.classifier(self.drop(self.head(hidden)))

    def load_encoder(self, encoder):
        self.model.load_state_dict(encoder.model.state_dict())
        self.head.load_state_dict(encoder.head.state_dict())


TASK_MODELS: dict[str, type[TaskModel]] = {m.family: m for m in (BertForTask, ModernBertForTask)}
"""family (``pretrain.models.FAMILIES``) -> its task model."""


def task_model(config: Any, kind: str, num_labels: int = 1) -> TaskModel:
    """A task model of ``config``'s family (``pretrain.models.family_of``): its head freshly initialised, its encoder
    to be filled (``load_encoder``, or a saved task model's weights)."""
    return TASK_MODELS[family_of(config)](config, kind, num_labels)


def from_pretrained(encoder: nn.Module, kind: str, num_labels: int) -> TaskModel:
    """A task model holding ``encoder``'s weights (a pretraining model of either family: ``load_encoder``); the
    output layer (and a BERT pooler where the encoder has none) starts fresh."""
    model = task_model(encoder.config, kind, num_labels)
    model.load_encoder(encoder)
    return model
