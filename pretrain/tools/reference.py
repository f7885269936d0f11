"""Reference curves: what a healthy run of a shipped recipe looks like, to overlay and to check a run against.

``docs/reference/NAME.csv`` (``NAME`` = the run's ``name``: ``demo-cpu``, ``tiny-cpu``) holds one row per log
step of a run of that recipe: ``step, tokens, loss, mlm_loss, nsp_loss, nsp_acc, lr`` and, at evaluation steps,
``val_mlm_loss, val_mlm_acc, val_nsp_acc``. Its first line is a ``#`` comment naming the commit, date, machine
and command that produced it. ``write_reference`` writes one from a run; ``pretrain.tools.report.load_reference`` reads
it (and any CSV with such columns); ``outside_band`` says where a run leaves it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from data_prep.atomic import write_text
from pretrain.tools.report import Reference, Run, load_run

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "docs" / "reference"
TRAIN_KEYS = ("loss", "mlm_loss", "nsp_loss", "nsp_acc", "lr")
EVAL_KEYS = ("val_mlm_loss", "val_mlm_acc", "val_nsp_acc")


def shipped(name: str) -> Path | None:
    """The shipped reference CSV of a recipe name, or None."""
    path = REFERENCE_DIR / f"{name}.csv"
    return path if path.is_file() else None


def write_reference(run_dir: str | Path, out: str | Path, provenance: str) -> Path:
    """The log-step rows of ``run_dir``'s metrics.jsonl as a reference CSV, ``provenance`` as its comment line."""
    run = load_run(run_dir)
    evals = {r["step"]: r for r in run.evals}
    steps = sorted({r["step"] for r in run.train} | set(evals))
    train = {r["step"]: r for r in run.train}
    keys = [k for k in TRAIN_KEYS if run.has(k)] + [k for k in EVAL_KEYS if run.has(k)]
    buf = io.StringIO()
    buf.write(f"# {provenance.strip()}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "tokens", *keys])
    tokens = run.tokens_at(np.array(steps, dtype=np.float64))
    for step, tok in zip(steps, tokens.tolist(), strict=True):
        row = {**train.get(step, {}), **evals.get(step, {})}
        cells = [_cell(row.get(k)) for k in keys]
        w.writerow([step, "" if math.isnan(tok) else int(round(tok)), *cells])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, buf.getvalue())
    return out


def _cell(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return f"{v:.6g}"


def outside_band(run: Run, ref: Reference, key: str, band: float, relative: bool = False) -> list[str]:
    """Steps where ``run``'s ``key`` differs from the reference's at the same step by more than ``band``
    (absolute, or a fraction of the reference's value with ``relative``): one line each; [] when it stays in.
    Only steps both logged are compared; none in common is itself a line."""
    ours, theirs = run.series(key), ref.series(key)
    if ours is None or theirs is None:
        return [f"{key}: not in {'the run' if ours is None else 'the reference'}"]
    ref_at = dict(zip(theirs.step.tolist(), theirs.value.tolist(), strict=True))
    common = [(s, v) for s, v in zip(ours.step.tolist(), ours.value.tolist(), strict=True) if s in ref_at]
    if not common:
        return [f"{key}: no step in common with the reference"]
    out = []
    for step, value in common:
        limit = band * abs(ref_at[step]) if relative else band
        if abs(value - ref_at[step]) > limit:
            out.append(f"{key} at step {int(step)}: {value:.4g} vs reference {ref_at[step]:.4g} (band ±{limit:.3g})")
    return out
