"""The layers hold: import-linter's contracts (pyproject.toml) pass on the code, and fail on a copy of it where the
model layer imports from training (an import that climbs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], capture_output=True, text=True, cwd=root, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})  # fmt: skip


def test_the_contracts_hold_and_an_import_that_climbs_breaks_them(tmp_path):
    assert LINT.is_file(), f"{LINT}: import-linter is in the dev extra; reinstall with make"
    r = _lint(ROOT)
    assert r.returncode == 0 and "Contracts: 2 kept, 0 broken." in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    copy = tmp_path / "house"
    for part in ("pretrain", "data_prep"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    model = copy / "pretrain" / "models" / "bert.py"
    model.write_text(
        model.read_text().replace("import torch\n", "import torch\n\nimport pretrain.training.engine\n", 1)
    )
    r = _lint(copy)
    assert r.returncode != 0 and "pretrain.models is not allowed to import pretrain.training" in r.stdout, r.stdout
