"""Evaluation after training: the unigram baseline, a single-process evaluation loop and the ``launch/evaluate.py``
run (checks of the data against the model, a table on stdout, a record in the run's ``metrics.jsonl``). The model
comes from ``pretrain.checkpoint.weights.load_model`` (a run directory, a checkpoint or a Hugging Face directory).

Every model is evaluated with the same masking (BERT's: 15%, 80/10/10, static, seeded by ``seed``) so numbers
compare across runs and sources; the unigram baseline (always the most frequent token of the training split) is
scored at exactly the masked positions the model is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import DataPrepError, UserError
from data_prep.manifest import read_manifest
from data_prep.vocab import read_vocab
from pretrain.checkpoint.hf import ROOT
from pretrain.checkpoint.weights import ModelSource, load_model
from pretrain.runtime.device import pick_device
from pretrain.training.config import Config
from pretrain.training.data import build_dataloader
from pretrain.training.masking import MaskingConfig
from pretrain.training.metrics import METRICS_FILE, Progress, append_record, pair_label
from pretrain.training.scores import (
    PRETRAINING_SUMS,
    Sums,
    evaluation_pass,
    most_frequent_token,
    pretraining_metrics,
    pretraining_scores,
)

# ------------------------------------------------------------------------------------------------ the data


def _sha256(tokens: list[str]) -> str:
    return hashlib.sha256("".join(t + "\n" for t in tokens).encode()).hexdigest()  # = sha256 of its vocab.txt


def check_data(source: ModelSource, data_dir: str | os.PathLike, split: str) -> Path:
    """The data directory, checked against the model: split present, same vocabulary, samples that fit."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"--data {d}: directory not found; prepare it first (python launch/prepare_data.py ...)")
    present = [s for s in ("train", "validation") if any((d / s).glob("*.index.npy"))]
    if split not in present:
        hint = f"pick --split {present[-1]}" if present else "run launch/prepare_data.py to completion first"
        raise UserError(f"--data {d}: no {split!r} split (no shards {d / split}/*.index.npy); {hint}")
    try:
        data_vocab = read_vocab(d / "vocab.txt")
        manifest = read_manifest(d)
    except DataPrepError as e:
        raise UserError(f"--data {d}: {e}") from None
    if data_vocab != source.vocab:
        same = ": the same number of tokens, different ones" if len(data_vocab) == len(source.vocab) else ""
        raise UserError(
            f"vocabulary mismatch: {d / 'vocab.txt'} has {len(data_vocab)} tokens (sha256 {_sha256(data_vocab)[:12]}) "
            f"but the model {source.path} has {len(source.vocab)} (sha256 {_sha256(source.vocab)[:12]}){same}; "
            "evaluate on data prepared with the model's vocabulary (prepare_data.py vocab=.../vocab.txt) or use --text"
        )
    longest = manifest.max_seq_length if manifest else None
    if longest and longest > source.model.config.max_position_embeddings:
        raise UserError(
            f"--data {d}: samples of up to {longest} tokens but the model has "
            f"max_position_embeddings={source.model.config.max_position_embeddings}; use shorter samples"
        )
    return d


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return True
    return False


