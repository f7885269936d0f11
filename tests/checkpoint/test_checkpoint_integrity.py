"""Nothing corrupt is trained on or exported: every checkpoint bundle lists each file's size and sha256 in its
COMPLETE marker; a resume (pretraining and fine-tuning), ``init_from`` and the tools verify the bundle they pick.
Injected for real: the newest bundle's model states truncated to half or to nothing, 64 KiB of finite or
non-finite junk inside the word-embedding tensor. The rerun names the file and the failed check in one line,
falls back to the older bundle and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint.bundle import CheckpointError, file_table, verify
from tests.helpers import (
    FINETUNE,
    FINETUNE_FAST,
    LAUNCH,
    ROOT,
    SMALL,
    classification_task,
    hf_weights,
    make_data,
    run_env,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ARGS = [*SMALL, "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.log_every=1",
        "trainer.eval_every=0", "optim.lr=5e-3", "scheduler.warmup_steps=1", "deepspeed=zero0",
        "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_last=3"]  # fmt: skip
STATES = "mp_rank_00_model_states.pt"


def _run(cmd: list[str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd, *overrides], capture_output=True, text=True, env=run_env(),
                          timeout=600, cwd=ROOT)  # fmt: skip


def _lines(r: subprocess.CompletedProcess, prefix: str) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith(prefix)]


def damage(path: Path, how: str) -> None:
    """Truncate a model-states file, or write 64 KiB of junk (finite or NaN) inside its word-embedding tensor."""
    if how == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
        table = sd["bert.embeddings.word_embeddings.weight"].contiguous().numpy().tobytes()
        raw = bytearray(path.read_bytes())
        at = raw.find(table[:256])
        assert at >= 0, "the embedding's bytes are stored as they are"
        n = min(64 * 1024, len(table)) // 4
        junk = np.full(n, np.nan if how == "nan" else 3.0, dtype=np.float32).tobytes()
        raw[at : at + len(junk)] = junk
        path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------------------- the marker, alone


def test_the_marker_lists_every_file_and_verify_names_the_failed_check(tmp_path):
    tag = tmp_path / "step00000002"
    (tag / "sub").mkdir(parents=True)
    (tag / "a.pt").write_bytes(b"x" * 1000)
    (tag / "sub" / "b.pt").write_bytes(b"y" * 10)
    files = file_table(tag)
    assert sorted(files) == ["a.pt", "sub/b.pt"] and files["a.pt"]["size"] == 1000
    (tag / "COMPLETE").write_text(json.dumps({"format": 2, "step": 2, "files": files}))
    assert verify(tag)["files"] == 2 and verify(tag)["bytes"] == 1010
    (tag / "a.pt").write_bytes(b"x" * 999 + b"z")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"a\.pt: sha256 .* does not match"):
        verify(tag)
    assert verify(tag, checksums=False)["files"] == 2  # sizes only: this one passes
    (tag / "a.pt").write_bytes(b"x" * 500)
    with pytest.raises(CheckpointError, match=r"a\.pt: 500 bytes where .* lists 1,000"):
        verify(tag, checksums=False)
    (tag / "sub" / "b.pt").unlink()
    (tag / "a.pt").write_bytes(b"x" * 1000)
    with pytest.raises(CheckpointError, match=r"b\.pt: no such file"):
        verify(tag)
    (tag / "COMPLETE").write_text(json.dumps({"format": 1, "step": 2}))  # older bundles: nothing to check
    assert verify(tag)["files"] == 0


# ------------------------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("integrity") / "bert")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity_ref") / "run"
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return run


@pytest.mark.parametrize("how", ["half", "empty", "finite", "nan"])
def test_a_damaged_newest_bundle_is_named_and_the_older_one_resumes(data, reference, tmp_path, how):
    run = tmp_path / "run"
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS, "trainer.stop_at_step=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    damage(run / "checkpoints" / "step00000004" / STATES, how)
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS)
    warnings = _lines(r, "warning:")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    named = [w for w in warnings if STATES in w]
    assert len(named) == 1 and ("sha256" in named[0] if how in ("finite", "nan") else "bytes where" in named[0])
    assert "falling back to" in named[0] and "step00000002" in named[0]
    assert "resumed from" in r.stdout and "step00000002" in r.stdout and "verified" in r.stdout
    assert (run / "checkpoints" / "corrupt-step00000004").is_dir()  # kept for a look, out of the way
    ours, theirs = hf_weights(run), hf_weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_no_bundle_that_verifies_is_one_line_exit_2_and_init_from_checks_too(data, tmp_path):
    run = tmp_path / "run"
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS, "trainer.stop_at_step=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for step in (2, 4):
        damage(run / "checkpoints" / f"step{step:08d}" / STATES, "half")
    keep = tmp_path / "damaged"
    shutil.copytree(run / "checkpoints" / "step00000004", keep)
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={tmp_path / 'other'}", *ARGS, f"trainer.init_from={keep}")
    errors = _lines(r, "error:")
    assert r.returncode == 2 and len(errors) == 1 and f"trainer.init_from={keep}" in errors[0], r.stderr[-2000:]
    assert STATES in errors[0] and "bytes where" in errors[0]
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS)
    errors = _lines(r, "error:")
    assert r.returncode == 2 and len(errors) == 1 and "no checkpoint under" in errors[0], r.stderr[-2000:]
    assert "resume=none" in errors[0]


def test_the_last_good_checkpoint_verifies_and_precedes_the_non_finite_steps(data, tmp_path):
    """NaN junk in the newest bundle, verification switched off (sizes only): the resume loads it, every step is
    non-finite, the run stops with exit 3 and names step 2 as the last good checkpoint, not the damaged step 4."""
    run = tmp_path / "run"
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS, "trainer.stop_at_step=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    damage(run / "checkpoints" / "step00000004" / STATES, "nan")
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={run}", *ARGS, "trainer.verify_checkpoint=false")
    errors = _lines(r, "error:")
    assert r.returncode == 3 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
    assert "sizes only" in r.stdout and "resumed from" in r.stdout
    assert f"last good checkpoint is {run / 'checkpoints' / 'step00000002'}" in errors[0]


def test_tools_refuse_a_damaged_checkpoint_and_fall_back_on_a_run(data, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    tags = sorted((run / "checkpoints").glob("step*"))
    damage(tags[-1] / STATES, "finite")
    evaluate = str(ROOT / "launch" / "evaluate.py")
    r = _run([evaluate, str(tags[-1]), "--data", str(data), "--batches", "1"])
    errors = _lines(r, "error:")
    assert r.returncode == 2 and len(errors) == 1 and STATES in errors[0] and "sha256" in errors[0], r.stderr
    assert tags[-1].is_dir()  # given by path: refused, left where it is
    r = _run([evaluate, str(run), "--data", str(data), "--batches", "1"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [w for w in _lines(r, "warning:") if "sha256" in w and f"falling back to {tags[-2]}" in w]


def test_one_rule_every_consumer_falls_back_from_a_damaged_step_20_to_step_10(data, tmp_path):
    """The one checkpoint rule, from every side: with step 20 damaged, ``resume=auto``, ``resume=RUN_DIR``,
    ``trainer.init_from=RUN_DIR`` and a tool (evaluate) each name it in one line and use step 10; given by path,
    the damaged bundle is one line, exit 2."""
    args = [a for a in ARGS if not a.startswith(("trainer.max_steps", "trainer.checkpoint_every"))]
    args += ["trainer.max_steps=20", "trainer.checkpoint_every=10"]
    made = tmp_path / "made"
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={made}", *args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    step10, step20 = (made / "checkpoints" / f"step{s:08d}" for s in (10, 20))
    damage(step20 / STATES, "finite")
    evaluate = str(ROOT / "launch" / "evaluate.py")
    cases = {  # what each consumer is given: a copy of the damaged run each, so none sees another's set-aside
        "resume=auto": lambda run: [LAUNCH, f"data.dir={data}", f"run_dir={run}", *args, "trainer.max_steps=21"],
        "resume=RUN_DIR": lambda run: [
            LAUNCH,
            f"data.dir={data}",
            f"run_dir={tmp_path / 'r2'}",
            *args,
            f"resume={run}",
        ],  # fmt: skip
        "init_from=RUN_DIR": lambda run: [
            LAUNCH,
            f"data.dir={data}",
            f"run_dir={tmp_path / 'r3'}",
            *args,
            "trainer.max_steps=1",
            f"trainer.init_from={run}",
        ],  # fmt: skip
        "evaluate RUN_DIR": lambda run: [evaluate, str(run), "--data", str(data), "--batches", "1"],
    }
    lines = {}
    for name, cmd in cases.items():
        run = tmp_path / name.replace(" ", "_").replace("=", "_")
        shutil.copytree(made, run)
        r = _run(cmd(run))
        assert r.returncode == 0, (name, (r.stdout + r.stderr)[-3000:])
        named = [w for w in _lines(r, "warning:") if "step00000020" in w]
        assert len(named) == 1, (name, r.stderr[-2000:])
        assert STATES in named[0] and "sha256" in named[0] and "set aside as corrupt-step00000020" in named[0]
        assert named[0].endswith(f"falling back to {run / 'checkpoints' / 'step00000010'}"), (name, named[0])
        lines[name] = named[0].replace(str(run), "RUN")
        assert (run / "checkpoints" / "corrupt-step00000020").is_dir() and (run / "checkpoints" / step10.name).is_dir()
    assert len(set(lines.values())) == 1, lines  # the same line, whoever asked
    r = _run([LAUNCH], f"data.dir={data}", f"run_dir={tmp_path / 'r4'}", *args, f"resume={step20}")
    errors = _lines(r, "error:")
    assert r.returncode == 2 and len(errors) == 1 and f"resume={step20}" in errors[0] and STATES in errors[0], r.stderr


# ------------------------------------------------------------------------------------------- fine-tuning


def test_fine_tuning_falls_back_from_a_truncated_checkpoint_and_matches(tiny_run, tmp_path):
    train, dev = classification_task(tmp_path)
    task = [FINETUNE, f"pretrained={tiny_run[1]}", "finetune=classification", f"task.train={train}",
            f"task.validation={dev}", "task.text_column=text", "epochs=2", "trainer.keep_last=3",
            "trainer.checkpoint_every=2", *FINETUNE_FAST]  # fmt: skip
    r = _run(task, f"run_dir={tmp_path / 'whole'}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = tmp_path / "run"
    r = _run(task, f"run_dir={run}", "trainer.stop_at_step=4")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    damage(run / "checkpoints" / "step00000004" / STATES, "empty")
    r = _run(task, f"run_dir={run}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [w for w in _lines(r, "warning:") if STATES in w and "step00000002" in w]
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "run"))
    assert a["epochs"] == b["epochs"]
    from safetensors.torch import load_file

    x, y = (load_file(str(tmp_path / n / "best" / "model.safetensors")) for n in ("whole", "run"))
    assert all(torch.equal(x[k], y[k]) for k in x)
