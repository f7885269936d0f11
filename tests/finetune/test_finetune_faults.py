"""Fine-tuning stands on pretraining's engine, so it keeps its guarantees, injected for real: SIGTERM/SIGUSR1 at
a step (checkpoint, exit 75, the rerun ends bit for bit as an uninterrupted run), a full disk at each write
(checkpoint, best/, results: one line, exit 2, the rerun after space is freed ends identically), resume=PATH,
2 ranks -> 1 rank, a non-finite loss skipped and counted, a key fine-tuning does not read refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FINETUNE, FINETUNE_FAST, ROOT, classification_task, free_port, run_env, tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# FAULT="signal:NAME@STEP": the process sends itself signal NAME once step STEP is booked.
# FAULT="fill:WHERE": fill the run dir's disk just before the write WHERE (checkpoint: the second one; best;
# results), so that write meets a real ENOSPC.
# FAULT="scale:CALL=FACTOR": multiply the loss of the CALL-th training forward by FACTOR.
SITECUSTOMIZE = """
import os
kind, _, arg = os.environ.get("FAULT", "").partition(":")
if kind == "signal":
    import signal
    import pretrain.training.engine as e
    name, step = arg.split("@")
    orig_book = e.Engine.book
    def book(self, *a, **k):
        out = orig_book(self, *a, **k)
        if self.state.step == int(step):
            os.kill(os.getpid(), getattr(signal, name))
        return out
    e.Engine.book = book
