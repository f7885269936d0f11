"""The loop machinery that pretraining (``pretrain/training/trainer.py``) and fine-tuning
(``pretrain/finetune/loop.py``) both stand on, whatever the model, batches and evaluation: the DeepSpeed engine and
where it resumes from, the optimizer step with gradient accumulation, the agreed non-finite skip/stop, checkpoint
bundles (client state, data position, RNG) with retention, preemption (SIGUSR1/SIGTERM, the time limit) and the loss
window of the log. It knows no model: a forward returns ``loss`` and, where the model names them, its
``loss_parts``; a step is a typed ``StepResult``. It decides two exit codes (``pretrain.runtime.exits``):
``NONFINITE`` and ``PREEMPTED``.

Non-finite losses: the ranks agree on them once per step (one all-reduce, with the step's loss). A step with one
is skipped: DeepSpeed's own overflow check skips it under fp16, bf16 and ZeRO 1-2 (turned on for fp32 too); under
ZeRO-0 in fp32 (a plain client optimizer) its update is skipped here. Where neither holds (ZeRO-3 in bf16 or
fp32) the update may have been applied, so the run stops at once rather than save suspect weights.

Resumes (which bundle: ``pretrain.checkpoint.locate``, the one rule) are exact: the data position comes back from the
``position`` object's state, the RNG states of every rank are restored, so the weights match an uninterrupted run (bit
for bit on CPU). Another world size loads DeepSpeed's universal conversion of the bundle and keeps the data position in
samples.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data_prep.errors import UserError
from pretrain.checkpoint.bundle import (
    TrainState,
    client_state,
    complete_bundles,
    fp32_weights,
    restore,
    save,
    universal_tag,
)
from pretrain.checkpoint.locate import newest_good, resume_from
from pretrain.runtime import distributed as D
from pretrain.runtime import exits
from pretrain.runtime.deepspeed_env import import_deepspeed, release_shm_buffer
from pretrain.runtime.signals import StopFlag
from pretrain.training.config import EngineConfig
from pretrain.training.data import fork_rng, to_device
from pretrain.training.ds_config import build_ds_config
from pretrain.training.metrics import MetricsLogger
from pretrain.training.optim import build_optimizer, scheduler_factory

SPIKE_HISTORY = 100  # running mean of the last this-many step losses, for trainer.loss_spike_factor


class Position(Protocol):
    """Where a rank is in its data: saved in every checkpoint, restored on resume."""

    epoch: int

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resume_tag(resume: str, ckpt_root: Path, checksums: bool = True) -> Path | None:
    """The bundle ``resume`` names under the one rule (``pretrain.checkpoint.locate.resume_from``): rank 0
    decides, every rank gets its answer (or its one-line error)."""
    tag, error = None, None
    if D.rank() == 0:
        try:
            tag = resume_from(resume, ckpt_root, checksums)
        except UserError as e:
            error = str(e)
    tag, error = D.from_rank0((tag, error))
    if error is not None:
        raise UserError(error)
    return tag


def engine_config(
    cfg: EngineConfig, model: torch.nn.Module, world_size: int, cuda: bool
) -> tuple[Any, list, Any, dict, str]:
    """The optimizer, schedule and DeepSpeed config of ``model`` as training builds them: (client optimizer or
    None, param groups, the LR scheduler factory, the DeepSpeed JSON under the one precedence rule, a description
    of the optimizer)."""
    zero = cfg.deepspeed.zero_optimization
    client_opt, ds_opt, groups, opt_desc = build_optimizer(cfg.optim, zero, cfg.loop.precision, model, cuda)
    schedule = scheduler_factory(cfg.scheduler, cfg.loop.max_steps)
    ds_config = build_ds_config(cfg, world_size, ds_opt)  # repeated warnings are shown once
    if client_opt is not None and "optimizer" in ds_config:  # the raw JSON names one: it wins, as every value does
        client_opt, opt_desc = None, f"{ds_config['optimizer'].get('type')}: DeepSpeed, from deepspeed.config_file"
        warnings.warn(f"{cfg.deepspeed.config_file}: its optimizer section replaces optim.* ({opt_desc})", stacklevel=2)
    return client_opt, groups, schedule, ds_config, opt_desc


def _scalar(x: Any) -> float | None:
    return None if x is None else float(x.item() if torch.is_tensor(x) else x)


@dataclass
class StepResult:
    """One optimizer step on this rank, as ``Engine.step`` returns it. Tensors stay on the device (float64): read
    them only where a figure is needed, so a step costs no host sync beyond the agreed non-finite check."""

    loss: torch.Tensor  # this rank's loss, summed over its micro-batches
    parts: dict[str, torch.Tensor]  # the model's named loss parts (``loss_parts``), summed likewise
    tokens: torch.Tensor  # real tokens of the step's micro-batches (packed rows: every sample's)
    positions: torch.Tensor  # positions computed (rows x length, padding included)
    step_loss: torch.Tensor  # the loss summed over micro-batches and ranks
    grad_norm: torch.Tensor | None  # measured here, where DeepSpeed reports none (plain fp32) and it was asked for
    nonfinite: bool  # a rank saw a non-finite loss (agreed by all ranks)


class LogWindow:
    """What this rank adds up between two log lines, and the record it becomes.

    ``sums`` (the loss, each named loss part of the model, micro-batches) is the ``TrainState.window`` dict, saved
    in checkpoints so that a resumed window averages the same steps; tokens and time are for throughput only."""

    def __init__(self, sums: dict[str, float], parts: tuple[str, ...], device: torch.device) -> None:
        self.keys = ("loss", *parts, "micro")  # the same on every rank: the model declares its parts
        self.parts, self.sums, self.device = parts, sums, device
        for k in self.keys:
            sums.setdefault(k, 0.0)
        self.tokens = torch.zeros(1, dtype=torch.float64, device=device)
        self.t0, self.steps = time.time(), 0

    def add(self, result: StepResult, accum: int, applied: bool) -> None:
        """One optimizer step; the losses of a skipped step are left out."""
        self.steps += 1
        self.tokens += result.tokens
        if applied:
            self.sums["loss"] += float(result.loss)
            for k in self.parts:
                self.sums[k] += float(result.parts[k])
            self.sums["micro"] += accum

    def close(self, all_reduce: Any, global_batch: int) -> tuple[dict[str, Any], int]:
        """Reduce over ranks and start a new window: (partial record, real tokens). The record has the loss and
        ``<part>_loss`` for each part (None without an applied step), sequences/s and tokens/s of the window."""
        s = dict(zip(self.keys, all_reduce(torch.tensor([self.sums[k] for k in self.keys], dtype=torch.float64,
                                                       device=self.device)).tolist(), strict=True))  # fmt: skip
        tokens = all_reduce(self.tokens.clone()).item()
        dt = max(time.time() - self.t0, 1e-9)
        n = s["micro"]
        rec = {"loss": s["loss"] / n if n else None}
        rec.update({f"{k}_loss": s[k] / n if n else None for k in self.parts})
        rec.update(sequences_per_s=self.steps * global_batch / dt, tokens_per_s=tokens / dt)
        for k in self.keys:
            self.sums[k] = 0.0
        self.tokens.zero_()
        self.t0, self.steps = time.time(), 0
        return rec, int(tokens)


@dataclass
class LoopState:
    """What the loop carries from step to step besides the checkpointed ``TrainState``."""

    status: str = "finished"
    code: int = 0
    last_ckpt: Path | None = None
    job_steps: int = 0
    job_tokens: int = 0
    t_start: float = field(default_factory=time.time)
    history: deque[float] = field(default_factory=lambda: deque(maxlen=SPIKE_HISTORY))


@dataclass
class Engine:
    """A DeepSpeed engine and the loop machinery around it: built by ``start``, driven by a trainer's loop."""

    cfg: EngineConfig  # the run's sections the engine reads
    env: Any
    device: torch.device
    model_engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    position: Position
    opt_desc: str
    resume_tag: Path | None
    state: TrainState
    client: dict[str, Any]  # the client state the run resumed from ({} afresh): a trainer's own extra keys
    skip_nonfinite: bool  # a plain client optimizer (ZeRO-0, fp32): non-finite updates are skipped here
    own_norm: bool  # DeepSpeed reports no gradient norm (plain fp32): ``step`` measures it
    stop: StopFlag
    window: LogWindow  # the losses and tokens since the last log record (its sums are checkpointed)
    logger: MetricsLogger  # metrics.jsonl, W&B, the bar: opened by ``start`` at the step the run resumes from
    loop: LoopState = field(default_factory=LoopState)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir).resolve()

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def main(self) -> bool:
        return self.env.is_main

    @property
    def module(self) -> torch.nn.Module:
        """The model (or task model) the engine trains."""
        return self.model_engine.module

    @property
    def zero_stage(self) -> int:
        return int(self.model_engine.zero_optimization_stage())

    @property
    def accum(self) -> int:
        return self.model_engine.gradient_accumulation_steps()

    # ------------------------------------------------------------------------------------------- one step

    def step(self, next_batch: Any, measure_norm: bool = False) -> StepResult:
        """One optimizer step: ``accum`` micro-batches through ``engine.backward``/``engine.step`` (DeepSpeed
        scales the loss and steps the optimizer at the boundary). The model's output has ``loss`` and, where it
        names them (``loss_parts``), the parts it is made of; the ranks agree on a non-finite loss before the last
        ``engine.step()``, where a plain client optimizer's update is then skipped. The norm is measured here
        (``measure_norm``) only where DeepSpeed does not report one (plain fp32)."""
        engine, device, accum = self.model_engine, self.device, self.accum
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        loss, tokens, positions, grad_norm = zero(), zero(), zero(), None
        parts = {k: zero() for k in self.window.parts}
        bad = torch.zeros(2, dtype=torch.float64, device=device)  # non-finite micro-batches, summed losses
        nonfinite = False
        for micro in range(accum):
            batch = to_device(next_batch(), device)
            out = engine(**batch)
            engine.backward(out.loss)
            micro_loss = out.loss.detach().double()
            bad[0] += (~torch.isfinite(micro_loss)).double()
            if micro == accum - 1:
                bad[1] = loss + micro_loss
                nonfinite = bool(D.all_reduce(bad)[0].item() > 0)  # one agreed answer for every rank
                if measure_norm and self.own_norm and not nonfinite:  # averaged over ranks, not yet clipped
                    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                    grad_norm = torch.stack(norms).norm().double() if norms else zero()
            if micro == accum - 1 and nonfinite and self.skip_nonfinite:
                self._step_without_update()
            else:
                engine.step()
            loss += micro_loss
            for k, v in getattr(out, "loss_parts", {}).items():
                parts[k] += v.detach().double()
            mask = batch.get("attention_mask")  # packed rows number their samples: count real tokens
            tokens += (mask > 0).sum() if mask is not None else batch["input_ids"].numel()
            positions += batch["input_ids"].numel()
        return StepResult(loss, parts, tokens, positions, bad[1], grad_norm, nonfinite)

    def _step_without_update(self) -> None:
        """The plain client optimizer (ZeRO-0, fp32) has no overflow check: skip its update for this step only,
        leaving weights and moments untouched (DeepSpeed still clears the gradients and steps the schedule)."""
        engine = self.model_engine
        opt, own = engine.optimizer, vars(engine.optimizer).get("step")  # the LR scheduler may have wrapped it
        opt.step = lambda *args, **kwargs: None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
            engine.step()
        if own is None:
            del opt.step
        else:
            opt.step = own

    def book(self, result: StepResult) -> tuple[bool, float | None]:
        """Book a finished step: the counters, the log window, skipped steps and non-finite streaks. Returns
        (stop the run now, the step's loss averaged over micro-batches and ranks; None for a skipped step)."""
        state, t, engine, loop, nonfinite = self.state, self.cfg.loop, self.model_engine, self.loop, result.nonfinite
        state.step, state.epoch, loop.job_steps = state.step + 1, self.position.epoch, loop.job_steps + 1
        applied = engine.was_step_applied() and not nonfinite
        self.window.add(result, self.accum, applied=applied)
        if nonfinite and engine.was_step_applied() and not self.skip_nonfinite:
            why = "this ZeRO stage and precision cannot skip the update, so the weights after it are discarded"
            self.nonfinite_stop(why)
            return True, None
        if not applied:  # skipped: weights and optimizer state unchanged
            state.skipped += 1
            state.nonfinite_streak = state.nonfinite_streak + 1 if nonfinite else 0
            reason = "non-finite loss" if nonfinite else "fp16 overflow"
            self.logger.log({"kind": "skipped", "step": state.step, "skipped": state.skipped, "reason": reason,
                             "loss_scale": self.loss_scale()})  # fmt: skip
            if nonfinite and state.nonfinite_streak >= max(1, t.max_nonfinite_steps):
                self.nonfinite_stop(f"{state.nonfinite_streak} step(s) in a row (trainer.max_nonfinite_steps)")
                return True, None
        else:
            state.nonfinite_streak = 0
        state.sequences += t.global_batch_size
        self.logger.advance()
        return False, float(result.step_loss) / (self.accum * self.env.world_size) if applied else None

    def nonfinite_stop(self, why: str) -> None:
        """Stop on non-finite losses without saving; name the last good checkpoint (it verifies and was saved
        before the first non-finite step of the streak)."""
        step = self.state.step
        if self.main:
            first_bad = step - max(1, self.state.nonfinite_streak) + 1
            last = newest_good(complete_bundles(self.ckpt_root), quiet=True, before_step=first_bad)
            print(
                f"error: non-finite loss at step {step}: {why}; stopping without a checkpoint. The last good "
                f"checkpoint is {last or 'none (no checkpoint yet)'}: look at the data and learning rate, then "
                "rerun to resume from it",
                file=sys.stderr,
                flush=True,
            )
        self.loop.status, self.loop.code = f"stopped: non-finite loss at step {step}", exits.NONFINITE

    def close_window(self) -> dict[str, Any] | None:
        """Reduce the log window over ranks: the common part of a ``train`` record (None: only skipped steps)."""
        t, state = self.cfg.loop, self.state
        rec, tokens = self.window.close(D.all_reduce, t.global_batch_size)
        state.tokens += tokens
        self.loop.job_tokens += tokens
        if rec["loss"] is None:
            return None
        return {"kind": "train", "step": state.step, "epoch": state.epoch, **rec,
                "lr": self.scheduler.get_last_lr()[0], "loss_scale": self.loss_scale()}  # fmt: skip

    def loss_scale(self) -> float | None:
        return _scalar(getattr(self.model_engine.optimizer, "cur_scale", 1.0))

    def grad_norm(self, result: StepResult) -> float | None:
        return _scalar(result.grad_norm) if self.own_norm else _scalar(self.model_engine.get_global_grad_norm())

    # ------------------------------------------------------------------------------------- checkpoints

    def checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        """Save a bundle now: the engine's files and the client state (counters, every rank's data position and
        RNG, the resolved config, the W&B id, a trainer's ``extra`` keys)."""
        t = self.cfg.loop
        client = client_state(self.state, self.position, self.logger.config, self.logger.wandb_id, extra or {})
        self.loop.last_ckpt = save(self.model_engine, self.ckpt_root, client, t.keep_last)
        return self.loop.last_ckpt

    def save_or_stop(self, due: bool, extra: dict[str, Any] | None = None) -> bool:
        """Checkpoint when ``due``, on preemption (a signal, or the time limit on any rank) and at
        ``trainer.stop_at_step``. True: leave the loop (``loop.code`` 75 when preempted)."""
        t, state, loop = self.cfg.loop, self.state, self.loop
        over_time = t.max_time_minutes is not None and (time.time() - loop.t_start) / 60 > t.max_time_minutes
        preempted = self.stop.agreed(over_time, self.device)  # every rank takes the same decision
        stopping = t.stop_at_step is not None and t.stop_at_step <= state.step < t.max_steps
        if due or preempted or stopping:
            self.checkpoint(extra)
        if preempted:
            reason = self.stop.signal_name or ("time limit" if over_time else "signal on another rank")
            loop.status = f"preempted ({reason}) at step {state.step}: resume=auto continues"
            loop.code = exits.PREEMPTED
        elif stopping:
            loop.status = f"stopped at trainer.stop_at_step={state.step}: resume=auto continues"
        return bool(preempted or stopping)

    def fp32_state_dict(self, tag: Path | None) -> dict[str, torch.Tensor]:
        """The model's fp32 weights: the engine's module where it holds them whole (ZeRO-0 in fp32), else the
        master weights of checkpoint ``tag`` (bf16/fp16 modules, ZeRO-3's partitioned parameters)."""
        if self.zero_stage == 0 and self.cfg.loop.precision == "fp32":
            return self.model_engine.module.state_dict()
        return fp32_weights(tag)

    def fp32_model(self, build: Callable[[], torch.nn.Module], tag: Path | None) -> torch.nn.Module:
        """A fresh model from ``build`` holding ``fp32_state_dict(tag)``, every key accounted for (the tied MLM
        decoder aside), built with the RNG streams forked: a new model's initial draws must not move training's."""
        with fork_rng(self.device):
            model = build()
        missing, unexpected = model.load_state_dict(self.fp32_state_dict(tag), strict=False)
        missing = [k for k in missing if k not in getattr(model, "tied_aliases", ())]
        if missing or unexpected:
            raise RuntimeError(f"fp32 weights of {tag}: missing {missing[:3]} / unexpected {unexpected[:3]}")
        return model


