"""The fine-tuning loop: a task head on a pretrained encoder, trained on pretraining's engine
(``pretrain/training/engine.py``:
the optimizer step with accumulation, the non-finite skip/stop, checkpoint bundles with
the data position and RNG, preemption with exit 75, resume=auto|PATH|none, another world size, the time limit,
retention, the averaged loss window) and evaluated by the one evaluation pass (``pretrain/training/scores.py``).

Reads top to bottom: ``TaskBatches`` (the data position), ``score_validation``, ``setup``, ``finetune`` (steps, the
epoch's evaluation, checkpoint and best model, results). Data order is a permutation seeded by (seed, epoch) cut
into global batches, so the position (epoch, steps done in it) means the same samples for any number of ranks
and a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from data_prep.atomic import write_json, write_text
from data_prep.errors import UserError
from pretrain.checkpoint.hf import export_hf, load_weights, read_weights
from pretrain.checkpoint.weights import load_model
from pretrain.finetune.config import FinetuneConfig
from pretrain.finetune.heads import TaskModel, from_pretrained, task_model
from pretrain.finetune.kinds import KINDS
from pretrain.finetune.prepare import Prepared, prepare
from pretrain.models import build, config_from_hf
from pretrain.runtime import distributed as D
from pretrain.runtime import exits
from pretrain.runtime.signals import StopFlag
from pretrain.training.config import EngineConfig
from pretrain.training.data import bucket_by_length
from pretrain.training.engine import Engine, resume_tag, start
from pretrain.training.metrics import MetricsLogger
from pretrain.training.scores import evaluation_pass

GROUP_STEPS = 50  # global batches sorted together by length (group_by_length)


class TaskBatches:
    """The training micro-batches of this rank and the data position: (epoch, optimizer steps done in it).

    An epoch is a permutation seeded by (seed, epoch), cut into ``ceil(n / global batch)`` global batches (the last
    wraps to the start); with ``group``, runs of ``GROUP_STEPS`` global batches are sorted by length first
    (pretraining's ``bucket_by_length``), so a batch pads little. Rank r takes the r-th slice of each global batch,
    cut into its micro-batches: the samples of a step do not depend on the number of ranks."""

    def __init__(self, data: Prepared, cfg: FinetuneConfig, rank: int, world: int) -> None:
        t = cfg.trainer
        self.data, self.seed, self.group, self.rank = data, cfg.seed, cfg.group_by_length, rank
        self.lengths = np.array([len(f["input_ids"]) for f in data.train])
        self.global_batch, self.micro = t.global_batch_size, t.micro_batch_size
        self.per_rank = self.global_batch // world
        self.accum = self.per_rank // self.micro
        self.steps_per_epoch = max(1, math.ceil(len(self.lengths) / self.global_batch))
        self.epoch, self.step, self._micro, self._plan = 0, 0, 0, (None, None)

    def plan(self, epoch: int, group: bool | None = None) -> np.ndarray:
        """[steps per epoch, global batch] sample indices of ``epoch``."""
        group = self.group if group is None else group
        if self._plan[0] == (epoch, group):
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = np.resize(rng.permutation(len(self.lengths)), self.steps_per_epoch * self.global_batch)
        if group:
            order = bucket_by_length(order, self.lengths, self.global_batch, GROUP_STEPS, rng)
        self._plan = ((epoch, group), order.reshape(self.steps_per_epoch, self.global_batch))
        return self._plan[1]

    def micro_batches(self, epoch: int, step: int, group: bool | None = None) -> list[np.ndarray]:
        mine = self.plan(epoch, group)[step][self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return [mine[k * self.micro : (k + 1) * self.micro] for k in range(self.accum)]

    def __call__(self) -> dict[str, torch.Tensor]:
        rows = self.micro_batches(self.epoch, self.step)[self._micro]
        self._micro += 1
        if self._micro == self.accum:  # the step's last micro-batch: the position moves on
            self._micro, self.step = 0, self.step + 1
        return self.data.collate([self.data.train[i] for i in rows])

    @property
    def epoch_done(self) -> bool:
        return self.step >= self.steps_per_epoch

    def next_epoch(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0

    def padding(self, group: bool) -> float:
        """Share of the positions of epoch 0's micro-batches that are padding (each padded to its longest row)."""
        batches = [b for s in range(self.steps_per_epoch) for b in self.micro_batches(0, s, group)]
        real = sum(int(self.lengths[b].sum()) for b in batches)
        return 1.0 - real / sum(int(self.lengths[b].max()) * len(b) for b in batches)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step, self._micro = int(state["epoch"]), int(state["step"]), 0


def score_validation(ds: Engine, data: Prepared, batch: int) -> dict[str, float]:
    """Logits of every validation feature through the one evaluation pass (every rank runs the passes ZeRO-3
    needs; rank 0 scores them)."""
    outs: list[np.ndarray] = []

    def collect(out: Any, b: dict[str, torch.Tensor], sums: Any) -> None:
        outs.extend(out.logits.float().cpu().numpy())

    feats = (data.collate(data.val[i : i + batch], with_labels=False) for i in range(0, len(data.val), batch))
    evaluation_pass(ds.model_engine, feats, ds.device, collect, names=())
    return data.score(outs)


def save_best(model: TaskModel, src: Any, data: Prepared, out: Path, metrics: dict[str, float]) -> None:
    """The best model as a Hugging Face directory (``export_hf``: true vocabulary rows, task head included, names
    as its family's ``<Family>For<Task>``), with the tokenizer files of its source: what ``mode=predict`` and
    ``transformers`` (``AutoModelFor<Task>``) load. Written beside ``out`` and renamed over it: the whole directory
    or nothing."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # transformers sizes the head by id2label (an empty one means 0 outputs): HF's own names where there are no
    # classes (regression's one output, QA's start and end)
    names = data.label_names or [f"LABEL_{i}" for i in range(model.num_labels)]
    extra = {
        **model.hf_extra(),
        "architectures": [model.hf_class],
        "task_kind": model.kind,
        "num_labels": model.num_labels,
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "finetune_metrics": metrics,
    }
    try:
        export_hf(model, src.vocab_file.parent if src.vocab_file else src.path, tmp, extra)
        if not (tmp / "vocab.txt").is_file():  # a source with tokenizer.json only: the vocabulary as well
            write_text(tmp / "vocab.txt", "".join(t + "\n" for t in src.vocab))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out.parent).free / 2**20
        raise UserError(
            f"{out}: the best model could not be written ({free:,.0f} MB free: "
            f"{e.strerror}); free space under {out.parent}, "
            "then rerun the same command: it writes it from the last checkpoint"
        ) from None
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_task_model(path: Path) -> TaskModel:
    """A directory written by ``save_best``, of either family (config.json's ``model_type``; ``load_hf``'s reader
    and vocabulary padding, every key required)."""
    hf = json.loads((path / "config.json").read_text())
    if "task_kind" not in hf:
        raise UserError(f"{path}: not a fine-tuned model (config.json has no task_kind)")
    try:
        model = task_model(config_from_hf(hf), hf["task_kind"], int(hf["num_labels"]))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    missing, unexpected = load_weights(model, read_weights(path), path)
    unexpected = [k for k in unexpected if not k.startswith(model.unread_prefixes())]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def setup(cfg: FinetuneConfig, env: Any, stop: StopFlag) -> tuple[Engine, Any, Prepared, TaskBatches]:
    """Model source, task data, head, the engine (resumed), the log."""
    t = cfg.trainer
    if t.max_steps is not None:
        raise UserError(f"trainer.max_steps={t.max_steps}: fine-tuning trains epochs x steps per epoch; set epochs")
    if not isinstance(t.micro_batch_size, int) or isinstance(t.micro_batch_size, bool):
        raise UserError(f"trainer.micro_batch_size={t.micro_batch_size!r}: give a number of features (auto is for "
                        "pretraining)")  # fmt: skip
    src = load_model(cfg.pretrained, "pretrained", heads=False, checksums=t.verify_checkpoint)
    data = prepare(cfg, src)
    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    tag = resume_tag(cfg.resume, Path(cfg.run_dir).resolve() / "checkpoints", t.verify_checkpoint)
    batches = TaskBatches(data, cfg, env.rank, env.world_size)
    t.max_steps = cfg.epochs * batches.steps_per_epoch  # the schedule's length (a given one is refused first)
    torch.manual_seed(cfg.seed)
    encoder = build(src.model.config) if cfg.random_init else src.model  # the source's family and shape
    model = from_pretrained(encoder, cfg.task.kind, data.num_labels)
    model.checkpoint_layers = t.activation_checkpointing
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    logger = MetricsLogger(cfg.logger, cfg.run_name, Path(cfg.run_dir).resolve(), env.is_main, config)
    ds = start(EngineConfig.of(cfg), env, model, device, tag, batches, stop, logger)
    if tag is None and env.is_main:
        what = "a randomly initialised encoder" if cfg.random_init else src.describe()
        print(f"fine-tuning {what}: {cfg.task.kind}, {len(data.train):,} training and {len(data.val):,} validation "
              f"features, {data.num_labels} label(s); {cfg.epochs} epochs x {batches.steps_per_epoch} steps; "
              f"{ds.opt_desc}", flush=True)  # fmt: skip
        pad = {g: batches.padding(g) for g in (True, False)}
        what = f"grouped by length ({pad[False]:.0%} shuffled)" if cfg.group_by_length else "shuffled"
        print(f"batches {what}: padding {pad[cfg.group_by_length]:.0%} of the positions", flush=True)
    return ds, src, data, batches


def finetune(cfg: FinetuneConfig) -> int:
    """Train ``cfg.epochs`` epochs (or resume), evaluate after each, keep the best model in ``RUN_DIR/best``,
    write ``results.json`` and a row of ``results.md``. Returns the exit code (0, 3 non-finite, 75 preempted)."""
    stop = StopFlag()  # first: a SLURM signal during start-up must not kill the job
    env = D.detect_env()
    D.set_threads()
    t, run_dir = cfg.trainer, Path(cfg.run_dir).resolve()
    ds, src, data, batches = setup(cfg, env, stop)
    metric = cfg.task.metric or KINDS[cfg.task.kind].metric
    state, loop = ds.state, ds.loop
    best, history = ds.client.get("best"), list(ds.client.get("history") or [])
    if history and env.is_main:
        _recover_best(ds, src, data, run_dir, history, metric)
    t0 = time.time()
    while state.step < t.max_steps:
        stopped, _ = ds.book(ds.step(batches))
        if stopped:
            break
        if state.step % t.log_every == 0 and (rec := ds.close_window()) is not None:
            ds.logger.log({**rec, "epoch": batches.epoch + 1})
        improved = False
        if batches.epoch_done:
            scores = score_validation(ds, data, t.micro_batch_size)
            history.append({"epoch": batches.epoch + 1, "step": state.step, **scores})
            ds.logger.log({"kind": "epoch", "step": state.step, "epoch": batches.epoch + 1, **scores})
            improved = best is None or scores[metric] > best
            best = scores[metric] if improved else best
            batches.next_epoch()
            state.epoch = batches.epoch
        due = improved or state.step == t.max_steps or batches.step == 0
        due = due or bool(t.checkpoint_every and state.step % t.checkpoint_every == 0)
        leave = ds.save_or_stop(due, extra={"best": best, "history": history})
        if improved and env.is_main:  # a stop between the checkpoint and here: _recover_best on resume
            save_best(_fp32_model(ds, ds.loop.last_ckpt), src, data, run_dir / "best", history[-1])
        D.barrier()
        if leave:
            break
    ds.logger.close({f"best_{k}": v for k, v in max(history, key=lambda h: h[metric]).items()} if history else None)
    if env.is_main and loop.code == 0:
        if state.step >= t.max_steps:
            _results(cfg, run_dir, history, metric, time.time() - t0, data.dropped)
        elif loop.status:
            print(f"{loop.status.replace('resume=auto continues', 'rerun the same command to resume')}", flush=True)
    elif env.is_main and loop.code == exits.PREEMPTED:
        print(f"{loop.status}; checkpoint {loop.last_ckpt}", flush=True)
    D.shutdown()
    return loop.code


def _fp32_model(ds: Engine, tag: Path | None) -> TaskModel:
    """The task model in fp32 (``Engine.fp32_model``: the module's weights, or checkpoint ``tag``'s master ones)."""
    module = ds.module
    return ds.fp32_model(lambda: type(module)(module.config, module.kind, module.num_labels), tag)


def _recover_best(ds: Engine, src: Any, data: Prepared, run_dir: Path, history: list[dict], metric: str) -> None:
    """A run stopped after the checkpoint of its best epoch but before ``best/`` was written: write it now from
    that checkpoint (only the newest checkpoints are kept, and only the newest epoch can be the missing one)."""
    best = max(history, key=lambda h: h[metric])
    config = run_dir / "best" / "config.json"
    on_disk = json.loads(config.read_text()).get("finetune_metrics", {}).get("epoch") if config.is_file() else None
    if on_disk != best["epoch"] and best["epoch"] == history[-1]["epoch"]:
        save_best(_fp32_model(ds, ds.resume_tag), src, data, run_dir / "best", dict(best))


def _results(
    cfg: FinetuneConfig, run_dir: Path, history: list[dict], metric: str, seconds: float, dropped: dict
) -> None:
    """results.json and this run's row of results.md beside the run dir (rewritten whole: a rerun after a failed
    write replaces its row instead of adding a second)."""
    best = max(history, key=lambda h: h[metric])
    res = {"task": cfg.task.kind, "data": cfg.task.train, "pretrained": cfg.pretrained, "random_init": cfg.random_init,
           "metric": metric, "best": best, "epochs": history, "best_dir": str(run_dir / "best"),
           "dropped_rows": dropped}  # fmt: skip
    table = run_dir.parent / "results.md"
    header = "| run | task | data | model | metric | best | epoch |\n|---|---|---|---|---|---|---|\n"
    model = cfg.pretrained + (" (random init)" if cfg.random_init else "")
    cells = [run_dir.name, cfg.task.kind, cfg.task.train, model, metric, f"{best[metric]:.4f}", best["epoch"]]
    row = "| " + " | ".join(str(c) for c in cells) + " |\n"
    rows = table.read_text(encoding="utf-8").splitlines(keepends=True)[2:] if table.is_file() else []
    rows = [r for r in rows if not r.startswith(f"| {run_dir.name} |")] + [row]
    try:
        write_text(table, header + "".join(rows))
        write_json(run_dir / "results.json", res)
    except OSError as e:
        raise UserError(f"{run_dir}: results could not be written ({e.filename or table}: {e.strerror}); free space, "
                        "then rerun the same command: it writes them from the last checkpoint") from None  # fmt: skip
    print(f"best {metric} {best[metric]:.4f} (epoch {best['epoch']} of {cfg.epochs}, {seconds / 60:.1f} min): "
          f"{run_dir / 'best'}; results in {run_dir / 'results.json'} and {table}", flush=True)  # fmt: skip
