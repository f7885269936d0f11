"""Checkpoints: one bundle per step, ``RUN_DIR/checkpoints/stepNNNNNNNN/``, and everything that reads or writes it.

A bundle is DeepSpeed's own files (``engine.save_checkpoint(save_latest=False)``: module, optimizer and ZeRO
partitions, LR scheduler) plus our ``client_state`` (step, counters, every rank's sampler position, RNG states
and open log window, the resolved config, the W&B run id). After a barrier rank 0 commits it with a ``COMPLETE``
marker (fsynced, renamed into place) that lists the size and sha256 of every file of the bundle (format 2), so a
job killed mid-save never leaves a bundle that ``resume=auto`` would pick, and ``verify`` finds a file truncated,
overwritten or damaged after the save; retention deletes old bundles only after a newer one is complete. A save
that fails (full disk) removes its partial bundle and stops with one line. A ZeRO checkpoint of another world
size is converted once by DeepSpeed's ``ds_to_universal`` and loaded as a universal checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import fsync_dir, write_json
from data_prep.errors import UserError, first_line
from pretrain.checkpoint import safe_load
from pretrain.runtime import distributed as D

CHECKPOINT_FORMAT = 2  # 2: COMPLETE lists every file's size and sha256; 1: no file list (nothing to verify)
MARKER = "COMPLETE"
HASH_CHUNK = 64 << 20  # files are hashed in pieces of this many bytes, the pieces on every core


class CheckpointError(UserError):
    """A bundle that fails verification: the file and the check that failed, in one line."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    sequences: int = 0
    tokens: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss (or an fp16 overflow), over the whole run
    nonfinite_streak: int = 0  # consecutive steps with a non-finite loss, up to now
    # Running sums since the last log line (kept in checkpoints so a resumed log window averages the same steps).
    # (the loss, each of the model's named loss parts, micro-batches: the engine's log window fills in the keys)
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "micro": 0.0})


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def complete_bundles(root: Path) -> list[Path]:
    """Tag dirs under ``root`` with a ``COMPLETE`` marker, newest first."""
    return sorted((p for p in root.glob("step*") if (p / MARKER).is_file()), reverse=True) if root.is_dir() else []


def _sha256(path: Path, start: int, length: int) -> str:
    """sha256 of ``length`` bytes of ``path`` from ``start``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0 and (block := f.read(min(1 << 22, length))):
            h.update(block)
            length -= len(block)
    return h.hexdigest()


def _hash_all(paths: list[Path], threads: int | None) -> list[list[str] | OSError]:
    """Per file, the sha256 of each ``HASH_CHUNK`` of it, all chunks of all files in threads (hashlib releases the
    GIL, so a bundle of one large file hashes on every core); an unreadable file gives its OSError."""
    jobs = [(i, path, start) for i, path in enumerate(paths)
            for start in range(0, max(1, path.stat().st_size), HASH_CHUNK)]  # fmt: skip

    def one(job: tuple[int, Path, int]) -> str | OSError:
        try:
            return _sha256(job[1], job[2], HASH_CHUNK)
        except OSError as e:
            return e

    out: list[list[str] | OSError] = [[] for _ in paths]
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for (i, _, _), h in zip(jobs, pool.map(one, jobs), strict=True):
            if isinstance(h, OSError):
                out[i] = h
            elif not isinstance(out[i], OSError):
                out[i].append(h)
    return out


def file_table(tag: Path, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 (of each ``HASH_CHUNK``) of every file of a bundle, paths relative to it: its ``COMPLETE``
    marker's list."""
    files = sorted(p for p in tag.rglob("*") if p.is_file() and p.name != MARKER)
    hashes = _hash_all(files, threads)
    for h in hashes:
        if isinstance(h, OSError):
            raise h
    return {
        str(p.relative_to(tag)): {"size": p.stat().st_size, "sha256": h} for p, h in zip(files, hashes, strict=True)
    }


