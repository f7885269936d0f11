"""The training loop, top to bottom: set-up, ``train_step``, ``evaluate``, ``train``; checkpoints live in
pretrain/checkpoint.py.

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

import json
import os
import random
import sys
import time
import warnings
from collections import deque
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain import distributed as D
from pretrain.checkpoint import (
    TrainState,
    checkpoint_step,
    find_checkpoint,
    fp32_weights,
    gather,
    restore,
    save,
    state_dict,
    tag_dir,
    universal_tag,
    weights_from,
)
from pretrain.config import UserError, build_ds_config, preflight
from pretrain.metrics import MetricsLogger, memory_gb, peak_tflops, print_summary
from pretrain.optim import build_optimizer, scheduler_factory

NONFINITE_EXIT_CODE = 3
SPIKE_HISTORY = 100  # running mean of the last this-many step losses, for trainer.loss_spike_factor


def _fork_rng(device: torch.device):
    """Loader iterators draw a base seed from the global RNG and eval runs outside the training stream: keep
    both from shifting the dropout RNG, or a resumed run would diverge from an uninterrupted one."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def build_model(model_kw: dict[str, Any], init_from: str | None):
    from pretrain.model import BertConfig, BertForPreTraining

    known = {f.name for f in fields(BertConfig)}
    unknown = sorted(set(model_kw) - known)
    if unknown:
        raise UserError(f"model.{unknown[0]}: unknown field; BertConfig takes {', '.join(sorted(known))}")
    try:
        model = BertForPreTraining(BertConfig(**model_kw))
    except ValueError as e:
        raise UserError(str(e)) from None
    if init_from:
        sd = weights_from(init_from)
        ours = model.state_dict()
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
        missing = [k for k in missing if not k.startswith("cls.predictions.decoder")]
        if missing:
            print(f"init_from: {len(missing)} tensors not in {init_from}, freshly initialised: {missing[:4]}")
    return model


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
        stats[3] += batch["attention_mask"].sum()
        stats[4] += batch["input_ids"].numel()
    return stats, nonfinite


@torch.no_grad()
def evaluate(engine: Any, loader: Any, max_batches: int, device: torch.device) -> dict[str, float]:
    """Validation MLM loss/accuracy and NSP loss/accuracy, summed over every rank's batches (static masks).
    All ranks run the same number of batches (ZeRO-3 gathers parameters collectively)."""
    n = torch.tensor([min(max_batches, len(loader))], device=device)
    n = int(D.all_reduce(n, dist.ReduceOp.MIN).item())
    s = torch.zeros(6, dtype=torch.float64, device=device)  # mlm loss, correct, count; nsp loss, correct, count
    engine.eval()
    with _fork_rng(device):
        for _, batch in zip(range(n), loader, strict=False):
            out = engine(**_to(batch, device))
            if out.mlm_logits is not None and out.num_masked:
                logits = out.mlm_logits.float()
                s[0] += F.cross_entropy(logits, out.mlm_labels, reduction="sum").double()
                s[1] += (logits.argmax(-1) == out.mlm_labels).sum()
                s[2] += out.num_masked
            if out.nsp_logits is not None and "next_sentence_label" in batch:
                label = batch["next_sentence_label"].to(device)
                s[3] += F.cross_entropy(out.nsp_logits.float(), label, reduction="sum").double()
                s[4] += (out.nsp_logits.argmax(-1) == label).sum()
                s[5] += label.numel()
    engine.train()
    s = D.all_reduce(s).tolist()
    res = {"val_mlm_loss": s[0] / s[2], "val_mlm_acc": s[1] / s[2]} if s[2] else {}
    if s[5]:
        res.update(val_nsp_loss=s[3] / s[5], val_nsp_acc=s[4] / s[5])
    return res


