"""The training loop, top to bottom: ``train_step``, ``evaluate``, ``setup`` (checks, process group, model,
engine, data, resume), the bookkeeping of a step (``after_step``, ``log_window``, ``save_or_stop``) and
``train``, which reads: resume, loop (step, log, evaluate, save, stop on signal), export, summary. Checkpoint
bundles live in pretrain/checkpoint.py, metric windows and the log in pretrain/metrics.py.

Exit codes of ``train``: 0 finished (or stopped at ``trainer.stop_at_step``), 75 preempted (SIGUSR1/SIGTERM or
``trainer.max_time_minutes``; a checkpoint was saved, requeue with the same run dir and ``resume=auto``), 3 stopped
on non-finite losses (``trainer.max_nonfinite_steps`` in a row; nothing saved after the last good checkpoint).

Non-finite losses: the ranks agree on them once per step (one all-reduce, with the step's loss). A step with one
is skipped: DeepSpeed's own overflow check skips it under fp16, bf16 and ZeRO 1-2 (turned on for fp32 too); under
ZeRO-0 in fp32 (a plain client optimizer) its update is skipped here. Where neither holds (ZeRO-3 in bf16 or
fp32) the update may have been applied, so the run stops at once rather than save suspect weights.

Resumes (``resume=auto``: the newest complete checkpoint; incomplete ones alone stop the run) are exact: data
order and masks follow from the sampler position, and the Python/NumPy/torch/CUDA RNG states of every rank are
restored, so the loss curve and the weights match an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain import distributed as D
from pretrain.checkpoint import (
    TrainState,
    build_model,
    check_format,
    checkpoint_step,
    export,
    find_checkpoint,
    gather,
    restore,
    save,
    state_dict,
    tag_dir,
    universal_tag,
)
from pretrain.config import Config, UserError, build_ds_config, preflight
from pretrain.data import Batches, build_dataloader, fork_rng
from pretrain.deepspeed_env import import_deepspeed, release_shm_buffer
from pretrain.evaluation import most_frequent_token
from pretrain.masking import IGNORE_INDEX
from pretrain.metrics import (
    LogWindow,
    MetricsLogger,
    memory_gb,
    peak_tflops,
    print_complete,
    print_startup,
    print_summary,
)
from pretrain.optim import build_optimizer, scheduler_factory

NONFINITE_EXIT_CODE = 3
UNIGRAM_SAMPLE = 1 << 26  # tokens read for the unigram baseline: seconds, not minutes, on a billion-token corpus
SPIKE_HISTORY = 100  # running mean of the last this-many step losses, for trainer.loss_spike_factor


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    engine: Any,
    next_batch: Any,
    accum: int,
    device: torch.device,
    grad_norm: bool = False,
    skip_nonfinite: bool = False,
) -> tuple[torch.Tensor, bool]:
    """One optimizer step: ``accum`` micro-batches through ``engine.backward``/``engine.step`` (DeepSpeed scales
    the loss and steps the optimizer at the boundary). Returns float64 [loss, mlm, nsp, tokens, padded tokens,
    grad norm, step loss summed over ranks] and whether any rank saw a non-finite loss (agreed before the last
    ``engine.step()``, where ``skip_nonfinite`` then skips the client optimizer's update). The norm
    is measured here (``grad_norm``) only where DeepSpeed does not report one (plain fp32)."""
    stats = torch.zeros(7, dtype=torch.float64, device=device)
    bad = torch.zeros(2, dtype=torch.float64, device=device)  # non-finite micro-batches, summed losses
    for micro in range(accum):
        batch = _to(next_batch(), device)
        out = engine(**batch)
        engine.backward(out.loss)
        loss = out.loss.detach().double()
        bad[0] += (~torch.isfinite(loss)).double()
        if micro == accum - 1:
            bad[1] = stats[0] + loss
            nonfinite = bool(D.all_reduce(bad)[0].item() > 0)  # one agreed answer for every rank
            stats[6] = bad[1]
            if grad_norm and not nonfinite:  # gradients are averaged over ranks by now, not yet clipped
                norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                stats[5] = torch.stack(norms).norm().double() if norms else 0.0
        if micro == accum - 1 and nonfinite and skip_nonfinite:
            # The plain client optimizer (ZeRO-0, fp32) has no overflow check: skip its update for this step only,
            # leaving weights and moments untouched (DeepSpeed still clears the gradients and steps the schedule).
            opt, own = engine.optimizer, vars(engine.optimizer).get("step")  # the LR scheduler may have wrapped it
            opt.step = lambda *args, **kwargs: None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
                engine.step()
            if own is None:
                del opt.step
            else:
                opt.step = own
        else:
            engine.step()
        stats[0] += loss
        stats[1] += out.mlm_loss.detach().double()
        if out.nsp_loss is not None:
            stats[2] += out.nsp_loss.detach().double()
        stats[3] += (batch["attention_mask"] > 0).sum()  # packed rows number their samples: count real tokens
        stats[4] += batch["input_ids"].numel()
    return stats, nonfinite


@torch.no_grad()
def evaluate(engine: Any, loader: Any, max_batches: int, device: torch.device, unigram_id: int) -> dict[str, float]:
    """Validation MLM loss/accuracy and NSP loss/accuracy, summed over every rank's batches (static masks), and
    the unigram baseline: the accuracy of always answering ``unigram_id`` (the training split's most frequent
    token) at the same masked positions. All ranks run the same number of batches (ZeRO-3 gathers parameters
    collectively)."""
    n = torch.tensor([min(max_batches, len(loader))], device=device)
    n = int(D.all_reduce(n, dist.ReduceOp.MIN).item())
    s = torch.zeros(7, dtype=torch.float64, device=device)  # mlm loss, correct, count; nsp loss, correct, count; uni
    engine.eval()
    with fork_rng(device):
        for _, batch in zip(range(n), loader, strict=False):
            out = engine(**_to(batch, device))
            if out.mlm_logits is not None and out.num_masked:
                logits = out.mlm_logits.float()
                s[0] += F.cross_entropy(logits, out.mlm_labels, reduction="sum").double()
                s[1] += (logits.argmax(-1) == out.mlm_labels).sum()
                s[2] += out.num_masked
                s[6] += (out.mlm_labels == unigram_id).sum()
            if out.nsp_logits is not None and "next_sentence_label" in batch:
                label = batch["next_sentence_label"].to(device)
                s[3] += F.cross_entropy(out.nsp_logits.float(), label, reduction="sum").double()
                valid = label != IGNORE_INDEX  # SOP: NotNext rows carry no pair label
                s[4] += ((out.nsp_logits.argmax(-1) == label) & valid).sum()
                s[5] += valid.sum()
    engine.train()
    s = D.all_reduce(s).tolist()
    res = {"val_mlm_loss": s[0] / s[2], "val_mlm_acc": s[1] / s[2], "val_unigram_acc": s[6] / s[2]} if s[2] else {}
    if s[5]:
        res.update(val_nsp_loss=s[3] / s[5], val_nsp_acc=s[4] / s[5])
    return res


def nonfinite_stop(step: int, why: str, ckpt_root: Path, main: bool) -> tuple[str, int]:
    """Stop on non-finite losses without saving: the last complete checkpoint is the last good state."""
    last = find_checkpoint(ckpt_root)
    msg = (
        f"non-finite loss at step {step}: {why}; stopping without a checkpoint. The last good checkpoint is "
        f"{last or 'none (no checkpoint yet)'}: look at the data and learning rate, then rerun to resume from it"
    )
    if main:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    return f"stopped: non-finite loss at step {step}", NONFINITE_EXIT_CODE


def _scalar(x: Any) -> float | None:
    return None if x is None else float(x.item() if torch.is_tensor(x) else x)


@dataclass
class Run:
    """Everything ``setup`` builds for a job; the trainer's functions read it, the model never sees it."""

    cfg: Any
    cfg_dict: dict
    env: Any
    device: torch.device
    run_dir: Path
    engine: Any
    scheduler: Any
    sampler: Any
    loader: Any
    val_loader: Any
    logger: MetricsLogger
    info: Any
    model_kw: dict[str, Any]
    opt_desc: str
    resume_tag: Path | None
    state: TrainState
    skip_nonfinite: bool  # a plain client optimizer (ZeRO-0, fp32): non-finite updates are skipped here
    own_norm: bool  # DeepSpeed reports no gradient norm (plain fp32): train_step measures it
    flops_per_token: float
    peak_tflops: float | None
    unigram_id: int  # the training split's most frequent maskable token: the validation baseline's answer

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def main(self) -> bool:
        return self.env.is_main


@dataclass
class LoopState:
    """What the loop carries from step to step besides the checkpointed ``TrainState``."""

    status: str = "finished"
    code: int = 0
    last_ckpt: Path | None = None
    last_rec: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    job_steps: int = 0
    job_tokens: int = 0
    t_start: float = field(default_factory=time.time)
    history: deque[float] = field(default_factory=lambda: deque(maxlen=SPIKE_HISTORY))


def engine_config(cfg: Config, model: torch.nn.Module, world_size: int, cuda: bool) -> tuple[Any, list, dict, str]:
    """The optimizer and DeepSpeed config of ``model`` as training builds them: (client optimizer or None, param
    groups, the DeepSpeed JSON under the one precedence rule, a description of the optimizer)."""
    client_opt, ds_opt, groups, opt_desc = build_optimizer(cfg, model, cuda)
    ds_config = build_ds_config(cfg, world_size, ds_opt)  # repeated warnings are shown once
    if client_opt is not None and "optimizer" in ds_config:  # the raw JSON names one: it wins, as every value does
        client_opt, opt_desc = None, f"{ds_config['optimizer'].get('type')}: DeepSpeed, from deepspeed.config_file"
        warnings.warn(f"{cfg.deepspeed.config_file}: its optimizer section replaces optim.* ({opt_desc})", stacklevel=2)
    return client_opt, groups, ds_config, opt_desc


def choose_micro_batch(cfg: Config, model: torch.nn.Module, env: Any, device: torch.device) -> None:
    """``trainer.micro_batch_size=auto``: probe (pretrain/batch_probe.py), agree on the smallest answer across
    ranks, set it and say what was chosen and why."""
    from pretrain.batch_probe import memory_cap, probe

    t = cfg.trainer
    found = probe(model.to(device), cfg, env.world_size, device, memory_cap(cfg, device, D.local_world_size()))
    agreed = D.all_reduce(torch.tensor([found.micro_batch_size], device=device), dist.ReduceOp.MIN)
    t.micro_batch_size = found.micro_batch_size = int(agreed.item())
    if env.is_main:
        accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
        print(found.describe(t.max_seq_length, accum, t.global_batch_size, env.world_size), flush=True)


def setup(cfg: Config, env: Any) -> Run:
    """Pre-flight checks, process group, model, optimizer, data, DeepSpeed engine, resume, logger."""
    t = cfg.trainer
    threads = D.set_threads()
    auto_batch = t.micro_batch_size == "auto"
    if auto_batch:
        t.micro_batch_size = 1  # for the checks below; probed once the model is on its device
    info, model_kw = preflight(cfg, env.world_size)  # fails before any work
    build_ds_config(cfg, env.world_size)  # a bad deepspeed.config_file fails here, before any work
    deepspeed = import_deepspeed(cfg.verbose)

    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    run_dir = Path(cfg.run_dir).resolve()
    ckpt_root = run_dir / "checkpoints"
    resume_tag = (
        None
        if cfg.resume == "none"
        else (find_checkpoint(ckpt_root) if cfg.resume == "auto" else tag_dir(cfg.resume, "resume"))
    )
    if resume_tag is not None:
        check_format(resume_tag)
    partial = sorted(p.name for p in ckpt_root.glob("step*")) if ckpt_root.is_dir() else []
    if cfg.resume == "auto" and resume_tag is None and partial:  # never silently start over a killed run
        raise UserError(
            f"{ckpt_root} holds checkpoints but none is complete ({', '.join(partial[-3:])}: killed "
            "while saving?); pass resume=none to start afresh, or restore a complete one"
        )
    if t.deterministic:  # cuBLAS needs a fixed workspace for reproducible GEMMs; read at its first use, after this
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)  # same initial weights everywhere
    model = build_model(model_kw, t.init_from if resume_tag is None else None)
    model.bert.encoder.checkpoint_layers = t.activation_checkpointing
    if auto_batch:
        choose_micro_batch(cfg, model, env, device)
    torch.manual_seed(cfg.seed + env.rank)  # per-rank dropout streams
    client_opt, groups, ds_config, opt_desc = engine_config(cfg, model, env.world_size, device.type == "cuda")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    masking = cfg.data.masking
    common = dict(rank=env.rank, world_size=env.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                  sentence_order=cfg.data.pair_task == "sop")  # fmt: skip
    try:
        loader, sampler = build_dataloader(
            cfg.data.dir,
            "train",
            t.micro_batch_size,
            masking=masking,
            bucket=cfg.data.bucket,
            pack=cfg.data.pack,
            **common,
        )
        val_loader = (
            build_dataloader(
                cfg.data.dir,
                "validation",
                t.micro_batch_size,
                masking=masking,
                shuffle=False,
                drop_last=False,
                **common,
            )[0]
            if info.has_validation
            else None
        )
    except ValueError as e:
        raise UserError(f"data.dir={cfg.data.dir}: {e}") from None
    stage = ds_config["zero_optimization"].get("stage", 0)
    load_tag = universal_tag(resume_tag, stage, env.world_size, env.is_main) if resume_tag is not None else None
    if load_tag is not None:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=client_opt,
        model_parameters=groups,
        lr_scheduler=scheduler_factory(cfg),
        config=ds_config,
    )
    release_shm_buffer(env.rank)  # every rank is past init_distributed: the engine's set-up had collectives
    if t.compile:
        engine.compile()
    state, wandb_id = TrainState(), None
    if resume_tag is not None:
        state, client = restore(engine, resume_tag, sampler, load_tag)
        wandb_id = client.get("wandb_id")
        if env.is_main:
            print(f"resumed from {resume_tag} at step {state.step}", flush=True)
    elif t.init_from and env.is_main:
        print(f"phase {t.phase}: weights from {t.init_from}; optimizer, schedule and step start afresh", flush=True)
    sampler.set_epoch(state.epoch)
    if env.is_main:
        print_startup(cfg, model.config, model.num_parameters(), info, env, device, threads, stage, opt_desc,
                      engine.gradient_accumulation_steps(), state.step, run_dir)  # fmt: skip
    # Who skips a non-finite step: DeepSpeed's wrappers check for overflow (fp16 loss scaler, bf16 optimizer,
    # ZeRO 1-2, where fp32 has the check off: turn it on); a plain client optimizer (ZeRO-0, fp32) is skipped here.
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    cfg_dict = dataclasses.asdict(cfg)  # the resolved config, in every checkpoint and the W&B run
    return Run(
        cfg=cfg,
        cfg_dict=cfg_dict,
        env=env,
        device=device,
        run_dir=run_dir,
        engine=engine,
        scheduler=scheduler,
        sampler=sampler,
        loader=loader,
        val_loader=val_loader,
        logger=MetricsLogger(cfg, run_dir, env.is_main, wandb_id, cfg_dict, state.step, t.max_steps),
        info=info,
        model_kw=model_kw,
        opt_desc=opt_desc,
        resume_tag=resume_tag,
        state=state,
        skip_nonfinite=engine.optimizer is client_opt and client_opt is not None,
        own_norm=engine.zero_optimization_stage() == 0 and t.precision == "fp32",
        flops_per_token=model.flops_per_token(t.max_seq_length),
        peak_tflops=peak_tflops(t.peak_tflops, device),
        unigram_id=most_frequent_token(cfg.data.dir, "train", max_tokens=UNIGRAM_SAMPLE) if val_loader else -1,
    )


