"""``launch/report.py``: figures and summary table from metrics.jsonl files written with the trainer's record keys
(fast), and from a real tiny training run (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.tools.report import build_figure, load_reference, load_run, load_runs, summarize
from tests.helpers import LAUNCH, SMALL, make_data, run_env

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "launch" / "report.py"
_spec = importlib.util.spec_from_file_location("launch_report", REPORT)  # launch/ is not a package
_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_launch)
main = _launch.main

BATCH, SEQ, TPS, LOG_EVERY, EVAL_EVERY, T0 = 32, 100, 4000.0, 10, 50, 1_800_000_000.0


def write_metrics(run_dir: Path, steps: int = 200, nsp: bool = True, extra_lines: tuple[str, ...] = ()) -> list[dict]:
    """A run's metrics.jsonl with the keys ``pretrain.training.trainer.log_window`` and ``evaluate`` write: a train
    record every LOG_EVERY steps (a constant throughput, so each window takes BATCH*SEQ*LOG_EVERY/TPS seconds), an eval
    record every EVAL_EVERY, and the spike and skipped records a report leaves out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    window = BATCH * SEQ * LOG_EVERY / TPS
    records: list[dict] = []
    for i, step in enumerate(range(LOG_EVERY, steps + 1, LOG_EVERY)):
        t = T0 + (i + 1) * window
        mlm = 8.0 * np.exp(-step / 80) + 2.0
        nsp_loss = 0.7 - 0.1 * step / steps if nsp else None
        rec = {"kind": "train", "step": step, "epoch": 0, "loss": mlm + (nsp_loss or 0.0), "mlm_loss": mlm,
               "nsp_loss": nsp_loss, "sequences_per_s": TPS / SEQ, "tokens_per_s": TPS, "lr": 1e-3 * (1 - step / steps),
               "grad_norm": 5.0 / (1 + step / 20), "loss_scale": 1.0, "mfu": None, "memory_gb": 0.5,
               "tokens": step * BATCH * SEQ, "time": t}  # fmt: skip
        records.append(rec)
        if step == 30:
            records.append({"kind": "spike", "step": step, "loss": 30.0, "running_mean": 5.0, "samples": [1, 2]})
            records.append({"kind": "skipped", "step": step, "skipped": 1, "reason": "overflow", "loss_scale": 0.5})
        if step % EVAL_EVERY == 0:
            ev = {
                "kind": "eval",
                "step": step,
                "val_mlm_loss": mlm + 0.1,
                "val_mlm_acc": 0.5 * (1 - np.exp(-step / 60)),
            }
            if nsp:
                ev |= {"val_nsp_loss": 0.69 - 0.001 * step, "val_nsp_acc": 0.5 + 0.001 * step}
            records.append({**ev, "time": t + 1.0})
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return records


def png_ok(path: Path) -> tuple[int, int]:
    """The PNG's (width, height), after checking it is not blank: a real plot has a fair share of ink."""
    assert path.is_file() and path.stat().st_size > 10_000
    pixels = np.asarray(Image.open(path).convert("L"))
    assert (pixels < 200).mean() > 0.02, f"{path} looks empty"
    return Image.open(path).size


