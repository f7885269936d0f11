"""One way to get weights from a path, for every tool: ``trainer.init_from``, ``launch/evaluate.py``, fill-mask,
embed and fine-tuning's ``pretrained=``.

Which directory a path means is ``pretrain.checkpoint.locate.resolve``, the one rule: a Hugging Face directory
(``config.json`` beside weights) is itself; a checkpoint (``RUN_DIR/checkpoints/stepNNNNNNNN`` with its ``COMPLETE``
marker) is itself and must verify; a run directory means its newest checkpoint that verifies, and its ``hf/`` export
only where no complete checkpoint is left (a finished run's ``hf/`` holds the same weights as its last checkpoint; a run
trained further has newer checkpoints than its export). ``load_model`` returns the model in eval mode with its
vocabulary and tokenizer; a checkpoint's model shape is the resolved config its client state carries.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import UserError
from data_prep.vocab import read_vocab
from pretrain.checkpoint import safe_load
from pretrain.checkpoint.bundle import check_format, checkpoint_step, fp32_weights
from pretrain.checkpoint.hf import ROOT, load_hf, vocabulary, weight_keys
from pretrain.checkpoint.locate import resolve
from pretrain.models import NAMES, architecture, build, config_from_hf, family_of
from pretrain.runtime.deepspeed_env import import_deepspeed


def pretraining_model(
    model_kw: dict[str, Any], init_from: str | None = None, checksums: bool | None = True
) -> torch.nn.Module:
    """A fresh pretraining model of ``model_kw`` (its family's, ``pretrain.models.build``), with the weights
    ``init_from`` names (any path ``resolve`` takes) where given: shapes must fit (one line naming every misfit),
    tensors it lacks stay fresh (named)."""
    try:
        model = build(model_kw)
    except ValueError as e:
        raise UserError(str(e)) from None
    if init_from:
        sd = weights_from(init_from, checksums)
        ours = model.state_dict()
        if sd and not set(sd) & set(ours):  # another family's weights: every name differs
            raise UserError(
                f"trainer.init_from={init_from}: none of its tensors is a {NAMES[family_of(model_kw)]} weight "
                f"(its first: {next(iter(sd))}); pick the model (model=...) these weights were trained as"
            )
        bad = [
            f"{k} {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
            for k, v in sd.items()
            if k in ours and v.shape != ours[k].shape
        ]
        if bad:  # whole names and both shapes, not a cut-off torch message
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UserError(
                f"trainer.init_from={init_from}: {len(bad)} tensor(s) do not fit the model: "
                f"{'; '.join(bad[:10])}{more}; pick the model config these weights were trained with"
            )
        missing, _ = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in model.tied_aliases]
        if missing:
            print(f"init_from: {len(missing)} tensors not in {init_from}, freshly initialised: {missing[:4]}")
    return model


def weights_from(path: str, checksums: bool | None = True) -> dict[str, torch.Tensor]:
    """fp32 model weights of whatever ``path`` resolves to (``trainer.init_from``), verified as ``resolve`` says."""
    kind, d = resolve(path, "trainer.init_from", checksums)
    if kind == "hf":
        try:
            return load_hf(d, heads=True).state_dict()
        except ValueError as e:  # weights that contradict their config.json, a model_type that is not BERT
            raise UserError(f"trainer.init_from={path}: {e}") from None
    check_format(d)
    return fp32_weights(d)


@dataclass
class ModelSource:
    """A loaded model and what came with it."""

    model: torch.nn.Module  # a pretraining model of its family (pretrain.models), eval mode, on the CPU
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


def continue_from(init_from: str, model: dict[str, Any], data_dir: str, data_lowercase: bool | None) -> list[str]:
    """Continued pretraining from a Hugging Face directory (``trainer.init_from``; a run dir's ``hf/`` too): its
    ``config.json`` fixes the architecture (``model`` is updated in place), its vocabulary and casing must be the
    data's (else one UserError line saying how to prepare the data), and the pair head stays only where the
    checkpoint has one. Returns what changed, for the start-up log; nothing for other ``init_from`` kinds."""
    kind, d = resolve(init_from, "trainer.init_from", checksums=None)  # verified when the weights are read
    if kind != "hf":
        return []
    what = f"trainer.init_from={init_from}"
    hf = json.loads((d / "config.json").read_text())
    family = family_of(model)
    try:
        theirs_cfg = config_from_hf(hf)
    except ValueError as e:  # a model type this project does not train, a pattern the model cannot reproduce
        raise UserError(f"{what}: {e}") from None
    if family_of(theirs_cfg) != family:
        raise UserError(
            f"{what} is a {NAMES[family_of(theirs_cfg)]} model (model_type {hf.get('model_type')!r}) but the run's "
            f"model is {NAMES[family]}; choose a model={family_of(theirs_cfg)}-* config (its shape comes from "
            "config.json)"
        )
    arch = {k: getattr(theirs_cfg, k) for k in architecture(family)}
    notes = [f"model.{k}={model.get(k)} -> {v}" for k, v in arch.items() if model.get(k) not in (None, v)]
    model.update(arch)
    theirs = vocabulary(d, what)
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
    # Pretraining continues the pair task only with a trained pair head (an encoder-only directory's pooler, which
    # load_hf keeps for fine-tuning, is not one); the names are read from the safetensors header, not the weights.
    if model.get("nsp", False) and "cls.seq_relationship.weight" not in weight_keys(d):
        model["nsp"] = False
        notes.append("model.nsp=false: the checkpoint has no NSP head (MLM continues alone)")
    return notes


def _client_state(tag: Path) -> dict:
    """The client state DeepSpeed stores beside the module in ``*model_states.pt`` (memory-mapped: the weights in
    it are not read here)."""
    files = sorted(tag.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{tag}: no DeepSpeed model states (*model_states.pt); not a checkpoint of this trainer")
    try:
        return safe_load.load_file(files[0], mmap=True)  # weights only: a refused pickle is one UserError
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
    check_format(tag)
    run_dir = tag.parent.parent if tag.parent.name == "checkpoints" else None
    config = _run_config(tag, run_dir)
    data_dir = str((config.get("data") or {}).get("dir") or "")
    # The run's export holds the tokenizer files of its data; the data directory itself is the other place. A
    # relative data.dir was relative to where training ran: the checkout, usually.
    places = ([run_dir / "hf"] if run_dir else []) + ([Path(data_dir), ROOT / data_dir] if data_dir else [])
    places = list(dict.fromkeys(places))  # an absolute data.dir is the same path twice
    found = next((v for v in (vocabulary(p, str(given)) for p in places) if v is not None), None)
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
        model = pretraining_model(model_kw, str(tag), checksums=None)  # verified by resolve
    for line in out.getvalue().splitlines():
        if line.startswith("init_from:"):  # tensors the checkpoint lacked
            print(f"warning: {line.removeprefix('init_from: ')}", file=sys.stderr)
    return ModelSource(
        model.eval(), vocab, tokenizer, lowercase, tag, "checkpoint", run_dir, checkpoint_step(tag), config, vocab_file
    )


def _load_hf_dir(path: Path, heads: bool) -> ModelSource:
    found = vocabulary(path, str(path))
    if found is None:
        raise UserError(f"{path}: no vocab.txt or tokenizer.json beside config.json; copy the model's tokenizer there")
    vocab, tokenizer, lowercase, vocab_file = found
    try:
        model = load_hf(path, heads=heads)
    except ValueError as e:
        raise UserError(str(e)) from None
    if model.config.vocab_size != len(vocab):
        raise UserError(
            f"{path}: config.json has vocab_size={model.config.vocab_size} but the tokenizer has {len(vocab)} "
            "tokens; the tokenizer files belong to another model"
        )
    return ModelSource(model.eval(), vocab, tokenizer, lowercase, path, "hf", vocab_file=vocab_file)


def load_model(path: str | os.PathLike, what: str = "model", heads: bool = True, checksums: bool = True) -> ModelSource:
    """The model ``path`` names (``resolve``), in eval mode, with its vocabulary and tokenizer. ``heads=False``:
    the caller uses the encoder alone (fine-tuning, embeddings), so a directory without MLM/NSP heads is not
    worth a warning. Raises UserError (one line naming ``what``) for anything else."""
    kind, d = resolve(path, what, checksums)
    return _load_hf_dir(d, heads) if kind == "hf" else _load_checkpoint(Path(path), d)
