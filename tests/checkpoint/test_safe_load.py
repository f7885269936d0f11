"""Nothing loaded from elsewhere runs code: weights given by path (``trainer.init_from``, ``pretrained=``, the tools)
are unpickled with ``weights_only=True`` and the allow-list of ``pretrain/checkpoint/safe_load.py``. Injected for
real: a bundle's ``.pt`` replaced (or joined) by a pickle whose loading would run ``os.system`` or ``builtins.exec``,
the bundle re-marked so that it verifies; every consumer refuses it in one line naming the file, and the code never
runs (its sentinel file stays absent). Normal bundles (ZeRO 0 fp32, ZeRO 1 bf16) and Hugging Face directories
(safetensors, ``pytorch_model.bin``) load as before."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.errors import UserError
from tests.helpers import LAUNCH, ROOT, SMALL, make_data, run_env

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ARGS = [*SMALL, "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.max_steps=2", "trainer.checkpoint_every=2", "logger=none"]  # fmt: skip
STATES = "mp_rank_00_model_states.pt"


class SystemCall:
    """Unpickled, it runs ``touch SENTINEL`` in a shell."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class Exec:
    """Unpickled, it runs Python code that creates SENTINEL."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.sentinel)!r}, 'w').close()",))


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=run_env(), timeout=600,
                          cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("safe_load") / "bert")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """Two 2-step tiny runs: ZeRO 0 in fp32 (the module holds the weights) and ZeRO 1 in bf16 (DeepSpeed's
    optimizer partitions hold the fp32 master weights)."""
    root, out = tmp_path_factory.mktemp("safe_load_runs"), {}
    for name, extra in (("zero0", ["deepspeed=zero0"]), ("zero1", ["deepspeed=zero1", "trainer.precision=bf16"])):
        r = _run(LAUNCH, f"data.dir={data}", f"run_dir={root / name}", *ARGS, *extra)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        out[name] = root / name
    return out


def _bundle(run: Path, to: Path) -> Path:
    """A copy of the run's bundle (``to`` named stepNNNNNNNN, so that it is one)."""
    shutil.copytree(run / "checkpoints" / "step00000002", to)
    return to


def _remark(tag: Path) -> None:
    """Rewrite the COMPLETE marker with the files as they are now: the injected file verifies."""
    from pretrain.checkpoint.bundle import mark_complete, verify

    mark_complete(tag, 2, 1)
    assert verify(tag)["files"] == len([p for p in tag.rglob("*") if p.is_file() and p.name != "COMPLETE"])


def _poison_states(tag: Path, payload: object) -> Path:
    """The bundle's model states with ``payload`` in its client state: every tensor still there."""
    path = tag / STATES
    states = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by the run above
    states["config"] = {**states["config"], "note": payload}
    torch.save(states, path)
    _remark(tag)
    return path


def _assert_would_run(path: Path, sentinel: Path) -> None:
    """The injected file is a real fault: an unsafe load (in another process) runs its code."""
    probe = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", probe], capture_output=True, env=run_env(), timeout=120, check=False)
    assert sentinel.exists(), "the injected pickle does not run code: the test proves nothing"
    sentinel.unlink()


# ------------------------------------------------------------------------------------------- the launchers


def test_init_from_a_bundle_whose_pickle_runs_code_is_refused_in_one_line(data, runs, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    tag = _bundle(runs["zero0"], tmp_path / "step00000002")
    bad = _poison_states(tag, SystemCall(sentinel))
    _assert_would_run(bad, sentinel)
    r = _run(LAUNCH, f"data.dir={data}", f"run_dir={tmp_path / 'run'}", *ARGS, f"trainer.init_from={tag}")
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
    assert str(bad) in errors[0] and "posix.system" in errors[0] and "refused" in errors[0]
    assert not sentinel.exists(), "the checkpoint's code ran"


def test_evaluate_refuses_an_injected_exec_in_a_zero_bundle(data, runs, tmp_path):
    """A ZeRO 1 bundle with one more ``*_optim_states.pt`` that would ``exec``: refused before DeepSpeed's loader
    (``weights_only=False``) opens it; the launcher's one ``error:`` line names it, exit 2."""
    sentinel = tmp_path / "SENTINEL"
    tag = _bundle(runs["zero1"], tmp_path / "step00000002")
    bad = tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Exec(sentinel)}, bad)
    _remark(tag)
    _assert_would_run(bad, sentinel)
    r = _run(str(ROOT / "launch" / "evaluate.py"), str(tag), "--data", str(data), "--batches", "1")
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
    assert str(bad) in errors[0] and "builtins.exec" in errors[0]
    assert not sentinel.exists(), "the checkpoint's code ran"


