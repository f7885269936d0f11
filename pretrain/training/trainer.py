"""Pretraining, top to bottom: ``setup`` (checks, process group, model, data, the engine and its resume),
``validate``, the step's pretraining bookkeeping (``log_spike``, ``log_window``), ``summarize`` and ``train``,
which reads: resume, loop (step, log, validate, save, stop on signal), export, summary. The loop machinery
(optimizer step, non-finite skip/stop, checkpoint bundles, preemption, resume) is
``pretrain/training/engine.py``, shared with fine-tuning; the log is ``pretrain/training/metrics.py``.

``train`` returns an exit code of ``pretrain.runtime.exits`` (DONE, PREEMPTED, NONFINITE). Data order and masks follow
from the sampler position, so a resumed run matches an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoint.bundle import checkpoint_step
from pretrain.checkpoint.hf import export_hf
from pretrain.checkpoint.locate import finished
from pretrain.checkpoint.weights import continue_from, pretraining_model
from pretrain.models import build
from pretrain.runtime import distributed as D
from pretrain.runtime.signals import StopFlag
from pretrain.training.config import Config, EngineConfig
from pretrain.training.data import Batches, run_loaders
from pretrain.training.engine import Engine, StepResult, resume_tag, spike_mean, start
from pretrain.training.metrics import (
    MetricsLogger,
    memory_gb,
    mfu,
    peak_tflops,
    print_complete,
    print_startup,
    print_summary,
)
from pretrain.training.preflight import preflight
from pretrain.training.scores import (
    PRETRAINING_SUMS,
    evaluation_pass,
    most_frequent_token,
    pretraining_metrics,
    pretraining_scores,
)

UNIGRAM_SAMPLE = 1 << 26  # tokens read for the unigram baseline: seconds, not minutes, on a billion-token corpus
VALIDATION_KEYS = ("mlm_loss", "mlm_acc", "unigram_acc", "nsp_loss", "nsp_acc")  # logged as val_*


@dataclass
class Run:
    """What ``setup`` builds for a pretraining job besides the engine; the model never sees it."""

    cfg: Any
    cfg_dict: dict
    ds: Engine
    loader: Any
    val_loader: Any
    info: Any
    model_kw: dict[str, Any]
    flops_per_token: float
    peak_tflops: float | None
    unigram_id: int  # the training split's most frequent maskable token: the validation baseline's answer
    last_rec: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def validate(ds: Engine, loader: Any, max_batches: int, unigram_id: int) -> dict[str, float]:
    """Validation MLM and NSP loss/accuracy summed over every rank's batches (static masks) and the unigram
    baseline at the same masked positions, through the one evaluation pass."""

    def agree(limit: int) -> int:  # ranks may hold different numbers of validation batches: run the fewest
        return int(D.all_reduce(torch.tensor([limit], device=ds.device), dist.ReduceOp.MIN).item())

    sums = evaluation_pass(ds.model_engine, loader, ds.device, pretraining_scores(unigram_id), PRETRAINING_SUMS,
                           min(max_batches, len(loader)), reduce=D.all_reduce, agree=agree)  # fmt: skip
    res = pretraining_metrics(sums)
    return {f"val_{k}": res[k] for k in VALIDATION_KEYS if k in res}


def choose_micro_batch(cfg: Config, model: torch.nn.Module, env: Any, device: torch.device) -> None:
    """``trainer.micro_batch_size=auto``: probe (pretrain/training/batch_probe.py), agree on the smallest answer across
    ranks, set it and say what was chosen and why."""
    from pretrain.training.batch_probe import memory_cap, probe

    t = cfg.trainer
    found = probe(model.to(device), cfg, env.world_size, device, memory_cap(cfg, device, D.local_world_size()))
    agreed = D.all_reduce(torch.tensor([found.micro_batch_size], device=device), dist.ReduceOp.MIN)
    t.micro_batch_size = found.micro_batch_size = int(agreed.item())
    if env.is_main:
        accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
        print(found.describe(t.max_seq_length, accum, t.global_batch_size, env.world_size), flush=True)


def setup(cfg: Config, env: Any, stop: StopFlag) -> Run:
    """Pre-flight checks, process group, model, data, the engine (resumed), the log."""
    t = cfg.trainer
    threads = D.set_threads()
    auto_batch = t.micro_batch_size == "auto"
    if auto_batch:
        t.micro_batch_size = 1  # for the checks below; probed once the model is on its device

    def architecture(model: dict[str, Any], info: Any) -> list[str]:  # a Hugging Face directory brings its own
        return continue_from(t.init_from, model, cfg.data.dir, info.manifest.lowercase) if t.init_from else []

    info, model_kw = preflight(cfg, env.world_size, architecture)  # fails before any work
    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    run_dir = Path(cfg.run_dir).resolve()
    tag = resume_tag(cfg.resume, run_dir / "checkpoints", t.verify_checkpoint)
    if t.deterministic:  # cuBLAS needs a fixed workspace for reproducible GEMMs; read at its first use, after this
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)  # same initial weights everywhere
    model = pretraining_model(model_kw, t.init_from if tag is None else None, t.verify_checkpoint)
    model.checkpoint_layers = t.activation_checkpointing
    if auto_batch:
        choose_micro_batch(cfg, model, env, device)
    torch.manual_seed(cfg.seed + env.rank)  # per-rank dropout streams
    loader, sampler, val_loader = run_loaders(cfg.data, t.micro_batch_size, cfg.seed, env.rank, env.world_size,
                                              info.has_validation)  # fmt: skip
    unigram_id = most_frequent_token(cfg.data.dir, "train", max_tokens=UNIGRAM_SAMPLE) if val_loader else -1
    cfg_dict = dataclasses.asdict(cfg)  # the resolved config, in every checkpoint and the W&B run
    cfg_dict["model"] = dict(model_kw)  # the model as built: vocab_size filled in, a continued directory's shape
    logger = MetricsLogger(cfg.logger, cfg.run_name, run_dir, env.is_main, cfg_dict, pair=cfg.data.pair_task)
    ds = start(EngineConfig.of(cfg), env, model, device, tag, sampler, stop, logger)
    if tag is None and t.init_from and env.is_main:
        print(f"phase {t.phase}: weights from {t.init_from}; optimizer, schedule and step start afresh", flush=True)
    flops, peak = model.flops_per_token(t.max_seq_length), peak_tflops(t.peak_tflops, device)
    if env.is_main:
        print_startup(cfg, model.config, model.num_parameters(), info, env, device, threads,
                      ds.zero_stage, ds.opt_desc, ds.accum, ds.state.step, run_dir)  # fmt: skip
    return Run(cfg=cfg, cfg_dict=cfg_dict, ds=ds, loader=loader, val_loader=val_loader, info=info, model_kw=model_kw,
               flops_per_token=flops, peak_tflops=peak, unigram_id=unigram_id)  # fmt: skip


def log_spike(run: Run, step: int, loss: float, mean: float, batches: Batches) -> None:
    """Every rank's sample indices of this step (global indices into the split: ``data_prep.inspect``)."""
    samples = sorted(i for ids in D.gather(batches.samples(run.cfg.trainer.micro_batch_size)) for i in ids)
    rec = {"kind": "spike", "step": step, "loss": loss, "running_mean": mean, "epoch": run.ds.state.epoch}
    run.ds.logger.log({**rec, "samples": samples})
    if run.ds.main:
        more = " ..." if len(samples) > 8 else ""
        print(
            f"loss spike at step {step}: {loss:.4f} vs running mean {mean:.4f}; samples {samples[:8]}{more} "
            "(all in metrics.jsonl)",
            flush=True,
        )


