"""Optimizers and the learning-rate schedule.

- Parameter groups: weight decay on every weight matrix, never on biases nor LayerNorm parameters (as BERT).
- AdamW: ``torch.optim.AdamW`` with ``fused=True`` (one kernel on GPU, nothing to compile at start-up; on CPU,
  torch >= 2.4, 6.7x faster than the per-tensor loop for BERT-base's 110M parameters); DeepSpeed's
  fused Adam when asked (``optim.implementation=deepspeed``) and its CPU Adam under ZeRO offload, both built by
  DeepSpeed from the ``"optimizer"`` section of its config.
- LAMB: apex's FusedLAMB when apex is importable on GPU, else DeepSpeed's FusedLamb on GPU (its CUDA op is
  compiled once at start-up; where that fails, one warning and the fallback), else ``Lamb`` below,
  a pure-PyTorch implementation of You et al. (2019) as in NVIDIA's BERT: Adam moments with bias correction,
  decoupled weight decay in the update, then a per-parameter (layer-wise) trust ratio ||w|| / ||update||.
- Schedule: linear warm-up then polynomial decay, a ``LambdaLR`` (DeepSpeed steps it once per optimizer step).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases + LayerNorm parameters (no decay)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Lamb(torch.optim.Optimizer):
    """LAMB with bias correction and a layer-wise trust ratio (pure PyTorch; used on CPU or when asked).

    The trust ratio is ``||w|| / ||adam_update + wd * w||``, taken as 1 when either norm is zero (fresh zero
    biases, or a parameter without gradient), and applies to every parameter, decayed or not, as in NVIDIA's BERT.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr} betas={betas} eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat = m / (1 - beta1 ** state["step"])
                    v_hat = v / (1 - beta2 ** state["step"])
                else:
                    m_hat, v_hat = m, v
                w = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(w, alpha=group["weight_decay"])
                w_norm, u_norm = w.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))
        return loss


_CPU_FUSED_ADAMW = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)  # CPU kernel since 2.4


def _apex_lamb():
    try:
        from apex.optimizers import FusedLAMB  # type: ignore[import-not-found]
    except Exception:  # apex missing or built without its CUDA extensions
        return None
    return FusedLAMB


