"""Hugging Face checkpoints: ``load_hf`` reads a ``transformers`` BERT directory into ``BertForPreTraining``,
``export_hf`` writes one (``AutoModelForMaskedLM`` and ``AutoTokenizer.from_pretrained`` load it), and
``fill_mask`` predicts masked tokens from a prompt. Parameter names map 1:1 (pretrain/model.py keeps HF's).

``load_model(path)`` takes any source the tools accept: a run directory (its newest complete checkpoint), a
checkpoint tag directory (``RUN_DIR/checkpoints/stepNNNNNNNN``) or a Hugging Face directory (the trainer's
``RUN_DIR/hf`` export, or any BERT directory with ``config.json`` + weights + ``vocab.txt`` or ``tokenizer.json``),
and returns the model in eval mode with its vocabulary and tokenizer. Checkpoints are read through
``pretrain.checkpoint`` (``find_checkpoint``, ``check_format``, ``build_model`` -> ``fp32_weights``); their model
shape is the resolved config that every checkpoint's client state carries."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.report import DataPrepError
from data_prep.vocab import SPECIAL_TOKENS, build_tokenizer, model_dir_lowercase, read_vocab, special_ids
from pretrain.config import UserError
from pretrain.model import BertConfig, BertForPreTraining

ROOT = Path(__file__).resolve().parent.parent

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


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> tuple[list[str], list[str]]:
    """Copy a Hugging Face state dict (``_normalise_keys``'d) into ``model`` (ours, keys as HF's; its ``config`` a
    ``BertConfig``), padding the vocabulary rows with zeros; returns (missing, unexpected) keys. A shape that
    disagrees with the config is an error naming ``path``."""
    vocab_size = model.config.vocab_size
    own = model.state_dict()
    for alias in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        own.pop(alias, None)  # tied aliases: filled through their owners
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    with torch.no_grad():
        for k in set(own) & set(sd):
            src, dst = sd[k], own[k]
            if k in _VOCAB_KEYS and len(src) == vocab_size:
                dst[vocab_size:].zero_()  # vocab padding rows
                dst = dst[:vocab_size]
            if src.shape != dst.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(src.shape)}, config.json implies {tuple(dst.shape)}")
            dst.copy_(src)
    return missing, unexpected


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
    missing, unexpected = load_weights(model, sd, path)
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
    work. ``model`` is ``BertForPreTraining`` or a fine-tuning ``BertForTask`` (keys as HF's, ``config`` ours)."""
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
    dtype = str(sd["bert.embeddings.word_embeddings.weight"].dtype).removeprefix("torch.")
    hf_config = {**c.to_hf_dict(), "dtype": dtype, **(extra or {})}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        for name in _TOKENIZER_FILES:
            if (tdir / name).is_file():
                shutil.copy2(tdir / name, out / name)
        if not (tdir / "tokenizer_config.json").is_file():
            lower = model_dir_lowercase(tdir) is not False  # no tokenizer files: uncased, as ours default
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


@dataclass
class ModelSource:
    """A loaded model and what came with it."""

    model: BertForPreTraining  # eval mode, on the CPU
    vocab: list[str]  # token of each id
    tokenizer: Any  # tokenizers.Tokenizer
    lowercase: bool
    path: Path  # the directory the model was read from: a checkpoint tag dir or a HF dir
    kind: str  # "checkpoint" or "hf"
    run_dir: Path | None = None  # the run a checkpoint belongs to (its metrics.jsonl gets the record)
    step: int | None = None
    config: dict | None = None  # the run's resolved config (checkpoints)
    vocab_file: Path | None = None  # a vocab.txt holding ``vocab``, where there is one

    def describe(self) -> str:
        return f"{self.path} (step {self.step})" if self.step is not None else str(self.path)


ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")  # fmt: skip


def continue_from(init_from: str, model: dict[str, Any], data_dir: str, data_lowercase: bool | None) -> list[str]:
    """Continued pretraining from a Hugging Face directory (``trainer.init_from``; a run dir's ``hf/`` too): its
    ``config.json`` fixes the architecture (``model`` is updated in place), its vocabulary and casing must be the
    data's (else one UserError line saying how to prepare the data), and the pair head stays only where the
    checkpoint has one. Returns what changed, for the start-up log; nothing for other ``init_from`` kinds."""
    d = Path(init_from)
    d = d if (d / "config.json").is_file() else d / "hf"
    if not (d / "config.json").is_file():
        return []
    what = f"trainer.init_from={init_from}"
    hf = json.loads((d / "config.json").read_text())
    arch = {k: hf[k] for k in ARCHITECTURE if k in hf}
    notes = [f"model.{k}={model.get(k)} -> {v}" for k, v in arch.items() if model.get(k) not in (None, v)]
    model.update(arch)
    theirs = _vocabulary(d, what)
    if theirs is not None:
        ours = read_vocab(Path(data_dir) / "vocab.txt")
        if ours != theirs[0]:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs[0], strict=False)) if a != b),
                min(len(ours), len(theirs[0])),
            )
            raise UserError(
                f"data.dir={data_dir} was prepared with another vocabulary than {what} ({len(ours)} vs "
                f"{len(theirs[0])} tokens, first difference at id {at}); prepare it with vocab={d}"
            )
        if data_lowercase is not None and data_lowercase != theirs[2]:
            raise UserError(
                f"data.dir={data_dir} is {'uncased' if data_lowercase else 'cased'} but {what} is "
                f"{'uncased' if theirs[2] else 'cased'}; prepare it with vocab={d} lowercase={str(theirs[2]).lower()}"
            )
    if model.get("nsp", True) and "cls.seq_relationship.weight" not in _normalise_keys(_read_state_dict(d)):
        model["nsp"] = False
        notes.append("model.nsp=false: the checkpoint has no NSP head (MLM continues alone)")
    return notes


