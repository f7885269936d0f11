"""The SLURM launchers against a real one-node cluster (``tests/slurm_cluster.py``).

Array data preparation + merge over the Gutenberg books, a 2-rank CPU pretraining (gloo) through
``launch/slurm/pretrain.sbatch``, and a preemption: SIGUSR1 mid-run, checkpoint, requeue, resume, and final
weights identical to the uninterrupted run. The cluster, the vocabulary, the prepared data and the reference
run are each made once per session and shared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster as cluster_module
from tests.slurm_cluster import SlurmCluster

slurm_cluster = cluster_module.slurm_cluster  # the session fixture, found by pytest under this name

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
NUM_TASKS = 2
# Tiny BERT on 2 CPU ranks: long enough to signal mid-run, short enough for CI.
TRAIN_OVERRIDES = (
    "model=tiny", "trainer.max_steps=40", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
    "trainer.checkpoint_every=0", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
)  # fmt: skip
MAX_STEPS = 40
SIGNAL_AFTER_STEP = 3
# One thread per rank: two ranks share the two cores of a CI machine.
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHON": sys.executable}


def _needs(path: str) -> None:
    if not (ROOT / path).exists():
        pytest.fail(f"{path} not found (it is needed to run this SLURM test)")


@pytest.fixture(scope="session")
def books(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "books").glob("*.txt.gz"))
    if len(files) < NUM_TASKS:
        pytest.skip(f"need at least {NUM_TASKS} books in {shared_data / 'books'}")
    return files


@pytest.fixture(scope="session")
def vocab_txt(books: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small WordPiece vocabulary trained once on two books (stage=read, then stage=vocab)."""
    _needs("launch/prepare_data.py")
    out = tmp_path_factory.mktemp("vocab")
    inputs = f"inputs=[{books[0]},{books[-1]}]"
    for stage in ("read", "vocab"):
        cmd = [sys.executable, "launch/prepare_data.py", inputs, f"output_dir={out}", f"stage={stage}",
               "vocab_size=2000", "num_workers=1"]  # fmt: skip
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"stage={stage} failed:\n{result.stderr[-3000:]}"
    assert (out / "vocab.txt").is_file()
    return out / "vocab.txt"


