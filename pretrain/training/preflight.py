"""Pre-flight: every check that can fail runs before the process group, the model or the data loader exist:
data against its manifest, model against data, batch and DeepSpeed settings against the world size."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data_prep.errors import DataPrepError, UserError
from data_prep.manifest import Manifest, read_manifest
from data_prep.store import NSP_LABEL, ShardError, verify_data
from data_prep.vocab import read_vocab
from pretrain.models import NAMES, family_of
from pretrain.training.config import EngineConfig
from pretrain.training.ds_config import build_ds_config, gradient_accumulation_steps


@dataclass
class DataInfo:
    manifest: Manifest
    vocab_size: int
    nsp: bool
    max_seq_length: int | None
    has_validation: bool
    verified: dict = field(default_factory=dict)
    """What ``data_prep.store.verify_data`` checked: shards, samples per split, bytes hashed, seconds."""


def _shards(split_dir: Path) -> list[Path]:
    return sorted(split_dir.glob("*.index.npy")) if split_dir.is_dir() else []


def inspect_data(data_dir: str, verify: bool = True) -> DataInfo:
    """Read ``manifest.json`` and check the shards against it (sha256 too with ``verify``); raises UserError."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data.dir={d}: directory not found; run `python launch/prepare_data.py output_dir={d}` first")
    try:
        manifest = read_manifest(d) or Manifest()
    except DataPrepError as e:
        raise UserError(str(e)) from None
    vocab_size = manifest.vocab_size
    if not (d / "vocab.txt").is_file():
        raise UserError(f"{d}: no vocab.txt; this is not a prepare_data output directory")
    if vocab_size is None:
        vocab_size = len(read_vocab(d / "vocab.txt"))
    if not _shards(d / "train"):
        raise UserError(f"{d / 'train'}: no shards (*.index.npy); run launch/prepare_data.py to completion first")
    try:  # before any process group or model exists: a rotten shard must not surface as a step-9000 traceback
        verified = verify_data(d, manifest, checksums=verify)
    except ShardError as e:
        raise UserError(str(e)) from None
    nsp = manifest.nsp
    if nsp is None:  # older manifests: look at the first sample's label
        import numpy as np

        nsp = bool(np.load(_shards(d / "train")[0], mmap_mode="r")[0, NSP_LABEL] >= 0)
    return DataInfo(
        manifest, int(vocab_size), bool(nsp), manifest.max_seq_length, bool(_shards(d / "validation")), verified
    )


def preflight(
    cfg: Any, world_size: int, architecture: Callable[[dict[str, Any], DataInfo], list[str]] | None = None
) -> tuple[DataInfo, dict[str, Any]]:
    """Check data, model and batch settings against each other; return the data info and the model kwargs
    (``vocab_size`` filled from the data). ``architecture`` may change the model kwargs first (continued
    pretraining: the checkpoint's own), returning what it changed. Raises UserError; warnings for the harmless
    mismatches."""
    if cfg.optim.name not in ("adamw", "lamb"):
        raise UserError(f"optim.name={cfg.optim.name!r}: use adamw or lamb")
    if not isinstance(cfg.trainer.max_steps, int) or cfg.trainer.max_steps < 1:
        raise UserError(f"trainer.max_steps={cfg.trainer.max_steps}: give the optimizer steps to train (>= 1)")
    gradient_accumulation_steps(cfg.trainer, world_size)
    build_ds_config(EngineConfig.of(cfg), world_size)  # precision, a bad deepspeed.config_file: fail before any work
    if cfg.trainer.phase == 2 and not cfg.trainer.init_from:
        warnings.warn("trainer.phase=2 without trainer.init_from: phase 2 starts from random weights", stacklevel=2)
    info = inspect_data(cfg.data.dir, cfg.data.verify)
    asked = info.manifest.config.get("validation_fraction")
    n_val = info.verified.get("samples", {}).get("validation", 0)
    if not n_val and cfg.trainer.eval_batches > 0 and asked != 0:
        raise UserError(
            f"{Path(cfg.data.dir) / 'validation'}: no validation samples"
            + (f" (prepared with validation_fraction={asked})" if asked else "")
            + "; prepare the data with more text or a larger validation_fraction, or set trainer.eval_batches=0 "
            "to train without validation"
        )
    info.has_validation = bool(n_val) and cfg.trainer.eval_batches > 0
    model = OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model) else asdict(cfg.model)
    for note in architecture(model, info) if architecture is not None else []:
        warnings.warn(f"trainer.init_from: {note}", stacklevel=2)
    if model.get("vocab_size") is None:
        model["vocab_size"] = info.vocab_size
    elif model["vocab_size"] != info.vocab_size:
        raise UserError(
            f"model.vocab_size={model['vocab_size']} but {cfg.data.dir}/vocab.txt has {info.vocab_size} "
            "tokens; set model.vocab_size=null to take it from the data"
        )
    family = family_of(model)
    name = NAMES[family]
    max_pos = model.get("max_position_embeddings", 512)
    if info.max_seq_length is not None and info.max_seq_length > max_pos:
        raise UserError(
            f"{cfg.data.dir} holds samples of up to {info.max_seq_length} tokens but "
            f"model.max_position_embeddings={max_pos} ({name}'s context); use a model with more positions"
        )
    if cfg.trainer.max_seq_length > max_pos:
        raise UserError(
            f"trainer.max_seq_length={cfg.trainer.max_seq_length} is above model.max_position_embeddings={max_pos} "
            f"({name}'s context); lower it or use a model with more positions"
        )
    if info.max_seq_length is not None and info.max_seq_length > cfg.trainer.max_seq_length:
        raise UserError(
            f"{cfg.data.dir} holds samples of up to {info.max_seq_length} tokens but "
            f"trainer.max_seq_length={cfg.trainer.max_seq_length} (phase {cfg.trainer.phase}); "
            "point data.dir at matching shards or raise trainer.max_seq_length"
        )
    nsp = model.get("nsp", True)
    pair = cfg.data.pair_task
    if pair not in ("auto", "nsp", "sop", "none"):
        raise UserError(f"data.pair_task={pair!r}: use nsp, sop or none (or objective=nsp|sop|mlm)")
    if family != "bert" and pair in ("nsp", "sop"):
        raise UserError(
            f"objective={pair}: {name} has no sentence-pair head (transformers' {name} masked-LM class has none); "
            "drop objective= or use objective=mlm"
        )
    if pair == "auto":  # no objective= given: what the model has
        pair = cfg.data.pair_task = "nsp" if nsp else "none"
    if pair == "none" and nsp:
        raise UserError("objective=mlm but model.nsp=true: drop model.nsp=true, or use objective=nsp")
    if pair == "sop" and not (nsp and info.nsp):
        raise UserError(
            f"objective=sop needs sentence pairs and the pair head: model.nsp={str(nsp).lower()}, {cfg.data.dir} "
            f"holds {'BERT pairs' if info.nsp else 'RoBERTa-mode shards'}; prepare the data with nsp=true"
        )
    if nsp and not info.nsp:
        raise UserError(
            f"model.nsp=true but {cfg.data.dir} holds RoBERTa-mode shards (no sentence pairs); "
            "set model.nsp=false (objective=mlm) or prepare the data with nsp=true"
        )
    if pair == "nsp" and not nsp and info.nsp:
        warnings.warn(
            f"{cfg.data.dir} holds BERT sentence pairs but model.nsp=false: NSP labels are ignored", stacklevel=2
        )
    return info, model
