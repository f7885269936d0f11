"""The shards stage: plans the shards, runs the workers, records what each wrote; BERT pairs come from pairs.py,
RoBERTa packed sequences from packing.py.

``run_shards`` builds the shards of either mode: it chooses between RoBERTa's packing (``data_prep.packing``) and
BERT's sentence pairs (``data_prep.pairs``, which also holds the corpus, worker and sample builder both modes share),
so it stands here, above both.
Each split is cut into shards of contiguous units, and every shard is built from its own random streams, seeded by
``(seed, split, shard, dupe pass)`` only: the output is byte-identical whatever ``num_workers``.
``shards.json`` fingerprints the settings that decide the shards: a re-run with the same fingerprint only builds
the shards that are missing (an interrupted run is finished), a changed one clears the stale shards first. Each
finished shard leaves a record (``work/shards/SPLIT-NAME.json``: manifest entry and counts), so a re-run reports
what an uninterrupted run would; a shard without its record, or whose files no longer match it, is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep import store
from data_prep.atomic import write_json
from data_prep.config import PrepareConfig, task_dir
from data_prep.errors import DataPrepError
from data_prep.packing import roberta_docs
from data_prep.pairs import (
    STAT_KEYS,
    Builder,
    Corpus,
    Params,
    Worker,
    bert_doc,
    open_token_store,
    plan_shards,
    split_figures,
)
from data_prep.procs import die_with_parent
from data_prep.report import Report
from data_prep.store import LENGTH, NSP_LABEL, sha256_file, shard_complete, shard_name, token_dtype, write_shard
from data_prep.vocab import read_vocab, special_ids

log = logging.getLogger("data_prep")

SPLITS = ("train", "validation")
FINGERPRINT_FILE = "shards.json"
RECORDS_DIR = Path("work") / "shards"
FORMAT_VERSION = 2  # 2: target length drawn per chunk, document tails as validation, short-target counts


def _rng(*key: int) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:16], "little"))


def _record_path(out: str | Path, split: str, name: str) -> Path:
    return Path(out) / RECORDS_DIR / f"{split}-{name}.json"


def _finished(split_dir: Path, name: str, record: Path) -> dict | None:
    """The record of a shard an earlier run finished, if its files are whole and still match it; else None."""
    if not shard_complete(split_dir, name) or not record.exists():
        return None
    try:
        done = json.loads(record.read_text())
        tokens, index = store.open_shard(split_dir, name)
        store.check_index(split_dir / f"{name}.index.npy", index, len(tokens))
    except (ValueError, OSError):  # a torn record or a damaged shard (ShardError): build it again
        return None
    entry = done.get("entry", {})
    sha = {key: sha256_file(split_dir / f"{name}.{key}.npy") for key in ("tokens", "index")}
    ok = entry.get("samples") == len(index) and entry.get("tokens") == len(tokens) and entry.get("sha256") == sha
    ok = ok and isinstance(done.get("short_target"), int)
    return done if ok else None


def _build_task(task: tuple[int, int, int, int]) -> tuple[int, int, dict, dict]:
    split_id, shard, lo, hi = task
    w = _STATE
    split_dir, name = Path(w.p.out) / SPLITS[split_id], shard_name(shard)
    record = _record_path(w.p.out, SPLITS[split_id], name)
    done = _finished(split_dir, name, record)
    if done is None:  # (re)build: the same seeds give the same bytes, so a rebuilt shard equals the lost one
        units = w.units[split_id]
        # Room for the shard's own tokens per pass plus half (NotNext segments come from other documents; 1.16x
        # on books): seldom grown, and np.empty's pages that are never written cost no memory.
        b = Builder(w, int(w.unit_tokens[split_id][lo:hi].sum()) * (w.p.dupe_factor if w.p.nsp else 1) * 3 // 2)
        if w.p.nsp:
            for dupe in range(w.p.dupe_factor):
                rng = _rng(w.p.seed, split_id, shard, dupe)
                for u in range(lo, hi):
                    bert_doc(w, b, rng, units, u)
        else:
            roberta_docs(w, b, units[lo:hi])
        entry = write_shard(split_dir, name, *b.finish((w.p.seed, split_id, shard, 1 << 20)))
        done = {"entry": entry, "dropped": b.dropped, "short_target": b.short}  # known only while building
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, done, indent=1)
    entry = done["entry"]
    index = np.load(split_dir / f"{name}.index.npy", mmap_mode="r")
    stats = {
        "is_next": int((index[:, NSP_LABEL] == 0).sum()),
        "not_next": int((index[:, NSP_LABEL] == 1).sum()),
        "tokens_in_samples": int(index[:, LENGTH].sum()),
        "dropped": int(done["dropped"]),
        "short_target": int(done["short_target"]),
        "short_rows": int((index[:, LENGTH] * 2 < w.p.max_seq_length).sum()),
    }
    return split_id, shard, entry, stats


_STATE: Worker | None = None  # this process's opened corpus


def _init_worker(p: Params) -> None:
    global _STATE
    die_with_parent()
    _STATE = Worker(p)


def _special_ids(out: Path, cfg: PrepareConfig) -> tuple[int, int, int, str]:
    path = out / "vocab.txt"
    if not path.exists() and cfg.vocab:
        path = Path(cfg.vocab)
    if not path.exists():
        raise DataPrepError(f"{out / 'vocab.txt'}: vocabulary not found; run stage=vocab first (or stage=all)")
    tokens = read_vocab(path)
    ids = special_ids(tokens, path)
    return ids["[CLS]"], ids["[SEP]"], len(tokens), sha256_file(path)


def _store_identity(w: Worker) -> str:
    """Content fingerprint of the token store: its offsets plus 1000 sentences' tokens (no mtimes)."""
    h = hashlib.sha256()
    nd = int(w.c.num_docs)
    h.update(repr((nd, w.doc_tokens.sum() if nd else 0)).encode())
    h.update(w.docs.span(0, nd).tobytes())
    n_sent = int(w.docs.span(nd, nd)[0]) if nd else 0
    step = 1 << 20
    for lo in range(0, n_sent + 1, step):
        h.update(w.sents.span(lo, min(lo + step, n_sent)).tobytes())
    for s in np.linspace(0, n_sent - 1, min(n_sent, 1000)).astype(np.int64).tolist():
        h.update(np.asarray(w.c.sentence_tokens(s)).astype(np.int64).tobytes())
    return h.hexdigest()


