"""Metrics: always ``RUN_DIR/metrics.jsonl``, W&B on rank 0 when enabled, a tqdm bar, and the final summary.

W&B mode ``auto`` is online only when an API key is available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for
api.wandb.ai), else offline, so a run never blocks on a login prompt; offline runs sit in ``RUN_DIR/wandb`` and
``wandb sync`` uploads them later. The run id is kept in every checkpoint: a requeued job logs into the same run.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_prep.atomic import write_text
from data_prep.errors import UserError
from pretrain.models import NAMES, family_of

METRICS_FILE = "metrics.jsonl"  # RUN_DIR/metrics.jsonl: one JSON record per line, owned by this module

# Dense bf16/fp16 peak TFLOP/s per device, for the MFU estimate when trainer.peak_tflops is not set.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation, the one definition everything prints: training FLOPs per token
    (``BertForPreTraining.flops_per_token`` at the run's sequence length) times the REAL (non-padding) tokens per
    second of all ranks, over the peak of all ranks' devices. Padding does no useful work, so it earns none."""
    return flops_per_token * tokens_per_s / (peak * 1e12 * world_size) if peak else None


def memory_gb(device: torch.device) -> float:
    """CUDA peak allocated memory on GPU, the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (logged after the checkpoint a resumed run restarts from) so the resumed
    metrics.jsonl reads exactly like an uninterrupted run's."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in keep))


class MetricsLogger:
    """Rank 0 writes; other ranks (and ``MetricsLogger.disabled()``) hold a no-op logger. Built by the caller from
    its own sections, then ``open``ed by the engine once it knows where the run resumes (step, W&B id)."""

    def __init__(
        self, logger: Any, run_name: str, run_dir: Path, is_main: bool, config: dict, pair: str = "nsp"
    ) -> None:
        self.logger, self.run_name, self.config = logger, run_name, config  # config: the resolved config (W&B)
        self.is_main, self.run_dir = is_main, run_dir
        self.path = run_dir / METRICS_FILE
        self.wandb = None
        self.wandb_mode = "disabled"
        self.wandb_id: str | None = None
        self.bar = None
        self.plain = False
        self.pair = pair  # nsp or sop: what a pair head's nsp_* figures are
        self.t0, self.start_step, self.max_steps = time.time(), 0, 0

    @classmethod
    def disabled(cls) -> MetricsLogger:
        """A logger that writes nothing (the benchmark's engine)."""
        return cls(None, "", Path("."), False, {})

    def open(self, wandb_id: str | None, start_step: int, max_steps: int) -> None:
        """Start logging at ``start_step``: metrics.jsonl cut back to it, the W&B run (resumed under ``wandb_id``),
        a bar on a terminal or plain lines in a file."""
        self.wandb_id, self.t0, self.start_step, self.max_steps = wandb_id, time.time(), start_step, max_steps
        if not self.is_main:
            return
        cfg, run_dir = self.logger, self.run_dir
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if cfg.wandb and wandb_mode(cfg.mode) != "disabled":
            import wandb

            mode = self.wandb_mode = wandb_mode(cfg.mode)
            self.wandb_id = wandb_id or secrets.token_hex(4)  # not the global RNG: resumes stay exact
            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=self.run_name,
                id=self.wandb_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=self.config,
                tags=list(cfg.tags) or None,
            )
            print(f"W&B ({mode}): run {self.wandb_id}, files in {self.wandb.dir}", flush=True)
        # A terminal gets a progress bar; a file (SLURM, nohup, CI) gets one plain line per log record instead.
        self.plain = not sys.stdout.isatty()
        self.bar = (
            None
            if self.plain
            else tqdm(
                total=max_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,
            )
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record["time"] = round(time.time(), 3)
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full or vanished disk: one line, not a traceback from deep in the loop
            raise UserError(
                f"{self.path}: cannot write metrics ({e.strerror}); free space or point run_dir "
                "elsewhere, then rerun to resume from the last complete checkpoint"
            ) from None
        if self.wandb is not None:
            self.wandb.log(
                {
                    k: v
                    for k, v in record.items()
                    if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                step=record["step"],
            )  # lists/strings stay in the jsonl
        if self.bar is not None and record.get("kind") == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        if self.plain:
            line = self.plain_line(record)
            if line:
                print(line, flush=True)
        elif self.bar is not None and record.get("kind") in ("eval", "epoch"):
            self.bar.write(self.plain_line(record) or "", file=sys.stderr)  # results stay above the bar

    def plain_line(self, r: dict[str, Any]) -> str | None:
        """One line of a log record for a log file: step/total, losses, lr, throughput and ETA for training."""

        def f(v: Any, spec: str = ".4f") -> str:
            return "n/a" if v is None else format(v, spec)

        step, kind = r.get("step"), r.get("kind")
        if kind == "train":
            done = step - self.start_step
            eta = (time.time() - self.t0) / done * (self.max_steps - step) if done > 0 else None
            if "mlm_loss" not in r:  # fine-tuning: one task loss
                epoch = f"  epoch {r['epoch']}" if "epoch" in r else ""
                lr = f(r["lr"], ".2e")
                return f"step {step}/{self.max_steps}{epoch}  loss {f(r['loss'])}  lr {lr}  ETA {duration(eta)}"
            nsp = f", {self.pair} {f(r['nsp_loss'])}" if r.get("nsp_loss") is not None else ""  # MLM-only: none
            return (
                f"step {step}/{self.max_steps}  loss {f(r['loss'])} (mlm {f(r['mlm_loss'])}{nsp})  lr "
                f"{f(r['lr'], '.2e')}  {f(r['sequences_per_s'], ',.1f')} seq/s  "
                f"{f(r['tokens_per_s'], ',.0f')} tokens/s  ETA {duration(eta)}"
            )
        if kind == "epoch":  # fine-tuning's validation after an epoch
            scores = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in ("kind", "step", "epoch", "time"))
            return f"epoch {r['epoch']}: {scores}"
        if kind == "eval":
            line = (
                f"eval step {step}: val MLM loss {f(r.get('val_mlm_loss'))} acc {f(r.get('val_mlm_acc'), '.2%')} "
                f"(unigram {f(r.get('val_unigram_acc'), '.2%')})"
            )
            if r.get("val_nsp_acc") is not None:  # MLM-only runs have no NSP to report
                line += f"  {self.pair.upper()} loss {f(r.get('val_nsp_loss'))} acc {f(r.get('val_nsp_acc'), '.2%')}"
            return line
        if kind == "skipped":
            return f"step {step}: skipped ({r['reason']}), {r['skipped']} so far"
        return None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()


def duration(seconds: float | None) -> str:
    """``42.0 s``, ``3m07s``, ``2h05m``; ``n/a`` for none (the bar's ETA, the report's wall time)."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def append_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """One line in ``RUN_DIR/metrics.jsonl`` from outside the trainer (``launch/evaluate.py``), as the trainer writes
    them (``kind``, ``step``, ``time``, non-finite values as null): a single ``write`` of one line in append mode,
    so it never tears a line the trainer writes."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    record["time"] = round(time.time(), 3)
    path = run_dir / METRICS_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return path


def pair_label(pair_task: str | None) -> str:
    """How logs and summaries name the pair head's task: SOP for sentence order, else NSP (metrics keep ``nsp_*``)."""
    return "SOP" if pair_task == "sop" else "NSP"


def print_startup(
    cfg: Any,
    model: Any,
    parameters: int,
    info: Any,
    env: Any,
    device: torch.device,
    threads: str,
    zero_stage: int,
    optimizer: str,
    accum: int,
    start_step: int,
    run_dir: Path,
) -> None:
    """Rank 0, once, before the first step: what will happen (``model`` is the model's config dataclass, ``info``
    the pre-flight's ``DataInfo``)."""
    t, samples = cfg.trainer, info.verified.get("samples", {})
    tokens = info.manifest.split("train").get("tokens")
    data = f"{cfg.data.dir}: train {samples.get('train', 0):,} samples"
    data += f" ({tokens:,} tokens)" if tokens else ""
    data += f", validation {samples.get('validation', 0):,}; {info.verified.get('shards', 0)} shards"
    data += f", sha256 verified in {info.verified.get('seconds', 0):.1f} s" if cfg.data.verify else ""
    heads = f"MLM + {pair_label(cfg.data.pair_task)} heads" if model.nsp else "MLM head only"
    where = f"threads per rank: {threads}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    epochs = t.max_steps * t.global_batch_size / max(1, samples.get("train", 0))
    extras = [("packed rows", cfg.data.pack), ("compiled", t.compile), ("activation checkpointing",
              t.activation_checkpointing)]  # fmt: skip
    lines = [
        "=" * 72,
        f"run {cfg.run_name}",
        f"  model        {NAMES[family_of(model)]}, {parameters:,} parameters: {model.num_hidden_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_attention_heads} heads, vocab {model.vocab_size:,}, {heads}",
        f"  data         {data}",
        f"  ranks        {env.world_size} rank(s) via {env.launcher}; {where}",
        f"  engine       ZeRO stage {zero_stage}, {t.precision}; optimizer: {optimizer}"
        + "".join(f"; {name}" for name, on in extras if on),
        f"  batch        {t.global_batch_size:,} sequences per step = {t.micro_batch_size} micro x {accum} "
        f"accumulation x {env.world_size} rank(s); up to {t.global_batch_size * t.max_seq_length:,} tokens per step",
        f"  plan         step {start_step} -> {t.max_steps:,} ({epochs:.2f} epochs of the training split); "
        f"checkpoint every {t.checkpoint_every or '-'} steps, evaluate every {t.eval_every or '-'} and at the end",
        f"  run dir      {run_dir}",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)


def print_summary(s: dict[str, Any]) -> None:
    """One screen: what ran, how fast, how good, where everything is."""

    def fmt(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    lines = [
        f"{'=' * 72}",
        f"run {s['run_name']}: {s['status']}",
        f"  steps        {s['step']}/{s['max_steps']}   sequences {s['sequences']:,}   tokens {s['tokens']:,}",
        f"  time         {s['seconds'] / 60:.1f} min this job   {fmt(s['sequences_per_s'], ',.1f')} seq/s   "
        f"{fmt(s['tokens_per_s'], ',.0f')} tokens/s   MFU {fmt(s.get('mfu'), '.1%')}",
        f"  final loss   train {fmt(s.get('train_loss'))}",
        *validation_lines(s),
        f"  optimizer    {s['optimizer']}   ZeRO stage {s['zero_stage']}   {s['precision']}   world {s['world_size']}",
        f"  run dir      {s['run_dir']}",
        f"  metrics      {s['run_dir']}/{METRICS_FILE}",
        f"  checkpoint   {s.get('checkpoint') or 'none'}",
        f"  HF export    {s.get('hf_dir') or 'not written (run not finished)'}",
    ]
    if s.get("wandb_dir"):
        lines.append(f"  W&B          {s['wandb_dir']}")
        if s.get("wandb_mode") == "offline":  # its files are the run's W&B record; one command publishes them
            lines.append(f"  publish      wandb sync {Path(s['wandb_dir']).parent}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def validation_lines(v: dict[str, Any]) -> list[str]:
    """The final validation figures beside their baselines: MLM accuracy against always answering the training
    split's most frequent token (same masked positions), NSP accuracy against the 50% of a coin."""
    if v.get("val_mlm_acc") is None:
        return ["  validation   none (no validation split, or trainer.eval_batches=0)"]
    acc, uni = v["val_mlm_acc"], v.get("val_unigram_acc")
    times = f": {acc / uni:.1f}x" if uni else ""
    lines = [
        f"  validation   MLM loss {v['val_mlm_loss']:.4f}  acc {acc:.2%}  (unigram baseline "
        f"{'n/a' if uni is None else format(uni, '.2%')}{times})"
    ]
    if v.get("val_nsp_acc") is not None:
        pair = pair_label(v.get("pair_task"))
        lines.append(f"               {pair} loss {v['val_nsp_loss']:.4f}  acc {v['val_nsp_acc']:.2%}  (chance 50%)")
    return lines


def print_complete(run_dir: Path, tag: Path, step: int, max_steps: int, pair: str = "nsp") -> None:
    """What a finished run left, for a rerun of its command (no process group, no new W&B run)."""
    records = (
        [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
        if (run_dir / METRICS_FILE).is_file()
        else []
    )
    val = next((r for r in reversed(records) if r.get("kind") == "eval"), {})
    loss = next((r["loss"] for r in reversed(records) if r.get("kind") == "train"), None)

    def f(key: str, spec: str) -> str:
        return "n/a" if val.get(key) is None else format(val[key], spec)

    hf, pair_name = run_dir / "hf", pair_label(pair)
    print(
        f"run {run_dir} is complete at step {step}/{max_steps}: checkpoint {tag}, HF export "
        f"{hf}; final train loss "
        f"{'n/a' if loss is None else format(loss, '.4f')}, val MLM acc {f('val_mlm_acc', '.2%')}"
        f"{'' if val.get('val_nsp_acc') is None else f', val {pair_name} acc ' + f('val_nsp_acc', '.2%')}. "
        "Nothing to do: "
        "raise trainer.max_steps to train on, or use another run_dir",
        flush=True,
    )


class Progress:
    """A tqdm bar on a terminal; when stdout is a file, a plain line at every tenth of the batches."""

    def __init__(self, total: int, desc: str = "evaluate") -> None:
        from tqdm.auto import tqdm

        self.total, self.desc, self.done = total, desc, 0
        self.plain = not sys.stdout.isatty()
        self.bar = (
            None if self.plain else tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
        )
        self.every = max(1, total // 10)

    def update(self, note: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(note, refresh=False)
        elif self.done % self.every == 0 or self.done == self.total:
            print(f"{self.desc}: batch {self.done}/{self.total}  {note}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