def build_optimizer(
    o: Any, zero: dict[str, Any], precision: str, model: nn.Module, on_cuda: bool
) -> tuple[Any, dict | None, list, str]:
    """``(client_optimizer or None, DeepSpeed "optimizer" section or None, param groups, description)``.

    Exactly one of the first two is set: DeepSpeed builds its fused optimizers itself from the config section
    (and then picks CPU Adam under ZeRO offload); client optimizers are handed to ``deepspeed.initialize``.
    ``o``: the ``optim`` section; ``zero``: DeepSpeed's ``zero_optimization`` section; ``precision``:
    ``trainer.precision``.
    """
    groups = param_groups(model, o.weight_decay)
    betas = tuple(float(b) for b in o.betas)
    impl = o.implementation
    if impl not in ("auto", "torch", "deepspeed", "apex"):
        raise ValueError(f"optim.implementation={impl!r}: use auto, torch, deepspeed or apex")
    ds_params = {"lr": o.lr, "betas": list(betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "lamb":
        apex = _apex_lamb() if on_cuda and impl in ("auto", "apex") else None
        if apex is not None:
            return (
                apex(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay),
                None,
                groups,
                "LAMB: apex FusedLAMB",
            )
        if impl == "apex":
            raise ValueError("optim.implementation=apex but apex (with CUDA extensions) is not importable")
        if on_cuda and impl in ("auto", "deepspeed"):
            error = _deepspeed_op_error("FusedLambBuilder")
            if error is None:
                return None, {"type": "Lamb", "params": ds_params}, groups, "LAMB: DeepSpeed FusedLamb"
            if impl == "deepspeed":
                raise ValueError(f"optim.implementation=deepspeed but DeepSpeed's FusedLamb op does not build: {error}")
            warnings.warn(
                f"DeepSpeed's FusedLamb op does not build here ({error}): pure PyTorch LAMB instead", stacklevel=2
            )
        label = "pure PyTorch" if impl == "torch" or on_cuda else "pure PyTorch (CPU fallback)"
        if zero.get("stage", 0) > 0 or precision != "fp32":
            warnings.warn(
                "LAMB under ZeRO or bf16/fp16 sees flattened partitions: its trust ratio is per partition, "
                "not per layer (use deepspeed=zero0 with fp32, or a GPU with DeepSpeed/apex LAMB)",
                stacklevel=2,
            )
        return Lamb(groups, lr=o.lr, betas=betas, eps=o.eps), None, groups, f"LAMB: {label}"
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if on_cuda and (offload or impl == "deepspeed"):  # DeepSpeed builds CPU Adam (offload) or its fused Adam
        desc = "AdamW: DeepSpeed CPU Adam (ZeRO offload)" if offload else "AdamW: DeepSpeed fused Adam"
        return None, {"type": "AdamW", "params": ds_params}, groups, desc
    fused = on_cuda or _CPU_FUSED_ADAMW
    desc = f"AdamW: PyTorch fused ({'CUDA' if on_cuda else 'CPU'})" if fused else "AdamW: PyTorch"
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps, fused=fused or None), None, groups, desc


def _deepspeed_op_error(builder: str) -> str | None:
    """None when DeepSpeed's CUDA op loads (JIT-compiled and cached on first use), else the first line of why not."""
    # DeepSpeed's JIT reads TORCH_CUDA_ARCH_LIST as digits only: the arch-specific "9.0a" that CUDA images set
    # breaks its parser (int("0a")). The generic "9.0" builds the same kernels for these ops.
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch and re.search(r"\d[a-z]", arch):
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d)[a-z]+", r"\1", arch)
    try:
        from deepspeed.ops import op_builder

        getattr(op_builder, builder)().load(verbose=False)
    except Exception as e:  # a missing nvcc, a CUDA/torch mismatch, a compiler error: all mean "use the fallback"
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def lr_lambda(
    max_steps: int, warmup_steps: int, power: float, min_lr_ratio: float, decay_steps: int | None = None
) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up to 1, then ``(1 - progress) ** power`` down to the floor;
    with ``decay_steps`` (warm-up-stable-decay) 1 until the last ``decay_steps`` steps, then ``1 - sqrt(progress)``
    through them (ModernBERT's "1-sqrt" cool-down) down to the floor."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay_steps is not None:
            start = max_steps - decay_steps
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, decay_steps))
            return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(progress))
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power

    return f


def warmup_steps(s: Any, max_steps: int) -> int:
    """Warm-up steps of the ``scheduler`` section ``s`` in a run of ``max_steps``."""
    return int(s.warmup_steps) if s.warmup_steps is not None else int(math.ceil(s.warmup_ratio * max_steps))


def scheduler_factory(s: Any, max_steps: int) -> Callable[[torch.optim.Optimizer], LambdaLR]:
    """A callable for ``deepspeed.initialize(lr_scheduler=...)``: DeepSpeed calls it with the optimizer it wraps.
    ``s``: the ``scheduler`` section."""
    if s.name not in ("bert", "linear", "wsd"):
        raise ValueError(f"scheduler.name={s.name!r}: use bert, linear or wsd")
    if s.name == "wsd" and not 0.0 <= s.decay_ratio <= 1.0:
        raise ValueError(f"scheduler.decay_ratio={s.decay_ratio}: give the cool-down's share of the steps, 0 to 1")
    power = 1.0 if s.name == "linear" else float(s.power)
    decay = int(math.ceil(s.decay_ratio * max_steps)) if s.name == "wsd" else None
    fn = lr_lambda(max_steps, warmup_steps(s, max_steps), power, float(s.min_lr_ratio), decay)
    return lambda optimizer: LambdaLR(optimizer, fn)
