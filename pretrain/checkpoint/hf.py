"""The Hugging Face directory format: ``load_hf`` reads a ``transformers`` BERT or ModernBERT directory into the
family's pretraining model (``pretrain.models``, by ``model_type``), ``export_hf`` writes one
(``AutoModelForMaskedLM`` and ``AutoTokenizer.from_pretrained`` load it), ``vocabulary`` reads its tokenizer files,
and ``fill_mask`` predicts masked tokens from a prompt. Parameter names map 1:1 (each model file keeps HF's).
Which weights a path means (a run, a checkpoint or such a directory) is ``pretrain/checkpoint/weights.py``'s to say."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import DataPrepError, UserError
from data_prep.vocab import SPECIAL_TOKENS, build_tokenizer, model_dir_lowercase, read_vocab, special_ids
from pretrain.checkpoint import safe_load
from pretrain.models import build, config_from_hf, family_of

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pretrain/checkpoint/hf.py

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_IGNORED_KEYS = (
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
    "cls.predictions.decoder.weight",
    "decoder.weight",
)  # fmt: skip - buffers and tied copies: filled through their owners
# ModernBERT's tokenizer takes no segment ids (its model has no token types): its tokenizer_config says so.
_TOKENIZER_EXTRA = {"modernbert": {"model_input_names": ["input_ids", "attention_mask"]}}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():  # sharded checkpoint
        shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(path / s).items()}
    return safe_load.load_file(path / "pytorch_model.bin", deepspeed=False)  # weights only, or one UserError


def _normalise_keys(sd: dict[str, torch.Tensor], family: str = "bert") -> dict[str, torch.Tensor]:
    """HF key variants -> ours: an encoder-only ``BertModel`` / ``ModernBertModel`` (no ``bert.`` / ``model.``
    prefix), TF-era gamma/beta, buffers, tied copies."""
    if family == "modernbert":
        if not any(k.startswith(("model.", "head.", "decoder.")) for k in sd):
            sd = {f"model.{k}": v for k, v in sd.items()}
        return {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}
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


def _family(path: Path) -> str:
    """The family of a Hugging Face directory: its config.json's ``model_type`` (none: BERT)."""
    return json.loads((path / "config.json").read_text()).get("model_type", "bert")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face directory's state dict with our key names (``_normalise_keys``)."""
    return _normalise_keys(_read_state_dict(path), _family(path))


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> tuple[list[str], list[str]]:
    """Copy a Hugging Face state dict (``_normalise_keys``'d) into ``model`` (ours, keys as HF's), padding the
    vocabulary rows with zeros; returns (missing, unexpected) keys. A shape that disagrees with the config is an
    error naming ``path``."""
    vocab_size = model.config.vocab_size
    own = model.state_dict()
    for alias in model.tied_aliases:
        own.pop(alias, None)  # tied aliases: filled through their owners
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    with torch.no_grad():
        for k in set(own) & set(sd):
            src, dst = sd[k], own[k]
            if k in model.vocab_keys and len(src) == vocab_size:
                dst[vocab_size:].zero_()  # vocab padding rows
                dst = dst[:vocab_size]
            if src.shape != dst.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(src.shape)}, config.json implies {tuple(dst.shape)}")
            dst.copy_(src)
    return missing, unexpected