def print_complete(run_dir: Path, tag: Path, max_steps: int) -> None:
    """What a finished run left, for a rerun of its command (no process group, no new W&B run)."""
    records = (
        [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "metrics.jsonl").is_file()
        else []
    )
    val = next((r for r in reversed(records) if r.get("kind") == "eval"), {})
    loss = next((r["loss"] for r in reversed(records) if r.get("kind") == "train"), None)

    def f(key: str, spec: str) -> str:
        return "n/a" if val.get(key) is None else format(val[key], spec)

    hf = run_dir / "hf"
    print(
        f"run {run_dir} is complete at step {checkpoint_step(tag)}/{max_steps}: checkpoint {tag}, HF export "
        f"{hf}; final train loss "
        f"{'n/a' if loss is None else format(loss, '.4f')}, val MLM acc {f('val_mlm_acc', '.2%')}, val NSP acc "
        f"{f('val_nsp_acc', '.2%')}. Nothing to do: raise trainer.max_steps to train on, or use another run_dir",
        flush=True,
    )


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


def train(cfg: Any, cfg_dict: dict) -> int:
    """Run (or resume) a pretraining job from a composed Hydra config; return the process exit code."""
    t, t_start = cfg.trainer, time.time()
    stop = D.StopFlag()  # first: a SLURM signal during start-up must not kill the job
    env = D.detect_env()
    done = find_checkpoint(Path(cfg.run_dir) / "checkpoints") if cfg.resume == "auto" else None
    exported = (Path(cfg.run_dir) / "hf" / "model.safetensors").is_file()  # else the resume below exports it
    if done is not None and checkpoint_step(done) >= t.max_steps and exported:  # the same command again
        if env.is_main:
            print_complete(Path(cfg.run_dir).resolve(), done, t.max_steps)
        return 0
    threads = D.set_threads()
    info, model_kw = preflight(cfg, env.world_size)  # fails before any work
    ds_config = build_ds_config(cfg, env.world_size)
    import deepspeed

    from pretrain.data import build_dataloader
    from pretrain.masking import MaskingConfig
    from pretrain.model import export_hf

    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes)
    run_dir = Path(cfg.run_dir).resolve()
    main, ckpt_root = env.is_main, run_dir / "checkpoints"
    resume_tag = (
        None
        if cfg.resume == "none"
        else (find_checkpoint(ckpt_root) if cfg.resume == "auto" else tag_dir(cfg.resume, "resume"))
    )
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
    torch.manual_seed(cfg.seed + env.rank)  # per-rank dropout streams
    client_opt, ds_opt, groups, opt_desc = build_optimizer(cfg, model, device.type == "cuda")
    if ds_opt is not None:
        ds_config["optimizer"] = ds_opt
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        print(
            f"run dir: {run_dir}\noptimizer: {opt_desc}\nmodel: {model.num_parameters():,} parameters, "
            f"vocab {model_kw['vocab_size']}, {env.world_size} rank(s) via {env.launcher}, "
            f"ZeRO {ds_config['zero_optimization'].get('stage', 0)}, {t.precision}\nthreads per rank: {threads}",
            flush=True,
        )
    masking = MaskingConfig(**cfg_dict["data"]["masking"])
    common = dict(rank=env.rank, world_size=env.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers)
    try:
        loader, sampler = build_dataloader(
            cfg.data.dir,
            "train",
            t.micro_batch_size,
            masking=masking,
            bucket=cfg.data.bucket,
            shuffle=True,
            drop_last=True,
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
    load_tag = universal_tag(resume_tag, stage, env.world_size, main) if resume_tag is not None else None
    if load_tag is not None:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=client_opt,
        model_parameters=groups,
        lr_scheduler=scheduler_factory(cfg),
        config=ds_config,
    )
    accum = engine.gradient_accumulation_steps()
    state, wandb_id = TrainState(), None
    if resume_tag is not None:
        state, client = restore(engine, resume_tag, sampler, load_tag)
        wandb_id = client.get("wandb_id")
        if main:
            print(f"resumed from {resume_tag} at step {state.step}", flush=True)
    elif t.init_from and main:
        print(f"phase {t.phase}: weights from {t.init_from}; optimizer, schedule and step start afresh", flush=True)
    sampler.set_epoch(state.epoch)
    logger = MetricsLogger(cfg, run_dir, main, wandb_id, cfg_dict, state.step, t.max_steps)
    flops = model.flops_per_token(t.max_seq_length)
    peak = peak_tflops(t.peak_tflops, device)

    def new_iter():
        with _fork_rng(device):
            return iter(loader)

    it = [new_iter()]
    positions: list[tuple[int, int]] = []  # (epoch, micro-batch) of this step's batches on this rank

    def next_batch() -> dict[str, torch.Tensor]:
        try:
            batch = next(it[0])
        except StopIteration:  # epoch boundary: the sampler reshuffles with the new epoch
            sampler.set_epoch(sampler.epoch + 1)
            it[0] = new_iter()
            batch = next(it[0])
        sampler.advance(1)  # consumed micro-batches: the checkpointed position (the loader prefetches ahead)
        state.epoch = sampler.epoch
        positions.append((sampler.epoch, sampler.batches_consumed - 1))  # which samples: for the spike log
        return batch

    w = state.window
    own_norm = engine.zero_optimization_stage() == 0 and t.precision == "fp32"
    last_rec: dict[str, Any] = {}
    window_stats = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, padded tokens (timing only)
    t_window, steps_window, job_steps, job_tokens = time.time(), 0, 0, 0
    t_loop = t_window
    last_val: dict[str, float] = {}
    status, code, last_ckpt = "finished", 0, None
    # Who skips a non-finite step: DeepSpeed's wrappers check for overflow (fp16 loss scaler, bf16 optimizer,
    # ZeRO 1-2, where fp32 has the check off: turn it on); a plain client optimizer (ZeRO-0, fp32) is skipped here.
    skip_nonfinite = engine.optimizer is client_opt and client_opt is not None
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    history: deque[float] = deque(maxlen=SPIKE_HISTORY)

    def log_spike(step: int, loss: float, mean: float) -> None:
        """Every rank's sample indices of this step (global indices into the split: ``data_prep.inspect``)."""
        b = t.micro_batch_size
        mine = [i for e, k in positions for i in sampler.rank_order(e)[k * b : (k + 1) * b].tolist()]
        samples = sorted(i for ids in gather(mine) for i in ids)
        logger.log(
            {
                "kind": "spike",
                "step": step,
                "loss": loss,
                "running_mean": mean,
                "epoch": state.epoch,
                "samples": samples,
            }
        )
        if main:
            print(
                f"loss spike at step {step}: {loss:.4f} vs running mean {mean:.4f}; samples {samples[:8]}"
                f"{' ...' if len(samples) > 8 else ''} (all in metrics.jsonl)",
                flush=True,
            )

    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        positions.clear()
        stats, nonfinite = train_step(engine, next_batch, accum, device, log_now and own_norm, skip_nonfinite)
        state.step += 1
        job_steps += 1
        steps_window += 1
        window_stats += stats[3:5]
        if nonfinite and engine.was_step_applied() and not skip_nonfinite:
            status, code = nonfinite_stop(
                state.step,
                "this ZeRO stage and precision cannot skip the update, so the weights after it are discarded",
                ckpt_root,
                main,
            )
            break
        if nonfinite or not engine.was_step_applied():  # skipped: weights and optimizer state unchanged
            state.skipped += 1
            state.nonfinite_streak = state.nonfinite_streak + 1 if nonfinite else 0
            logger.log(
                {
                    "kind": "skipped",
                    "step": state.step,
                    "skipped": state.skipped,
                    "reason": "non-finite loss" if nonfinite else "fp16 overflow",
                    "loss_scale": _scalar(getattr(engine.optimizer, "cur_scale", 1.0)),
                }
            )
            if nonfinite and state.nonfinite_streak >= max(1, t.max_nonfinite_steps):
                status, code = nonfinite_stop(
                    state.step,
                    f"{state.nonfinite_streak} step(s) in a row (trainer.max_nonfinite_steps)",
                    ckpt_root,
                    main,
                )
                break
        else:
            state.nonfinite_streak = 0
            for i, k in enumerate(("loss", "mlm", "nsp")):
                w[k] += float(stats[i])
            w["micro"] += accum
            step_loss = float(stats[6]) / (accum * env.world_size)
            if t.loss_spike_factor and len(history) >= 10 and step_loss > t.loss_spike_factor * np.mean(history):
                log_spike(state.step, step_loss, float(np.mean(history)))
            else:
                history.append(step_loss)
        state.sequences += t.global_batch_size
        logger.advance()
        if log_now:
            sums = D.all_reduce(
                torch.tensor([w["loss"], w["mlm"], w["nsp"], w["micro"]], dtype=torch.float64, device=device)
            ).tolist()
            toks = D.all_reduce(window_stats.clone()).tolist()
            state.tokens += int(toks[0])
            job_tokens += int(toks[0])
            dt = max(time.time() - t_window, 1e-9)
            rec = {
                "kind": "train",
                "step": state.step,
                "epoch": state.epoch,
                "loss": sums[0] / max(sums[3], 1),
                "mlm_loss": sums[1] / max(sums[3], 1),
                "nsp_loss": sums[2] / max(sums[3], 1) if info.nsp and model.config.nsp else None,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(stats[5]) if own_norm else _scalar(engine.get_global_grad_norm()),
                "loss_scale": _scalar(getattr(engine.optimizer, "cur_scale", 1.0)),
                "sequences_per_s": steps_window * t.global_batch_size / dt,
                "tokens_per_s": toks[0] / dt,
                "mfu": flops * toks[1] / dt / (peak * 1e12 * env.world_size) if peak else None,
                "memory_gb": memory_gb(device),
                "tokens": state.tokens,
            }
            if sums[3]:  # a window of skipped steps only has no loss to report
                logger.log(rec)
                last_rec = rec
            state.window = w = {k: 0.0 for k in w}
            window_stats.zero_()
            t_window, steps_window = time.time(), 0
        if val_loader is not None and (t.eval_every and state.step % t.eval_every == 0 or state.step == t.max_steps):
            last_val = evaluate(engine, val_loader, t.eval_batches, device)
            logger.log({"kind": "eval", "step": state.step, **last_val})
        over_time = t.max_time_minutes is not None and (time.time() - t_start) / 60 > t.max_time_minutes
        preempted = stop.agreed(over_time, device)
        stopping = t.stop_at_step is not None and state.step >= t.stop_at_step and state.step < t.max_steps
        if (
            (t.checkpoint_every and state.step % t.checkpoint_every == 0)
            or state.step == t.max_steps
            or preempted
            or stopping
        ):
            last_ckpt = save(engine, ckpt_root, state_dict(state, sampler, cfg_dict, logger.wandb_id), t.keep_last)
        if preempted:
            reason = stop.signal_name or ("time limit" if over_time else "signal on another rank")
            status, code = f"preempted ({reason}) at step {state.step}: resume=auto continues", D.PREEMPTED_EXIT_CODE
            break
        if stopping:
            status = f"stopped at trainer.stop_at_step={state.step}: resume=auto continues"
            break
    hf_dir = None
    if state.step >= t.max_steps and code == 0:
        hf_dir = run_dir / "hf"
        stage = engine.zero_optimization_stage()
        if stage == 0 and t.precision == "fp32":
            sd = engine.module.state_dict() if main else None
        else:
            sd = fp32_weights(last_ckpt or resume_tag) if main else None
        if main:
            from pretrain.model import BertConfig, BertForPreTraining

            export = BertForPreTraining(BertConfig(**model_kw))
            missing, unexpected = export.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("cls.predictions.decoder")]  # tied aliases
            if missing or unexpected:
                raise RuntimeError(f"HF export: weights missing {missing[:3]} / unexpected {unexpected[:3]}")
            export_hf(export, cfg.data.dir, hf_dir)
        D.barrier()
    seconds, loop_s = time.time() - t_start, max(time.time() - t_loop, 1e-9)
    summary = {
        "run_name": cfg.run_name,
        "status": status,
        "step": state.step,
        "max_steps": t.max_steps,
        "sequences": state.sequences,
        "tokens": state.tokens,
        "seconds": seconds,
        "sequences_per_s": job_steps * t.global_batch_size / loop_s,
        "tokens_per_s": job_tokens / loop_s,
        "mfu": last_rec.get("mfu"),
        "train_loss": last_rec.get("loss"),
        "optimizer": opt_desc,
        "zero_stage": engine.zero_optimization_stage(),
        "precision": t.precision,
        "world_size": env.world_size,
        "run_dir": str(run_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "hf_dir": str(hf_dir) if hf_dir else None,
        "wandb_dir": logger.wandb.dir if logger.wandb is not None else None,
        **last_val,
    }
    logger.close(summary)
    if main:
        print_summary(summary)
    D.shutdown()
    return code