def prepare_text(
    source: ModelSource, text_file: str | os.PathLike, out_dir: Path, max_seq_length: int, seed: int
) -> Path:
    """Shards of a text file, prepared by the project's pipeline with the model's own vocabulary and casing, all of
    it in the ``train`` split (nothing held out: the whole text is evaluated). Returns the data directory."""
    from data_prep.config import PrepareConfig
    from data_prep.pipeline import prepare

    t = Path(text_file)
    if not t.is_file():
        raise UserError(f"--text {t}: file not found")
    if not _has_text(t):
        raise UserError(f"--text {t}: the file is empty (only whitespace); give a file with some sentences")
    vocab_file = source.vocab_file
    if vocab_file is None:  # a tokenizer.json alone: the pipeline takes a vocab.txt
        vocab_file = out_dir / "vocab.txt"
        vocab_file.write_text("".join(tok + "\n" for tok in source.vocab), encoding="utf-8")
    size = t.stat().st_size
    print(f"preparing {t} ({size:,} bytes) with the model's vocabulary", file=sys.stderr, flush=True)

    def run(nsp: bool) -> dict:
        cfg = PrepareConfig(
            inputs=[f"text:{t.resolve()}"],
            output_dir=str(out_dir / ("pairs" if nsp else "sentences")),
            vocab=str(vocab_file),
            lowercase=source.lowercase,
            max_seq_length=max_seq_length,
            nsp=nsp,
            validation_fraction=0.0,
            seed=seed,
            num_workers=1 if size < 64 << 20 else 0,  # worker start-up outweighs small texts
        )
        # The data-prep summary, stage bars and log lines are not this tool's output; its warnings are relayed.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return prepare(cfg)

    nsp = bool(source.model.config.nsp)
    try:
        manifest = run(nsp)
    except DataPrepError as e:
        if not nsp:
            raise UserError(f"--text {t}: {e}") from None
        try:  # too little text for sentence pairs (one sentence, say): the MLM figures can still be had
            manifest, nsp = run(False), False
        except DataPrepError:
            raise UserError(f"--text {t}: {e}") from None
        print(f"warning: --text {t}: no sentence pairs (too little text), NSP is not evaluated", file=sys.stderr)
    for w in manifest.get("warnings", []):
        # The empty validation split is asked for here, and NotNext is moot without pairs.
        if not w.startswith("validation_fraction=") and (nsp or "NotNext" not in w):
            print(f"warning: --text {t}: {w}", file=sys.stderr)
    return out_dir / ("pairs" if nsp else "sentences")


# ------------------------------------------------------------------------------------------------ the loop