def start(cfg: EngineConfig, env: Any, model: torch.nn.Module, device: torch.device, tag: Path | None,
          position: Position, stop: StopFlag, logger: MetricsLogger | None = None, record: bool = True,
          compile: bool | None = None) -> Engine:  # fmt: skip
    """The DeepSpeed engine of ``model`` (its optimizer, schedule, ZeRO stage and precision from ``cfg``), resumed
    from checkpoint ``tag`` when given (``resume_tag``): weights, optimizer, schedule, counters, data position
    and RNG. With ``record``, the run dir's ``ds_config.json`` records the DeepSpeed config actually used.
    ``compile``: ``engine.compile()`` (default: ``trainer.compile``). ``logger`` (none: nothing is logged) is
    opened at the step the run resumes from; the resolved config it holds goes into every checkpoint."""
    t = cfg.loop
    deepspeed = import_deepspeed(cfg.verbose)
    client_opt, groups, schedule, ds_config, opt_desc = engine_config(cfg, model, env.world_size, device.type == "cuda")
    if env.is_main and record:
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    stage = ds_config["zero_optimization"].get("stage", 0)
    load_tag = universal_tag(tag, stage, env.world_size, env.is_main) if tag is not None else None
    if load_tag is not None:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=groups,
                                                   lr_scheduler=schedule, config=ds_config)  # fmt: skip
    release_shm_buffer(env.rank)  # every rank is past init_distributed: the engine's set-up had collectives
    if t.compile if compile is None else compile:
        engine.compile()
    state, client = TrainState(), {}
    if tag is not None:
        state, client = restore(engine, tag, position, load_tag)
        if env.is_main:
            print(f"resumed from {tag} at step {state.step}", flush=True)
    logger = logger or MetricsLogger.disabled()
    logger.open(client.get("wandb_id"), state.step, t.max_steps)
    # Who skips a non-finite step: DeepSpeed's wrappers check for overflow (fp16 loss scaler, bf16 optimizer,
    # ZeRO 1-2, where fp32 has the check off: turn it on); a plain client optimizer (ZeRO-0, fp32) is skipped here.
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    return Engine(
        cfg=cfg,
        env=env,
        device=device,
        model_engine=engine,
        scheduler=scheduler,
        position=position,
        opt_desc=opt_desc,
        resume_tag=tag,
        state=state,
        client=client,
        skip_nonfinite=engine.optimizer is client_opt and client_opt is not None,
        own_norm=engine.zero_optimization_stage() == 0 and t.precision == "fp32",
        stop=stop,
        window=LogWindow(state.window, tuple(getattr(model, "loss_part_names", ())), device),
        logger=logger,
    )


def spike_mean(history: deque[float]) -> float:
    return float(np.mean(history)) if history else 0.0
