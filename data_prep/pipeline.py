"""Runs the data-prep stages in order, writes ``manifest.json`` and prints the summary.

Stages (each in its own module, each runnable alone with ``stage=NAME``):
``read`` (data_prep.read) -> ``vocab`` (data_prep.vocab) -> ``tokenize`` (data_prep.tokenize) -> ``shards``
(data_prep.shards). Each stage saves its result and report under ``work/state/`` so that a later stage, run in
another process or on another day, can still write the complete manifest. ``merge`` joins the outputs of SLURM
array tasks (``num_tasks > 1``) into one data directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from data_prep.atomic import write_json
from data_prep.config import PrepareConfig, task_dir
from data_prep.errors import DISK_ERRNOS, DataPrepError
from data_prep.manifest import MANIFEST_FILE, MANIFEST_VERSION, Manifest, read_manifest, write_manifest
from data_prep.report import Report
from data_prep.store import shard_name

log = logging.getLogger("data_prep")

STAGES = ("read", "vocab", "tokenize", "shards")
TOOLS = ("tokenizers", "numpy", "blingfire", "mwparserfromhell", "datasets", "pyarrow", "bert-pretrain")


def validate(cfg: PrepareConfig) -> None:
    """Settings that cannot work fail here, before any work starts."""
    checks = [
        (cfg.stage in (*STAGES, "all", "merge"), f"stage={cfg.stage}: choose one of all, {', '.join(STAGES)}, merge"),
        (cfg.max_seq_length >= 8, f"max_seq_length={cfg.max_seq_length}: must be at least 8"),
        (cfg.vocab_size > 5, f"vocab_size={cfg.vocab_size}: must exceed the 5 special tokens"),
        (0.0 <= cfg.short_seq_prob <= 1.0, f"short_seq_prob={cfg.short_seq_prob}: must be within [0, 1]"),
        (0.0 <= cfg.validation_fraction < 1.0, f"validation_fraction={cfg.validation_fraction}: must be in [0, 1)"),
        (cfg.samples_per_shard > 0, f"samples_per_shard={cfg.samples_per_shard}: must be positive"),
        (cfg.dupe_factor >= 1, f"dupe_factor={cfg.dupe_factor}: must be at least 1"),
        (cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: use 0 for one per core, or a positive count"),
        (
            cfg.num_tasks >= 1 and 0 <= cfg.task_index < cfg.num_tasks,
            f"task_index={cfg.task_index} num_tasks={cfg.num_tasks}: need 0 <= task_index < num_tasks",
        ),
        (
            cfg.text_documents in ("auto", "file", "blank_line"),
            f"text_documents={cfg.text_documents}: choose auto, file or blank_line",
        ),
        (len(cfg.inputs) > 0 or cfg.stage == "merge", "inputs=[]: give at least one corpus, e.g. inputs=[PATH]"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataPrepError(message)
    if cfg.num_tasks > 1 and cfg.vocab is None and cfg.stage in ("all", "tokenize", "shards", "vocab"):
        raise DataPrepError(
            f"num_tasks={cfg.num_tasks}: array tasks must share one vocabulary; train it once (stage=read then "
            "stage=vocab with num_tasks=1) and pass vocab=PATH/vocab.txt"
        )
    if cfg.vocab is not None:
        _checkpoint_vocab(cfg)


def _checkpoint_vocab(cfg: PrepareConfig) -> None:
    """``vocab=`` names a vocab.txt or a model directory (e.g. bert-base-uncased, to continue pretraining it): a
    directory gives its vocab.txt, and its casing (tokenizer_config.json / tokenizer.json) must match
    ``lowercase``, else every capitalised word would tokenize differently from the checkpoint's training."""
    from data_prep.vocab import model_dir_lowercase

    given = Path(cfg.vocab).expanduser()
    if given.is_dir():
        if not (given / "vocab.txt").is_file():
            raise DataPrepError(f"vocab={given}: no vocab.txt in this directory; give a BERT model directory or file")
        cfg.vocab = str(given / "vocab.txt")
    elif not given.is_file():
        raise DataPrepError(f"vocab={cfg.vocab}: file not found; give an existing vocab.txt or model directory")
    uncased = model_dir_lowercase(Path(cfg.vocab).parent)
    if uncased is not None and uncased != cfg.lowercase:
        raise DataPrepError(
            f"vocab={given}: the model's tokenizer is {'uncased' if uncased else 'cased'} (tokenizer files beside "
            f"vocab.txt) but lowercase={str(cfg.lowercase).lower()}; set lowercase={str(uncased).lower()}"
        )


def _state_path(out: Path, stage: str) -> Path:
    return out / "work" / "state" / f"{stage}.json"