def test_two_runs_give_figures_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evaluate = '{"kind": "evaluate", "step": 200, "val_mlm_loss": 0.1, "val_mlm_acc": 0.99, "time": 1}'
    bert = write_metrics(tmp_path / "bert-run", nsp=True, extra_lines=(evaluate, '{"kind": "train", "step": 21'))
    roberta = write_metrics(tmp_path / "roberta-run", steps=120, nsp=False)
    out = tmp_path / "rep"
    assert main([str(tmp_path / "bert-run"), str(tmp_path / "roberta-run"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 unreadable line(s)" in captured.err and "bert-run" in captured.err  # the cut line, named
    for name in ("report.md", "report_steps.png", "report_tokens.png"):
        assert str(out / name) in captured.out
    # 8 panels (total loss, MLM/NSP loss, MLM/NSP accuracy, lr, throughput, grad norm) in a 2 x 4 grid
    assert png_ok(out / "report_steps.png") == (1800, 790)
    assert png_ok(out / "report_tokens.png") == (1800, 790)
    md = (out / "report.md").read_text()
    assert "![against optimizer steps](report_steps.png)" in md and "(report_tokens.png)" in md
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and "-run" in line]
    assert [r[0].strip() for r in rows] == ["bert-run", "roberta-run"]
    b, r = ([c.strip() for c in row] for row in rows)
    train_b = [x for x in bert if x["kind"] == "train"]
    evals_b = [x for x in bert if x["kind"] == "eval"]
    assert b[1] == "200" and b[2] == f"{200 * BATCH * SEQ:,}" and b[3] == f"{train_b[-1]['loss']:.4f}"
    best = min(e["val_mlm_loss"] for e in evals_b)
    assert b[4] == f"{best:.4f} / {evals_b[-1]['val_mlm_loss']:.4f}"
    assert b[5] == f"{max(e['val_mlm_acc'] for e in evals_b):.2%} / {evals_b[-1]['val_mlm_acc']:.2%}"
    assert b[6] == f"{evals_b[-1]['val_nsp_acc']:.2%}" and b[7] == f"{TPS:,.0f}"
    assert b[8] == "2m41s"  # 20 windows of 8 s, then the last evaluation 1 s later
    assert r[1] == "120" and r[6] == "n/a" and r[3] == f"{[x for x in roberta if x['kind'] == 'train'][-1]['loss']:.4f}"


def test_summary_figures_are_computed_from_the_records(tmp_path: Path) -> None:
    records = write_metrics(tmp_path / "run", steps=100)
    s = summarize(load_run(tmp_path / "run"))
    train = [r for r in records if r["kind"] == "train"]
    assert s["steps"] == 100 and s["tokens"] == train[-1]["tokens"] == 100 * BATCH * SEQ
    # constant throughput: tokens over the summed window times is that throughput
    assert s["tokens_per_s"] == pytest.approx(TPS)
    times = [r["time"] for r in records if "time" in r]
    first_window = train[0]["tokens"] / TPS
    assert s["wall_seconds"] == pytest.approx(max(times) - min(times) + first_window)
    assert s["wall_seconds"] == pytest.approx(100 * BATCH * SEQ / TPS + 1.0)  # the windows, then the last eval


def test_panels_follow_the_keys_present(tmp_path: Path) -> None:
    """RoBERTa mode: no NSP panels and no total-loss panel (it would repeat the MLM loss); 5 panels, 2 x 3."""
    write_metrics(tmp_path / "roberta", nsp=False)
    fig = build_figure(load_runs([tmp_path / "roberta"]), [], "step")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["MLM loss", "MLM accuracy", "Learning rate", "Throughput", "Gradient norm"]
    assert main([str(tmp_path / "roberta")]) == 0  # default --out: RUN_DIR/report
    assert png_ok(tmp_path / "roberta" / "report" / "report_steps.png") == (1350, 790)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["roberta", "training (log window)", "validation"]


def test_reference_csv_is_overlaid_dashed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_metrics(tmp_path / "run")
    csv = tmp_path / "google.csv"
    csv.write_text(
        "step,tokens,mlm_loss,nsp_acc,lr\n0,0,10.0,0.5,0\n100,320000,4.0,0.8,1e-3\n200,640000,3.0,0.9,5e-4\n"
    )
    ref = load_reference(csv)
    for x in ("step", "tokens"):
        fig = build_figure(load_runs([tmp_path / "run"]), [ref], x)
        with_ref = {ax.get_title() for ax in fig.axes for ln in ax.lines if ln.get_label() == "reference"}
        assert with_ref == {"MLM loss", "NSP accuracy", "Learning rate"}
        line = next(ln for ax in fig.axes for ln in ax.lines if ln.get_label() == "reference")
        assert line.get_linestyle() == "--" and list(line.get_xdata()) == ([0, 100, 200] if x == "step" else
                                                                           [0, 320000, 640000])  # fmt: skip
    assert main([str(tmp_path / "run"), "--reference", str(csv), "--out", str(tmp_path / "rep")]) == 0
    assert f"reference: `{csv}`" in (tmp_path / "rep" / "report.md").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,mlm_loss\n1,3.0\n")
    assert main([str(tmp_path / "run"), "--reference", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "'step' or 'tokens'" in err[0]


def test_runs_of_the_same_name_are_told_apart(tmp_path: Path) -> None:
    write_metrics(tmp_path / "a" / "run")
    write_metrics(tmp_path / "b" / "run", steps=60)
    assert [r.name for r in load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])] == ["a/run", "b/run"]


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "evals_only").mkdir()
    (tmp_path / "evals_only" / "metrics.jsonl").write_text('{"kind": "eval", "step": 5, "val_mlm_loss": 3.0}\n')
    write_metrics(tmp_path / "good")
    cases = {
        "missing": "no such run directory",
        "empty": "metrics.jsonl: not found",
        "evals_only": "no training records",
    }
    for name, why in cases.items():
        assert main([str(tmp_path / "good"), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / name) in err[0] and why in err[0]
    assert not (tmp_path / "good" / "report").exists()  # nothing written when one run is unusable
    blocker = tmp_path / "blocker"  # a file where the output folder should go
    blocker.write_text("")
    assert main([str(tmp_path / "good"), "--out", str(blocker / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0] and "cannot write the report" in err[0] and "--out" in err[0]
    assert main([str(tmp_path / "good"), "--check", "--out", str(tmp_path / "rep")]) == 2  # good: no shipped one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --check: no reference for") and "--reference" in err[0]
    assert not (tmp_path / "rep").exists()  # refused before the report is written
    # the real process: exit code 2, one line, no traceback
    r = subprocess.run([sys.executable, str(REPORT), str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, str(REPORT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "RUN_DIR" in r.stdout and "--reference CSV" in r.stdout and "--out DIR" in r.stdout


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path: Path) -> None:
    """A 12-step run of the real trainer (about 30 s on 2 cores), then its report."""

    data = make_data(tmp_path / "data")
    run = tmp_path / "run"
    args = [sys.executable, LAUNCH, f"data.dir={data}", f"run_dir={run}", *SMALL, "trainer.max_steps=12",
            "trainer.log_every=2", "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=4", "optim.lr=5e-3", "scheduler.warmup_steps=1"]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, env=run_env(), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(REPORT), str(run)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3  # header, rule, the run
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[1] == "12" and cells[2] == f"{train[-1]['tokens']:,}" and cells[3] == f"{train[-1]['loss']:.4f}"
    assert 0.0 <= float(cells[6].rstrip("%")) <= 100.0
    assert png_ok(run / "report" / "report_steps.png") == (1800, 790)
    assert png_ok(run / "report" / "report_tokens.png") == (1800, 790)
