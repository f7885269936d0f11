"""Schema of the data-preparation config (``conf/prepare_data.yaml``); every field is a Hydra override."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=lambda: ["builtin:pydocs"])
    """Corpora to read, any mix. The kind is detected from the path: ``*.xml``/``*.xml.bz2`` a Wikipedia dump,
    ``*.txt``/``*.txt.gz`` or a directory of them plain text or books (Project Gutenberg detected by its header),
    ``*.jsonl``/``*.jsonl.gz``/``*.parquet`` records with a text field, ``hf:NAME[:CONFIG]`` a Hugging Face hub
    dataset (streamed), ``builtin:pydocs`` the docstrings of Python's standard library. Force a kind with a
    prefix: ``wiki:PATH``, ``books:PATH``, ``text:PATH``, ``jsonl:PATH``, ``parquet:PATH``, ``arrow:PATH``
    (a dataset saved with ``datasets.save_to_disk``)."""
    output_dir: str = "data/out"
    """Where shards, vocabulary, manifest and the intermediate ``work/`` folder go."""
    stage: str = "all"
    """``all``, or one stage run alone: ``read`` (corpora to sentences), ``vocab`` (train WordPiece),
    ``tokenize`` (sentences to token ids), ``shards`` (token ids to training samples), ``merge``
    (combine the manifests of SLURM array tasks)."""
    vocab: str | None = None
    """Existing ``vocab.txt`` (for example bert-base-uncased's) to use instead of training a vocabulary."""
    vocab_size: int = 30522
    """Size of the WordPiece vocabulary to train (special tokens included)."""
    lowercase: bool = True
    """Uncased (lowercase and strip accents, as bert-base-uncased) or cased (as bert-base-cased)."""
    min_frequency: int = 2
    """Minimum count of a pair for the WordPiece trainer to merge it."""
    max_seq_length: int = 128
    """Maximum tokens per sample, specials included (128 for BERT phase 1, 512 for phase 2)."""
    nsp: bool = True
    """BERT sentence pairs with IsNext/NotNext labels; false packs full sentences (RoBERTa-style)."""
    short_seq_prob: float = 0.1
    """Probability of a shorter target length, so the model also sees short sequences (BERT mode)."""
    dupe_factor: int = 1
    """Passes over the corpus with different pairings; 1 is enough with dynamic masking."""
    validation_fraction: float = 0.01
    """Fraction of the corpus's tokens held out for validation, never shared with training: whole documents (at
    least two when the corpus has four or more, so validation has NotNext pairs) when they come within a point of
    it, else the last fraction of every document's sentences (corpora of few long documents, such as books)."""
    samples_per_shard: int = 100_000
    """Target samples per shard (shards follow document boundaries, so sizes vary slightly)."""
    seed: int = 12345
    """Seed for document split, pairing and truncation: same seed, inputs and vocabulary give identical shards."""
    num_workers: int = 0
    """Worker processes; 0 means one per CPU core. Output does not depend on it."""
    strict: bool = False
    """Stop with an error naming the file at the first bad file or document, instead of skipping and counting it."""
    text_field: str = "text"
    """Field that holds the text in jsonl, parquet, arrow and hub datasets."""
    hf_split: str = "train"
    """Split of a hub dataset to stream."""
    text_documents: str = "auto"
    """How plain text splits into documents: ``file`` (one per file), ``blank_line`` (blank-line separated),
    ``auto`` (``file`` unless the file looks like one-sentence-per-line BERT format with blank lines between
    documents)."""
    max_sentence_chars: int = 100_000
    """Sentences longer than this (a 10 MB line with no punctuation) are cut into pieces of this size."""
    unk_warning_rate: float = 0.01
    """Warn when more than this fraction of tokens is ``[UNK]`` (vocabulary and corpus disagree)."""
    task_index: int = 0
    """This task's index when the shard stage is split across SLURM array tasks (``$SLURM_ARRAY_TASK_ID``)."""
    num_tasks: int = 1
    """Number of array tasks; task i takes every num_tasks-th input file, then ``stage=merge`` joins them."""


def task_dir(cfg: PrepareConfig) -> Path:
    """This task's output folder: ``output_dir``, or ``output_dir/tasks/task-NNNNN`` for SLURM array tasks."""
    out = Path(cfg.output_dir)
    return out / "tasks" / f"task-{cfg.task_index:05d}" if cfg.num_tasks > 1 else out
