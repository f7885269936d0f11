"""Console scripts: one per launch/*.py in pyproject.toml, installed, answering --help and a bad override as
``python launch/X.py`` does (from any folder, conf/ found); a built wheel ships launch/ and conf/; and a real
start-up prints no DeepSpeed accelerator line (the import in pretrain/runtime/distributed.py is the quiet one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.helpers import LAUNCH, ROOT, SMALL, make_data, run_env

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

BIN = Path(sys.executable).parent
LAUNCHERS = sorted(p.stem for p in (ROOT / "launch").glob("*.py") if p.stem != "__init__")
HYDRA = {"prepare_data", "pretrain", "finetune", "benchmark"}  # the rest parse their arguments with argparse


def script(stem: str) -> str:
    return f"bert-{stem.replace('_', '-')}"


def project_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def installed_env() -> dict[str, str]:
    """A launched run's environment without PYTHONPATH: what the installed package alone provides."""
    env = run_env()
    env.pop("PYTHONPATH")
    return env


def errors(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if "error:" in x]


def test_one_script_per_launcher_installed_and_callable():
    assert project_scripts() == {script(s): f"launch.{s}:run" for s in LAUNCHERS}
    eps = {ep.name: ep.value for ep in distribution("bert-pretrain").entry_points if ep.group == "console_scripts"}
    assert eps == project_scripts(), "stale install: pip install --no-build-isolation --no-deps -e ."
    assert all((BIN / name).is_file() for name in eps)
    # loaded in a child: importing a launcher installs signal handlers and edits sys.argv
    probe = (
        "import json, inspect; from importlib.metadata import distribution; "
        "eps = [e for e in distribution('bert-pretrain').entry_points if e.group == 'console_scripts']; "
        "print(json.dumps({e.name: [callable(f := e.load()), inspect.getfile(f)] for e in eps}))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=installed_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.splitlines()[-1])
    assert loaded == {script(s): [True, str(ROOT / "launch" / f"{s}.py")] for s in LAUNCHERS}


HELP = {  # what each --help must print: Hydra's groups read from conf/, the docstring, or argparse's usage
    "pretrain": [
        "pretrain is powered by Hydra.",
        "model: bert-base, bert-large, mini, modernbert-base, modernbert-large, modernbert-tiny, roberta-base, small, "
        "tiny",
    ],
    "finetune": ["finetune is powered by Hydra.", "finetune: classification, mrpc, ner, qa"],
    "prepare_data": ["Data preparation: corpora -> sentences"],
    "benchmark": ["Training throughput of the real DeepSpeed engine"],
    "evaluate": ["usage: launch/evaluate.py"],
    "fill_mask": ["usage: launch/fill_mask.py"],
    "embed": ["usage: launch/embed.py"],
    "report": ["usage: python launch/report.py"],
}


@pytest.mark.parametrize("stem", LAUNCHERS)
def test_script_help_exits_0_from_any_folder(stem, tmp_path):
    r = subprocess.run([str(BIN / script(stem)), "--help"], capture_output=True, text=True, env=installed_env(),
                       timeout=300, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert all(w in r.stdout for w in HELP[stem]), r.stdout[:3000]
    assert not list(tmp_path.iterdir())  # nothing written where it ran


@pytest.mark.parametrize("stem", LAUNCHERS)
def test_script_bad_argument_exits_2_with_one_error_line(stem, tmp_path):
    bad = "modle=tiny" if stem in HYDRA else "--no-such-flag"
    r = subprocess.run([str(BIN / script(stem)), bad], capture_output=True, text=True, env=installed_env(),
                       timeout=300, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert len(errors(r.stderr)) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    if stem in HYDRA:  # the one line of cli.check_overrides, with conf/'s schema behind it
        assert r.stderr.strip().startswith("error: modle: no such option;"), r.stderr
        assert stem == "prepare_data" or "did you mean mode" in r.stderr, r.stderr


@pytest.mark.slow
def test_wheel_ships_launch_and_conf(tmp_path):
    """A regular (non-editable) install: the wheel holds launch/ and every conf/ YAML, and its bert-pretrain reads
    the configs from beside its own launch/ (built from a copy: an in-tree build leaves build/ in the checkout)."""
    src = tmp_path / "src"
    for name in ("pretrain", "data_prep", "launch", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "w")], capture_output=True, text=True, timeout=300, cwd=src)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix() for p in [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "launch").glob("*.py")]}
    assert want - names == set()
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"{name} = {value}" in entry_points for name, value in project_scripts().items())
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install --target lays out
    run = [sys.executable, "-c", "import sys; from launch.pretrain import run; sys.argv[0] = 'bert-pretrain'; run()"]
    env = {**installed_env(), "PYTHONPATH": str(site)}
    r = subprocess.run(
        [*run, "--info", "searchpath"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0 and f"file://{site / 'conf'}" in r.stdout, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run([*run, "model=nope"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and errors(r.stderr) == [
        "error: model=nope: no such model config; choose from bert-base, bert-large, mini, modernbert-base, "
        "modernbert-large, modernbert-tiny, roberta-base, small, tiny (conf/model/*.yaml)"
    ], r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- quiet start-up

ACCELERATOR_LINES = ("Setting ds_accelerator", "Setting accelerator to", "[real_accelerator.py", "accelerator.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "bert")


def accelerator_env() -> dict[str, str]:
    """DeepSpeed detects its accelerator and says so while it imports (on CPU a WARNING: "Setting accelerator to
    CPU"); DS_ACCELERATOR=cpu (run_env's) would make it silent on its own, so it is left out here, and the GPU
    hidden so that the detection lands on the CPU on any machine."""
    env = run_env()
    env.pop("DS_ACCELERATOR")
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


# CI time: `python launch/pretrain.py` is the same start-up as the console script (long runs it too)
@pytest.mark.parametrize("how", [pytest.param("launch", marks=pytest.mark.long), "script", "verbose"])
def test_startup_prints_no_deepspeed_accelerator_line(how, data, tmp_path):
    """The first import of DeepSpeed in a run is distributed.init's (the process group, before the engine): it goes
    through deepspeed_env.import_deepspeed, so no accelerator line on stdout or stderr, from `python
    launch/pretrain.py` or `bert-pretrain`; verbose=true brings DeepSpeed's notes back (so the check can fail)."""
    cmd = [str(BIN / "bert-pretrain")] if how == "script" else [sys.executable, LAUNCH]
    args = [f"data.dir={data}", f"run_dir={tmp_path / 'run'}", *SMALL, "trainer.max_steps=1", "trainer.eval_every=0"]
    args += ["verbose=true"] if how == "verbose" else []
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=accelerator_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "step 1/1" in r.stdout, (r.stdout + r.stderr)[-3000:]
    said = [x for x in (r.stdout + r.stderr).splitlines() if any(s in x for s in ACCELERATOR_LINES)]
    assert (said != []) == (how == "verbose"), said or r.stdout + r.stderr