# -------------------------------------------------------------------------------------------- in process


@pytest.mark.parametrize("payload", [SystemCall, Exec])
def test_every_path_given_load_refuses_code(runs, tmp_path, payload):
    """``weights_from`` (init_from), ``load_model`` (the tools, ``pretrained=``), a ZeRO bundle's extra file and a
    Hugging Face ``pytorch_model.bin``: one UserError naming the file, and nothing ran."""
    from pretrain.checkpoint.weights import load_model, weights_from

    sentinel = tmp_path / "SENTINEL"
    tag = _bundle(runs["zero0"], tmp_path / "a" / "step00000002")
    bad = _poison_states(tag, payload(sentinel))
    for load in (weights_from, load_model):
        with pytest.raises(UserError, match="refused") as e, contextlib.redirect_stdout(io.StringIO()):
            load(str(tag))
        assert str(bad) in str(e.value) and "\n" not in str(e.value)

    zero = _bundle(runs["zero1"], tmp_path / "b" / "step00000002")
    extra = zero / "zero_pp_rank_0_mp_rank_00_extra_states.pt"
    torch.save({"x": payload(sentinel)}, extra)
    _remark(zero)
    with pytest.raises(UserError, match="refused") as e, contextlib.redirect_stdout(io.StringIO()):
        weights_from(str(zero))
    assert str(extra) in str(e.value)

    hf = tmp_path / "hf"
    shutil.copytree(runs["zero0"] / "hf", hf)
    (hf / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2), "x": payload(sentinel)},
               hf / "pytorch_model.bin")  # fmt: skip
    for load in (weights_from, load_model):
        with pytest.raises(UserError, match="refused") as e:
            load(str(hf))
        assert str(hf / "pytorch_model.bin") in str(e.value)
    assert not sentinel.exists(), "a checkpoint's code ran"


def test_normal_bundles_and_hf_directories_still_load(runs, tmp_path):
    """ZeRO 0 fp32 and ZeRO 1 bf16 bundles give the weights they gave before (the module's, DeepSpeed's gathered
    master weights); a run's hf/ export and the same weights as ``pytorch_model.bin`` load; the allow-list takes
    every file of both bundles and an fp16 loss scaler. A ZeRO bundle without its optimizer partitions is one line,
    not a silent load of its bf16 module."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.checkpoint.bundle import fp32_weights
    from pretrain.checkpoint.safe_load import check_bundle, load_file
    from pretrain.checkpoint.weights import load_model, weights_from

    zero0, zero1 = (r / "checkpoints" / "step00000002" for r in (runs["zero0"], runs["zero1"]))
    for tag in (zero0, zero1):
        check_bundle(tag)
        for f in tag.glob("*.pt"):  # every key of every file, as the unsafe load gives it
            assert load_file(f).keys() == torch.load(f, map_location="cpu", weights_only=False).keys()
    module = torch.load(zero0 / STATES, map_location="cpu", weights_only=False)["module"]
    with contextlib.redirect_stdout(io.StringIO()):
        got = weights_from(str(zero0))
        assert got.keys() == module.keys() and all(torch.equal(got[k], module[k]) for k in module)
        master = get_fp32_state_dict_from_zero_checkpoint(str(zero1.parent), tag=zero1.name)
        got = fp32_weights(zero1)
        assert got.keys() == master.keys() and all(torch.equal(got[k], master[k]) for k in master)
        assert all(v.dtype == torch.float32 for v in got.values())
        assert load_model(str(zero0)).kind == "checkpoint" and load_model(str(zero1)).step == 2

    hf = tmp_path / "hf"
    shutil.copytree(runs["zero0"] / "hf", hf)
    ref = load_model(str(hf)).model.state_dict()
    from safetensors.torch import load_file as read_safetensors

    torch.save(read_safetensors(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    bin_sd = load_model(str(hf)).model.state_dict()
    assert all(torch.equal(ref[k], bin_sd[k]) for k in ref)
    assert weights_from(str(hf)).keys() == ref.keys()

    scaler = tmp_path / "scaler.pt"  # fp16 ZeRO runs (GPU only) keep a DynamicLossScaler in their optimizer states
    torch.save({"loss_scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, True, dtype=torch.float16)}, scaler)
    assert vars(load_file(scaler)["loss_scaler"])["cur_scale"] == 2.0**16

    partial = shutil.copytree(zero1, tmp_path / "partial" / "step00000002")
    for f in partial.glob("*_optim_states.pt"):
        f.unlink()
    with pytest.raises(UserError, match=r"ZeRO-1 checkpoint without its \*_optim_states\.pt"):
        fp32_weights(partial)
