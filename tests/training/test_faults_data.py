"""Faults in the training data: corrupt, truncated, missing and unlisted shards stop pretraining at pre-flight with
one ``error:`` line naming the file (exit code 2, no traceback, no step taken); opening a damaged shard fails the
same way; ``data.verify=false`` skips the checksums but keeps the structural checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import UserError
from data_prep.store import Shard, ShardError, sha256_file, verify_data
from pretrain.training.data import ShardDataset
from pretrain.training.preflight import inspect_data
from tests.helpers import LAUNCH, ROOT, SMALL, make_data, run_env

pytestmark = pytest.mark.faults


def with_checksums(out: Path) -> dict:
    """``make_data``'s manifest plus the ``splits`` section data preparation writes (counts and sha256)."""
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {}
    for split in ("train", "validation"):
        shards = []
        for index in sorted((out / split).glob("*.index.npy")):
            name = index.name[: -len(".index.npy")]
            tokens = index.with_name(f"{name}.tokens.npy")
            shards.append(
                {
                    "name": name,
                    "samples": len(np.load(index)),
                    "tokens": len(np.load(tokens)),
                    "sha256": {"tokens": sha256_file(tokens), "index": sha256_file(index)},
                }
            )
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    manifest["splits"] = splits
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def data(tmp_path: Path) -> Path:
    out = make_data(tmp_path / "data")
    with_checksums(out)
    return out


def flip_tokens(d: Path) -> Path:
    """XOR four bytes in the middle of the token ids (the header stays intact: only a checksum can tell)."""
    path = d / "train" / "shard-00000.tokens.npy"
    raw = bytearray(path.read_bytes())
    mid = (128 + len(raw)) // 2
    raw[mid : mid + 4] = bytes(b ^ 0x01 for b in raw[mid : mid + 4])  # ids stay inside the vocabulary
    path.write_bytes(bytes(raw))
    return path


def truncate_index(d: Path) -> Path:
    path = d / "train" / "shard-00000.index.npy"
    path.write_bytes(path.read_bytes()[:-100])  # a copy cut short
    return path


def delete_shard(d: Path) -> Path:
    for p in (d / "validation").glob("shard-00000.*"):
        p.unlink()
    return d / "validation" / "shard-00000.index.npy"


def add_unlisted(d: Path) -> Path:
    for suffix in (".tokens.npy", ".index.npy"):  # a shard left from another run
        shutil.copyfile(d / "train" / f"shard-00000{suffix}", d / "train" / f"shard-00007{suffix}")
    return d / "train" / "shard-00007.index.npy"


FAULTS = {
    "flipped": (flip_tokens, "sha256"),
    "truncated": (truncate_index, "where its header implies"),
    "deleted": (delete_shard, "listed in manifest.json but missing"),
    "unlisted": (add_unlisted, "not listed in manifest.json"),
}


def pretrain(d: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCH, f"data.dir={d}", f"run_dir={run_dir}", *SMALL, *overrides],
                          capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=300)  # fmt: skip


def assert_one_line_error(r: subprocess.CompletedProcess, path: Path, what: str, run_dir: Path) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and what in errors[0], r.stderr[-3000:]
    assert "re-run data preparation" in errors[0] or "delete it" in errors[0]  # what to do
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()  # no step taken
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_data_stops_pretraining_at_preflight(fault: str, data: Path, tmp_path: Path) -> None:
    damage, what = FAULTS[fault]
    path = damage(data)
    error = assert_one_line_error(pretrain(data, tmp_path / "run"), path, what, tmp_path / "run")
    if fault == "flipped":  # the manifest's checksum is named, to compare with a backup
        expected = json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][0]["sha256"]
        assert expected["tokens"] in error


@pytest.mark.slow
def test_verify_false_still_catches_truncation(data: Path, tmp_path: Path) -> None:
    path = truncate_index(data)
    assert_one_line_error(pretrain(data, tmp_path / "run", "data.verify=false"), path, "truncated", tmp_path / "run")


def test_verify_false_skips_checksums_only(data: Path) -> None:
    clean = inspect_data(str(data), verify=True).verified
    assert clean["shards"] == 2 and clean["bytes_hashed"] == sum(p.stat().st_size for p in data.rglob("*.npy"))
    flip_tokens(data)
    with pytest.raises(UserError, match="sha256"):
        inspect_data(str(data), verify=True)
    info = inspect_data(str(data), verify=False)  # the flip is invisible without the checksums...
    assert info.verified["bytes_hashed"] == 0 and info.verified["samples"]["train"] == 96
    index = np.load(data / "train" / "shard-00000.index.npy", mmap_mode="r+")
    index[5, 0] = 1 << 40  # ...but an index pointing outside its tokens is not
    index.flush()
    del index
    with pytest.raises(UserError, match=r"shard-00000\.index\.npy: row 5 of 96 \(offset 1099511627776"):
        inspect_data(str(data), verify=False)


def test_manifest_without_splits_gets_structural_checks_only(tmp_path: Path) -> None:
    d = make_data(tmp_path / "plain")  # test_trainer's tiny data: a manifest with no shard list, no checksums
    info = inspect_data(str(d), verify=True)
    assert info.verified["shards"] == 2 and info.verified["bytes_hashed"] == 0
    path = d / "validation" / "shard-00000.tokens.npy"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match=f"{path}: [0-9]+ bytes where its header implies [0-9]+: truncated"):
        inspect_data(str(d), verify=False)


def test_opening_a_damaged_shard_names_the_file(data: Path) -> None:
    tokens = data / "train" / "shard-00000.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:200])
    for open_it in (lambda: Shard(data / "train", "shard-00000"), lambda: ShardDataset(data, "train")):
        with pytest.raises(ShardError) as caught:
            open_it()
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{tokens}: ") and "re-run data preparation" in message
    tokens.write_bytes(b"")
    with pytest.raises(ShardError, match="not a readable .npy file"):
        ShardDataset(data, "train")
    (data / "train" / "shard-00000.index.npy").unlink()  # only the tokens file: not a shard (index = commit)
    with pytest.raises(ValueError, match="no shards"):
        ShardDataset(data, "train")


def test_prepared_data_verifies_and_names_a_grown_file(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    assert verify_data(data, manifest)["samples"] == {"train": 96, "validation": 24}
    index = data / "validation" / "shard-00000.index.npy"
    with open(index, "ab") as f:
        f.write(b"\0" * 48)  # one row too many: np.load alone would not notice
    with pytest.raises(ShardError, match=f"{index}: .* bytes where its header implies"):
        verify_data(data, manifest, checksums=False)


def test_manifest_shard_list_is_checked_as_well(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["validation"]  # a manifest that lists no validation shards: those on disk are strays
    with pytest.raises(ShardError, match=r"validation/shard-00000\.index\.npy: shard not listed"):
        verify_data(data, manifest, checksums=False)
    manifest["splits"]["train"]["shards"] = [{"samples": 96}]
    with pytest.raises(ShardError, match=r"manifest\.json: splits\.train\.shards is not a list of shard entries"):
        verify_data(data, manifest, checksums=False)
