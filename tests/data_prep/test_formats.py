"""The on-disk formats' owners: one atomic write for every committed file, version checks of the manifest and
of checkpoints (a newer version is refused by name), one reader of vocab.txt."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep import atomic
from data_prep.errors import DataPrepError, UserError
from data_prep.manifest import MANIFEST_VERSION, Manifest, read_manifest, write_manifest
from data_prep.vocab import SPECIALS, read_vocab, special_ids
from pretrain.checkpoint.bundle import CHECKPOINT_FORMAT, check_format
from pretrain.training.preflight import inspect_data
from tests.helpers import make_data


def test_atomic_write_commits_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and len(synced) == 2  # the file, then its directory
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as f:
            f.write('{"a": 2')  # half written, then the writer fails
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1} and not atomic.temporary(target).exists()
    part = atomic.AtomicFile(tmp_path / "part.bin")
    part.f.write(b"abc")
    assert not (tmp_path / "part.bin").exists()  # invisible until committed
    part.commit()
    assert (tmp_path / "part.bin").read_bytes() == b"abc"
    atomic.save_npy(tmp_path / "x.npy", np.arange(3))
    with atomic.atomic_path(tmp_path / "y.npy") as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(4,))[:] = np.arange(4)
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2] and np.load(tmp_path / "y.npy").tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "part.bin", "x.npy", "y.npy"]


def test_manifest_round_trip_and_newer_version_refused(tmp_path):
    m = Manifest(format_version=MANIFEST_VERSION, mode="bert", nsp=True, max_seq_length=128, vocab_size=72,
                 splits={"train": {"samples": 3, "shards": []}})  # fmt: skip
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m and read_manifest(tmp_path / "none") is None
    assert read_manifest(tmp_path).split("train")["samples"] == 3 and read_manifest(tmp_path).split("x") == {}
    (tmp_path / "manifest.json").write_text(json.dumps({**m.to_dict(), "format_version": MANIFEST_VERSION + 1}))
    with pytest.raises(DataPrepError, match=rf"manifest.json: manifest format_version {MANIFEST_VERSION + 1}, but"):
        read_manifest(tmp_path)
    data = make_data(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(
        UserError, match=rf"{data}/manifest.json: manifest format_version 99, .* up to {MANIFEST_VERSION}"
    ):
        inspect_data(str(data))


def test_newer_checkpoint_format_refused_by_name(tmp_path):
    tag = tmp_path / "step00000004"
    tag.mkdir()
    (tag / "COMPLETE").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "step": 4}))
    check_format(tag)
    (tag / "COMPLETE").write_text(json.dumps({"step": 4}))  # older markers: format 1
    check_format(tag)
    (tag / "COMPLETE").write_text(json.dumps({"format": CHECKPOINT_FORMAT + 1, "step": 4}))
    with pytest.raises(UserError, match=rf"{tag}: checkpoint format {CHECKPOINT_FORMAT + 1}, but this code reads"):
        check_format(tag)


def test_one_vocab_reader(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(("\r\n".join([*SPECIALS, "a\x85b", "##c"]) + "\r\n").encode())  # \x85 is a token, not a break
    tokens = read_vocab(path)
    assert tokens == [*SPECIALS, "a\x85b", "##c"]
    assert special_ids(tokens, path) == {t: i for i, t in enumerate(SPECIALS)}
    with pytest.raises(DataPrepError, match=r"vocab.txt: missing special token\(s\) \[MASK\]"):
        special_ids(tokens[:4] + tokens[5:], path)
    with pytest.raises(DataPrepError, match="vocabulary not found"):
        read_vocab(tmp_path / "nope.txt")
