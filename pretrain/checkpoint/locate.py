"""Which checkpoint a path means: the one rule, used by resume (``auto``, a bundle, a run directory),
``trainer.init_from``, fine-tuning's ``pretrained=``, every tool, the resume hint, the finished-run check, the last
good checkpoint and retention.

- A **bundle** given by path (a directory with the ``COMPLETE`` marker) is itself, and must verify: anything else
  is one line naming the setting and the failed check (``UserError``, exit 2).
- A **run directory** (or its ``checkpoints/``) means its newest bundle that verifies. Each newer bundle that fails
  is named in one ``warning:`` line and set aside (moved to ``corrupt-<name>``: out of the way of resume and
  retention, kept for a look; left where it is on a read-only disk). None that verifies is an error.
- A run directory with **no complete bundle**: resume starts afresh, unless half-written bundles are there (killed
  while saving: an error, never a silent restart); the weights tools take the run's ``hf/`` export.
- A **Hugging Face directory** (``config.json``) is itself (``resolve``, for the tools that read weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from data_prep.errors import UserError
from pretrain.checkpoint.bundle import (
    MARKER,
    CheckpointError,
    check_format,
    checkpoint_step,
    complete_bundles,
    describe_verify,
    verify,
)


def run_bundles(path: Path) -> list[Path]:
    """The complete bundles of a run directory (``path/checkpoints``) or of a checkpoints directory, newest
    first (not verified)."""
    return complete_bundles(path / "checkpoints") or complete_bundles(path)


def is_bundle(path: Path) -> bool:
    return (path / MARKER).is_file()


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def newest_good(
    bundles: list[Path], checksums: bool = True, quiet: bool = False, before_step: int | None = None
) -> Path | None:
    """The first of ``bundles`` (newest first, saved before ``before_step`` where given) that this code reads and
    that verifies (``checksums``: sha256 too, else sizes). Unless ``quiet``, every newer one that fails is named
    in one line and set aside; ``quiet`` (a check, a hint) only looks."""
    return _first_good(bundles, checksums, quiet, before_step)[0]


def _first_good(
    bundles: list[Path], checksums: bool, quiet: bool = False, before_step: int | None = None
) -> tuple[Path | None, dict | None]:
    if before_step is not None:
        bundles = [t for t in bundles if checkpoint_step(t) < before_step]
    for i, tag in enumerate(bundles):
        check_format(tag)
        try:
            return tag, verify(tag, checksums)
        except CheckpointError as e:
            if not quiet:
                instead = bundles[i + 1] if i + 1 < len(bundles) else "no older checkpoint"
                _warn(f"{e}; {_set_aside(tag)}, falling back to {instead}")
    return None, None


def _set_aside(tag: Path) -> str:
    aside = tag.with_name(f"corrupt-{tag.name}")
    try:
        tag.rename(aside)
    except OSError as e:
        return f"left in place ({e.strerror.lower()})"
    return f"set aside as {aside.name}"


def bundle(path: str | os.PathLike, what: str, checksums: bool = True, say: bool = False) -> Path:
    """The bundle ``what=path`` names: a bundle must verify; a run directory means its newest bundle that does.
    ``say``: print what verifying it checked (a resume's start-up line)."""
    p = Path(path)
    if is_bundle(p):
        check_format(p)
        try:
            report = verify(p, checksums)
        except CheckpointError as e:
            raise UserError(f"{what}={p}: {e}") from None
        tag = p
    else:
        bundles = run_bundles(p)
        tag, report = _first_good(bundles, checksums)
        if tag is None and bundles:
            raise UserError(f"{what}={p}: no checkpoint under it verifies; restore one, or give another {what}")
        if tag is None:
            raise UserError(f"{what}={p}: no complete checkpoint there (a step* dir with a {MARKER} marker)")
    if say:
        print(describe_verify(tag, report), flush=True)
    return tag


def resume_from(resume: str, ckpt_root: Path, checksums: bool = True) -> Path | None:
    """The bundle a run resumes from: ``none`` afresh, ``auto`` this run's newest bundle that verifies (None in a
    new run), anything else the bundle or run directory it names (``bundle``)."""
    if resume == "none":
        return None
    if resume != "auto":
        return bundle(resume, "resume", checksums, say=True)
    bundles = complete_bundles(ckpt_root)
    if not bundles:
        partial = sorted(p.name for p in ckpt_root.glob("step*")) if ckpt_root.is_dir() else []
        if partial:
            raise UserError(
                f"{ckpt_root} holds checkpoints but none is complete ({', '.join(partial[-3:])}: killed while "
                "saving?); pass resume=none to start afresh, or restore a complete one"
            )
        return None
    tag, report = _first_good(bundles, checksums)
    if tag is None:
        raise UserError(f"no checkpoint under {ckpt_root} verifies; restore one, or pass resume=none to start afresh")
    print(describe_verify(tag, report), flush=True)
    return tag


def resolve(path: str | os.PathLike, what: str, checksums: bool | None = True) -> tuple[str, Path]:
    """(``"hf"`` or ``"checkpoint"``, the directory) that ``path`` means to a tool that reads weights: a Hugging
    Face directory is itself; a bundle or run directory as ``bundle`` says (``checksums`` None: not verified here,
    the caller verifies when it reads); a run without a complete bundle its ``hf/`` export."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{what}={p}: not found; give a run directory, a checkpoint (RUN_DIR/checkpoints/stepNNNNNNNN) or a "
            "Hugging Face model directory (RUN_DIR/hf)"
        )
    if (p / "config.json").is_file():
        return "hf", p
    if is_bundle(p) or run_bundles(p):
        if checksums is None:
            return "checkpoint", p if is_bundle(p) else run_bundles(p)[0]
        return "checkpoint", bundle(p, what, checksums)
    if (p / "hf" / "config.json").is_file():
        return "hf", p / "hf"
    if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file() or list(p.glob("step*")):
        raise UserError(f"{what}={p}: a run without a complete checkpoint (no step*/{MARKER} under "
                        f"{p / 'checkpoints'}) and no hf/ export; train it to a checkpoint")  # fmt: skip
    raise UserError(
        f"{what}={p}: not a model: no config.json (Hugging Face directory), no {MARKER} marker (checkpoint) and "
        "no checkpoints/ (run directory)"
    )


def resume_hint(run_dir: Path) -> str:
    """Where a rerun of the same command would continue from (sizes checked: the hint of a failing run is quick)."""
    tag = newest_good(complete_bundles(run_dir / "checkpoints"), checksums=False, quiet=True)
    if tag is None:
        return f"no complete checkpoint in {run_dir / 'checkpoints'} yet; rerun the same command to start again"
    return f"the last complete checkpoint is {tag}; rerun the same command to resume"


def finished(run_dir: Path, max_steps: int, checksums: bool = True) -> Path | None:
    """The bundle of a run that reached ``max_steps`` (the newest, and it verifies), else None: quiet, a resume
    names what fails."""
    bundles = complete_bundles(run_dir / "checkpoints")
    if not bundles or checkpoint_step(bundles[0]) < max_steps:
        return None
    return newest_good(bundles[:1], checksums, quiet=True)