def verify(tag: Path, checksums: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Check a complete bundle against its ``COMPLETE`` marker: every listed file present, readable, of the listed
    size and (``checksums``) sha256. Raises ``CheckpointError`` naming the file and the failed check; returns
    ``{"files", "bytes", "seconds", "checksums"}`` (``files`` 0 for a format-1 bundle, which lists none)."""
    start, marker = time.perf_counter(), tag / MARKER
    try:
        listed = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{marker}: unreadable marker ({e}); the bundle cannot be trusted") from None
    if listed is None:
        return {"files": 0, "bytes": 0, "seconds": 0.0, "checksums": False}
    paths, total = [], 0
    for rel, meta in listed.items():
        path = tag / rel
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{path}: {e.strerror.lower()} (listed in {marker})") from None
        if size != meta["size"]:
            raise CheckpointError(f"{path}: {size:,} bytes where {marker} lists {meta['size']:,} (truncated or "
                                  "overwritten after the save)")  # fmt: skip
        paths.append(path)
        total += size
    if checksums:
        for path, h in zip(paths, _hash_all(paths, threads), strict=True):
            if isinstance(h, OSError):
                raise CheckpointError(f"{path}: unreadable ({h.strerror})")
            want = listed[str(path.relative_to(tag))]["sha256"]
            if h != want:
                at = next((i for i, (x, y) in enumerate(zip(h, want, strict=False)) if x != y), 0) * HASH_CHUNK
                raise CheckpointError(f"{path}: sha256 of bytes {at:,}+ does not match {marker}'s (damaged after "
                                      "the save)")  # fmt: skip
    return {"files": len(paths), "bytes": total, "seconds": time.perf_counter() - start, "checksums": checksums}


def describe_verify(tag: Path, report: dict[str, Any]) -> str:
    """The one line that says what verifying ``tag`` checked and cost."""
    if not report["files"]:
        return f"{tag}: format-1 checkpoint, no file list to verify"
    how = "sha256" if report["checksums"] else "sizes only (trainer.verify_checkpoint=false)"
    return (
        f"verified {tag}: {report['files']} files, {report['bytes'] / 2**20:,.1f} MiB, {how} in "
        f"{report['seconds']:.2f} s"
    )


def check_format(tag: Path) -> None:
    """Refuse, in one line, a checkpoint written by a newer version of this code (its ``COMPLETE`` marker says)."""
    try:
        version = int(json.loads((tag / MARKER).read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return  # older markers carry no format: version 1
    if version > CHECKPOINT_FORMAT:
        raise UserError(
            f"{tag}: checkpoint format {version}, but this code reads format {CHECKPOINT_FORMAT} at most; update "
            "the code to the version that wrote it, or pass resume=none to start afresh"
        )


def checkpoint_step(tag: Path) -> int:
    """The step of a complete checkpoint, from its ``COMPLETE`` marker (the tag name where the marker is older)."""
    try:
        return int(json.loads((tag / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return int(tag.name.removeprefix("step").split("_")[0])


def fp32_weights(tag: Path) -> dict[str, torch.Tensor]:
    if not any(tag.glob("*_optim_states.pt")):  # no ZeRO optimizer partitions: the module's are the master weights
        states = tag / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise UserError(f"{tag}: no *_optim_states.pt and no {states.name}; not a complete checkpoint")
        sd = safe_load.load_file(states)
        if stage := safe_load.zero_stage(sd):  # its fp32 weights were in the optimizer partitions that are missing
            raise UserError(
                f"{tag}: a ZeRO-{stage} checkpoint without its *_optim_states.pt files; give a complete one"
            )
        return {k: v.float() for k, v in sd["module"].items()}
    safe_load.check_bundle(tag)  # DeepSpeed's loader unpickles with weights_only=False: only allowed types reach it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:  # ZeRO 1-3 (and bf16): the fp32 master weights, whatever the stage and world size
        return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # a rank's partition missing, another layout
        raise UserError(f"{tag}: DeepSpeed cannot gather its fp32 weights ({first_line(e)[:200]})") from None


def client_state(
    state: TrainState, position: Any, cfg_dict: dict, wandb_id: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """``client_state`` of a checkpoint: the counters, a trainer's ``extra`` keys, and per-rank entries (log window,
    data position, RNG) gathered from every rank: DeepSpeed writes the client state from one rank (ZeRO 0-2) and
    every rank reads that copy back."""
    return {
        "format": CHECKPOINT_FORMAT,
        **extra,
        **asdict(state),
        "window": D.gather(state.window),
        "sampler": D.gather(position.state_dict()),
        "rng": D.gather(_rng_state()),
        "world_size": dist.get_world_size(),
        "config": cfg_dict,
        "wandb_id": wandb_id,
    }


def save(engine: Any, root: Path, client: dict, keep_last: int) -> Path:
    tag = f"step{client['step']:08d}"
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as e:  # full disk, quota, read-only mount: torch.save raises either
        error = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    ok = torch.tensor([0.0 if error else 1.0], device=engine.device)
    if D.all_reduce(ok, dist.ReduceOp.MIN).item() == 0:  # every rank learns that some rank failed
        free = shutil.disk_usage(root).free / 2**20 if root.exists() else 0.0  # before the clean-up frees some
        if dist.get_rank() == 0:
            shutil.rmtree(root / tag, ignore_errors=True)  # never leave a half-written tag behind
        # torch reports a full disk as "unexpected pos ..." or "file write failed": say what it means
        why = (
            f": the disk is full ({free:,.0f} MB free)"
            if free < 64 or "No space" in (error or "")
            else f" ({error})"
            if error
            else " (on another rank)"
        )
        raise UserError(
            f"checkpoint {root / tag} could not be written{why}; free space under {root} or point "
            "run_dir elsewhere, then rerun the same command to resume"
        )
    D.barrier()  # every rank has written its shards
    if dist.get_rank() == 0:
        mark_complete(root / tag, client["step"], dist.get_world_size())
        retain(root, tag, keep_last)
    D.barrier()
    return root / tag


def mark_complete(tag: Path, step: int, world_size: int) -> None:
    """The commit of a bundle: its ``COMPLETE`` marker with every file's size and sha256, written atomically once
    every rank's files are."""
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "world_size": world_size, "time": time.time(),
            "files": file_table(tag)}  # fmt: skip
    write_json(tag / MARKER, meta, indent=None)