def watch_spikes(run: Run, step_loss: float, batches: Batches) -> None:
    """``trainer.loss_spike_factor``: a step loss that many times the running mean is logged with its samples
    (and kept out of the mean)."""
    t, history = run.cfg.trainer, run.ds.loop.history
    mean = spike_mean(history)
    if t.loss_spike_factor and len(history) >= 10 and step_loss > t.loss_spike_factor * mean:
        log_spike(run, run.ds.state.step, step_loss, mean, batches)
    else:
        history.append(step_loss)


def log_window(run: Run, result: StepResult) -> None:
    """Close the log window: one ``train`` record (metrics.jsonl, W&B, the bar or a plain line)."""
    ds = run.ds
    rec = ds.close_window()
    if rec is None:  # a window of skipped steps only has no loss to report
        return
    rec.update(
        nsp_loss=rec.get("nsp_loss") if run.info.nsp and run.model_kw.get("nsp", True) else None,
        grad_norm=ds.grad_norm(result),
        mfu=mfu(run.flops_per_token, rec["tokens_per_s"], run.peak_tflops, ds.env.world_size),
        memory_gb=memory_gb(ds.device),
        tokens=ds.state.tokens,
    )
    ds.logger.log(rec)
    run.last_rec = rec


def export(run: Run) -> Path:
    """The finished run's fp32 weights as a Hugging Face directory ``RUN_DIR/hf`` with the tokenizer files of
    its data. Rank 0 writes; all ranks wait."""
    ds, out = run.ds, run.ds.run_dir / "hf"
    if ds.main:
        model = ds.fp32_model(lambda: build(run.model_kw), ds.loop.last_ckpt or ds.resume_tag)
        export_hf(model, run.cfg.data.dir, out)
    D.barrier()
    return out