@pytest.fixture(scope="session")
def prepared(
    slurm_cluster: SlurmCluster, books: list[Path], vocab_txt: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Every book through ``prepare_data.sh``: a 2-task array job, then the dependent merge job."""
    out = tmp_path_factory.mktemp("prepared")
    env = {**slurm_cluster.env, **JOB_ENV, "NUM_TASKS": str(NUM_TASKS)}
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "prepare_data.sh"), f"inputs=[{','.join(map(str, books))}]", f"output_dir={out}",
         f"vocab={vocab_txt}", "max_seq_length=128", "num_workers=1", "seed=7"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    array_id, merge_id = result.stdout.split()
    array = slurm_cluster.wait(array_id, timeout=300)
    merge = slurm_cluster.wait(merge_id, timeout=120)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((out / "logs").glob("*.out")))
    return {"dir": out, "array": array, "merge": merge, "array_id": array_id, "logs": logs,
            "seconds": time.monotonic() - start}  # fmt: skip


def _submit_pretrain(cluster: SlurmCluster, run_dir: Path, data_dir: Path, name: str) -> str:
    return cluster.submit(
        SLURM_DIR / "pretrain.sbatch", f"data.dir={data_dir}", *TRAIN_OVERRIDES,
        options=["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", f"--job-name={name}",
                 f"--output={run_dir.parent / (name + '.log')}"],
        env={**JOB_ENV, "RUN_DIR": str(run_dir)}, cwd=ROOT,
    )  # fmt: skip


def _log(run_dir: Path, name: str) -> str:
    path = run_dir.parent / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


@pytest.fixture(scope="session")
def reference_run(slurm_cluster: SlurmCluster, prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted 2-rank pretraining run on the prepared shards."""
    _needs("launch/pretrain.py")
    if prepared["merge"].state != "COMPLETED":
        pytest.fail("data preparation failed (see test_prepare_data_array_and_merge)")
    run_dir = tmp_path_factory.mktemp("pretrain") / "reference"
    start = time.monotonic()
    job = _submit_pretrain(slurm_cluster, run_dir, prepared["dir"], "reference")
    info = slurm_cluster.wait(job, timeout=400)
    return {"dir": run_dir, "info": info, "log": _log(run_dir, "reference"), "seconds": time.monotonic() - start}


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("kind") == "train":
            steps.append(int(rec["step"]))
    return steps


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step*") if (p / "COMPLETE").exists())


@pytest.mark.slow
@pytest.mark.slurm
def test_cluster_runs_a_two_task_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS on $(hostname)'\n")
    out = tmp_path / "hello.out"
    job = slurm_cluster.submit(script, options=["--ntasks=2", f"--output={out}"])
    info = slurm_cluster.wait(job, timeout=60)
    assert (info.state, info.exit_code) == ("COMPLETED", 0), out.read_text() if out.exists() else info
    lines = sorted(out.read_text().split("\n"))
    host = slurm_cluster.host
    assert [ln for ln in lines if ln] == [f"task 0 of 2 on {host}", f"task 1 of 2 on {host}"]

    failing = tmp_path / "fail.sbatch"
    failing.write_text("#!/bin/bash\nexit 3\n")
    info = slurm_cluster.wait(slurm_cluster.submit(failing, options=[f"--output={tmp_path / 'fail.out'}"]), 60)
    assert (info.state, info.exit_code) == ("FAILED", 3)


# Stands in for the trainer behind PYTHON=: `-c` (the look-up of exits.PREEMPTED) goes to the real
# interpreter; `launch/pretrain.py ...` waits for SIGUSR1 and exits 75 in the first run, exits 0 once requeued,
# or exits FAKE_EXIT at once when that is set.
FAKE_TRAINER = """#!{python}
import os, signal, sys, time
if sys.argv[1] == "-c":
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
rank, restart = os.environ["SLURM_PROCID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print(f"rank {{rank}} run {{restart}} resume={{args['resume']}} run_dir={{args['run_dir']}}", flush=True)
if "FAKE_EXIT" in os.environ:
    sys.exit(int(os.environ["FAKE_EXIT"]))
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open(os.path.join(args["run_dir"], f"ready-{{rank}}-{{restart}}"), "w").close()
for _ in range(1200):
    if got:
        print(f"rank {{rank}} got SIGUSR1", flush=True)
        sys.exit(75)
    if restart:
        sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
"""


def _fake_job(cluster: SlurmCluster, tmp_path: Path, extra_env: dict[str, str] | None = None) -> tuple[str, Path]:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "run").mkdir()
    job = cluster.submit(
        SLURM_DIR / "pretrain.sbatch", "model=tiny",
        options=["--gpus-per-node=0", "--ntasks-per-node=2", f"--output={tmp_path / 'job.log'}"],
        env={**JOB_ENV, "PYTHON": str(fake), "RUN_DIR": str(tmp_path / "run"), **(extra_env or {})}, cwd=ROOT,
    )  # fmt: skip
    return job, tmp_path / "job.log"


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_to_batch_shell_is_forwarded_then_job_requeued(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """``scancel --signal=USR1 --batch`` (as ``--signal=B:USR1@T``): the script traps it, forwards it to srun,
    sees exit 75 and requeues; the requeued run gets the same run dir and resume=auto."""
    _needs("pretrain/runtime/distributed.py")
    job, log = _fake_job(slurm_cluster, tmp_path)
    deadline = time.monotonic() + 120
    while not all((tmp_path / "run" / f"ready-{rank}-0").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline and slurm_cluster.info(job).state in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    slurm_cluster.signal(job, "USR1", target="batch")
    info = slurm_cluster.wait(job, timeout=120)
    text = log.read_text()
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", 0, 1), text
    assert "SIGUSR1: asking the trainer" in text and "requeueing job" in text, text
    assert text.count("got SIGUSR1") == 2  # both ranks, each once
    for rank in (0, 1):
        assert f"rank {rank} run 1 resume=auto run_dir={tmp_path / 'run'}" in text, text


@pytest.mark.slow
@pytest.mark.slurm
def test_failed_training_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job, log = _fake_job(slurm_cluster, tmp_path, {"FAKE_EXIT": "3"})
    info = slurm_cluster.wait(job, timeout=120)
    assert (info.state, info.exit_code, info.restarts) == ("FAILED", 3, 0), log.read_text()
    assert "requeueing" not in log.read_text()


def test_prepare_data_sh_refuses_missing_vocab(tmp_path: Path) -> None:
    """Array tasks must share a vocabulary: without an existing vocab= nothing is submitted."""
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "prepare_data.sh"), "inputs=[a.txt]", f"output_dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "vocab=" in result.stderr and "stage=vocab" in result.stderr
    result = subprocess.run(
        ["bash", str(SLURM_DIR / "prepare_data.sh"), f"vocab={tmp_path / 'none.txt'}", "num_tasks=3"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "NUM_TASKS" in result.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_prepare_data_array_and_merge(prepared: dict, books: list[Path]) -> None:
    out = prepared["dir"]
    assert prepared["array"].state == "COMPLETED", prepared["logs"]
    assert prepared["merge"].state == "COMPLETED", prepared["logs"]
    manifest = json.loads((out / "manifest.json").read_text())
    tasks = [json.loads((out / "tasks" / f"task-{i:05d}" / "manifest.json").read_text()) for i in range(NUM_TASKS)]
    # Each task read its own share of the books (every NUM_TASKS-th file), together all of them once.
    assert [t["counts"]["documents_read"] for t in tasks] == [len(books[i::NUM_TASKS]) for i in range(NUM_TASKS)]
    assert manifest["counts"]["documents_read"] == len(books)
    for key in ("sentences", "tokens", "samples_train", "samples_validation"):
        assert manifest["counts"][key] == sum(t["counts"][key] for t in tasks) > 0, key
    for split, info in manifest["splits"].items():
        assert {s["task"] for s in info["shards"]} == set(range(NUM_TASKS)), split
        assert (
            info["samples"]
            == sum(s["samples"] for s in info["shards"])
            == sum(t["splits"][split]["samples"] for t in tasks)
        )
        for shard in info["shards"]:  # merged shards are on disk under their new names
            assert (out / split / f"{shard['name']}.index.npy").is_file()
            assert (out / split / f"{shard['name']}.tokens.npy").is_file()
    assert (out / "vocab.txt").read_text() == Path(tasks[0]["config"]["vocab"]).read_text()
    assert {t["vocab_sha256"] for t in tasks} == {manifest["vocab_sha256"]}


@pytest.mark.slow
@pytest.mark.slurm
def test_pretrain_sbatch_two_ranks_on_cpu(reference_run: dict) -> None:
    run_dir, info, log = reference_run["dir"], reference_run["info"], reference_run["log"]
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", 0, 0), log[-4000:]
    assert "2 tasks on" in log and "2 rank(s) via srun" in log, log[-4000:]
    assert _steps(run_dir)[-1] == MAX_STEPS
    checkpoints = _checkpoints(run_dir)
    assert checkpoints and checkpoints[-1].name == f"step{MAX_STEPS:08d}", checkpoints
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / "hf" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_job_is_requeued_and_matches_uninterrupted_run(
    slurm_cluster: SlurmCluster, prepared: dict, reference_run: dict, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    assert reference_run["info"].state == "COMPLETED", reference_run["log"][-4000:]
    run_dir = tmp_path / "preempted"
    job = _submit_pretrain(slurm_cluster, run_dir, prepared["dir"], "preempted")
    # Signal once training is under way (before that the trainer has no handler and SIGUSR1 would kill it).
    deadline = time.monotonic() + 300
    while not _steps(run_dir) or _steps(run_dir)[-1] < SIGNAL_AFTER_STEP:
        assert time.monotonic() < deadline, _log(run_dir, "preempted")[-4000:]
        assert slurm_cluster.info(job).state in ("PENDING", "RUNNING", "CONFIGURING"), _log(run_dir, "preempted")
        time.sleep(0.2)
    # As --signal=USR1@120 does: to the job's steps (the srun tasks), not the batch shell.
    slurm_cluster.signal(job, "USR1")
    info = slurm_cluster.wait(job, timeout=400)
    log = _log(run_dir, "preempted")
    assert (info.state, info.exit_code, info.restarts) == ("COMPLETED", 0, 1), log[-4000:]
    assert "requeueing job" in log and "resumed from" in log, log[-4000:]
    stopped = re.search(r"preempted \(SIGUSR1\) at step (\d+)", log)
    assert stopped and SIGNAL_AFTER_STEP <= int(stopped.group(1)) < MAX_STEPS, log[-4000:]  # interrupted mid-run
    assert f"at step {stopped.group(1)}" in log.split("requeueing job")[1]  # resumed from that checkpoint
    assert _steps(run_dir)[-1] == MAX_STEPS

    ref = load_file(str(reference_run["dir"] / "hf" / "model.safetensors"))
    got = load_file(str(run_dir / "hf" / "model.safetensors"))
    assert ref.keys() == got.keys()
    differing = [k for k in ref if not (ref[k] == got[k]).all()]
    assert not differing, f"weights differ from the uninterrupted run in {differing[:5]}"
