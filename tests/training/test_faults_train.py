"""Faults inside the training loop, injected for real into real trainer processes: non-finite losses, a loss
spike, SIGKILL at points inside a checkpoint save, a full disk under the run dir.

Injection: a ``sitecustomize.py`` on the child's PYTHONPATH wraps the model's forward (or the checkpoint commit)
when ``FAULT`` is set, so the trainer itself carries no test hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.errors import UserError
from pretrain.runtime import deepspeed_env
from pretrain.training.data import ResumableDistributedSampler
from tests.helpers import LAUNCH, ROOT, SMALL, hf_weights, launch_cmd, make_data, newest_bundle, run_env, tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# FAULT="scale:STEP=FACTOR,...": multiply the loss of the STEP-th training forward by FACTOR (inf, nan, 100).
# FAULT="kill:WHERE@STEP": SIGKILL this process inside the save of STEP, WHERE = engine (before DeepSpeed writes),
# commit (shards written, before the COMPLETE marker), retention (marker written, before old bundles are pruned).
SITECUSTOMIZE = """
import os
import shutil
spec = os.environ.get("FAULT", "")
if spec.startswith("scale:"):
    import pretrain.models.bert as m
    factors = {int(k): float(v) for k, v in (x.split("=") for x in spec[6:].split(","))}
    orig, calls = m.BertForPreTraining.forward, [0]
    def forward(self, *a, **k):
        out = orig(self, *a, **k)
        if self.training:
            calls[0] += 1
            if calls[0] in factors:
                out.loss = out.loss * factors[calls[0]]
        return out
    m.BertForPreTraining.forward = forward
elif spec.startswith("record:"):  # append every training micro-batch's (epoch, sample) pairs to PATH.RANK
    import json
    import pretrain.training.data as d
    path, orig = f"{spec[7:]}.{os.environ.get('RANK', '0')}", d.ShardDataset.__getitems__
    def getitems(self, items):
        if self.split == "train":
            with open(path, "a") as f:
                f.write(json.dumps([[int(e), int(i)] for e, i in items]) + "\\n")
        return orig(self, items)
    d.ShardDataset.__getitems__ = getitems
elif spec.startswith("kill:"):
    import signal
    import pretrain.checkpoint.bundle as c
    import pretrain.training.engine as t
    where, step = spec[5:].split("@")
    step = int(step)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    orig_save, orig_mark, orig_retain = t.save, c.mark_complete, c.retain
    def save(engine, root, client, keep_last):
        if client["step"] == step and where == "engine":
            (root / f"step{step:08d}").mkdir(parents=True, exist_ok=True)
            die()
        return orig_save(engine, root, client, keep_last)
    def mark_complete(tag, at, *rest):
        if where == "commit" and at == step:
            die()
        return orig_mark(tag, at, *rest)
    def retain(root, tag, keep_last):
        if where == "retention" and tag == f"step{step:08d}":
            die()
        return orig_retain(root, tag, keep_last)
    t.save, c.mark_complete, c.retain = save, mark_complete, retain
