"""The README's first command, `make demo` (launch/demo.sh), end to end on the built-in corpus: shards, a short
pretraining, the Hugging Face export and fill-mask predictions, with no download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_env


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {
        **run_env(),
        "DEMO_DIR": str(tmp_path / "demo"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    r = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "trainer.max_steps=4", "trainer.eval_every=4",
                        "trainer.checkpoint_every=4", "trainer.eval_batches=2"], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path / "demo"
    assert (out / "data" / "manifest.json").is_file() and (out / "run" / "hf" / "model.safetensors").is_file()
    assert "finished" in r.stdout and "eval step 4: val MLM loss" in r.stdout
    predictions = [line for line in r.stdout.splitlines() if line.strip().startswith("->")]
    assert len(predictions) == 5 and all("(0." in p for p in predictions)
    # The demo's own figures: accuracy beside the unigram baseline, NSP beside chance, how to publish the W&B run.
    assert "(unigram baseline " in r.stdout and "(chance 50%)" in r.stdout
    sync = next(line for line in r.stdout.splitlines() if "wandb sync" in line).split("wandb sync ")[1]
    assert Path(sync).is_dir() and Path(sync).name.startswith("offline-run-")
    report = out / "run" / "report"
    assert (report / "report.md").is_file() and (report / "report_steps.png").stat().st_size > 10_000
