"""Fine-tuning configuration: the schema behind ``conf/finetune.yaml`` and its ``finetune/`` task group.

The optimizer, schedule, DeepSpeed, logger and loop (``trainer``) sections are pretraining's own dataclasses (one
source of truth for every field); ``trainer`` is ``LoopConfig``, the settings the shared engine reads, so a key of
pretraining's loop alone (``trainer.eval_every``, ``trainer.init_from``...) is refused as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from pretrain.finetune.heads import KINDS
from pretrain.training.config import DeepSpeedSection, LoggerConfig, LoopConfig, OptimConfig, SchedulerConfig


@dataclass
class TaskConfig:
    kind: str = "classification"
    """``classification`` (one text or a pair), ``regression`` (a float label), ``ner`` (BIO tags per word) or
    ``qa`` (extractive, SQuAD v1 style)."""
    train: str | None = None
    """Training data: a local ``.csv``/``.tsv``/``.jsonl``/``.parquet`` file (NER also a CoNLL text file: word TAB
    tag per line), or a hub dataset ``NAME[/CONFIG]`` read with ``datasets`` (``glue/sst2``, ``squad``)."""
    validation: str | None = None
    """Validation data, as ``train``; null = the hub dataset's ``validation_split`` (local files need it)."""
    validation_split: str = "validation"
    """Split of a hub dataset used for validation (``validation_matched`` for MNLI)."""
    text_column: str = "sentence"
    """Column of the (first) text: classification and regression."""
    text_pair_column: str | None = None
    """Column of the second text of a sentence pair (MRPC, RTE, STS-B); null = single sentences."""
    label_column: str = "label"
    """Column of the label (a class name or number; a float for regression)."""
    labels: list[str] | None = None
    """Declared classes, in order (the model's output index); null = the sorted distinct labels of the training
    data. A label outside the declared set is an error naming the file and row."""
    tokens_column: str = "tokens"
    """NER: column holding each sentence's words (a list)."""
    tags_column: str = "tags"
    """NER: column holding each word's BIO tag (a list as long as the words)."""
    question_column: str = "question"
    """QA: column of the question."""
    context_column: str = "context"
    """QA: column of the context the answer is cut from."""
    answers_column: str = "answers"
    """QA: column of the answers, ``{"text": [...], "answer_start": [...]}`` as SQuAD stores them."""
    doc_stride: int = 128
    """QA: tokens shared by two consecutive windows of a context longer than the model's length."""
    max_query_length: int = 64
    """QA: the question is cut to this many tokens."""
    max_answer_length: int = 30
    """QA: the longest answer span (in tokens) the post-processing considers."""
    truncate: bool = True
    """Cut texts longer than ``trainer.max_seq_length`` (counted); false = an error naming the row."""
    metric: str | None = None
    """Validation metric that picks the best checkpoint; null = accuracy (classification), pearson (regression),
    f1 (ner: entity level, as seqeval; qa: as the SQuAD script)."""


@dataclass
class FinetuneConfig:
    pretrained: str = "???"
    """What to fine-tune: a pretraining run dir (its newest complete checkpoint), a checkpoint, or a Hugging Face
    BERT or ModernBERT directory (an export of ours, or e.g. the original ``bert-base-uncased`` or
    ``answerdotai/ModernBERT-base``); the task model is of its family (``pretrain/finetune/heads.py``)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task and its data (``conf/finetune/*.yaml``: one per task type, and presets such as ``sst2``)."""
    epochs: int = 3
    """Passes over the training data; the validation metric is computed after each."""
    group_by_length: bool = True
    """Batch training rows of similar length, so batches pad little: runs of 50 optimizer steps of the seeded
    shuffle are sorted by length and cut into batches, taken in shuffled order. ``false``: plain shuffled batches."""
    random_init: bool = False
    """Start from a randomly initialised encoder of the same shape and vocabulary (the baseline that shows what
    pretraining bought)."""
    mode: str = "train"
    """``train``, or ``predict``: write predictions for ``predict_file`` with the best checkpoint of ``run_dir``
    (or with ``model`` when the run dir holds none)."""
    predict_file: str | None = None
    """``mode=predict``: the file to label (same format as the training data; labels not needed)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer (``conf/optim/*.yaml``; fine-tuning's learning rate in ``conf/finetune.yaml``)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule (``conf/scheduler/*.yaml``); its length is epochs x steps per epoch."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """ZeRO and raw DeepSpeed settings (``conf/deepspeed/*.yaml``)."""
    trainer: LoopConfig = field(default_factory=LoopConfig)
    """Batch sizes, precision, sequence length and the loop's settings, as pretraining's (``LoopConfig``; defaults
    for fine-tuning in ``conf/finetune.yaml``). The schedule's length is epochs x steps per epoch; a checkpoint is
    written after each epoch."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Weights & Biases (``conf/logger/*.yaml``); metrics.jsonl is always written."""
    run_dir: str = "runs/finetune"
    """Where checkpoints (``checkpoints/``, ``best/``), metrics.jsonl, results.json and predictions go."""
    resume: str = "auto"
    """``auto`` (continue from the newest complete checkpoint of ``run_dir``), a checkpoint or run directory to
    continue from, or ``none`` (start afresh)."""
    seed: int = 1234
    """Seed of the head's initialisation, data order and dropout."""
    verbose: bool = False
    """Show DeepSpeed's own per-rank messages."""

    @property
    def run_name(self) -> str:
        """The W&B run name: the run directory's name."""
        return Path(self.run_dir).name

    def __post_init__(self) -> None:
        if self.task.kind not in KINDS:
            raise ValueError(f"task.kind={self.task.kind!r}: use one of {', '.join(KINDS)}")
        if self.mode not in ("train", "predict"):
            raise ValueError(f"mode={self.mode!r}: use train or predict")


def register() -> None:
    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


register()