def after_step(run: Run, loop: LoopState, stats: torch.Tensor, nonfinite: bool, batches: Batches) -> bool:
    """Book a finished step: skipped steps and non-finite streaks, loss spikes. True: stop the run now."""
    state, t, engine = run.state, run.cfg.trainer, run.engine
    if nonfinite and engine.was_step_applied() and not run.skip_nonfinite:
        why = "this ZeRO stage and precision cannot skip the update, so the weights after it are discarded"
        loop.status, loop.code = nonfinite_stop(state.step, why, run.ckpt_root, run.main)
        return True
    if nonfinite or not engine.was_step_applied():  # skipped: weights and optimizer state unchanged
        state.skipped += 1
        state.nonfinite_streak = state.nonfinite_streak + 1 if nonfinite else 0
        reason = "non-finite loss" if nonfinite else "fp16 overflow"
        scale = _scalar(getattr(engine.optimizer, "cur_scale", 1.0))
        run.logger.log(
            {"kind": "skipped", "step": state.step, "skipped": state.skipped, "reason": reason, "loss_scale": scale}
        )
        if nonfinite and state.nonfinite_streak >= max(1, t.max_nonfinite_steps):
            why = f"{state.nonfinite_streak} step(s) in a row (trainer.max_nonfinite_steps)"
            loop.status, loop.code = nonfinite_stop(state.step, why, run.ckpt_root, run.main)
            return True
        return False
    state.nonfinite_streak = 0
    step_loss = float(stats[6]) / (engine.gradient_accumulation_steps() * run.env.world_size)
    mean = float(np.mean(loop.history)) if loop.history else 0.0
    if t.loss_spike_factor and len(loop.history) >= 10 and step_loss > t.loss_spike_factor * mean:
        log_spike(run, state.step, step_loss, mean, batches)
    else:
        loop.history.append(step_loss)
    return False