def _save_state(out: Path, stage: str, state: dict) -> None:
    path = _state_path(out, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, state, indent=1)


def _load_state(out: Path, stage: str) -> dict:
    path = _state_path(out, stage)
    if not path.exists():
        raise DataPrepError(f"{out}: stage '{stage}' has not run yet; run it first (stage={stage}) or use stage=all")
    return json.loads(path.read_text())


def _runner(stage: str):
    # Imported lazily so that `stage=merge` or a config error does not pay for importing every library.
    if stage == "read":
        from data_prep.read import run_read

        return run_read
    if stage == "vocab":
        from data_prep.vocab import run_vocab

        return run_vocab
    if stage == "tokenize":
        from data_prep.tokenize import run_tokenize

        return run_tokenize
    from data_prep.shards import run_shards

    return run_shards


def prepare(cfg: PrepareConfig) -> dict:
    """Run the configured stage(s); return the manifest when the shards stage ran, else the stage states."""
    try:
        return _prepare(cfg)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = Path(e.filename) if e.filename else Path(cfg.output_dir)
        free = shutil.disk_usage(cfg.output_dir).free / 2**20 if Path(cfg.output_dir).exists() else 0.0
        raise DataPrepError(
            f"{where}: {e.strerror} ({free:,.0f} MB free under output_dir={cfg.output_dir}); free "
            "space or fix the permissions, then rerun the same command: finished stages and "
            "shards are kept, nothing complete was overwritten"
        ) from None


def _prepare(cfg: PrepareConfig) -> dict:
    validate(cfg)
    if cfg.stage == "merge":
        return merge(cfg)
    out = task_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    states = {}
    for stage in stages:
        report = Report(strict=cfg.strict)
        start = time.perf_counter()
        log.info("stage %s: starting", stage)
        result = _runner(stage)(cfg, report)
        states[stage] = {"result": result, "report": report.to_dict(), "seconds": time.perf_counter() - start}
        _save_state(out, stage, states[stage])
    if "shards" not in stages:
        return states
    manifest = build_manifest(cfg, out)
    write_manifest(out, manifest)  # last: its presence says the shards are complete
    print_summary(manifest, out)
    return manifest.to_dict()


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(cfg: PrepareConfig, out: Path) -> Manifest:
    states = {stage: _load_state(out, stage) for stage in STAGES}
    report = Report()
    for state in states.values():
        report.merge(Report.from_dict(state["report"]))
    vocab, shards = states["vocab"]["result"], states["shards"]["result"]
    splits = shards["splits"]
    text_bytes = report.counts.get("characters", 0)  # uncompressed text, comparable across .gz/.bz2/plain
    seconds = {stage: round(state["seconds"], 3) for stage, state in states.items()}
    return Manifest(
        format_version=MANIFEST_VERSION,
        mode="bert" if cfg.nsp else "roberta",
        nsp=cfg.nsp,
        max_seq_length=cfg.max_seq_length,
        vocab_size=vocab["vocab_size"],
        vocab_sha256=vocab["vocab_sha256"],
        vocab_trained=vocab["trained"],
        lowercase=vocab["lowercase"],
        special_tokens=vocab["special_tokens"],
        inputs=states["read"]["result"]["inputs"],
        config=dataclasses.asdict(cfg),
        counts=report.to_dict()["counts"],
        skipped=report.to_dict()["skipped"],
        warnings=report.warnings,
        splits=splits,
        holdout=shards.get("holdout", "documents"),
        stage_seconds=seconds,
        throughput_mchars_per_s=round(text_bytes / 1e6 / max(sum(seconds.values()), 1e-9), 3),
        versions=_versions(),
    )