elif kind == "fill":
    import pretrain.training.engine as e
    import pretrain.finetune.loop as loop
    def fill(directory):
        f = open(os.path.join(directory, "filler"), "wb")
        try:
            while True:
                f.write(b"\\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
        try:
            f.close()
        except OSError:
            pass
    calls = [0]
    if arg == "checkpoint":
        orig_save = e.save
        def save(engine, root, client, keep_last):
            calls[0] += 1
            if calls[0] == 2:
                fill(root.parent)
            return orig_save(engine, root, client, keep_last)
        e.save = save
    elif arg == "best":
        orig_best = loop.save_best
        def save_best(model, src, data, out, metrics):
            fill(out.parent)
            return orig_best(model, src, data, out, metrics)
        loop.save_best = save_best
    elif arg == "results":
        orig_results = loop._results
        def results(cfg, run_dir, *a):
            fill(run_dir)
            return orig_results(cfg, run_dir, *a)
        loop._results = results
elif kind == "scale":
    import pretrain.finetune.heads as h
    call, factor = arg.split("=")
    orig_forward, calls = h.TaskModel.forward, [0]
    def forward(self, *a, **k):
        out = orig_forward(self, *a, **k)
        if self.training:
            calls[0] += 1
            if calls[0] == int(call):
                out.loss = out.loss * float(factor)
        return out
    h.TaskModel.forward = forward
"""


@pytest.fixture(scope="module")
def task(tiny_run, tmp_path_factory) -> list[str]:
    """Two epochs of five steps of the toy classification task, on the tiny pretraining run."""
    train, dev = classification_task(tmp_path_factory.mktemp("ft_faults_data"))
    return [f"pretrained={tiny_run[1]}", "finetune=classification", f"task.train={train}", f"task.validation={dev}",
            "task.text_column=text", "epochs=2", *FINETUNE_FAST]  # fmt: skip


@pytest.fixture(scope="module")
def inject(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft_inject")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def _run(task: list[str], run_dir: Path, *extra: str, fault: str = "", inject: Path | None = None,
         ranks: int = 1) -> subprocess.CompletedProcess:  # fmt: skip
    env = run_env()
    if fault:
        env.update(FAULT=fault, PYTHONPATH=f"{inject}:{ROOT}")
    launcher = [sys.executable]
    if ranks > 1:
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
                    str(free_port())]  # fmt: skip
    argv = [*launcher, FINETUNE, *task, f"run_dir={run_dir}", *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def _errors(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def _outcome(run: Path) -> tuple[dict, dict, dict]:
    """(final checkpoint's module weights, best/ weights, results.json without its own path)."""
    tag = sorted((run / "checkpoints").glob("step*"))[-1]
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    results = json.loads((run / "results.json").read_text())
    results.pop("best_dir")
    return module, load_file(str(run / "best" / "model.safetensors")), results


def _same(a: tuple[dict, dict, dict], b: tuple[dict, dict, dict]) -> None:
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory) -> tuple[dict, dict, dict]:
    run = tmp_path_factory.mktemp("ft_reference") / "run"
    r = _run(task, run)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return _outcome(run)


@pytest.mark.parametrize("signal_at", ["SIGTERM@3", "SIGUSR1@5"])  # mid-epoch; the step that ends epoch 1
def test_signal_checkpoints_exits_75_and_the_rerun_matches(task, inject, reference, tmp_path, signal_at):
    run = tmp_path / "run"
    r = _run(task, run, fault=f"signal:{signal_at}", inject=inject)
    step = int(signal_at.split("@")[1])
    assert r.returncode == 75, (r.stdout + r.stderr)[-3000:]
    assert not _errors(r) and f"preempted ({signal_at.split('@')[0]}) at step {step}" in r.stdout
    assert (run / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file()
    r = _run(task, run)
    assert r.returncode == 0 and f"resumed from {run / 'checkpoints'}" in r.stdout, (r.stdout + r.stderr)[-3000:]
    _same(_outcome(run), reference)


@pytest.mark.parametrize("where", ["checkpoint", "best", "results"])
def test_full_disk_at_each_write_is_one_line_and_the_rerun_matches(task, inject, reference, tmp_path, where):
    mnt = tmp_path / "small"
    with tmpfs(mnt, "size=48m"):
        run = mnt / "run"
        r = _run(task, run, fault=f"fill:{where}", inject=inject)
        errors = _errors(r)
        assert r.returncode == 2 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
        assert "free space" in errors[0] and str(run) in errors[0], errors[0]
        assert not list((run / "checkpoints").glob("step*[!0-9]*")) and not (run / "best.tmp").exists()
        (run / "filler").unlink()
        r = _run(task, run)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        _same(_outcome(run), reference)


@pytest.mark.long  # CI time: a world-size change on resume is test_faults_train.py::test_world_size_change_on_resume
def test_resume_from_a_path_and_from_two_ranks_to_one(task, reference, tmp_path, deepspeed_cpu_comm):
    first, second = tmp_path / "first", tmp_path / "second"
    r = _run(task, first, "trainer.stop_at_step=3")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = _run(task, second, f"resume={first / 'checkpoints' / 'step00000003'}")
    assert r.returncode == 0 and "resumed from" in r.stdout, (r.stdout + r.stderr)[-3000:]
    _same(_outcome(second), reference)
    two = tmp_path / "two"
    zero2 = ["deepspeed=zero2", "trainer.micro_batch_size=8"]
    r = _run(task, two, *zero2, "trainer.stop_at_step=3", ranks=2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = _run(task, two, *zero2)  # one rank now: DeepSpeed's universal conversion, the same data position
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "2 rank(s) -> 1" in r.stdout and "resumed from" in r.stdout
    results = json.loads((two / "results.json").read_text())
    assert [e["step"] for e in results["epochs"]] == [5, 10]
    module, best, _ = _outcome(two)
    assert all(torch.isfinite(v).all() for v in best.values())


def test_nonfinite_loss_is_skipped_and_counted(task, inject, tmp_path):
    run = tmp_path / "run"
    r = _run(task, run, "epochs=1", fault="scale:2=nan", inject=inject)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in records if x["kind"] == "skipped"]
    assert [(x["step"], x["reason"], x["skipped"]) for x in skipped] == [(2, "non-finite loss", 1)]
    assert all(x["loss"] is not None and x["loss"] == x["loss"] for x in records if x["kind"] == "train")


def test_a_key_fine_tuning_does_not_read_is_refused(task, tmp_path):
    refused = (
        ("trainer.eval_every=5", "no such option"),
        ("+trainer.init_from=x", "no such option"),
        ("trainer.max_steps=5", "epochs x steps per epoch"),
        ("trainer.micro_batch_size=auto", "pretraining"),
    )
    for key, hint in refused:
        r = _run(task, tmp_path / "run", key)
        errors = _errors(r)
        assert r.returncode == 2 and len(errors) == 1 and hint in errors[0], (r.stdout + r.stderr)[-2000:]
