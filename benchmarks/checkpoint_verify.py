"""What verifying a checkpoint bundle adds to a resume: a real pretraining run of MODEL saves a bundle (fp32,
ZeRO-0, AdamW: weights and both Adam moments), then the same command resumes from copies of it twice, with
``trainer.verify_checkpoint=true`` (sha256 of every file) and ``false`` (sizes only). Reported: the bundle's size,
the verification line the run prints, and the time from launch to the first step after the resume.

    python benchmarks/checkpoint_verify.py --model bert-base            # about 2 minutes on 2 CPU cores
    python benchmarks/checkpoint_verify.py --model bert-large --keep /tmp/ckpt-bench
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.tools.benchmark import synthetic_data  # noqa: E402

ARGS = ["trainer.max_seq_length=128", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
        "trainer.log_every=1", "trainer.eval_batches=0", "trainer.checkpoint_every=0", "trainer.max_steps=3",
        "deepspeed=zero0", "logger=none"]  # fmt: skip


def launch(run_dir: Path, data: Path, model: str, *extra: str) -> tuple[float, float | None, str]:
    """Run the trainer; (seconds to the end, seconds from launch to the first logged step, stdout)."""
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"model={model}", f"data.dir={data}",
           f"run_dir={run_dir}", *ARGS, *extra]  # fmt: skip
    t0, first, out = time.perf_counter(), None, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as p:
        for line in p.stdout:
            out.append(line)
            if first is None and re.match(r"step\s+\d+", line.strip()):
                first = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{''.join(out)[-3000:]}")
    return time.perf_counter() - t0, first, "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=3, help="resumes of each kind (default: 3)")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="ckpt-verify-"))
    data = synthetic_data(work / "data", 30522, 128, 64, nsp=True)
    base = work / "base"
    launch(base, data, a.model, "trainer.stop_at_step=1")
    tag = next((base / "checkpoints").glob("step*"))
    size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
    firsts: dict[str, list[float]] = {"true": [], "false": []}
    lines = {}
    for _ in range(a.repeats):  # alternating, so drift and cache effects hit both alike
        for verify in ("true", "false"):
            run = work / f"resume-{verify}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            _, first, out = launch(run, data, a.model, "trainer.stop_at_step=2", f"trainer.verify_checkpoint={verify}")
            firsts[verify].append(first)
            lines[verify] = next((x for x in out.splitlines() if x.startswith("verified")), "")
    with_, without = statistics.median(firsts["true"]), statistics.median(firsts["false"])
    took = float(re.search(r"in ([\d.]+) s", lines["true"]).group(1))
    print(
        f"{a.model}: bundle {size / 2**30:.2f} GiB; launch to first step after the resume, median of {a.repeats}: "
        f"{with_:.1f} s verified vs {without:.1f} s sizes only ({with_ / without - 1:+.0%}); the sha256 pass "
        f"itself {took:.2f} s = {took / without:.1%} of the resume"
    )
    print(f"  {lines['true']}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
