"""Reference curves (docs/reference/, pretrain/tools/reference.py): written from a run with their provenance, read back,
overlaid by launch/report.py on a run of the same recipe, and a band check that a short demo run stays inside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.tools.reference import REFERENCE_DIR, outside_band, shipped, write_reference
from pretrain.tools.report import load_reference, load_run
from tests.helpers import ROOT, run_env, run_main

REPORT = ROOT / "launch" / "report.py"


def _fake_run(path: Path, scale: float = 1.0, name: str = "demo-cpu") -> Path:
    path.mkdir(parents=True)
    rows = []
    for step in range(50, 501, 50):
        loss = 7.5 * np.exp(-step / 400) + 3.0
        rows.append({"kind": "train", "step": step, "tokens": step * 2048, "loss": loss * scale + 0.6,
                     "mlm_loss": loss * scale, "nsp_loss": 0.6, "lr": 2e-3 * (1 - step / 4000)})  # fmt: skip
    rows.append({"kind": "eval", "step": 500, "val_mlm_loss": 5.0 * scale, "val_mlm_acc": 0.2, "val_nsp_acc": 0.6})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"name: {name}\nrun_dir: {path}\n")
    return path


def test_reference_round_trip_and_band(tmp_path):
    run = _fake_run(tmp_path / "a")
    out = write_reference(run, tmp_path / "ref.csv", "commit abc, 2026-11-26, CPU: python launch/pretrain.py x")
    assert out.read_text().splitlines()[0] == "# commit abc, 2026-11-26, CPU: python launch/pretrain.py x"
    ref = load_reference(out)
    np.testing.assert_array_equal(ref.columns["step"], np.arange(50, 501, 50))
    np.testing.assert_allclose(ref.columns["mlm_loss"], [r["mlm_loss"] for r in load_run(run).train], rtol=1e-5)
    assert np.isnan(ref.columns["val_mlm_loss"][:-1]).all() and ref.columns["val_mlm_loss"][-1] == 5.0
    assert outside_band(load_run(run), ref, "mlm_loss", 0.10, relative=True) == []
    drifted = load_run(_fake_run(tmp_path / "b", scale=1.2))
    off = outside_band(drifted, ref, "mlm_loss", 0.10, relative=True)
    assert len(off) == 10 and off[0].startswith("mlm_loss at step 50:")
    assert outside_band(drifted, ref, "grad_norm", 0.1) == ["grad_norm: not in the run"]


def test_report_overlays_the_shipped_reference_and_checks_the_band(tmp_path, capsys):
    assert shipped("demo-cpu") == REFERENCE_DIR / "demo-cpu.csv" and shipped("tiny-cpu") is not None
    assert shipped("no-such-recipe") is None
    ref = load_reference(shipped("demo-cpu"))  # the shipped file parses, comment line and all
    assert {"step", "tokens", "mlm_loss", "lr", "val_mlm_acc"} <= set(ref.columns)
    healthy = _fake_run(tmp_path / "healthy")
    write_reference(healthy, tmp_path / "ref.csv", "test")
    code, out, err = run_main(capsys, REPORT, healthy, "--out", tmp_path / "r1")
    assert code == 0 and f"overlaying the shipped reference of demo-cpu: {shipped('demo-cpu')}" in out, err
    code, out, _ = run_main(capsys, REPORT, healthy, "--reference", tmp_path / "ref.csv", "--check", "--out",
                            tmp_path / "r2")  # fmt: skip
    assert code == 0 and "check: within ±10%" in out
    broken = _fake_run(tmp_path / "broken", scale=1.3)
    code, out, _ = run_main(capsys, REPORT, broken, "--reference", tmp_path / "ref.csv", "--check", "--out",
                            tmp_path / "r3")  # fmt: skip
    assert code == 1 and "check: FAILED" in out and out.count("outside the reference band: mlm_loss at step") == 10


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment",
    ["demo-cpu", pytest.param("modernbert-tiny-cpu", marks=pytest.mark.long)],  # CI time: make test-all
)
def test_a_short_demo_run_stays_within_the_band_of_the_shipped_reference(experiment, tmp_path):
    """The demo recipe (``make demo``'s data and preset; and its ModernBERT twin) for its first 250 of 4,000
    steps, logged every 50: the training MLM loss stays within ±10% of docs/reference/<experiment>.csv at every
    logged step. A change that breaks learning (a collapse to the unigram answer, a NaN, a dead schedule) leaves it
    by far more."""
    data, run = tmp_path / "data", tmp_path / "run"
    prep = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "inputs=[builtin:pydocs]", f"output_dir={data}",
            "vocab_size=2000", "max_seq_length=64", "samples_per_shard=40000", "validation_fraction=0.05"]  # fmt: skip
    env = {**run_env(), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(prep, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    train = [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"experiment={experiment}", f"data.dir={data}",
             f"run_dir={run}", "logger=none", "trainer.stop_at_step=250", "trainer.log_every=50"]  # fmt: skip
    r = subprocess.run(train, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run([sys.executable, str(REPORT), str(run), "--check", "--out", str(tmp_path / "report")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "check: within ±10%" in r.stdout and f"overlaying the shipped reference of {experiment}" in r.stdout
