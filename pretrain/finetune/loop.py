"""The fine-tuning loop: pretraining's machinery (DeepSpeed engine, optimizer and schedule builders, checkpoint
bundles with their COMPLETE marker, metrics.jsonl and W&B) around a task head.

Reads top to bottom: ``setup`` (model source, task data, head, engine, resume), ``train_epoch``, ``evaluate``,
``finetune`` (epochs, the best checkpoint, results). Data order is a permutation seeded by (seed, epoch), so a
resumed run skips the batches it already did and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from data_prep.atomic import write_json, write_text
from pretrain import distributed as D
from pretrain.checkpoint import _rng_state, _set_rng_state, find_checkpoint, fp32_weights, gather, save
from pretrain.config import UserError
from pretrain.data import bucket_by_length
from pretrain.finetune.config import METRICS, FinetuneConfig
from pretrain.finetune.heads import BertForTask, from_pretrained
from pretrain.finetune.prepare import Prepared, prepare
from pretrain.hf import _normalise_keys, _read_state_dict, export_hf, load_model, load_weights
from pretrain.metrics import MetricsLogger
from pretrain.model import BertForPreTraining

GROUP_STEPS = 50  # global batches sorted together by length (group_by_length)
HF_CLASSES = {"classification": "BertForSequenceClassification", "regression": "BertForSequenceClassification",
              "ner": "BertForTokenClassification", "qa": "BertForQuestionAnswering"}  # fmt: skip


@dataclass
class Progress:
    """What a checkpoint carries besides the engine's own state."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_id: str | None = None  # the W&B run a resumed fine-tuning continues


def _batches(
    lengths: np.ndarray, micro: int, accum: int, seed: int, epoch: int, rank: int, world: int, group: bool
) -> list[np.ndarray]:
    """This rank's micro-batches of one epoch: a permutation seeded by (seed, epoch), cut in rounds of ``micro x
    world`` dealt out by rank, as many rounds as ``ceil(n / global batch)`` optimizer steps need (every rank gets
    the same number; the last step wraps to the start of the permutation). With ``group``, rows of similar length
    share a round (pretraining's ``bucket_by_length`` over runs of ``GROUP_STEPS`` optimizer steps)."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    per = micro * world
    rounds = max(1, math.ceil(n / (per * accum))) * accum
    order = np.resize(order, rounds * per)
    if group:
        order = bucket_by_length(order, lengths, per, accum * GROUP_STEPS, rng)
    return [order[r * per + rank * micro : r * per + (rank + 1) * micro] for r in range(rounds)]


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of the padded batches' positions that are padding (each batch padded to its longest row)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine: Any, data: Prepared, batch: int, device: torch.device) -> dict[str, float]:
    """Logits of every validation feature (rank 0 scores them; every rank runs the passes ZeRO-3 needs)."""
    engine.eval()
    outs = []
    for start in range(0, len(data.val), batch):
        feats = data.val[start : start + batch]
        out = engine(**_to(data.collate(feats, with_labels=False), device))
        outs.extend(out.logits.float().cpu().numpy()[i] for i in range(len(feats)))
    engine.train()
    return data.score(outs)


def save_best(model: BertForTask, src: Any, data: Prepared, out: Path, metrics: dict[str, float]) -> None:
    """The best model as a Hugging Face directory (``export_hf``: true vocabulary rows, task head included, names
    as ``BertFor<Task>``), with the tokenizer files of its source: what ``mode=predict`` and ``transformers``
    load. Written beside ``out`` and renamed over it: the whole directory or nothing."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {
        "architectures": [HF_CLASSES[model.kind]],
        "nsp": model.bert.pooler is not None,  # read back by BertConfig.from_hf_dict: whether there is a pooler
        "task_kind": model.kind,
        "num_labels": model.num_labels,
        "id2label": dict(enumerate(data.label_names or [])),
        "finetune_metrics": metrics,
    }
    export_hf(model, src.vocab_file.parent if src.vocab_file else src.path, tmp, extra)
    if not (tmp / "vocab.txt").is_file():  # a source with tokenizer.json only: the vocabulary as well
        write_text(tmp / "vocab.txt", "".join(t + "\n" for t in src.vocab))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_task_model(path: Path) -> BertForTask:
    """A directory written by ``save_best`` (``load_hf``'s reader and vocabulary padding, every key required)."""
    from pretrain.model import BertConfig

    hf = json.loads((path / "config.json").read_text())
    if "task_kind" not in hf:
        raise UserError(f"{path}: not a fine-tuned model (config.json has no task_kind)")
    model = BertForTask(BertConfig.from_hf_dict(hf), hf["task_kind"], int(hf["num_labels"]))
    missing, unexpected = load_weights(model, _normalise_keys(_read_state_dict(path)), path)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def setup(cfg: FinetuneConfig, env: Any) -> tuple[Any, Any, Prepared, Progress, Any]:
    from pretrain.deepspeed_env import import_deepspeed, release_shm_buffer
    from pretrain.optim import scheduler_factory
    from pretrain.trainer import engine_config

    t = cfg.trainer
    if t.micro_batch_size == "auto":
        raise UserError("trainer.micro_batch_size=auto is for pretraining; give fine-tuning a number")
    src = load_model(cfg.pretrained)
    data = prepare(cfg, src)
    per_step = t.global_batch_size
    steps_per_epoch = max(1, math.ceil(len(data.train) / per_step))
    t.max_steps = cfg.epochs * steps_per_epoch  # the schedule's length
    deepspeed = import_deepspeed(cfg.verbose)
    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    torch.manual_seed(cfg.seed)
    encoder = BertForPreTraining(src.model.config) if cfg.random_init else src.model
    model = from_pretrained(encoder, cfg.task.kind, data.num_labels)
    client_opt, groups, ds_config, opt_desc = engine_config(cfg, model, env.world_size, device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, model_parameters=groups,
                                           lr_scheduler=scheduler_factory(cfg), config=ds_config)  # fmt: skip
    release_shm_buffer(env.rank)
    progress = Progress()
    tag = find_checkpoint(Path(cfg.run_dir) / "checkpoints") if cfg.resume == "auto" else None
    if tag is not None:
        _, client = engine.load_checkpoint(str(tag.parent), tag=tag.name)
        if not client:
            raise UserError(f"resume: DeepSpeed found no checkpoint in {tag}; pass resume=none to start afresh")
        progress = Progress(**{k: client.get(k) for k in ("step", "epoch", "batch", "best", "history", "wandb_id")})
        _set_rng_state(client["rng"][env.rank])
        if env.is_main:
            print(f"resumed from {tag} at step {progress.step} (epoch {progress.epoch + 1})", flush=True)
    elif env.is_main:
        what = "a randomly initialised encoder" if cfg.random_init else src.describe()
        print(f"fine-tuning {what}: {cfg.task.kind}, {len(data.train):,} training and {len(data.val):,} validation "
              f"features, {data.num_labels} label(s); {cfg.epochs} epochs x {steps_per_epoch} steps; {opt_desc}",
              flush=True)  # fmt: skip
    return engine, src, data, progress, device