def _check_fingerprint(out: Path, fingerprint: dict) -> None:
    """Clear the shards of a run whose settings differ (or are unknown), then record this run's settings."""
    path = out / FINGERPRINT_FILE
    old = json.loads(path.read_text()).get("fingerprint") if path.exists() else None
    if old != fingerprint:
        stale = [p for split in SPLITS for p in (out / split).glob("shard-*.npy*")]
        for p in [*stale, *(out / RECORDS_DIR).glob("*.json")]:
            p.unlink()  # shards of other settings (or of unknown ones): never mix them with this run's
    write_json(path, {"fingerprint": fingerprint}, indent=1)


def run_shards(cfg: PrepareConfig, report: Report, open_corpus: Callable[[], Corpus] | None = None) -> dict:
    """Build the train and validation shards of ``task_dir(cfg)`` and return their counts and manifest entries.

    ``open_corpus`` (a picklable zero-argument callable) opens the tokenized corpus in each worker; by default
    ``TokenStore(task_dir)``. Shards go to ``OUTDIR/{train,validation}/shard-NNNNN.{tokens,index}.npy``.
    """
    out = task_dir(cfg)
    if cfg.max_seq_length < (5 if cfg.nsp else 3):
        raise DataPrepError(f"max_seq_length={cfg.max_seq_length}: too short for a sample with its special tokens")
    cls_id, sep_id, vocab_size, vocab_sha = _special_ids(out, cfg)
    opener = open_corpus or functools.partial(open_token_store, str(out))
    p = Params(
        opener,
        str(out),
        cfg.seed,
        cfg.max_seq_length,
        cfg.nsp,
        cfg.short_seq_prob,
        cfg.dupe_factor,
        cfg.validation_fraction,
        cls_id,
        sep_id,
        token_dtype(vocab_size).str,
    )
    w = Worker(p)
    if int(w.doc_tokens.sum()) == 0:
        raise DataPrepError(f"{out}: the token store is empty (no document has any token); nothing to build")
    report.count("documents_without_tokens", int((w.doc_tokens == 0).sum()))
    train, val = w.units
    if w.holdout == "document_tails":
        log.info(
            "shards: whole documents cannot hold out validation_fraction=%s within a point (%d usable "
            "documents); validation is the last %s of every document's sentences (%d tails, %.2f%% of the tokens)",
            cfg.validation_fraction,
            int((w.doc_tokens > 0).sum()),
            cfg.validation_fraction,
            len(val),
            100 * w.unit_tokens[1].sum() / max(1, int(w.doc_tokens.sum())),
        )
    if len(val) == 0:
        report.warn(
            f"validation_fraction={cfg.validation_fraction}: no validation documents "
            f"({len(train)} usable document(s)); the validation split is empty"
        )
    elif len(val) == 1 and cfg.nsp:
        report.warn("validation split has a single document: it holds IsNext pairs only (NotNext needs two)")
    plans = [plan_shards(tokens, cfg) for tokens in w.unit_tokens]
    fingerprint = {
        "version": FORMAT_VERSION,
        "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length,
        "nsp": cfg.nsp,
        "short_seq_prob": cfg.short_seq_prob,
        "dupe_factor": cfg.dupe_factor,
        "validation_fraction": cfg.validation_fraction,
        "samples_per_shard": cfg.samples_per_shard,
        "vocab_sha256": vocab_sha,
        "token_store": _store_identity(w),
    }
    _check_fingerprint(out, fingerprint)
    tasks = [(s, i, lo, hi) for s, plan in enumerate(plans) for i, (lo, hi) in enumerate(plan)]
    results = _run_tasks(tasks, p, w, cfg.num_workers or os.cpu_count() or 1)
    return _summarize(cfg, report, results, w, plans, out, fingerprint)