def _vocabulary(d: Path, what: str) -> tuple[list[str], Any, bool, Path | None] | None:
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


def _client_state(tag: Path) -> dict:
    """The client state DeepSpeed stores beside the module in ``*model_states.pt`` (memory-mapped: the weights in
    it are not read here)."""
    files = sorted(tag.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{tag}: no DeepSpeed model states (*model_states.pt); not a checkpoint of this trainer")
    try:
        return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated or overwritten mid-copy
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise UserError(f"{files[0]}: unreadable ({why}); the checkpoint is damaged, give an older one") from None


def _run_config(tag: Path, run_dir: Path | None) -> dict:
    config = _client_state(tag).get("config")
    if config is None and run_dir is not None and (run_dir / "config.yaml").is_file():  # older bundles
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    if not isinstance(config, dict) or "model" not in config:
        raise UserError(f"{tag}: the checkpoint records no model config; evaluate its run's hf/ export instead")
    return config


def _load_checkpoint(given: Path, tag: Path) -> ModelSource:
    from pretrain.checkpoint import build_model, check_format, checkpoint_step
    from pretrain.deepspeed_env import import_deepspeed

    check_format(tag)
    run_dir = tag.parent.parent if tag.parent.name == "checkpoints" else None
    config = _run_config(tag, run_dir)
    data_dir = str((config.get("data") or {}).get("dir") or "")
    # The run's export holds the tokenizer files of its data; the data directory itself is the other place. A
    # relative data.dir was relative to where training ran: the checkout, usually.
    places = ([run_dir / "hf"] if run_dir else []) + ([Path(data_dir), ROOT / data_dir] if data_dir else [])
    places = list(dict.fromkeys(places))  # an absolute data.dir is the same path twice
    found = next((v for v in (_vocabulary(p, str(given)) for p in places) if v is not None), None)
    if found is None:
        raise UserError(
            f"{given}: no vocabulary for this checkpoint: no vocab.txt or tokenizer.json in "
            f"{' or '.join(map(str, places)) or 'its run (no data.dir recorded)'}; restore the run's data directory"
        )
    vocab, tokenizer, lowercase, vocab_file = found
    model_kw = dict(config["model"])
    if model_kw.get("vocab_size") is None:  # the usual null: taken from the data when the run started
        model_kw["vocab_size"] = len(vocab)
    elif model_kw["vocab_size"] != len(vocab):
        raise UserError(
            f"{given}: model.vocab_size={model_kw['vocab_size']} but its vocabulary ({vocab_file or places}) has "
            f"{len(vocab)} tokens; restore the data directory the run was trained on"
        )
    import_deepspeed()  # fp32_weights reads ZeRO checkpoints through DeepSpeed: import it without the chatter
    out = io.StringIO()
    # DeepSpeed's notes and progress bars while it gathers ZeRO partitions: seconds, and not this tool's output
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        model = build_model(model_kw, str(tag))
    for line in out.getvalue().splitlines():
        if line.startswith("init_from:"):  # tensors the checkpoint lacked
            print(f"warning: {line.removeprefix('init_from: ')}", file=sys.stderr)
    return ModelSource(
        model.eval(), vocab, tokenizer, lowercase, tag, "checkpoint", run_dir, checkpoint_step(tag), config, vocab_file
    )


def _load_hf_dir(path: Path) -> ModelSource:
    found = _vocabulary(path, str(path))
    if found is None:
        raise UserError(f"{path}: no vocab.txt or tokenizer.json beside config.json; copy the model's tokenizer there")
    vocab, tokenizer, lowercase, vocab_file = found
    try:
        model = load_hf(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if model.config.vocab_size != len(vocab):
        raise UserError(
            f"{path}: config.json has vocab_size={model.config.vocab_size} but the tokenizer has {len(vocab)} "
            "tokens; the tokenizer files belong to another model"
        )
    return ModelSource(model.eval(), vocab, tokenizer, lowercase, path, "hf", vocab_file=vocab_file)


def load_model(path: str | os.PathLike) -> ModelSource:
    """The model a path names: a HF directory, a checkpoint tag dir, or a run dir (its newest complete checkpoint).
    Raises UserError (one line) for anything else."""
    from pretrain.checkpoint import find_checkpoint

    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p}: not found; give a run directory, a checkpoint (RUN_DIR/checkpoints/stepNNNNNNNN) or a Hugging "
            "Face model directory (RUN_DIR/hf)"
        )
    if (p / "config.json").is_file():
        return _load_hf_dir(p)
    if (p / "COMPLETE").is_file():
        return _load_checkpoint(p, p)
    tag = find_checkpoint(p / "checkpoints") or find_checkpoint(p)
    if tag is not None:
        return _load_checkpoint(p, tag)
    if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file() or list(p.glob("step*")):
        hint = f"evaluate its export {p / 'hf'}" if (p / "hf" / "config.json").is_file() else "train it to a checkpoint"
        raise UserError(
            f"{p}: a run without a complete checkpoint (no step*/COMPLETE under {p / 'checkpoints'}); {hint}"
        )
    raise UserError(
        f"{p}: not a model: no config.json (Hugging Face directory), no COMPLETE marker (checkpoint) and no "
        "checkpoints/ (run directory)"
    )