def log_spike(run: Run, step: int, loss: float, mean: float, batches: Batches) -> None:
    """Every rank's sample indices of this step (global indices into the split: ``data_prep.inspect``)."""
    samples = sorted(i for ids in gather(batches.samples(run.cfg.trainer.micro_batch_size)) for i in ids)
    rec = {"kind": "spike", "step": step, "loss": loss, "running_mean": mean, "epoch": run.state.epoch}
    run.logger.log({**rec, "samples": samples})
    if run.main:
        more = " ..." if len(samples) > 8 else ""
        print(
            f"loss spike at step {step}: {loss:.4f} vs running mean {mean:.4f}; samples {samples[:8]}{more} "
            "(all in metrics.jsonl)",
            flush=True,
        )


def log_window(run: Run, loop: LoopState, window: LogWindow, stats: torch.Tensor) -> None:
    """Close the log window: one ``train`` record (metrics.jsonl, W&B, the bar or a plain line)."""
    state, t, engine = run.state, run.cfg.trainer, run.engine
    rec, tokens, _ = window.close(D.all_reduce, t.global_batch_size)
    state.tokens += tokens
    loop.job_tokens += tokens
    padded = rec.pop("padded_tokens_per_s")
    if rec["loss"] is None:  # a window of skipped steps only has no loss to report
        return
    peak = run.peak_tflops
    rec = {
        "kind": "train",
        "step": state.step,
        "epoch": state.epoch,
        **rec,
        "nsp_loss": rec["nsp_loss"] if run.info.nsp and run.model_kw.get("nsp", True) else None,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(stats[5]) if run.own_norm else _scalar(engine.get_global_grad_norm()),
        "loss_scale": _scalar(getattr(engine.optimizer, "cur_scale", 1.0)),
        "mfu": run.flops_per_token * padded / (peak * 1e12 * run.env.world_size) if peak else None,
        "memory_gb": memory_gb(run.device),
        "tokens": state.tokens,
    }
    run.logger.log(rec)
    loop.last_rec = rec