def retain(root: Path, tag: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete bundles (``tag`` is complete by now) and drop half-written ones."""
    done = complete_bundles(root)  # newest first
    for old in done[max(1, keep_last) :]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step*"):  # half-written leftovers of killed jobs
        if not (stale / MARKER).is_file() and stale.name < tag:
            shutil.rmtree(stale, ignore_errors=True)


def universal_tag(tag: Path, stage: int, world_size: int, is_main: bool) -> Path | None:
    """For a ZeRO 1-3 checkpoint saved by another number of ranks: the same checkpoint in DeepSpeed's universal
    format (per-parameter fp32 weights and optimizer moments, loadable by any world size), converted once by rank 0
    with DeepSpeed's ``ds_to_universal`` into ``TAG_universal`` while the others wait. None where no conversion
    is needed (same world size, or ZeRO-0, whose files do not depend on it)."""
    saved = len(list(tag.glob("*_optim_states.pt")))  # one file per data-parallel rank of the saving job
    if stage == 0 or saved in (0, world_size):
        return None
    out = tag.with_name(tag.name + "_universal")
    if is_main and not out.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(tag),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )  # our model declares no TP/PP layout: plain DP
        print(f"resume: {saved} rank(s) -> {world_size}: converting {tag.name} to a universal checkpoint", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter
            ds_to_universal(args)
        (tag.parent / "latest_universal").unlink(missing_ok=True)  # we always name the tag
        os.replace(tmp, out)  # complete, or absent
        fsync_dir(out.parent)
    D.barrier()
    return out


def restore(engine: Any, tag: Path, position: Any, load_tag: Path | None = None) -> tuple[TrainState, dict]:
    """Load ``tag`` (or its universal conversion ``load_tag``) into the engine; the data position, RNG and
    counters from its client state. Another world size keeps the data position in samples (rank 0's state: a
    position object must read it for any world size) and restarts the RNG streams."""
    load = load_tag or tag
    try:
        load_path, client = engine.load_checkpoint(str(load.parent), tag=load.name)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # an unverifiable bundle
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{load}: unreadable ({why}); give resume=PATH of an older checkpoint, or "
                              "resume=none to start afresh") from None  # fmt: skip
    if load_path is None or not client:
        raise UserError(f"resume: DeepSpeed found no checkpoint in {tag}; pass resume=none to start afresh")
    rank, same_world = dist.get_rank(), client["world_size"] == dist.get_world_size()
    try:
        position.load_state_dict(client["sampler"][rank if same_world else 0])
    except ValueError as e:
        raise UserError(f"resume from {tag}: {e} (or start a new run dir / resume=none)") from None
    if same_world:
        _set_rng_state(client["rng"][rank])
    elif rank == 0:
        print(f"resume: world size {client['world_size']} -> {dist.get_world_size()}: RNG streams restart")
    keys = [f.name for f in fields(TrainState) if f.name != "window" and f.name in client]  # older formats: fewer
    state = TrainState(**{k: client[k] for k in keys})
    if same_world:  # per-rank loss sums of the open log window
        state.window = dict(client["window"][rank])
    return state, client
