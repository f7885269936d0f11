"""``trainer.micro_batch_size=auto``: the largest micro-batch that fits, found by measuring, not guessing.

Memory of a training step = what stays (weights, gradients, optimizer state: each partitioned by the ZeRO stage
across ranks) + what a forward pass saves for the backward (activations: linear in the micro-batch) + the
transient peak of the backward. The probe runs a real forward and backward of the model at the run's full
sequence length, precision and activation checkpointing with micro-batches of 2 and 4 and measures the bytes
the autograd graph saves (``saved_tensors_hooks``: the same count on CPU and GPU; on a GPU also the allocator's
peak). The per-sample slope and the intercept give the micro-batch that fills the memory cap less a safety
margin; the answer is then cut to a divisor of the global batch per rank, so gradient accumulation keeps the
global batch the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_prep.errors import UserError

GIB = 1 << 30


@dataclass
class Probe:
    micro_batch_size: int
    fits: int  # the largest micro-batch under the cap, before cutting to a divisor of the global batch
    static_bytes: int  # weights, gradients, optimizer state on this rank
    per_sample_bytes: int  # activations of one more sample
    fixed_bytes: int  # activations that do not grow with the batch
    cap_bytes: int

    def describe(self, seq_len: int, accumulation: int, global_batch: int, world_size: int) -> str:
        return (
            f"micro_batch_size=auto: {self.micro_batch_size} (up to {self.fits} fit at {seq_len} tokens: "
            f"{self.per_sample_bytes / GIB:.3f} GiB of activations per sample, {self.static_bytes / GIB:.2f} GiB "
            f"of weights, gradients and optimizer state, cap {self.cap_bytes / GIB:.1f} GiB less a "
            f"{MARGIN:.0%} margin); gradient accumulation {accumulation} for the global batch {global_batch} on "
            f"{world_size} rank(s)"
        )


MARGIN = 0.15  # allocator fragmentation, the optimizer step's temporaries, evaluation


def static_bytes(n_params: int, stage: int, precision: str, world_size: int) -> int:
    """Weights, gradients and Adam state on one rank: fp32 weights 4 B, gradients 4 B (2 B in bf16/fp16, plus
    the 4 B fp32 master copy DeepSpeed keeps), Adam's two moments 8 B; ZeRO-1 splits the optimizer state across
    ranks, ZeRO-2 the gradients too, ZeRO-3 the weights as well."""
    half = precision in ("bf16", "fp16")
    weights, grads, optim = (2 if half else 4), (2 if half else 4), 8 + (4 if half else 0)
    w = world_size
    per_param = weights / (w if stage >= 3 else 1) + grads / (w if stage >= 2 else 1) + optim / (w if stage >= 1 else 1)
    return int(n_params * per_param)


def saved_bytes(model: torch.nn.Module, batch: int, seq_len: int, precision: str, device: torch.device) -> int:
    """Bytes the autograd graph saves for the backward of one training forward at ``batch x seq_len`` (masked
    positions and NSP labels as in training), counted once per storage; a real backward follows."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=g).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, 3::7] = ids[:, 3::7]  # 1 in 7 positions masked, the same count in every sample: bytes linear in batch
    nsp = torch.zeros(batch, dtype=torch.long, device=device) if model.config.nsp else None
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(ids, labels=labels, next_sentence_label=nsp)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)  # weights are counted in static_bytes


def measure(model: torch.nn.Module, seq_len: int, precision: str, device: torch.device) -> tuple[int, int]:
    """(activation bytes per sample, activation bytes that do not grow with the batch) of ``model`` as set up,
    from real passes at 2 and 4 samples. With activation checkpointing, the layer the backward recomputes is
    added (its share of a pass without checkpointing): what the forward saves is then only the layers' inputs."""
    was = model.training
    model.train()

    def line() -> tuple[int, int]:
        two, four = (saved_bytes(model, b, seq_len, precision, device) for b in (2, 4))
        per_sample = max((four - two) // 2, 1)  # the slope from 2 to 4: at 1 a few shared buffers bend the line
        return per_sample, max(two - 2 * per_sample, 0)

    per_sample, fixed = line()
    if model.checkpoint_layers:  # the backward recomputes one layer at a time: its activations come back
        model.checkpoint_layers = False
        try:
            full, _ = line()
        finally:
            model.checkpoint_layers = True
        per_sample += full // model.config.num_hidden_layers
    model.train(was)
    return per_sample, fixed


def choose(n_params: int, measured: tuple[int, int], cfg: Any, world_size: int, cap_bytes: int) -> Probe:
    """The micro-batch for ``cfg.trainer`` (sequence length, precision, global batch) and ZeRO stage under
    ``cap_bytes`` per rank, from ``measure``'s figures; UserError when not even one sample fits."""
    t = cfg.trainer
    stage = int(cfg.deepspeed.zero_optimization.get("stage", 0))
    fixed = static_bytes(n_params, stage, t.precision, world_size)
    per_sample, intercept = measured
    room = cap_bytes * (1 - MARGIN) - fixed - intercept
    fits = int(room // per_sample) if room > 0 else 0
    if fits < 1:
        raise UserError(
            f"trainer.micro_batch_size=auto: not even one sample of {t.max_seq_length} tokens fits in "
            f"{cap_bytes / GIB:.1f} GiB ({fixed / GIB:.2f} GiB of weights and optimizer state, "
            f"{per_sample / GIB:.3f} GiB per sample); use a higher ZeRO stage, activation checkpointing, bf16, "
            "a shorter trainer.max_seq_length or a larger trainer.memory_cap_gb"
        )
    if t.global_batch_size % world_size:
        raise UserError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by the world size {world_size}"
        )
    per_rank = t.global_batch_size // world_size
    best = max(d for d in range(1, min(fits, per_rank) + 1) if per_rank % d == 0)
    return Probe(best, fits, fixed, per_sample, intercept, cap_bytes)


def probe(model: torch.nn.Module, cfg: Any, world_size: int, device: torch.device, cap_bytes: int) -> Probe:
    """``measure`` then ``choose``: the micro-batch of this run on this device."""
    n = sum(p.numel() for p in model.parameters())
    return choose(n, measure(model, cfg.trainer.max_seq_length, cfg.trainer.precision, device), cfg, world_size,
                  cap_bytes)  # fmt: skip


def memory_cap(cfg: Any, device: torch.device, local_world_size: int) -> int:
    """Bytes one rank may use: ``trainer.memory_cap_gb`` when set; else the GPU's memory, or on CPU the machine's
    available memory shared by the ranks on this node."""
    if cfg.trainer.memory_cap_gb:
        return int(cfg.trainer.memory_cap_gb * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return int(psutil.virtual_memory().available / max(1, local_world_size))