def evaluate_model(
    model: Any,
    loader: Iterable[dict[str, torch.Tensor]],
    num_batches: int,
    device: torch.device,
    unigram_id: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float | int]:
    """MLM loss/accuracy, the unigram baseline's accuracy at the same masked positions, NSP loss/accuracy and the
    majority-class NSP accuracy over the first ``num_batches`` batches; one process, through the one evaluation
    pass (``pretrain.training.scores``).
    Keys: batches, samples, masked_tokens, mlm_loss, mlm_acc, perplexity, unigram_acc
    (with ``unigram_id``), and nsp_loss, nsp_acc, nsp_majority_acc where the model has the NSP head and the data
    NSP labels."""
    config = getattr(model, "module", model).config

    def one_segment(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if getattr(config, "type_vocab_size", 1) < 2:  # RoBERTa-style or ModernBERT: one segment or none
            batch.pop("token_type_ids", None)
        return batch

    def show(s: Sums) -> None:
        if progress is not None:
            correct, masked = (float(s.values[s.index[k]]) for k in ("mlm_correct", "masked"))
            progress(f"MLM acc {correct / max(masked, 1):.2%}")

    s = evaluation_pass(model, loader, device, pretraining_scores(unigram_id), PRETRAINING_SUMS, num_batches,
                 progress=show, prepare=one_segment)  # fmt: skip
    res: dict[str, float | int] = {"batches": int(s["batches"]), "samples": int(s["samples"]),
                                   "masked_tokens": int(s["masked"])}  # fmt: skip
    return {**res, **pretraining_metrics(s, unigram=unigram_id is not None)}


# ------------------------------------------------------------------------------------------------ the tool


def _table(source: ModelSource, where: str, res: dict[str, Any], batch_size: int, seed: int, unigram: str) -> str:
    def row(name: str, value: str, base: str = "", note: str = "") -> str:
        return f"  {name:<14}{value:>10}{base:>10}  {note}".rstrip()

    lines = [
        f"evaluate {source.describe()} on {where}",
        f"  {res['samples']:,} samples in {res['batches']} batch(es) of {batch_size}, {res['masked_tokens']:,} masked "
        f"tokens, masking seed {seed}",
        row("metric", "model", "baseline"),
    ]
    if "mlm_loss" in res:
        lines += [
            row("MLM loss", f"{res['mlm_loss']:.4f}"),
            row("perplexity", f"{res['perplexity']:.2f}"),
            row("MLM accuracy", f"{res['mlm_acc']:.2%}", f"{res['unigram_acc']:.2%}", f"unigram: always {unigram!r}"),
        ]
    if "nsp_loss" in res:
        # an SOP model is scored on sentence order, drawn as in training
        pair = pair_label(res.get("pair_task"))
        lines += [
            row(f"{pair} loss", f"{res['nsp_loss']:.4f}"),
            row(f"{pair} accuracy", f"{res['nsp_acc']:.2%}", f"{res['nsp_majority_acc']:.2%}", "majority class"),
        ]
    return "\n".join(lines)


def run_evaluate(
    model_path: str,
    data: str | None = None,
    text: str | None = None,
    split: str = "validation",
    batches: int | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    max_seq_length: int | None = None,
    log: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """``launch/evaluate.py``: load, check, evaluate, print the table, append the record; returns the record."""
    if data and text:
        raise UserError("give --data DIR or --text FILE, not both")
    dev = pick_device(device)
    if batch_size < 1 or (batches is not None and batches < 1):
        raise UserError(f"--batch-size {batch_size} / --batches {batches}: both must be at least 1")
    source = load_model(model_path)
    if seed is None:  # the run's own seed: a run evaluated with defaults sees its own validation masks
        seed = int((source.config or {}).get("seed", Config.seed))
    if data is None and text is None:  # a checkpoint knows the data it was trained on
        data = ((source.config or {}).get("data") or {}).get("dir")
        if not data:
            raise UserError(f"{model_path}: give the data to evaluate on: --data DIR (prepared shards) or --text FILE")
        if not Path(data).is_dir() and not (ROOT / data).is_dir():
            raise UserError(
                f"{model_path}: its training data {data} (data.dir) is gone; give --data DIR or --text FILE"
            )
    with tempfile.TemporaryDirectory(prefix="evaluate-text-") as tmp:
        if text is not None:
            trained = ((source.config or {}).get("trainer") or {}).get("max_seq_length") or 128
            length = max_seq_length or min(int(trained), source.model.config.max_position_embeddings)
            data_dir, split, where = prepare_text(source, text, Path(tmp), length, seed), "train", str(text)
        else:
            if not Path(data).is_dir() and (ROOT / data).is_dir():  # a run's relative data.dir, from elsewhere
                data = str(ROOT / data)
            data_dir = check_data(source, data, split)
            where = f"{data_dir} ({split})"
        try:
            # Unigram baseline: the train split's most frequent token (for --text the text's own, all in train).
            unigram_id = most_frequent_token(data_dir, "train")
            pair = ((source.config or {}).get("data") or {}).get("pair_task", "nsp")
            loader, _ = build_dataloader(data_dir, split, batch_size, seed=seed, masking=MaskingConfig(),
                                         shuffle=False, drop_last=False, sentence_order=pair == "sop")  # fmt: skip
        except ValueError as e:  # a truncated or corrupt shard: one line naming it
            raise UserError(f"--data {data_dir}: {e}") from None
        model = source.model.to(dev)
        n = len(loader) if batches is None else min(batches, len(loader))
        bar = Progress(n)
        try:
            res = evaluate_model(model, loader, n, dev, unigram_id, bar.update)
        finally:
            bar.close()
    if not res["masked_tokens"]:
        raise UserError(f"{where}: no token was masked in {res['samples']} samples; evaluate on more text")
    unigram = source.vocab[unigram_id]
    print(_table(source, where, {**res, "pair_task": pair}, batch_size, seed, unigram), flush=True)
    record = {
        "kind": "evaluate",
        "step": source.step,
        "source": str(source.path.resolve()),
        "data": str(Path(text).resolve() if text else Path(data_dir).resolve()),
        "split": None if text else split,
        "seed": seed,
        "batch_size": batch_size,
        "unigram_token": unigram,
        **{k if k in ("batches", "samples", "masked_tokens") else f"val_{k}": v for k, v in res.items()},
    }
    if log and source.run_dir is not None:
        try:
            path = append_record(source.run_dir, record)
            print(f"  recorded in  {path}")
        except OSError as e:
            warnings.warn(f"{source.run_dir / METRICS_FILE}: not recorded ({e.strerror})", stacklevel=2)
    return record