def summarize(run: Run, hf_dir: Path | None, t_loop: float) -> dict[str, Any]:
    t, ds = run.cfg.trainer, run.ds
    state, loop = ds.state, ds.loop
    loop_s = max(time.time() - t_loop, 1e-9)
    return {
        "run_name": run.cfg.run_name,
        "pair_task": run.cfg.data.pair_task,
        "status": loop.status,
        "step": state.step,
        "max_steps": t.max_steps,
        "sequences": state.sequences,
        "tokens": state.tokens,
        "seconds": time.time() - loop.t_start,
        "sequences_per_s": loop.job_steps * t.global_batch_size / loop_s,
        "tokens_per_s": loop.job_tokens / loop_s,
        "mfu": run.last_rec.get("mfu"),
        "train_loss": run.last_rec.get("loss"),
        "optimizer": ds.opt_desc,
        "zero_stage": ds.zero_stage,
        "precision": t.precision,
        "world_size": ds.env.world_size,
        "run_dir": str(ds.run_dir),
        "checkpoint": str(loop.last_ckpt) if loop.last_ckpt else None,
        "hf_dir": str(hf_dir) if hf_dir else None,
        "wandb_dir": ds.logger.wandb.dir if ds.logger.wandb is not None else None,
        "wandb_mode": ds.logger.wandb_mode,
        **run.last_val,
    }


def finished_before(cfg: Any, env: Any) -> bool:
    """The same command again after the run finished: say what it left (no process group, no new W&B run)."""
    done = (
        finished(Path(cfg.run_dir), cfg.trainer.max_steps, cfg.trainer.verify_checkpoint)
        if cfg.resume == "auto"
        else None
    )
    exported = (Path(cfg.run_dir) / "hf" / "model.safetensors").is_file()  # else the resume exports it
    step = checkpoint_step(done) if done is not None else -1
    if step < cfg.trainer.max_steps or not exported:
        return False
    if env.is_main:
        print_complete(Path(cfg.run_dir).resolve(), done, step, cfg.trainer.max_steps, cfg.data.pair_task)
    return True


def train(cfg: Config) -> int:
    """Run (or resume) a pretraining job from the typed config (``OmegaConf.to_object`` of the composed Hydra
    config); return the process exit code."""
    t = cfg.trainer
    stop = StopFlag()  # first: a SLURM signal during start-up must not kill the job
    env = D.detect_env()
    if finished_before(cfg, env):
        return 0
    run = setup(cfg, env, stop)  # resumes from the newest complete checkpoint
    ds = run.ds
    state, loop = ds.state, ds.loop
    batches = Batches(run.loader, ds.position, ds.device)
    t_loop = time.time()
    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        batches.positions.clear()
        result = ds.step(batches, measure_norm=log_now)
        stopped, step_loss = ds.book(result)
        if stopped:
            break
        if step_loss is not None:
            watch_spikes(run, step_loss, batches)
        if log_now:
            log_window(run, result)
        if run.val_loader is not None and (
            t.eval_every and state.step % t.eval_every == 0 or state.step == t.max_steps
        ):
            run.last_val = validate(ds, run.val_loader, t.eval_batches, run.unigram_id)
            ds.logger.log({"kind": "eval", "step": state.step, **run.last_val})
        due = bool(t.checkpoint_every and state.step % t.checkpoint_every == 0) or state.step == t.max_steps
        if ds.save_or_stop(due):
            break
    hf_dir = export(run) if state.step >= t.max_steps and loop.code == 0 else None
    summary = summarize(run, hf_dir, t_loop)
    ds.logger.close(summary)
    if ds.main:
        print_summary(summary)
    D.shutdown()
    return loop.code
