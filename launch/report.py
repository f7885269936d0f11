"""Plots and a summary table of training runs: python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run's ``RUN_DIR/metrics.jsonl`` and writes, into ``--out`` (default: the first run's ``report/``):
``report_steps.png`` and ``report_tokens.png`` (loss, MLM and NSP accuracy, training and validation, learning
rate, throughput and gradient norm against optimizer steps and against tokens seen; several runs overlaid, one
colour each, named after their directories) and ``report.md`` (a summary table, one row per run, and the
figures). The logic lives in ``pretrain/report.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pretrain.report import ReportError, summary_table, write_report  # noqa: E402

EPILOG = """examples:
  python launch/report.py runs/tiny-cpu
  python launch/report.py runs/bert-base-lr1e-4 runs/bert-base-lr2e-4 --out reports/lr-sweep
  python launch/report.py runs/bert-base --reference google_bert_base.csv

A reference CSV has a header row with a 'step' and/or 'tokens' column and columns named after metrics.jsonl keys
(mlm_loss, nsp_loss, loss, val_mlm_acc, nsp_acc, lr, ...); each is drawn as a dashed line labelled 'reference'.
Exit codes: 0 written, 2 a run directory or file that is missing or unusable (one error line)."""


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
    args = parser.parse_args(argv)
    try:
        result = write_report(args.run_dirs, args.out, args.reference)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: read-only, full disk, a file in the way
        where = e.filename or args.out or Path(args.run_dirs[0]) / "report"
        print(f"error: {where}: cannot write the report ({e.strerror}); give a writable --out", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_table(result["rows"]))
    print(f"\nreport written to {result['report'].parent}:")
    for path in [result["report"], *result["figures"].values()]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
