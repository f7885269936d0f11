"""Task heads on the pretrained encoder, with Hugging Face's parameter names (``BertForSequenceClassification``,
``BertForTokenClassification``, ``BertForQuestionAnswering``), so a fine-tuned model exports and loads there.

    sequence (classification, regression): [CLS] -> pooler (tanh dense) -> dropout -> classifier [N, labels]
    token (NER):                           every token -> dropout -> classifier [B, L, labels]
    span (extractive QA):                  every token -> qa_outputs [B, L, 2] -> start and end logits

Each head is its kind's (``kinds.KINDS``: ``add_head`` builds the output layer, ``head`` computes logits and loss);
``BertForTask`` holds the encoder and calls it. ``KINDS`` is re-exported here (the names ``task.kind`` takes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.finetune.kinds import KINDS, TaskKind
from pretrain.models.bert import BertConfig, BertModel, BertPooler

__all__ = ["KINDS", "BertForTask", "TaskKind", "TaskOutput", "from_pretrained"]


@dataclass
class TaskOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [N, labels] | [N] (regression) | [B, L, labels] | [B, L, 2] (start, end)


class BertForTask(nn.Module):
    """The encoder (``bert.*``, as pretrained) and one task head (``kind``: a name of ``KINDS``)."""

    def __init__(self, config: BertConfig, kind: str, num_labels: int = 1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"task kind {kind!r}: use one of {', '.join(KINDS)}")
        self.config, self.kind, self.num_labels = config, kind, num_labels
        self.task_kind: TaskKind = KINDS[kind]
        self.bert = BertModel(config)
        if self.task_kind.pooled and self.bert.pooler is None:
            self.bert.pooler = BertPooler(config)  # an MLM-only encoder has none: a new one, trained here
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        fresh = [self.task_kind.add_head(self, config, num_labels)]
        if self.bert.pooler is not None:
            fresh.append(self.bert.pooler.dense)  # overwritten by from_pretrained where the encoder has one
        for lin in fresh:  # new layers start as BERT's do: N(0, initializer_range), zero bias
            lin.weight.data.normal_(0.0, config.initializer_range)
            lin.bias.data.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> TaskOutput:
        hidden = self.bert(input_ids, token_type_ids, attention_mask)  # [B, L, H]
        loss, logits = self.task_kind.head(self, hidden, attention_mask, labels, start_positions, end_positions)
        return TaskOutput(loss, logits)


def from_pretrained(encoder: nn.Module, kind: str, num_labels: int) -> BertForTask:
    """A task model whose ``bert.*`` weights are those of ``encoder`` (a ``BertForPreTraining``); the head (and a
    pooler where the encoder has none) starts fresh."""
    model = BertForTask(encoder.config, kind, num_labels)
    missing, unexpected = model.bert.load_state_dict(encoder.bert.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
