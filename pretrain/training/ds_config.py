"""DeepSpeed's JSON config, generated from the engine's sections (``EngineConfig``): gradient accumulation from the
global batch, the micro batch and the world size; precision; the ZeRO section. One precedence rule, for every
section (the optimizer's too): generated < ``deepspeed.extra`` < a raw DeepSpeed JSON (``deepspeed.config_file``),
with a warning for every value of the JSON that contradicts the Hydra config.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data_prep.errors import UserError
from pretrain.training.config import EngineConfig, LoopConfig

PRECISIONS = ("fp32", "bf16", "fp16")


def gradient_accumulation_steps(t: LoopConfig, world_size: int) -> int:
    if not isinstance(t.micro_batch_size, int) or isinstance(t.micro_batch_size, bool):
        raise UserError(f"trainer.micro_batch_size={t.micro_batch_size!r}: give a positive integer or auto")
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        raise UserError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{t.micro_batch_size} x world size {world_size}; change either so it divides"
        )
    return t.global_batch_size // per_step


def _diff(file_cfg: dict, ours: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in file_cfg.items():
        if k not in ours:
            continue
        if isinstance(v, dict) and isinstance(ours[k], dict):
            out += _diff(v, ours[k], f"{prefix}{k}.")
        elif v != ours[k] and v != "auto":
            out.append(f"{prefix}{k}={v!r} (Hydra config: {ours[k]!r})")
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def build_ds_config(cfg: EngineConfig, world_size: int, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config generated from the Hydra config, ``deepspeed.extra`` merged in, then
    ``deepspeed.config_file`` on top: the one precedence rule, for every section. ``optimizer`` is the
    ``"optimizer"`` section where DeepSpeed builds the optimizer itself
    (``pretrain.training.optim.build_optimizer``)."""
    t, ds = cfg.loop, cfg.deepspeed
    if t.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision!r}: use one of {', '.join(PRECISIONS)}")
    out: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(t, world_size),
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": OmegaConf.to_container(ds.zero_optimization, resolve=True)
        if OmegaConf.is_config(ds.zero_optimization)
        else copy.deepcopy(dict(ds.zero_optimization)),
        # Client optimizers (PyTorch AdamW, our LAMB) are fine under ZeRO and with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if optimizer is not None:
        out["optimizer"] = copy.deepcopy(optimizer)
    extra = OmegaConf.to_container(ds.extra, resolve=True) if OmegaConf.is_config(ds.extra) else dict(ds.extra)
    _merge(out, extra)
    if ds.config_file:
        path = Path(ds.config_file)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"deepspeed.config_file={path}: cannot read it as JSON ({e})") from None
        for d in _diff(raw, out):
            warnings.warn(f"{path}: {d} - the DeepSpeed JSON wins", stacklevel=2)
        _merge(out, raw)
        if (
            out["train_batch_size"]
            != out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * world_size
        ):
            raise UserError(
                f"{path}: train_batch_size != micro batch x gradient_accumulation_steps x world size "
                f"{world_size}; fix the JSON or drop those keys"
            )
    return out
