"""Task heads on the pretrained encoder, with Hugging Face's parameter names (``BertForSequenceClassification``,
``BertForTokenClassification``, ``BertForQuestionAnswering``), so a fine-tuned model exports and loads there.

    sequence (classification, regression): [CLS] -> pooler (tanh dense) -> dropout -> classifier [N, labels]
    token (NER):                           every token -> dropout -> classifier [B, L, labels]
    span (extractive QA):                  every token -> qa_outputs [B, L, 2] -> start and end logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import IGNORE_INDEX, BertConfig, BertModel, BertPooler

KINDS = ("classification", "regression", "ner", "qa")


@dataclass
class TaskOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [N, labels] | [N] (regression) | [B, L, labels] | [B, L, 2] (start, end)


class BertForTask(nn.Module):
    """The encoder (``bert.*``, as pretrained) and one task head."""

    def __init__(self, config: BertConfig, kind: str, num_labels: int = 1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"task kind {kind!r}: use one of {', '.join(KINDS)}")
        self.config, self.kind, self.num_labels = config, kind, num_labels
        self.bert = BertModel(config)
        if kind in ("classification", "regression") and self.bert.pooler is None:
            self.bert.pooler = BertPooler(config)  # an MLM-only encoder has none: a new one, trained here
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if kind == "qa":
            self.qa_outputs = nn.Linear(config.hidden_size, 2)
        else:
            self.classifier = nn.Linear(config.hidden_size, 1 if kind == "regression" else num_labels)
        fresh = [self.qa_outputs if kind == "qa" else self.classifier]
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
        loss = None
        if self.kind in ("classification", "regression"):
            logits = self.classifier(self.dropout(self.bert.pooler(hidden[:, 0])))  # [B, labels]
            if self.kind == "regression":
                logits = logits.squeeze(-1)  # [B]
                if labels is not None:
                    loss = F.mse_loss(logits.float(), labels.float())
            elif labels is not None:
                loss = F.cross_entropy(logits.float(), labels)
        elif self.kind == "ner":
            logits = self.classifier(self.dropout(hidden))  # [B, L, labels]
            if labels is not None:  # -100 on continuation pieces, specials and padding
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        else:
            logits = self.qa_outputs(hidden)  # [B, L, 2]
            if start_positions is not None and end_positions is not None:
                if attention_mask is not None:  # padding is never an answer
                    logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
                start, end = logits.float().unbind(-1)
                loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return TaskOutput(loss, logits)


def from_pretrained(encoder: nn.Module, kind: str, num_labels: int) -> BertForTask:
    """A task model whose ``bert.*`` weights are those of ``encoder`` (a ``BertForPreTraining``); the head (and a
    pooler where the encoder has none) starts fresh."""
    model = BertForTask(encoder.config, kind, num_labels)
    missing, unexpected = model.bert.load_state_dict(encoder.bert.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ValueError(f"encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