def summarize(run: Run, loop: LoopState, hf_dir: Path | None, t_loop: float) -> dict[str, Any]:
    t, state = run.cfg.trainer, run.state
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
        "mfu": loop.last_rec.get("mfu"),
        "train_loss": loop.last_rec.get("loss"),
        "optimizer": run.opt_desc,
        "zero_stage": run.engine.zero_optimization_stage(),
        "precision": t.precision,
        "world_size": run.env.world_size,
        "run_dir": str(run.run_dir),
        "checkpoint": str(loop.last_ckpt) if loop.last_ckpt else None,
        "hf_dir": str(hf_dir) if hf_dir else None,
        "wandb_dir": run.logger.wandb.dir if run.logger.wandb is not None else None,
        "wandb_mode": run.logger.wandb_mode,
        **loop.last_val,
    }


def finished_before(cfg: Any, env: Any) -> bool:
    """The same command again after the run finished: say what it left (no process group, no new W&B run)."""
    done = find_checkpoint(Path(cfg.run_dir) / "checkpoints") if cfg.resume == "auto" else None
    exported = (Path(cfg.run_dir) / "hf" / "model.safetensors").is_file()  # else the resume exports it
    step = checkpoint_step(done) if done is not None else -1
    if step < cfg.trainer.max_steps or not exported:
        return False
    if env.is_main:
        print_complete(Path(cfg.run_dir).resolve(), done, step, cfg.trainer.max_steps, cfg.data.pair_task)
    return True