def weight_keys(path: Path) -> list[str]:
    """The (normalised) tensor names of a directory's weights, without reading the tensors where they are
    safetensors (a header read, not 440 MB for BERT-base)."""
    from safetensors import safe_open

    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    if (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        files = [path / s for s in sorted(set(index.values()))]
    if not files:
        return list(read_weights(path))
    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys += list(st.keys())
    return list(_normalise_keys(dict.fromkeys(keys), _family(path)))  # type: ignore[arg-type] - names only


def has_nsp_head(keys: Any) -> bool:
    """Whether weights with these names carry a next-sentence head: ``cls.seq_relationship`` where there are
    heads, the pooler for an encoder-only directory (``BertModel``: the pooler is what NSP fine-tunes from)."""
    keys = set(keys)
    if any(k.startswith("cls.") for k in keys):
        return "cls.seq_relationship.weight" in keys
    return "bert.pooler.dense.weight" in keys


def load_hf(path: str | Path, heads: bool = True, **overrides: Any) -> torch.nn.Module:
    """Load a Hugging Face BERT or ModernBERT directory (``config.json`` + safetensors or ``pytorch_model.bin``)
    into its family's pretraining model.

    Keys map 1:1. Encoder-only checkpoints load too: missing heads keep their fresh initialisation and a warning
    names them (unless ``heads=False``: the caller will not use them); unexpected keys are warned about and
    skipped. A BERT's ``nsp`` is ``has_nsp_head`` of its weights unless given in ``overrides``. The vocabulary is
    padded to ``pad_vocab_size_multiple`` with zero rows.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; give a Hugging Face model directory (save_pretrained output)")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ValueError(f"{path}: no weights ({' or '.join(_WEIGHT_FILES)}) next to config.json")
    hf = json.loads((path / "config.json").read_text())
    family = hf.get("model_type", "bert")
    try:
        sd = _normalise_keys(_read_state_dict(path), family)
        if family == "bert" and "nsp" not in overrides:
            overrides["nsp"] = has_nsp_head(sd)
        model = build(config_from_hf(hf, **overrides))
    except ValueError as e:  # a model type this project does not train, a layout it cannot reproduce
        raise ValueError(f"{path}: {e}") from None
    missing, unexpected = load_weights(model, sd, path)
    if not heads:  # the caller uses the encoder alone: heads it will not use are nobody's concern
        encoder = "bert." if family == "bert" else "model."
        missing = [k for k in missing if k.startswith(encoder)]
    if missing:
        warnings.warn(f"{path}: not in the checkpoint, freshly initialised: {', '.join(missing)}", stacklevel=2)
    if unexpected:
        warnings.warn(f"{path}: unexpected checkpoint keys ignored: {', '.join(unexpected)}", stacklevel=2)
    return model


def export_hf(
    model: torch.nn.Module, tokenizer_dir: str | Path | None, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write a Hugging Face model directory: config.json (plus ``extra`` keys), model.safetensors (true vocab rows,
    tied decoder left out as ``save_pretrained`` does) and the tokenizer files of ``tokenizer_dir`` (a
    tokenizer_config.json is written when absent) so ``AutoModelForMaskedLM`` / ``AutoTokenizer.from_pretrained``
    work. ``model`` is a pretraining model of ``pretrain.models`` or a fine-tuning task model (keys as HF's,
    ``config`` ours, ``tied_aliases`` and ``vocab_keys`` its own)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if k in model.tied_aliases:
            continue
        if k in model.vocab_keys:
            v = v[: c.vocab_size]
        sd[k] = v.detach().to("cpu").contiguous().clone()
    try:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a failed write (a full disk) as its own error, "(os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out / "model.safetensors")) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600 (a temporary file): share it
    dtype = str(sd[model.vocab_keys[0]].dtype).removeprefix("torch.")
    hf_config = {**c.to_hf_dict(), "dtype": dtype, **(extra or {})}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        for name in _TOKENIZER_FILES:
            if (tdir / name).is_file():
                shutil.copy2(tdir / name, out / name)
        if (tdir / "tokenizer_config.json").is_file():
            tc = json.loads((tdir / "tokenizer_config.json").read_text())
        else:
            lower = model_dir_lowercase(tdir) is not False  # no tokenizer files: uncased, as ours default
            tc = {
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": lower,
                "model_max_length": c.max_position_embeddings,
                **SPECIAL_TOKENS,
            }
        if not (tdir / "tokenizer.json").is_file() and (tdir / "vocab.txt").is_file():
            # transformers 5 loads a ModernBERT tokenizer from tokenizer.json only (its TokenizersBackend); the
            # same WordPiece pipeline data preparation encodes with, built from vocab.txt
            vocab = read_vocab(tdir / "vocab.txt")
            tok = build_tokenizer({t: i for i, t in enumerate(vocab)}, bool(tc.get("do_lower_case", True)))
            tok.save(str(out / "tokenizer.json"))
        tc.update(_TOKENIZER_EXTRA.get(family_of(c), {}))
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return out


@torch.no_grad()
def fill_mask(
    model: torch.nn.Module, tokenizer: Any, text: str, top_k: int = 5, mask_token: str = SPECIAL_TOKENS["mask_token"]
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


def vocabulary(d: Path, what: str) -> tuple[list[str], Any, bool, Path | None] | None:
    """(tokens, tokenizer, lowercase, vocab.txt or None) of a directory with ``tokenizer.json`` and/or
    ``vocab.txt``; None where it has neither."""
    from tokenizers import Tokenizer

    vocab_txt, tok_json = d / "vocab.txt", d / "tokenizer.json"
    if not vocab_txt.is_file() and not tok_json.is_file():
        return None
    try:
        if tok_json.is_file():
            tokenizer = Tokenizer.from_file(str(tok_json))
            lowercase = bool(model_dir_lowercase(d))
            if vocab_txt.is_file():
                vocab = read_vocab(vocab_txt)
            else:
                ids = tokenizer.get_vocab(with_added_tokens=True)
                vocab = sorted(ids, key=ids.__getitem__)
                if [ids[t] for t in vocab] != list(range(len(vocab))):
                    raise DataPrepError(f"{tok_json}: token ids are not contiguous; give a vocab.txt beside it")
        else:  # a plain BERT directory: vocab.txt and the casing in tokenizer_config.json
            vocab = read_vocab(vocab_txt)
            tc = d / "tokenizer_config.json"
            lowercase = bool(json.loads(tc.read_text()).get("do_lower_case", True)) if tc.is_file() else True
            special_ids(vocab, vocab_txt)
            tokenizer = build_tokenizer({t: i for i, t in enumerate(vocab)}, lowercase)
    except (DataPrepError, ValueError, OSError) as e:  # tokenizers raises a bare Exception on a bad file
        raise UserError(f"{what}: cannot read the vocabulary in {d}: {e}") from None
    except Exception as e:
        raise UserError(f"{what}: {tok_json} is not a tokenizers file ({str(e).splitlines()[0]})") from None
    return vocab, tokenizer, lowercase, vocab_txt if vocab_txt.is_file() else None
