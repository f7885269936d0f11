"""Run reports: training curves of one or more runs as PNG figures and a Markdown summary table.

Reads ``RUN_DIR/metrics.jsonl`` as ``pretrain.training.metrics.MetricsLogger`` writes it: ``train`` records (one per log
window: step, tokens seen, loss, MLM/NSP loss, learning rate, gradient norm, throughput), ``eval`` records
(``val_*`` losses and accuracies), and others that a report leaves out: spikes, skipped steps, and the
``evaluate`` records of ``launch/evaluate.py`` (on other data or a whole split: not points of the same validation
curve). Keys differ between runs (RoBERTa mode has no NSP, older runs lack some), so every curve is drawn where
its key is present and skipped where it is not; a panel that no run fills is left out. Used by
``launch/report.py``.

Plotting goes through ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global state, no
display needed, and the same pixels on a laptop and a headless node.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import UserError
from pretrain.training.metrics import METRICS_FILE, duration

DPI = 100
PANEL_W, PANEL_H, LEGEND_H = 4.5, 3.5, 0.9  # inches; a figure is PANEL_W x ncols by PANEL_H x nrows + LEGEND_H
TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.4}
VAL_STYLE = {"linestyle": ":", "linewidth": 1.6, "marker": "o", "markersize": 4}
REF_STYLE = {"linestyle": "--", "linewidth": 1.4}
BASE_STYLE = {"linestyle": "-.", "linewidth": 1.0, "alpha": 0.7}  # the unigram baseline, in the run's colour
REF_COLORS = ["black", "0.5", "saddlebrown"]  # references stay out of the runs' colour cycle


class ReportError(UserError):
    """A user mistake (a run directory that does not exist, no metrics, an unreadable reference CSV): printed as
    one ``error:`` line by ``launch/report.py``, exit code 2."""


@dataclass
class Series:
    """One curve: values with the step and the tokens seen at which they were logged (NaN where unknown)."""

    step: np.ndarray
    tokens: np.ndarray
    value: np.ndarray


def _number(v: Any) -> float:
    """A record value as a float; NaN for None (a non-finite value logged as null), text, lists and booleans."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