def _run_tasks(tasks: list, p: Params, w: Worker, workers: int) -> list:
    bar = tqdm(total=len(tasks), desc="shards", unit="shard")
    results = []
    if workers <= 1 or len(tasks) <= 1:
        global _STATE
        _STATE = w
        for t in tasks:
            results.append(_build_task(t))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork after threads (tokenizers, tqdm) in the parent
        with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(p,)) as pool:
            for r in pool.imap_unordered(_build_task, tasks):
                results.append(r)
                bar.update()
    bar.close()
    return sorted(results, key=lambda r: (r[0], r[1]))


def _summarize(
    cfg: PrepareConfig, report: Report, results: list, w: Worker, plans: list, out: Path, fingerprint: dict
) -> dict:
    splits: dict[str, Any] = {}
    totals = {k: sum(r[3][k] for r in results) for k in ("is_next", "not_next", "tokens_in_samples", "dropped")}
    n_all = sum(r[2]["samples"] for r in results)
    for s, name in enumerate(SPLITS):
        entries = [r[2] for r in results if r[0] == s]
        n = sum(e["samples"] for e in entries)
        counts = {k: sum(r[3][k] for r in results if r[0] == s) for k in STAT_KEYS if cfg.nsp or k == "short_rows"}
        splits[name] = {
            "samples": n,
            "tokens": sum(e["tokens"] for e in entries),
            "documents": len(w.units[s]),  # units: whole documents, or heads and tails of documents
            "sample_fraction": round(n / max(1, n_all), 6),
            **split_figures(counts, n),
            "samples_per_shard": [e["samples"] for e in entries],
            "doc_ranges": [[int(w.units[s][lo, 0]), int(w.units[s][hi - 1, 0])] for lo, hi in plans[s]],
            "shards": entries,
        }
    if splits["train"]["samples"] == 0:
        raise DataPrepError(
            f"{out}: no training sample could be built (BERT pairs need two documents or documents "
            "of two or more sentences); add text or use nsp=false"
        )
    samples = {k: v["samples"] for k, v in splits.items()}
    n = sum(samples.values())
    for key, value in [*totals.items(), *((f"samples_{k}", v) for k, v in samples.items())]:
        report.count("chunks_without_pair" if key == "dropped" else key, value)
    result = {
        "splits": splits,
        "samples": samples,
        "is_next": totals["is_next"],
        "not_next": totals["not_next"],
        "tokens_in_samples": totals["tokens_in_samples"],
        "padding_free_fill": round(totals["tokens_in_samples"] / max(1, n) / cfg.max_seq_length, 4),
        "mode": "bert" if cfg.nsp else "roberta",
        "holdout": w.holdout,
    }
    write_json(out / FINGERPRINT_FILE, {"fingerprint": fingerprint, "result": result}, indent=1)
    return result
