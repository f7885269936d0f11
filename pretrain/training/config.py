"""Schema of the pretraining config (``conf/config.yaml`` and its groups): one dataclass per section, a docstring
per field. The DeepSpeed JSON derived from it is ``pretrain/training/ds_config.py``; the checks that run before any
work, ``pretrain/training/preflight.py``.

Every value has one home: batch sizes and precision in ``trainer``, clipping in ``optim``, the ZeRO section in
``deepspeed``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from pretrain.models import FAMILIES
from pretrain.training.masking import MaskingConfig


@dataclass
class DataConfig:
    dir: str = "data/out"
    """Output of ``launch/prepare_data.py``: ``manifest.json``, ``vocab.txt``, ``train/`` and ``validation/`` shards."""
    num_workers: int = 0
    """DataLoader worker processes per rank; batches (and masks) are identical whatever the number."""
    bucket: bool = False
    """Group samples of similar length into batches (less padding); order is still deterministic."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Dynamic MLM masking (see ``pretrain/training/masking.py``); validation always uses static masks of the same
    rates."""
    pack: bool = False
    """Pack each micro-batch's samples into as few rows as they fit (attention kept inside each sample, positions
    restarting, NSP read at each sample's [CLS]): no compute on padding, same losses per sample; the samples per
    step and the data order are unchanged (resumes stay exact)."""
    pair_task: str = "auto"
    """What the sentence-pair head learns from BERT shards (``objective=`` sets it): ``nsp``, the shards'
    IsNext/NotNext labels; ``sop``, ALBERT's sentence order, drawn at load time from the same shards (an IsNext
    pair kept or swapped 50/50 per epoch and sample; a NotNext pair cut to its first segment, MLM only); ``none``,
    MLM alone; ``auto`` (no ``objective=``), ``nsp`` for a model with a pair head and ``none`` for one without.
    Metrics keep the head's ``nsp_*`` names; logs and summaries say SOP."""
    verify: bool = True
    """Check every shard against the sha256 in ``manifest.json`` before the first step (a rotten or truncated
    shard stops the run with one line naming it); false keeps only the cheap size and index checks. Cost: one
    full read of the shards, hashed at 1.6 GB/s per core from page cache (SHA-NI; measured 2026-11-26 on a
    2-core EPYC VM, 0.37 GB/s while another job kept both cores busy) in up to 8 threads: about 1 s per 10 GB
    with 8 free cores when cached, else the disk's read speed. Every rank checks; the page cache shares reads."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """``adamw`` or ``lamb`` (layer-wise trust ratio, as NVIDIA's BERT phase 1/2 at large batch)."""
    lr: float = 1e-3
    """Peak learning rate (reached at the end of warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam/LAMB moment decay rates."""
    eps: float = 1e-6
    """Denominator epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases nor LayerNorm weights."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping (DeepSpeed ``gradient_clipping``); 0 disables."""
    implementation: str = "auto"
    """``auto`` (apex FusedLAMB, else DeepSpeed's fused kernels on GPU, else PyTorch), ``torch``, ``deepspeed``,
    ``apex``."""


@dataclass
class SchedulerConfig:
    name: str = "bert"
    """``bert``: linear warm-up then polynomial decay to ``min_lr_ratio`` at ``trainer.max_steps``; ``linear``: the
    same with power 1; ``wsd``: warm-up, stable at the peak, then a ``1 - sqrt`` cool-down over the last
    ``decay_ratio`` of the steps (ModernBERT's trapezoid)."""
    warmup_ratio: float = 0.01
    """Warm-up length as a fraction of ``trainer.max_steps`` (BERT phase 1: 0.2843, phase 2: 0.128 with LAMB)."""
    warmup_steps: int | None = None
    """Warm-up length in steps; overrides ``warmup_ratio`` when set."""
    power: float = 1.0
    """Decay exponent: 1.0 linear (original BERT), 0.5 as NVIDIA's LAMB phase configs."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    decay_ratio: float = 0.1
    """``wsd`` only: the cool-down's share of ``trainer.max_steps`` (0 = stay at the peak: a phase whose decay comes
    in the next phase, as ModernBERT's 1,024-token phase before its context extension)."""


@dataclass
class DeepSpeedSection:
    zero_optimization: dict[str, Any] = field(default_factory=lambda: {"stage": 0})
    """DeepSpeed's ``zero_optimization`` section verbatim (stage, offload_optimizer, overlap_comm, ...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other DeepSpeed keys, merged into the generated config (e.g. ``activation_checkpointing``)."""
    config_file: str | None = None
    """A raw DeepSpeed JSON; its values win over the generated ones (a warning names each contradiction)."""


@dataclass
class LoopConfig:
    """The loop settings the engine (``pretrain/training/engine.py``) reads: batch, steps, precision, checkpoint
    cadence, retention, verification, timeouts and the non-finite policy. Declared once, here; pretraining's and
    fine-tuning's ``trainer`` sections are this plus what their own loops read. Fine-tuning's defaults are in
    ``conf/finetune.yaml``."""

    max_seq_length: int = 128
    """Longest sample (tokens): the shards' manifest ``max_seq_length`` must not exceed it; fine-tuning cuts (or
    refuses, ``task.truncate=false``) longer texts and windows QA contexts to it."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks; gradient accumulation = global / (micro x world size)."""
    micro_batch_size: Any = 8
    """Sequences per forward/backward on one device, or (pretraining) ``auto``: the largest that fits at
    ``max_seq_length`` with this precision, ZeRO stage and activation checkpointing (measured at start-up, with a
    safety margin, cut to a divisor of the global batch per rank; ``pretrain/training/batch_probe.py``)."""
    max_steps: int | None = None
    """Optimizer steps to train (the schedule ends here). Pretraining: set by the ``trainer`` group
    (``conf/trainer/*.yaml``); fine-tuning: epochs x steps per epoch, so a value given there is refused."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (dynamic loss scaling); DeepSpeed keeps fp32 master weights."""
    log_every: int = 5
    """Steps per ``train`` record (metrics.jsonl, W&B, progress bar): the loss averaged over them, every
    micro-batch and every rank."""
    checkpoint_every: int = 20
    """Steps between checkpoints (and one at the end); 0 = only at the end and on preemption (fine-tuning: after
    each epoch too)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only once a newer one is complete."""
    max_time_minutes: float | None = None
    """Wall-clock budget of this job: when exceeded, checkpoint and exit with code 75 (requeue to continue)."""
    stop_at_step: int | None = None
    """Checkpoint and stop (exit 0) at this step without finishing; simulates an interruption in tests."""
    activation_checkpointing: bool = False
    """Keep only each encoder layer's input and recompute the layer in backward: about a third more compute for
    much less activation memory (BERT-large at 512 tokens); losses and gradients are unchanged."""
    compile: bool = False
    """``torch.compile`` the model under the DeepSpeed engine (``engine.compile()``, inductor): fused kernels, at
    the cost of a compile at start-up (and when batch shapes change); measure with ``launch/benchmark.py``."""
    collective_timeout_minutes: float = 5.0
    """How long a collective waits for a rank that died, froze or never started before every other rank stops
    with an error naming it (the NCCL/gloo default is 30 minutes). Must exceed the longest gap between two
    collectives: a checkpoint save or an evaluation pass."""
    rendezvous_timeout_minutes: float = 1.0
    """How long a rank waits at start-up for the others to join MASTER_ADDR:MASTER_PORT before it stops with one
    line naming them (a rank that never started, a wrong address). Counted from when this rank is ready, after
    its data checks: raise it where ranks verify a very large corpus at different speeds."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradients are not finite is skipped (fp16: DeepSpeed lowers the loss scale); this many
    in a row stop the run (exit 3), naming the step and the last good checkpoint. 0 = stop at the first."""
    verify_checkpoint: bool = True
    """Check the checkpoint a run resumes from (and ``trainer.init_from``/``pretrained``) against the sha256 of
    every file its ``COMPLETE`` marker lists; a run directory's newest bundle that fails is named and the next
    older one is used. false: file sizes only (a truncated file is still caught; a damaged one of the right size
    is not), no read of every byte."""


@dataclass
class TrainerConfig(LoopConfig):
    """Pretraining's ``trainer`` section: the loop settings and what the pretraining loop adds."""

    phase: int = 1
    """BERT phase: 1 (128 tokens, from scratch) or 2 (512 tokens, weights from ``init_from``, optimizer reset)."""
    memory_cap_gb: float | None = None
    """Memory one rank may use for ``micro_batch_size=auto``: default the GPU's memory, on CPU the available memory
    shared by the ranks of the node."""
    eval_every: int = 20
    """Steps between validation passes (and one at the end); 0 = only at the end."""
    eval_batches: int = 20
    """Validation micro-batches per rank per pass (static masks: comparable across passes); 0 = no validation
    (otherwise an empty validation split is an error)."""
    init_from: str | None = None
    """Weights only (optimizer, schedule and step start afresh) from a run dir, a checkpoint dir (or tag dir) or a
    Hugging Face directory: phase 2 from phase 1, or continued pretraining of a published checkpoint
    (``experiment=continue-bert``), whose ``config.json`` then sets the architecture and whose vocabulary and casing
    the data must share (prepare it with ``vocab=`` that directory)."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device for the MFU estimate; null = looked up from the GPU name (none on CPU)."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms`` (bit-exact GPU resumes at some speed cost; CPU is exact anyway)."""
    loss_spike_factor: float = 10.0
    """A step whose loss exceeds this times the running mean is logged (``kind: spike`` in metrics.jsonl) with the
    ids of its samples, so the document behind it can be found; training continues. 0 = off."""


@dataclass
class EngineConfig:
    """The sections of a run's configuration the engine reads, and nothing else of it: pretraining and fine-tuning
    both hold them under these names (``of``)."""

    loop: LoopConfig
    """The loop settings (``trainer``)."""
    optim: OptimConfig
    """The optimizer (``optim``)."""
    scheduler: SchedulerConfig
    """The learning-rate schedule (``scheduler``)."""
    deepspeed: DeepSpeedSection
    """ZeRO and raw DeepSpeed settings (``deepspeed``)."""
    run_dir: str
    """Where checkpoints and metrics go."""
    verbose: bool = False
    """Show DeepSpeed's own messages."""

    @classmethod
    def of(cls, cfg: Any) -> EngineConfig:
        return cls(cfg.trainer, cfg.optim, cfg.scheduler, cfg.deepspeed, cfg.run_dir, cfg.verbose)


@dataclass
class BenchConfig:
    warmup: int = 3
    """Untimed steps first (allocations, kernel selection, the loader's first batches)."""
    steps: int = 10
    """Timed optimizer steps per implementation (the median step time is reported)."""
    compare: str = "none"
    """``hf``: also time ``transformers``' BERT under the same DeepSpeed config, batches and optimizer, steps
    interleaved with ours, and print the ratio; ``none``: ours only."""
    synthetic_samples: int = 4096
    """Training samples of the synthetic shards made when ``data.dir`` holds no prepared data."""


@dataclass
class LoggerConfig:
    wandb: bool = False
    """Log to Weights & Biases from rank 0 (metrics.jsonl in the run dir is always written)."""
    project: str = "bert-pretrain"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); null = the default of the logged-in account."""
    mode: str = "auto"
    """``auto`` (online when an API key is available, else offline), ``online``, ``offline`` or ``disabled``."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class Config:
    model: Any = MISSING
    """Model shape: the config dataclass of its family (``pretrain.models.FAMILIES``: ``BertConfig``,
    ``ModernBertConfig``; Hugging Face field names), which each ``conf/model/*.yaml`` names in its defaults list
    (``/model_schema/<family>``) and then holds what differs from it; ``vocab_size: null`` = the size of the
    shards' vocabulary."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and loading (``conf/data/*.yaml``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer (``conf/optim/*.yaml``)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule (``conf/scheduler/*.yaml``)."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """ZeRO and raw DeepSpeed settings (``conf/deepspeed/*.yaml``)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Batch, steps, precision, logging, evaluation, checkpoints, fault limits (``conf/trainer/*.yaml``)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Weights & Biases (``conf/logger/*.yaml``); metrics.jsonl is always written."""
    bench: BenchConfig = field(default_factory=BenchConfig)
    """``launch/benchmark.py`` only: warm-up, timed steps, the ``transformers`` comparison."""
    name: str = "tiny-cpu"
    """Experiment name; the default run name starts with it."""
    run_name: str = "tiny-cpu"
    """Run name; default derived deterministically from ``name`` and the command-line overrides, so every rank
    on every node (and a requeued job) computes the same one."""
    run_dir: str = "runs/tiny-cpu"
    """Where checkpoints, metrics.jsonl, W&B files and the HF export go (``runs/${run_name}`` by default)."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in the run dir, else start fresh), ``none``, or a checkpoint path."""
    seed: int = 1234
    """Seed of initialisation, data order, masks and dropout."""
    verbose: bool = False
    """Show DeepSpeed's own per-rank messages (accelerator detection, engine set-up, op builds); errors always show."""


def _split_overrides(overrides: str) -> list[str]:
    """Hydra's ``override_dirname`` (``k=v,k2=v2``, sorted) back into items; commas inside brackets or quotes
    (``optim.betas=[0.9,0.98]``) stay inside their item."""
    items, depth, quote, cur = [], 0, "", ""
    for ch in overrides:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    return [*items, cur] if cur else items


def _run_slug(name: str, overrides: str, limit: int = 96) -> str:
    """Readable, deterministic run name: the experiment name, then each override that changes the result as
    ``<last key part><value>`` (a group choice as its value alone, a path as its last component alone), joined by
    ``-``: ``tiny-cpu-max_steps20-lr0.002-bert-base``. Every rank, node and requeued job computes the same one;
    the full overrides are in the run's saved config. Past ``limit`` characters the tail becomes a short hash of
    the whole override string, so different runs never share a run dir."""
    parts = [name]
    for item in _split_overrides(overrides):
        key, _, value = item.lstrip("+~").partition("=")
        value = value.strip("'\"").rstrip("/")
        leaf = key.rsplit(".", 1)[1] if "." in key else ""  # a group choice (model=bert-base): the value says it
        if "/" in value:  # a path: its last component says enough
            leaf, value = "", value.rsplit("/", 1)[1]
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "_", f"{leaf}{value}").strip("_") or "x")
    slug = "-".join(parts)
    if len(slug) > limit:
        digest = hashlib.sha1(overrides.encode()).hexdigest()[:8]
        slug = f"{slug[: limit - 9].rstrip('-_.')}-{digest}"
    return slug


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=Config)
    for family, (schema, _) in FAMILIES.items():  # conf/model/*.yaml: `defaults: [/model_schema/<family>, _self_]`
        store.store(group="model_schema", name=family, node=schema(vocab_size=None))
    if not OmegaConf.has_resolver("run_slug"):
        OmegaConf.register_new_resolver("run_slug", _run_slug)


register_configs()
