"""Plots and a summary table of training runs: python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run's ``RUN_DIR/metrics.jsonl`` and writes, into ``--out`` (default: the first run's ``report/``):
``report_steps.png`` and ``report_tokens.png`` (loss, MLM and NSP accuracy, training and validation, learning
rate, throughput and gradient norm against optimizer steps and against tokens seen; several runs overlaid, one
colour each, named after their directories) and ``report.md`` (a summary table, one row per run, and the
figures). The logic lives in ``pretrain/tools/report.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from data_prep.errors import UserError  # noqa: E402
from pretrain.cli import guard  # noqa: E402
from pretrain.tools.reference import outside_band, shipped, write_reference  # noqa: E402
from pretrain.tools.report import load_reference, load_run, summary_table, write_report  # noqa: E402

EPILOG = """examples:
  python launch/report.py runs/tiny-cpu
  python launch/report.py runs/bert-base-lr1e-4 runs/bert-base-lr2e-4 --out reports/lr-sweep
  python launch/report.py runs/bert-base --reference google_bert_base.csv
  python launch/report.py runs/demo-cpu               # overlays docs/reference/demo-cpu.csv by itself
  python launch/report.py runs/my-demo --reference demo-cpu --check
  python launch/report.py runs/demo-cpu --write-reference docs/reference/demo-cpu.csv

A reference CSV has a header row with a 'step' and/or 'tokens' column and columns named after metrics.jsonl keys
(mlm_loss, nsp_loss, loss, val_mlm_acc, nsp_acc, lr, ...); each is drawn as a dashed line labelled 'reference'.
A run whose name (demo-cpu, tiny-cpu) has a shipped reference in docs/reference/ gets it overlaid unless
--reference is given; --reference NAME picks a shipped one. --check compares the first run's training MLM loss
with the reference at every common log step (band: ±10%) and exits 1 where it leaves the band.
Exit codes: 0 written (and within the band), 1 outside the band, 2 a run directory or file that is missing or
unusable (one error line)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python launch/report.py",
        description="Training curves (PNG, against steps and tokens) and a summary table (Markdown) of one or more "
        "runs, from each RUN_DIR/metrics.jsonl.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="folder for the PNGs and report.md (default: RUN_DIR/report)")
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="CSV",
        help="reference curve to overlay (dashed); repeat the flag for several",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 where the run leaves the reference's band")
    parser.add_argument("--write-reference", metavar="CSV", help="write the first run's curves as a reference CSV")
    args = parser.parse_args(argv)
    return guard(lambda: report(args))  # a bad run directory or reference (ReportError): one line, exit 2


def report(args: argparse.Namespace) -> int:
    try:
        if args.write_reference:
            path = write_reference(args.run_dirs[0], args.write_reference, provenance(args.run_dirs[0]))
            print(f"reference written: {path}")
            return 0
        refs = [shipped(r) or r if not Path(r).suffix else r for r in args.reference] or auto_reference(args.run_dirs)
        if args.check and not refs:  # before any work: nothing is written for a command that cannot succeed
            raise UserError(f"--check: no reference for {args.run_dirs[0]}; give --reference")
        result = write_report(args.run_dirs, args.out, refs)
    except OSError as e:  # the output folder: read-only, full disk, a file in the way
        where = e.filename or args.out or Path(args.run_dirs[0]) / "report"
        raise UserError(f"{where}: cannot write the report ({e.strerror}); give a writable --out") from None
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_table(result["rows"]))
    print(f"\nreport written to {result['report'].parent}:")
    for path in [result["report"], *result["figures"].values()]:
        print(f"  {path}")
    if args.check:
        off = outside_band(load_run(args.run_dirs[0]), load_reference(refs[0]), "mlm_loss", BAND, relative=True)
        for line in off:
            print(f"outside the reference band: {line}")
        print(f"check: {'FAILED' if off else 'within'} ±{BAND:.0%} of {refs[0]} (training MLM loss)")
        return 1 if off else 0
    return 0


BAND = 0.10  # relative, on the training MLM loss: a healthy rerun on another machine stays well inside


def auto_reference(run_dirs: list[str]) -> list[str | Path]:
    """The shipped reference of the first run's recipe name (its config.yaml ``name``), announced; else none."""
    config = Path(run_dirs[0]) / "config.yaml"
    if not config.is_file():
        return []
    name = next((line.split(":", 1)[1].strip() for line in config.read_text().splitlines() if line.startswith("name:")),
                None)  # fmt: skip
    ref = shipped(name) if name else None
    if ref is not None:
        print(f"overlaying the shipped reference of {name}: {ref}")
    return [ref] if ref is not None else []


def provenance(run_dir: str) -> str:
    """Commit, date, machine and command of a run, for a reference CSV's comment line."""
    import datetime
    import platform
    import subprocess

    import torch

    root = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip() or "unknown"
    overrides = Path(run_dir) / "overrides.txt"
    command = " ".join(overrides.read_text().split()) if overrides.is_file() else "(overrides.txt missing)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return (f"commit {commit}, {datetime.date.today().isoformat()}, {device}, torch {torch.__version__}: "
            f"python launch/pretrain.py {command}")  # fmt: skip


def run() -> None:
    """The console script ``bert-report`` (pyproject.toml) and ``python launch/report.py``."""
    sys.exit(main())


if __name__ == "__main__":
    run()