@dataclass
class Run:
    """The usable records of one run's metrics.jsonl, in step order (the last record of a step wins)."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    bad_lines: int = 0

    def has(self, key: str) -> bool:
        return any(math.isfinite(_number(r.get(key))) for r in (*self.train, *self.evals))

    def series(self, key: str) -> Series | None:
        records = self.evals if key.startswith("val_") else self.train
        rows = [(r["step"], _number(r.get(key))) for r in records if math.isfinite(_number(r.get(key)))]
        if not rows:
            return None
        step = np.array([s for s, _ in rows], dtype=np.float64)
        return Series(step, self.tokens_at(step), np.array([v for _, v in rows], dtype=np.float64))

    def tokens_at(self, steps: np.ndarray) -> np.ndarray:
        """Tokens seen at ``steps``, interpolated between training records: eval records carry no token count,
        and an evaluation need not fall on a log step. Step 0 has seen 0 tokens."""
        known = [(r["step"], _number(r.get("tokens"))) for r in self.train if math.isfinite(_number(r.get("tokens")))]
        if not known:
            return np.full(len(steps), math.nan)
        xs, ys = zip(*[(0, 0.0), *known], strict=True)
        return np.interp(steps, np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64))


@dataclass
class Reference:
    """A reference curve from a CSV (columns such as ``tokens,step,mlm_loss,nsp_acc,lr``), drawn dashed."""

    label: str
    path: Path
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        return key in self.columns and bool(np.isfinite(self.columns[key]).any())

    def series(self, key: str) -> Series | None:
        if not self.has(key):
            return None
        n = len(self.columns[key])
        nan = np.full(n, math.nan)
        return Series(self.columns.get("step", nan), self.columns.get("tokens", nan), self.columns[key])


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    keys: tuple[tuple[str, str], ...]  # (record key, "train" | "validation")
    percent: bool = False
    log: bool = False
    chance: float | None = None
    only_with: str | None = None  # drawn only when some run has this key


PANELS = (
    # The total loss equals the MLM loss without NSP (RoBERTa mode): then the MLM panel says it all.
    Panel("Training loss (MLM + NSP)", "loss", (("loss", "train"),), only_with="nsp_loss"),
    Panel("MLM loss", "cross-entropy", (("mlm_loss", "train"), ("val_mlm_loss", "validation"))),
    Panel("NSP loss", "cross-entropy", (("nsp_loss", "train"), ("val_nsp_loss", "validation"))),
    Panel(
        "MLM accuracy",
        "accuracy (masked tokens)",
        (("mlm_acc", "train"), ("val_mlm_acc", "validation"), ("val_unigram_acc", "baseline")),
        True,
    ),  # fmt: skip
    Panel("NSP accuracy", "accuracy", (("nsp_acc", "train"), ("val_nsp_acc", "validation")), True, chance=0.5),
    Panel("Learning rate", "learning rate", (("lr", "train"),)),
    Panel("Throughput", "tokens / s", (("tokens_per_s", "train"),)),
    Panel("Gradient norm", "global L2 norm (log scale)", (("grad_norm", "train"),), log=True),
)
X_AXES = {"step": "optimizer step", "tokens": "tokens seen"}
FIGURE_FILES = {"step": "report_steps.png", "tokens": "report_tokens.png"}
HEADINGS = {"step": "Against optimizer steps", "tokens": "Against tokens seen"}


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read ``path/metrics.jsonl``; ``ReportError`` (one line naming the path and what to do) when the folder or
    file is missing or holds no training record. Unparsable lines (a write cut by a crash) are counted, not fatal."""
    path = Path(path)
    metrics = path / METRICS_FILE
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory; give the run_dir of a training run (e.g. runs/NAME)")
    if not metrics.is_file():
        raise ReportError(
            f"{metrics}: not found; {path} is not a run directory with metrics (a run writes it at its first log "
            "step: check the path, or train longer than trainer.log_every steps)"
        )
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    bad = 0
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise ReportError(f"{metrics}: cannot read ({e.strerror})") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(r, dict) or not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool):
            bad += 1
            continue
        kind = r.get("kind")
        if kind == "train" or (kind is None and "loss" in r):
            train[r["step"]] = r
        elif kind == "eval" or (kind is None and any(k.startswith("val_") for k in r)):
            evals[r["step"]] = r
    if not train:
        raise ReportError(
            f"{metrics}: no training records (kind 'train'); the run has not reached its first log step "
            "(trainer.log_every): train longer, or give another run directory"
        )
    return Run(
        name=name or path.resolve().name,
        path=path,
        train=[train[s] for s in sorted(train)],
        evals=[evals[s] for s in sorted(evals)],
        bad_lines=bad,
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, named after its directory; two directories of the same name are told apart by their parent."""
    resolved = [Path(p).resolve() for p in paths]
    names = [p.name for p in resolved]
    named = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in resolved]
    return [load_run(p, n) for p, n in zip(paths, named, strict=True)]


def load_reference(path: str | Path, label: str = "reference") -> Reference:
    """A CSV with a header row; numeric columns kept, empty cells NaN. It needs a ``step`` or ``tokens`` column
    and at least one column a panel plots."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:  # '#' lines: provenance comments
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    except OSError as e:
        raise ReportError(f"{path}: cannot read the reference CSV ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a CSV file ({e})") from None
    if not rows:
        raise ReportError(f"{path}: no rows; a reference CSV has a header (e.g. tokens,step,mlm_loss,lr) and rows")
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name is None:
            continue
        values = []
        for r in rows:
            cell = (r.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                values.append(math.nan)  # a text column (a label) or a stray cell: not plotted
        columns[name.strip()] = np.array(values, dtype=np.float64)
    plotted = sorted({k for p in PANELS for k, _ in p.keys} & set(columns))
    if "step" not in columns and "tokens" not in columns:
        raise ReportError(f"{path}: no 'step' or 'tokens' column to plot against; columns: {', '.join(columns)}")
    if not plotted:
        keys = ", ".join(sorted({k for p in PANELS for k, _ in p.keys}))
        raise ReportError(f"{path}: no column a report plots; name columns after metrics.jsonl keys ({keys})")
    return Reference(label, path, columns)


# ------------------------------------------------------------------------------------------------- summary


def window_seconds(run: Run) -> float:
    """Training time without evaluations, start-up or requeue gaps: each window's new tokens over its tokens/s."""
    total, prev = 0.0, 0.0
    for r in run.train:
        tokens, tps = _number(r.get("tokens")), _number(r.get("tokens_per_s"))
        if math.isfinite(tokens) and math.isfinite(tps) and tps > 0:
            total += max(tokens - prev, 0.0) / tps
        if math.isfinite(tokens):
            prev = tokens
    return total


def summarize(run: Run) -> dict[str, Any]:
    """One run's figures for the table (None where the run has no such value)."""

    def values(key: str) -> list[float]:
        records = run.evals if key.startswith("val_") else run.train
        return [v for v in (_number(r.get(key)) for r in records) if math.isfinite(v)]

    def last(key: str) -> float | None:
        v = values(key)
        return v[-1] if v else None

    def best(key: str, pick: Any) -> float | None:
        v = values(key)
        return pick(v) if v else None

    train_s = window_seconds(run)
    tokens = last("tokens")
    times = [t for t in (_number(r.get("time")) for r in (*run.train, *run.evals)) if math.isfinite(t)]
    # Records are stamped when written: the span misses the first window, which its own throughput gives.
    tokens0, tps0 = _number(run.train[0].get("tokens")), _number(run.train[0].get("tokens_per_s"))
    first_window = tokens0 / tps0 if math.isfinite(tokens0) and math.isfinite(tps0) and tps0 > 0 else 0.0
    wall = max(times) - min(times) + first_window if times else None
    return {
        "run": run.name,
        "path": str(run.path),
        "steps": max(r["step"] for r in (*run.train, *run.evals)),
        "tokens": int(tokens) if tokens is not None else None,
        "train_loss": last("loss"),
        "val_mlm_loss_best": best("val_mlm_loss", min),
        "val_mlm_loss": last("val_mlm_loss"),
        "val_mlm_acc_best": best("val_mlm_acc", max),
        "val_mlm_acc": last("val_mlm_acc"),
        "val_nsp_acc": last("val_nsp_acc"),
        "tokens_per_s": tokens / train_s if tokens and train_s > 0 else None,
        "wall_seconds": wall,
    }


def _fmt(v: float | int | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per run; "n/a" where a run has no such value (no validation, RoBERTa mode)."""
    head = (
        "| run | steps | tokens | final train loss | val MLM loss (best / final) | val MLM acc (best / final) "
        "| val NSP acc | tokens/s | wall time |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * 6]
    for s in rows:
        lines.append(
            f"| {s['run']} | {s['steps']:,} | {_fmt(s['tokens'], ',')} | {_fmt(s['train_loss'], '.4f')} "
            f"| {_fmt(s['val_mlm_loss_best'], '.4f')} / {_fmt(s['val_mlm_loss'], '.4f')} "
            f"| {_fmt(s['val_mlm_acc_best'], '.2%')} / {_fmt(s['val_mlm_acc'], '.2%')} "
            f"| {_fmt(s['val_nsp_acc'], '.2%')} | {_fmt(s['tokens_per_s'], ',.0f')} | {duration(s['wall_seconds'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- figures


def panels_for(runs: list[Run], refs: list[Reference]) -> list[Panel]:
    """The panels at least one run or reference fills."""
    sources: list[Run | Reference] = [*runs, *refs]
    filled = [p for p in PANELS if any(s.has(k) for s in sources for k, _ in p.keys)]
    return [p for p in filled if p.only_with is None or any(r.has(p.only_with) for r in runs)]


def grid(n: int) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels: at most 4 columns, at most 2 rows for the usual 8."""
    cols = {1: 1, 2: 2, 3: 3, 4: 2}.get(n, 3 if n <= 6 else 4)
    return math.ceil(n / cols), cols


def figure_pixels(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of ``n_panels`` panels (savefig without bbox cropping)."""
    rows, cols = grid(n_panels)
    return round(PANEL_W * cols * DPI), round((PANEL_H * rows + LEGEND_H) * DPI)


def build_figure(runs: list[Run], refs: list[Reference], x: str) -> Any:
    """One figure of every panel against ``x`` (``step`` or ``tokens``): a colour per run, solid training
    curves, dotted validation points, dashed references, one legend below the panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter, PercentFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")

    panels = panels_for(runs, refs)
    rows, cols = grid(len(panels))
    width, height = figure_pixels(len(panels))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    seen_val = seen_chance = seen_base = False
    for ax, panel in zip(axes, panels, strict=False):
        for run, color in zip(runs, colors, strict=True):
            for key, part in panel.keys:
                s = run.series(key)
                if s is None:
                    continue
                xs = s.step if x == "step" else s.tokens
                ok = np.isfinite(xs) & np.isfinite(s.value) & ((s.value > 0) if panel.log else True)
                if ok.any():
                    style = {"validation": VAL_STYLE, "baseline": BASE_STYLE}.get(part, TRAIN_STYLE)
                    if ok.sum() == 1:  # one log window: a line of one point is invisible
                        style = {**style, "marker": "o", "markersize": 5}
                    ax.plot(xs[ok], s.value[ok], color=color, label=f"{run.name} {part}", **style)
                    seen_val |= part == "validation"
                    seen_base |= part == "baseline"
        for ref, ref_color in zip(refs, REF_COLORS * len(refs), strict=False):
            for key, _ in panel.keys:
                s = ref.series(key)
                if s is None:
                    continue
                xs = s.step if x == "step" else s.tokens
                ok = np.isfinite(xs) & np.isfinite(s.value)
                if ok.any():
                    ax.plot(xs[ok], s.value[ok], color=ref_color, label=ref.label, **REF_STYLE)
        if panel.chance is not None:
            ax.axhline(panel.chance, color="0.6", linewidth=1.0, linestyle="-.", label="chance")
            seen_chance = True
        ax.set_title(panel.title)
        ax.set_xlabel(X_AXES[x])
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if panel.log and ax.lines and all((np.asarray(ln.get_ydata()) > 0).all() for ln in ax.lines):
            ax.set_yscale("log")
            # Plain numbers (0.5, 1, 2) read better than 10^k; under a decade the minor ticks need labels too.
            ax.yaxis.set_major_formatter(plain)
            lo, hi = ax.get_ylim()
            ax.yaxis.set_minor_formatter(plain if math.log10(hi / lo) < 1 else NullFormatter())
        elif panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        elif panel.keys[0][0] == "lr":
            ax.yaxis.set_major_formatter(plain)
        elif panel.keys[0][0] == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    # One legend for the figure: runs by colour, then what each line style means.
    handles = [Line2D([], [], color=c, linewidth=3) for c in colors]
    labels = [r.name for r in runs]
    handles.append(Line2D([], [], color="0.3", **TRAIN_STYLE))
    labels.append("training (log window)")
    if seen_val:
        handles.append(Line2D([], [], color="0.3", **VAL_STYLE))
        labels.append("validation")
    if seen_base:
        handles.append(Line2D([], [], color="0.3", **BASE_STYLE))
        labels.append("unigram baseline (validation)")
    for ref, ref_color in zip(refs, REF_COLORS * len(refs), strict=False):
        handles.append(Line2D([], [], color=ref_color, **REF_STYLE))
        labels.append(ref.label)
    if seen_chance:
        handles.append(Line2D([], [], color="0.6", linewidth=1.0, linestyle="-."))
        labels.append("chance (50%)")
    legend_rows = math.ceil(len(labels) / 8)  # balanced rows of at most 8 entries
    fig.legend(handles, labels, loc="outside lower center", ncol=math.ceil(len(labels) / legend_rows), frameon=False)
    return fig


def write_report(
    run_dirs: list[str | Path], out: str | Path | None = None, references: list[str | Path] | None = None
) -> dict[str, Any]:
    """Load the runs, write ``report_steps.png``, ``report_tokens.png`` (when tokens were logged) and
    ``report.md`` into ``out`` (default ``FIRST_RUN/report``); return the summary rows and the paths written."""
    runs = load_runs(list(run_dirs))
    refs_in = list(references or [])
    refs = [load_reference(p, "reference" if len(refs_in) == 1 else f"reference: {Path(p).stem}") for p in refs_in]
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a folder; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in runs]
    figures: dict[str, Path] = {}
    for x in X_AXES:
        # Against tokens only where some run logged its token count (every run of this trainer does).
        if x == "tokens" and not any(r.has("tokens") for r in runs):
            continue
        path = out / FIGURE_FILES[x]
        build_figure(runs, refs, x).savefig(path, dpi=DPI)
        figures[x] = path
    md = ["# Training report", "", summary_table(rows), ""]
    md += [f"- `{r.name}`: `{r.path}`" for r in runs]
    md += [f"- {ref.label}: `{ref.path}`" for ref in refs]
    md.append("")
    md += [f"## {HEADINGS[x]}\n\n![{HEADINGS[x].lower()}]({p.name})\n" for x, p in figures.items()]
    md.append(
        "Training curves are log-window averages; validation points are the evaluations (`val_*`). Tokens/s is "
        "the training throughput (tokens over the time spent in training windows); wall time spans the first "
        "to the last record, evaluations and requeue gaps included."
    )
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n", encoding="utf-8")
    return {
        "rows": rows,
        "report": report,
        "figures": figures,
        "warnings": [
            f"{r.path / METRICS_FILE}: {r.bad_lines} unreadable line(s) skipped (a write cut short?)"
            for r in runs
            if r.bad_lines
        ],
    }