def finetune(cfg: FinetuneConfig) -> int:
    """Train ``cfg.epochs`` epochs (or resume), evaluate after each, keep the best model in ``RUN_DIR/best``,
    write ``results.json`` and a row of ``results.md``. Returns the exit code."""
    env = D.detect_env()
    D.set_threads()
    t, run_dir = cfg.trainer, Path(cfg.run_dir).resolve()
    engine, src, data, p, device = setup(cfg, env)
    metric = cfg.task.metric or METRICS[cfg.task.kind]
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    if p.history and env.is_main:
        _recover_best(engine, src, data, run_dir, p, metric, t.precision)
    log = MetricsLogger(cfg, run_dir, env.is_main, p.wandb_id, config, p.step, t.max_steps)
    p.wandb_id = log.wandb_id
    lengths = np.array([len(f["input_ids"]) for f in data.train])
    if env.is_main and p.step == 0:
        pad = {
            g: padding_fraction(lengths, _batches(lengths, t.micro_batch_size, 1, cfg.seed, 0, 0, 1, g))
            for g in (True, False)
        }
        what = f"grouped by length ({pad[False]:.0%} shuffled)" if cfg.group_by_length else "shuffled"
        print(f"batches {what}: padding {pad[cfg.group_by_length]:.0%} of the positions", flush=True)
    t0 = time.time()
    while p.epoch < cfg.epochs:
        accum = engine.gradient_accumulation_steps()
        batches = _batches(lengths, t.micro_batch_size, accum, cfg.seed, p.epoch, env.rank, env.world_size,
                           cfg.group_by_length)  # fmt: skip
        for i in range(p.batch, len(batches)):
            out = engine(**_to(data.collate([data.train[j] for j in batches[i]]), device))
            engine.backward(out.loss)
            engine.step()
            p.batch = i + 1
            if p.batch % accum:
                continue  # mid-accumulation: no optimizer step yet
            p.step += 1
            log.advance()
            if p.step % t.log_every == 0:
                log.log({"kind": "train", "step": p.step, "epoch": p.epoch + 1, "loss": out.loss.item(),
                         "lr": engine.get_lr()[0]})  # fmt: skip
            if t.stop_at_step is not None and p.step >= t.stop_at_step:
                _checkpoint(engine, run_dir, p)
                log.close()
                if env.is_main:
                    print(f"stopped at step {p.step} (trainer.stop_at_step); rerun to resume", flush=True)
                D.shutdown()
                return 0
        scores = evaluate(engine, data, t.micro_batch_size, device)
        p.history.append({"epoch": p.epoch + 1, "step": p.step, **scores})
        log.log({"kind": "epoch", "step": p.step, "epoch": p.epoch + 1, **scores})
        improved = p.best is None or scores[metric] > p.best
        if improved:
            p.best = scores[metric]
        p.epoch, p.batch = p.epoch + 1, 0
        tag = _checkpoint(engine, run_dir, p)
        if improved and env.is_main:  # a stop between the checkpoint and here: _recover_best on resume
            save_best(_fp32_model(engine, tag, t.precision), src, data, run_dir / "best", {**scores, "epoch": p.epoch})
        D.barrier()
    best = max(p.history, key=lambda h: h[metric])
    log.close({f"best_{k}": v for k, v in best.items()})
    if env.is_main:
        _results(cfg, run_dir, p, metric, time.time() - t0)
    D.shutdown()
    return 0


