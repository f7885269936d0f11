"""Hugging Face checkpoints: ``load_hf`` reads a ``transformers`` BERT directory into ``BertForPreTraining``,
``export_hf`` writes one (``AutoModelForMaskedLM`` and ``AutoTokenizer.from_pretrained`` load it), and
``fill_mask`` predicts masked tokens from a prompt. Parameter names map 1:1 (pretrain/model.py keeps HF's)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from data_prep.vocab import SPECIAL_TOKENS
from pretrain.model import BertConfig, BertForPreTraining

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_VOCAB_KEYS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")  # rows padded in memory only
_IGNORED_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.decoder.weight")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():  # sharded checkpoint
        shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(path / s).items()}
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF key variants -> ours: ``BertModel`` (no ``bert.`` prefix), TF-era gamma/beta, buffers, tied copies."""
    if not any(k.startswith(("bert.", "cls.")) for k in sd):
        sd = {f"bert.{k}": v for k, v in sd.items()}
    sd = {
        k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
        for k, v in sd.items()
    }
    if "cls.predictions.decoder.bias" in sd:  # tied to cls.predictions.bias; older checkpoints save only this one
        sd.setdefault("cls.predictions.bias", sd["cls.predictions.decoder.bias"])
        del sd["cls.predictions.decoder.bias"]
    return {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}


def load_hf(path: str | Path, **overrides: Any) -> BertForPreTraining:
    """Load a Hugging Face BERT directory (``config.json`` + safetensors or ``pytorch_model.bin``).

    Keys map 1:1. Encoder-only checkpoints load too: missing heads keep their fresh BERT initialisation and a
    warning names them; unexpected keys are warned about and skipped. ``nsp`` is True when the checkpoint has
    ``cls.seq_relationship`` (or, for encoder-only checkpoints, a pooler) unless given in ``overrides``.
    The vocabulary is padded to ``pad_vocab_size_multiple`` with zero rows.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; give a Hugging Face model directory (save_pretrained output)")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"{path}: no weights ({' or '.join(_WEIGHT_FILES)}) next to config.json")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type", "bert") != "bert":
        raise ValueError(f"{path}: model_type={hf.get('model_type')!r}, only 'bert' checkpoints map onto this model")
    sd = _normalise_keys(_read_state_dict(path))
    if "nsp" not in overrides:
        has_heads = any(k.startswith("cls.") for k in sd)
        overrides["nsp"] = "cls.seq_relationship.weight" in sd if has_heads else "bert.pooler.dense.weight" in sd
    config = BertConfig.from_hf_dict(hf, **overrides)
    model = BertForPreTraining(config)
    own = model.state_dict()
    own.pop("cls.predictions.decoder.weight")  # tied aliases: filled through their owners
    own.pop("cls.predictions.decoder.bias")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    with torch.no_grad():
        for k in set(own) & set(sd):
            src, dst = sd[k], own[k]
            if k in _VOCAB_KEYS and len(src) == config.vocab_size:
                dst[config.vocab_size :].zero_()  # vocab padding rows
                dst = dst[: config.vocab_size]
            if src.shape != dst.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(src.shape)}, config.json implies {tuple(dst.shape)}")
            dst.copy_(src)
    if missing:
        warnings.warn(f"{path}: not in the checkpoint, freshly initialised: {', '.join(missing)}", stacklevel=2)
    if unexpected:
        warnings.warn(f"{path}: unexpected checkpoint keys ignored: {', '.join(unexpected)}", stacklevel=2)
    return model


def _lowercase_from_tokenizer_json(tok: Path) -> bool:
    norm = json.loads(tok.read_text()).get("normalizer") or {}
    parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return any(p.get("type") == "Lowercase" or p.get("lowercase", False) for p in parts)


def export_hf(model: BertForPreTraining, tokenizer_dir: str | Path | None, out_dir: str | Path) -> Path:
    """Write a Hugging Face model directory: config.json, model.safetensors (true vocab rows, tied decoder left
    out as ``save_pretrained`` does) and the tokenizer files of ``tokenizer_dir`` (a tokenizer_config.json is
    written when absent) so ``AutoModelForMaskedLM`` / ``AutoTokenizer.from_pretrained(out_dir)`` work."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if k in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue
        if k in _VOCAB_KEYS:
            v = v[: c.vocab_size]
        sd[k] = v.detach().to("cpu").contiguous().clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600 (a temporary file): share it
    hf_config = {**c.to_hf_dict(), "dtype": str(sd["cls.predictions.bias"].dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        for name in _TOKENIZER_FILES:
            if (tdir / name).is_file():
                shutil.copy2(tdir / name, out / name)
        if not (tdir / "tokenizer_config.json").is_file():
            lower = (
                _lowercase_from_tokenizer_json(tdir / "tokenizer.json") if (tdir / "tokenizer.json").is_file() else True
            )
            tc = {
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": lower,
                "model_max_length": c.max_position_embeddings,
                **SPECIAL_TOKENS,
            }
            (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return out


@torch.no_grad()
def fill_mask(
    model: BertForPreTraining, tokenizer: Any, text: str, top_k: int = 5, mask_token: str = SPECIAL_TOKENS["mask_token"]
) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each ``[MASK]`` in ``text``; ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    mask_id = tokenizer.token_to_id(mask_token)
    if mask_id is None:
        raise ValueError(f"tokenizer has no {mask_token} token")
    ids = tokenizer.encode(text).ids[: model.config.max_position_embeddings]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.tensor([ids], device=device)
        logits = model.mlm_logits_dense(model.encode(input_ids))[0].float()  # [L, vocab_size]
    finally:
        model.train(was_training)
    out = []
    for pos in (input_ids[0] == mask_id).nonzero().flatten().tolist():
        probs, top = logits[pos].softmax(-1).topk(min(top_k, logits.size(-1)))
        out.append([(tokenizer.id_to_token(int(t)), float(p)) for p, t in zip(probs, top, strict=True)])
    return out