def save_or_stop(run: Run, loop: LoopState, stop: D.StopFlag) -> bool:
    """Checkpoint when due, on preemption (a signal, or the time limit on any rank) and at ``stop_at_step``.
    True: leave the loop."""
    t, state = run.cfg.trainer, run.state
    over_time = t.max_time_minutes is not None and (time.time() - loop.t_start) / 60 > t.max_time_minutes
    preempted = stop.agreed(over_time, run.device)  # every rank takes the same decision
    stopping = t.stop_at_step is not None and t.stop_at_step <= state.step < t.max_steps
    due = t.checkpoint_every and state.step % t.checkpoint_every == 0 or state.step == t.max_steps
    if due or preempted or stopping:
        client = state_dict(state, run.sampler, run.cfg_dict, run.logger.wandb_id)
        loop.last_ckpt = save(run.engine, run.ckpt_root, client, t.keep_last)
    if preempted:
        reason = stop.signal_name or ("time limit" if over_time else "signal on another rank")
        loop.status = f"preempted ({reason}) at step {state.step}: resume=auto continues"
        loop.code = D.PREEMPTED_EXIT_CODE
    elif stopping:
        loop.status = f"stopped at trainer.stop_at_step={state.step}: resume=auto continues"
    return bool(preempted or stopping)