def _fp32_model(engine: Any, tag: Path, precision: str) -> BertForTask:
    """The task model in fp32: the engine's module where it holds fp32 weights whole (ZeRO-0, fp32), else the
    master weights of checkpoint ``tag`` (bf16/fp16 modules, ZeRO-3's partitioned parameters)."""
    module = engine.module
    if engine.zero_optimization_stage() == 0 and precision == "fp32":
        return module
    model = BertForTask(module.config, module.kind, module.num_labels)
    missing, unexpected = model.load_state_dict(fp32_weights(tag), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"best model: weights missing {missing[:3]} / unexpected {unexpected[:3]} in {tag}")
    return model


def _recover_best(
    engine: Any, src: Any, data: Prepared, run_dir: Path, p: Progress, metric: str, precision: str
) -> None:
    """A run stopped after the checkpoint of its best epoch but before ``best/`` was written: write it now from
    that checkpoint (only the newest is kept, and only the newest epoch can be the missing one)."""
    best = max(p.history, key=lambda h: h[metric])
    config = run_dir / "best" / "config.json"
    on_disk = json.loads(config.read_text()).get("finetune_metrics", {}).get("epoch") if config.is_file() else None
    if on_disk != best["epoch"] and best["epoch"] == p.epoch:
        tag = find_checkpoint(run_dir / "checkpoints")
        scores = {k: v for k, v in best.items() if k != "step"}
        save_best(_fp32_model(engine, tag, precision), src, data, run_dir / "best", scores)


def _checkpoint(engine: Any, run_dir: Path, p: Progress) -> Path:
    client = {"step": p.step, "epoch": p.epoch, "batch": p.batch, "best": p.best, "history": p.history,
              "wandb_id": p.wandb_id, "rng": gather(_rng_state())}  # fmt: skip
    return save(engine, run_dir / "checkpoints", client, keep_last=1)


def _results(cfg: FinetuneConfig, run_dir: Path, p: Progress, metric: str, seconds: float) -> None:
    best = max(p.history, key=lambda h: h[metric])
    res = {"task": cfg.task.kind, "data": cfg.task.train, "pretrained": cfg.pretrained, "random_init": cfg.random_init,
           "metric": metric, "best": best, "epochs": p.history, "best_dir": str(run_dir / "best")}  # fmt: skip
    write_json(run_dir / "results.json", res)
    table = run_dir.parent / "results.md"  # one row per run, beside the runs
    header = "| run | task | data | model | metric | best | epoch |\n|---|---|---|---|---|---|---|\n"
    model = cfg.pretrained + (" (random init)" if cfg.random_init else "")
    cells = [run_dir.name, cfg.task.kind, cfg.task.train, model, metric, f"{best[metric]:.4f}", best["epoch"]]
    row = "| " + " | ".join(str(c) for c in cells) + " |\n"
    new = not table.exists() or table.stat().st_size == 0
    with open(table, "a", encoding="utf-8") as f:
        f.write((header if new else "") + row)
    print(f"best {metric} {best[metric]:.4f} (epoch {best['epoch']} of {cfg.epochs}, {seconds / 60:.1f} min): "
          f"{run_dir / 'best'}; results in {run_dir / 'results.json'} and {table}", flush=True)  # fmt: skip