def merge(cfg: PrepareConfig) -> dict:
    """Join the outputs of ``num_tasks`` array tasks into ``output_dir`` (shards hard-linked, renumbered)."""
    root = Path(cfg.output_dir)
    manifests: list[Manifest] = []
    for i in range(cfg.num_tasks):
        manifest = read_manifest(root / "tasks" / f"task-{i:05d}")
        if manifest is None:
            raise DataPrepError(
                f"{root / 'tasks' / f'task-{i:05d}' / MANIFEST_FILE}: task {i} of {cfg.num_tasks} has not finished; "
                "rerun it, then stage=merge"
            )
        manifests.append(manifest)
    first = manifests[0]
    for i, m in enumerate(manifests):
        for key in ("vocab_sha256", "max_seq_length", "nsp"):
            if getattr(m, key) != getattr(first, key):
                raise DataPrepError(
                    f"task {i}: {key}={getattr(m, key)} differs from task 0 ({getattr(first, key)}); rerun them alike"
                )
    from data_prep.pairs import STAT_KEYS, split_figures

    report = Report()
    splits: dict[str, dict] = {}
    stats: dict[str, dict] = {}  # per split, the counts every task recorded (fractions are recomputed from them)
    for i, m in enumerate(manifests):
        report.merge(Report.from_dict({"counts": m.counts, "skipped": m.skipped, "warnings": m.warnings}))
        for split, info in (m.splits or {}).items():
            merged = splits.setdefault(split, {"samples": 0, "tokens": 0, "shards": []})
            counts, prev = {k: info[k] for k in STAT_KEYS if k in info}, stats.get(split)
            stats[split] = counts if prev is None else {k: prev[k] + counts[k] for k in prev if k in counts}
            (root / split).mkdir(parents=True, exist_ok=True)
            for entry in info["shards"]:
                new = shard_name(len(merged["shards"]))
                for suffix in (".tokens.npy", ".index.npy"):  # index last: it marks the shard complete
                    src = root / "tasks" / f"task-{i:05d}" / split / f"{entry['name']}{suffix}"
                    dst = root / split / f"{new}{suffix}"
                    dst.unlink(missing_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                merged["shards"].append({**entry, "name": new, "task": i, "task_shard": entry["name"]})
                merged["samples"] += entry["samples"]
                merged["tokens"] += entry["tokens"]
    n_all = sum(m["samples"] for m in splits.values())
    for split, merged in splits.items():  # the tasks' counts summed, fractions recomputed; shards stay last
        shards = merged.pop("shards")
        merged["sample_fraction"] = round(merged["samples"] / max(1, n_all), 6)
        merged.update(split_figures(stats[split], merged["samples"]), shards=shards)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = root / "tasks" / "task-00000" / name
        if src.exists():
            shutil.copyfile(src, root / name)
    manifest = dataclasses.replace(
        first,
        format_version=MANIFEST_VERSION,
        inputs=[inp for m in manifests for inp in m.inputs],
        counts=report.to_dict()["counts"],
        skipped=report.to_dict()["skipped"],
        warnings=report.warnings,
        splits=splits,
        holdout="/".join(sorted({m.holdout for m in manifests})),
        tasks=[{"task": i, "manifest": f"tasks/task-{i:05d}/{MANIFEST_FILE}"} for i in range(cfg.num_tasks)],
        stage_seconds={"merged_tasks": [m.stage_seconds for m in manifests]},
    )
    write_manifest(root, manifest)
    print_summary(manifest, root)
    return manifest.to_dict()


def print_summary(manifest: Manifest, out: Path) -> None:
    c, splits = manifest.counts, manifest.splits or {}
    lines = [
        f"data prepared in {out} ({manifest.mode} mode, {manifest.max_seq_length} tokens, "
        f"vocabulary {manifest.vocab_size})",
        f"  documents {c.get('documents_read', 0):,}  sentences {c.get('sentences', 0):,}  "
        f"tokens {c.get('tokens', 0):,}  text {c.get('characters', 0) / 1e6:,.1f} M characters",
    ]
    half = (manifest.max_seq_length or 0) / 2
    for split, info in splits.items():
        line = f"  {split:<10} {info['samples']:>10,} samples  {len(info['shards']):>4} shards"
        if "sample_fraction" in info:
            line += f"  {info['sample_fraction']:6.1%} of samples"
        if "not_next_fraction" in info:
            line += f"  NotNext {info['not_next_fraction']:.1%}  short targets {info['short_target_fraction']:.1%}"
        if "short_rows_fraction" in info:
            line += f"  under {half:g} tokens {info['short_rows_fraction']:.1%}"
        if split == "validation" and manifest.holdout == "document_tails":
            line += "  (tails of documents)"
        lines.append(line)
    if manifest.nsp:
        lines.append(f"  IsNext {c.get('is_next', 0):,}  NotNext {c.get('not_next', 0):,}")
    if c.get("special_token_literals"):
        prefix = "special_token_literals_"
        by = ", ".join(f"{k.removeprefix(prefix)} x{v:,}" for k, v in c.items() if k.startswith(prefix))
        lines.append(f"  special-token strings in the text, encoded as text: {c['special_token_literals']:,} ({by})")
    skipped = manifest.skipped
    if skipped:
        lines.append("  skipped: " + "; ".join(f"{k} x{v['count']}" for k, v in skipped.items()))
    if manifest.warnings:
        lines.append(f"  {len(manifest.warnings)} warning(s): see {MANIFEST_FILE}")
    seconds = manifest.stage_seconds
    if "merged_tasks" not in seconds:
        total = sum(seconds.values())
        lines.append(
            f"  time {total:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + ")"
            f"  {manifest.throughput_mchars_per_s:.2f} M characters/s"
        )
    print("\n".join(lines), flush=True)