def train(cfg: Config) -> int:
    """Run (or resume) a pretraining job from the typed config (``OmegaConf.to_object`` of the composed Hydra
    config); return the process exit code."""
    t, loop = cfg.trainer, LoopState()
    stop = D.StopFlag()  # first: a SLURM signal during start-up must not kill the job
    env = D.detect_env()
    if finished_before(cfg, env):
        return 0
    run = setup(cfg, env)  # resumes from the newest complete checkpoint
    state, engine, accum = run.state, run.engine, run.engine.gradient_accumulation_steps()
    batches, window = Batches(run.loader, run.sampler, run.device), LogWindow(state.window, run.device)
    t_loop = time.time()
    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        batches.positions.clear()
        stats, nonfinite = train_step(engine, batches, accum, run.device, log_now and run.own_norm, run.skip_nonfinite)
        state.step, state.epoch, loop.job_steps = state.step + 1, run.sampler.epoch, loop.job_steps + 1
        window.add(stats, accum, applied=engine.was_step_applied() and not nonfinite)
        if after_step(run, loop, stats, nonfinite, batches):
            break
        state.sequences += t.global_batch_size
        run.logger.advance()
        if log_now:
            log_window(run, loop, window, stats)
        if run.val_loader is not None and (
            t.eval_every and state.step % t.eval_every == 0 or state.step == t.max_steps
        ):
            loop.last_val = evaluate(engine, run.val_loader, t.eval_batches, run.device, run.unigram_id)
            run.logger.log({"kind": "eval", "step": state.step, **loop.last_val})
        if save_or_stop(run, loop, stop):
            break
    hf_dir = None
    if state.step >= t.max_steps and loop.code == 0:
        fp32_module = engine.zero_optimization_stage() == 0 and t.precision == "fp32"
        tag = loop.last_ckpt or run.resume_tag
        hf_dir = export(engine, run.model_kw, tag, cfg.data.dir, run.run_dir / "hf", fp32_module)
    summary = summarize(run, loop, hf_dir, t_loop)
    run.logger.close(summary)
    if run.main:
        print_summary(summary)
    D.shutdown()
    return loop.code
