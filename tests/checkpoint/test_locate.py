"""The one checkpoint rule (``pretrain/checkpoint/locate.py``) in-process, on bundles committed by the real marker
writer: what a bundle, a run directory and a Hugging Face directory mean, a damaged newer bundle named once and
set aside, the finished-run check, the resume hint and retention. The same rule through the launchers and tools,
on a real run: ``test_checkpoint_integrity.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.errors import UserError
from pretrain.checkpoint.bundle import MARKER, complete_bundles, mark_complete, retain
from pretrain.checkpoint.locate import bundle, finished, newest_good, resolve, resume_from, resume_hint


def _run(root: Path, steps: tuple[int, ...] = (10, 20)) -> Path:
    """A run directory with one committed bundle per step (two files each, listed in the marker)."""
    for step in steps:
        tag = root / "checkpoints" / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 4096)
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100)
        mark_complete(tag, step, 1)
    return root


def _damage(tag: Path) -> None:
    f = tag / "mp_rank_00_model_states.pt"
    f.write_bytes(b"\xff" * f.stat().st_size)  # same size, other bytes: only the sha256 tells


def test_a_run_means_its_newest_bundle_that_verifies_and_the_damaged_one_is_named_once_and_set_aside(tmp_path, capsys):
    run = _run(tmp_path / "run")
    ckpts = run / "checkpoints"
    assert bundle(run, "trainer.init_from") == ckpts / "step00000020"
    _damage(ckpts / "step00000020")
    assert bundle(run, "trainer.init_from") == ckpts / "step00000010"
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "sha256" in warnings[0] and "set aside as corrupt-step00000020" in warnings[0]
    assert warnings[0].endswith(f"falling back to {ckpts / 'step00000010'}")
    assert (ckpts / "corrupt-step00000020").is_dir() and not (ckpts / "step00000020").exists()
    assert bundle(run, "resume") == ckpts / "step00000010"  # asked again: nothing left to name
    assert not [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]


def test_a_bundle_given_by_path_must_verify_and_is_left_where_it_is(tmp_path):
    run = _run(tmp_path / "run")
    tag = run / "checkpoints" / "step00000020"
    _damage(tag)
    with pytest.raises(UserError, match=r"^resume=.*step00000020: .*mp_rank_00_model_states\.pt: sha256"):
        resume_from(str(tag), run / "checkpoints")
    assert tag.is_dir()
    assert bundle(tag, "x", checksums=False) == tag  # sizes only: the same size passes


def test_resume_auto_starts_afresh_in_a_new_run_and_refuses_only_half_written_bundles(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert resume_from("auto", ckpts) is None and resume_from("none", ckpts) is None
    (ckpts / "step00000005").mkdir(parents=True)  # killed while saving: no marker
    with pytest.raises(UserError, match="none is complete.*step00000005"):
        resume_from("auto", ckpts)
    _run(tmp_path / "run", (10,))
    assert resume_from("auto", ckpts) == ckpts / "step00000010"
    _damage(ckpts / "step00000010")
    with pytest.raises(UserError, match="no checkpoint under .* verifies"):
        resume_from("auto", ckpts)


def test_tools_take_a_hf_directory_as_itself_and_a_run_without_bundles_by_its_export(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve(hf, "model") == ("hf", hf)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="a run without a complete checkpoint"):
        resolve(run, "model")
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    assert resolve(run, "model") == ("hf", run / "hf")
    _run(run, (4,))
    assert resolve(run, "model") == ("checkpoint", run / "checkpoints" / "step00000004")  # newer than its export
    with pytest.raises(UserError, match="not found"):
        resolve(tmp_path / "nowhere", "model")


def test_the_finished_run_check_the_hint_and_the_last_good_checkpoint_use_the_same_rule(tmp_path, capsys):
    run = _run(tmp_path / "run")
    ckpts = run / "checkpoints"
    assert finished(run, 20) == ckpts / "step00000020" and finished(run, 30) is None
    assert str(ckpts / "step00000020") in resume_hint(run)
    assert newest_good(complete_bundles(ckpts), before_step=15) == ckpts / "step00000010"
    (ckpts / "step00000020" / "mp_rank_00_model_states.pt").write_bytes(b"x")  # truncated
    assert finished(run, 20) is None  # quiet: the resume that follows names it
    assert str(ckpts / "step00000010") in resume_hint(run)
    assert not capsys.readouterr().err and (ckpts / "step00000020").is_dir()  # quiet checks move nothing


def test_retention_keeps_the_newest_complete_bundles_and_drops_older_half_written_ones(tmp_path):
    run = _run(tmp_path / "run", (2, 4, 6, 8))
    ckpts = run / "checkpoints"
    (ckpts / "step00000003").mkdir()  # a killed save, older than the newest
    (ckpts / "corrupt-step00000001").mkdir()  # set aside earlier: kept for a look
    retain(ckpts, "step00000008", keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["corrupt-step00000001", "step00000006", "step00000008"]
    assert json.loads((ckpts / "step00000008" / MARKER).read_text())["step"] == 8
