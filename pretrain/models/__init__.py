"""The model families, each a plain ``nn.Module`` in its own file with a config dataclass of Hugging Face field
names, and the one place that says which is which: training, checkpoints, export and the tools build a model from
its config's ``family`` (a saved config without one is BERT, the only family before ModernBERT) or from a Hugging
Face ``config.json``'s ``model_type``, and otherwise use only the interface both share (``encode``,
``hidden_states``, ``mlm_logits_dense``, ``forward`` -> ``PretrainingOutput``, ``loss_part_names``,
``tied_aliases``, ``vocab_keys``, ``checkpoint_layers``, ``flops_per_token``, ``num_parameters``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM

# family -> (config dataclass, pretraining model); the family name is also the Hugging Face ``model_type``
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "bert": (BertConfig, BertForPreTraining),
    "modernbert": (ModernBertConfig, ModernBertForMaskedLM),
}
NAMES = {"bert": "BERT", "modernbert": "ModernBERT"}  # for messages


def family_of(model_kw: dict[str, Any] | Any) -> str:
    """The family a model config (a dict, or one of the config dataclasses) belongs to."""
    family = model_kw.get("family", "bert") if isinstance(model_kw, dict) else model_kw.family
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: use one of {', '.join(FAMILIES)}")
    return family


def model_config(model_kw: dict[str, Any]) -> Any:
    """The config dataclass of ``model_kw`` (a saved run's ``model`` section, or ``preflight``'s kwargs)."""
    cls = FAMILIES[family_of(model_kw)][0]
    return cls(**{k: v for k, v in model_kw.items() if k != "family"})


def build(config: dict[str, Any] | Any) -> nn.Module:
    """A freshly initialised pretraining model of ``config`` (model kwargs or a config dataclass)."""
    cfg = model_config(config) if isinstance(config, dict) else config
    return FAMILIES[family_of(cfg)][1](cfg)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> Any:
    """The config dataclass of a Hugging Face ``config.json`` dict, by its ``model_type`` (missing: BERT, as
    transformers' oldest files)."""
    family = hf.get("model_type", "bert")
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r}: this project trains {' and '.join(repr(f) for f in FAMILIES)} models")
    return FAMILIES[family][0].from_hf_dict(hf, **overrides)


def architecture(family: str) -> tuple[str, ...]:
    """The fields of ``family``'s config that fix its weights' shapes (see each config's ``ARCHITECTURE``)."""
    return FAMILIES[family][0].ARCHITECTURE