"""

ARGS = [
    *SMALL,
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "optim.lr=5e-3",
    "scheduler.warmup_steps=1",
    "deepspeed=zero0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("faults") / "bert")


@pytest.fixture(scope="module")
def inject_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inject")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def _run(
    run_dir: Path, data: Path, *overrides: str, fault: str = "", inject: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = run_env()
    if fault:
        env.update(FAULT=fault, PYTHONPATH=f"{inject}:{ROOT}")
    return subprocess.run(
        [sys.executable, LAUNCH, f"data.dir={data}", f"run_dir={run_dir}", *ARGS, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def test_nonfinite_step_skipped_and_spike_logged(data, inject_dir, tmp_path):
    """fp32, ZeRO-0: an inf loss at step 3 skips that step (weights untouched, counted, logged); a 100x loss at
    step 14 is logged as a spike with exactly the samples of that batch, and training goes on."""
    run = tmp_path / "run"
    r = _run(
        run, data, "trainer.max_steps=16", "trainer.checkpoint_every=0", fault="scale:3=inf,14=100", inject=inject_dir
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    skipped = _records(run, "skipped")
    assert [(s["step"], s["reason"], s["skipped"]) for s in skipped] == [(3, "non-finite loss", 1)]
    train = _records(run, "train")
    assert [x["step"] for x in train] == [s for s in range(1, 17) if s != 3]  # no log line for the skipped step
    assert all(np.isfinite(x["loss"]) for x in train)
    assert all(torch.isfinite(v).all() for v in hf_weights(run).values())
    spikes = _records(run, "spike")
    assert [s["step"] for s in spikes] == [14] and spikes[0]["loss"] > 10 * spikes[0]["running_mean"]
    sampler = ResumableDistributedSampler(96, 4, seed=1234)  # the trainer's: 96 train samples, seed, micro batch
    order = sampler.rank_order(spikes[0]["epoch"])
    k = 13 % len(sampler)  # the 14th micro-batch of the run
    assert spikes[0]["samples"] == sorted(order[k * 4 : (k + 1) * 4].tolist())
    assert "loss spike at step 14" in r.stdout


def test_nonfinite_streak_stops_with_last_good_checkpoint(data, inject_dir, tmp_path):
    run = tmp_path / "run"
    r = _run(
        run,
        data,
        "trainer.max_steps=12",
        "trainer.checkpoint_every=2",
        "trainer.max_nonfinite_steps=3",
        fault="scale:5=nan,6=inf,7=inf",
        inject=inject_dir,
    )
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    errors = _error_lines(r)
    assert len(errors) == 1 and "non-finite loss at step 7" in errors[0], r.stderr[-2000:]
    last = newest_bundle(run / "checkpoints")
    assert last is not None and last.name == "step00000006"
    # The last good checkpoint is the newest saved before the streak's first non-finite step (5): step 4.
    assert f"last good checkpoint is {run / 'checkpoints' / 'step00000004'}" in errors[0], errors[0]
    assert [s["step"] for s in _records(run, "skipped")] == [5, 6, 7]
    # The checkpoint saved during the streak holds the weights from before it (the skipped steps changed nothing).
    sd = torch.load(last / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in sd.values())
    # Resuming without the fault finishes the run.
    r = _run(run, data, "trainer.max_steps=12", "trainer.checkpoint_every=2")
    assert r.returncode == 0 and f"resumed from {last}" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_bf16_zero2_nonfinite_step_skipped_by_deepspeed(data, inject_dir, tmp_path):
    """bf16 under ZeRO-2: DeepSpeed's overflow check skips the step; the run counts it and finishes."""
    run = tmp_path / "run"
    r = _run(
        run,
        data,
        "deepspeed=zero2",
        "trainer.precision=bf16",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=0",
        fault="scale:2=inf",
        inject=inject_dir,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [(s["step"], s["reason"]) for s in _records(run, "skipped")] == [(2, "non-finite loss")]
    assert all(torch.isfinite(v).all() for v in hf_weights(run).values())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    r = _run(run, data, "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_last=1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run


@pytest.mark.parametrize("where", ["engine", "commit", "retention"])
def test_killed_inside_save_resumes_from_complete_checkpoint(data, inject_dir, reference, tmp_path, where):
    """SIGKILL inside the save of step 6 (keep_last=1): the partial step6 is never loaded, step4 is not deleted
    before step6 is complete, and the rerun ends with the weights of an uninterrupted run."""
    run = tmp_path / "run"
    args = ("trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_last=1")
    r = _run(run, data, *args, fault=f"kill:{where}@6", inject=inject_dir)
    assert r.returncode == -9, (r.stdout + r.stderr)[-3000:]
    ckpts = run / "checkpoints"
    expected = "step00000006" if where == "retention" else "step00000004"
    assert newest_bundle(ckpts).name == expected
    assert (ckpts / "step00000004" / "COMPLETE").is_file()  # retention waits for a complete successor
    r = _run(run, data, *args)
    assert r.returncode == 0 and f"resumed from {ckpts / expected}" in r.stdout, (r.stdout + r.stderr)[-3000:]
    ours, ref = hf_weights(run), hf_weights(reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000008"]


def test_no_complete_checkpoint_refuses_to_start_fresh(data, inject_dir, tmp_path):
    run = tmp_path / "run"
    r = _run(run, data, "trainer.max_steps=4", "trainer.checkpoint_every=2", fault="kill:engine@2", inject=inject_dir)
    assert r.returncode == -9
    r = _run(run, data, "trainer.max_steps=4", "trainer.checkpoint_every=2")
    errors = _error_lines(r)
    assert r.returncode == 2 and len(errors) == 1 and "step00000002" in errors[0] and "resume=none" in errors[0]
    r = _run(run, data, "trainer.max_steps=4", "trainer.checkpoint_every=2", "resume=none")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_full_disk_during_save_keeps_previous_checkpoint(data, tmp_path):
    """A 1.5 MB tmpfs as run dir: the first checkpoint fits, a later one does not. One error line, exit 2, no
    half-written checkpoint, and the complete one still loads."""
    mnt = tmp_path / "small"
    with tmpfs(mnt, "size=1536k"):
        run = mnt / "run"
        r = _run(run, data, "trainer.max_steps=40", "trainer.checkpoint_every=2", "trainer.keep_last=8", "logger=none")
        errors = _error_lines(r)
        assert r.returncode == 2 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
        assert ("could not be written" in errors[0] and "MB free" in errors[0]) or "cannot write metrics" in errors[0]
        ckpts = sorted((run / "checkpoints").glob("step*"))
        assert ckpts and all((c / "COMPLETE").is_file() for c in ckpts)  # no partial tag left behind
        sd = torch.load(ckpts[-1] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        assert sd["module"]["bert.embeddings.word_embeddings.weight"].shape[1] == 32


RESIZE = [
    *SMALL,
    "model.hidden_dropout_prob=0",
    "model.attention_probs_dropout_prob=0",
    "deepspeed=zero2",
    "trainer.max_steps=12",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=4",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=1",
    "optim.lr=5e-3",
    "scheduler.warmup_steps=1",
]
# Micro-batches of one sample: a step's gradient is then the mean over its samples whatever the number of ranks
# (with more samples per micro-batch, each micro-batch's mean loss weights its tokens differently).


def _run_ranks(ranks: int, run_dir: Path, data: Path, *overrides: str, fault: str = "", inject: Path | None = None):
    env = run_env()
    if fault:
        env.update(FAULT=fault, PYTHONPATH=f"{inject}:{ROOT}")
    launcher = launch_cmd("deepspeed") if ranks == 2 else [sys.executable, LAUNCH]
    return subprocess.run(
        [*launcher, f"data.dir={data}", f"run_dir={run_dir}", *RESIZE, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def resize_reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resize_ref") / "run"
    r = _run_ranks(2, run, data)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run


@pytest.mark.parametrize(("before", "after"), [(2, 1), pytest.param(1, 2, marks=pytest.mark.long)])  # CI time
def test_world_size_change_on_resume(data, inject_dir, resize_reference, tmp_path, before, after):
    """ZeRO-2 stopped at step 4 on BEFORE ranks, resumed on AFTER ranks through DeepSpeed's universal checkpoint:
    the same losses and weights as an uninterrupted 2-rank run (fp32, no dropout; up to summation order), and
    every sample of the epoch exactly once, in order."""
    run, ids = tmp_path / "run", tmp_path / "ids"
    r = _run_ranks(before, run, data, "trainer.stop_at_step=4", fault=f"record:{ids}", inject=inject_dir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    first = sorted(tmp_path.glob("ids.*"))
    seen_before = [tuple(x) for f in first for line in f.read_text().splitlines() for x in json.loads(line)]
    for f in first:
        f.unlink()
    r = _run_ranks(after, run, data, fault=f"record:{ids}", inject=inject_dir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"{before} rank(s) -> {after}: converting step00000004 to a universal checkpoint" in r.stdout
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    seen_after = [
        tuple(x) for f in tmp_path.glob("ids.*") for line in f.read_text().splitlines() for x in json.loads(line)
    ]
    order = ResumableDistributedSampler(96, 1, world_size=2, seed=1234).global_order(0)
    assert sorted(seen_before) == sorted((0, int(i)) for i in order[:64])  # steps 1-4
    assert sorted(x for x in seen_after if x[0] == 0) == sorted((0, int(i)) for i in order[64:])  # steps 5-6
    assert sorted(x[1] for x in seen_after if x[0] == 1) == list(range(96))  # steps 7-12: epoch 1, once each
    ref_loss = {x["step"]: x["loss"] for x in _records(resize_reference, "train")}
    ours = {x["step"]: x["loss"] for x in _records(run, "train") if x["step"] > 4}
    np.testing.assert_allclose([ours[k] for k in sorted(ours)], [ref_loss[k] for k in sorted(ours)], rtol=1e-4)
    ref, got = hf_weights(resize_reference), hf_weights(run)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-5)


def test_read_only_run_dir_is_one_line(data, tmp_path):
    mnt = tmp_path / "ro"
    with tmpfs(mnt, "size=1m,ro"):
        r = _run(mnt / "run", data, "trainer.max_steps=2")
        errors = _error_lines(r)
        assert r.returncode == 2 and len(errors) == 1 and "Read-only file system" in errors[0], r.stderr[-2000:]


def test_stale_comm_op_build_lock_is_one_line(data, tmp_path, monkeypatch):
    """A process killed while JIT-compiling DeepSpeed's CPU comm op leaves torch's lock file; without a check
    every later run waits on it forever. An old lock is refused in one line naming it; a fresh one (a build
    running now) is waited for."""
    ext = tmp_path / "ext"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = {**run_env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, LAUNCH, f"data.dir={data}", f"run_dir={tmp_path / 'run'}", *ARGS, "trainer.max_steps=2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    errors = _error_lines(r)
    assert r.returncode == 2 and len(errors) == 1 and str(lock) in errors[0] and "60 min" in errors[0], r.stderr
    assert time.monotonic() - started < 60 and lock.exists()  # refused at once; the file is the user's to delete

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    deepspeed_env.check_cpu_comm_build_lock(now=old + 60)  # one minute old: a build in progress, not an error
    with pytest.raises(UserError, match="delete it if no build is running"):
        deepspeed_env.check_cpu_comm_build_lock(now=old + deepspeed_env.STALE_BUILD_LOCK_S + 1)
    lock.unlink()
    deepspeed_env.check_cpu_comm_build_lock()  # no lock: nothing to say


def test_install_build_of_comm_op_is_per_environment_and_clears_a_stale_lock(tmp_path):
    """``make`` builds the CPU comm op with ``python -m pretrain.runtime.deepspeed_env``: into
    ``<venv>/torch_extensions`` (not ``~/.cache``, which every clone of a user shares and where one killed clone's lock
    hung the next clone's install for 90 minutes), and a lock older than any build is removed with a line saying so, not
    waited on."""
    env = {k: v for k, v in run_env().items() if k != "TORCH_EXTENSIONS_DIR"}
    probe = (
        "import os, pretrain.runtime.deepspeed_env as e; "
        "print(e.extensions_dir()); print(os.environ['TORCH_EXTENSIONS_DIR'])"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [os.path.join(sys.prefix, "torch_extensions")] * 2

    built = Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm"
    if not (built / "deepspeed_shm_comm.so").exists():
        pytest.skip(f"{built}: the op is not built in this environment (make builds it; no C++ compiler?)")
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / "deepspeed_shm_comm")  # a built op: the build below is ninja's no-op
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    cmd = [sys.executable, "-m", "pretrain.runtime.deepspeed_env"]
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "TORCH_EXTENSIONS_DIR": str(ext)}, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removing {lock}: left 60 min ago" in r.stdout and not lock.exists()
    assert f"built in {ext}" in r.stdout
