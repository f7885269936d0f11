"""Helpers shared by the test modules: paths, the environment of launched runs, tiny data and small builders.

Fixtures live in tests/conftest.py; test modules import plain helpers from here, never from each other. Project
modules are imported inside the helpers that use them, so that a module broken elsewhere fails only its tests.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

    from data_prep.config import PrepareConfig
    from data_prep.report import Report

# ---------------------------------------------------------------------------------------------- paths and runs

ROOT = Path(__file__).resolve().parent.parent  # the repository root
LAUNCH = str(ROOT / "launch" / "pretrain.py")  # the pretraining launcher
FINETUNE = str(ROOT / "launch" / "finetune.py")  # the fine-tuning launcher
SMALL = [  # overrides for a tiny BERT (1 layer, hidden size 32)
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "model.num_hidden_layers=1",
]


def run_env() -> dict[str, str]:
    """The environment of a launched run: no inherited rank or W&B settings, W&B offline, one thread, CPU ranks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    }
    # The CPU matrix (gloo, bit-exact resumes) also on a GPU machine: two ranks cannot share one GPU under NCCL,
    # and the GPU matrix lives in test_gpu.py.
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        HYDRA_FULL_ERROR="0",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
    )
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a launcher's --master_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launcher: str) -> list[str]:
    """The command line that starts two pretraining ranks under ``deepspeed`` or ``torchrun``."""
    if launcher == "deepspeed":
        ds = str(Path(sys.executable).parent / "deepspeed")
        return [ds, "--num_gpus", "2", "--master_port", str(free_port()), LAUNCH]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        LAUNCH,
    ]


def child_pids(pid: int) -> list[int]:
    """All descendants of a process (children first), from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out + [g for c in out for g in child_pids(c)]


def hf_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's Hugging Face export (``run_dir/hf/model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf" / "model.safetensors"))


def run_main(capsys, script: Path, *argv: object) -> tuple[int, str, str]:
    """A ``launch/`` script's ``main(argv)`` in this process: exit code, stdout, stderr."""
    spec = importlib.util.spec_from_file_location(f"launch_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------- tiny shards

# The vocabulary of make_data's shards: five specials, 59 words, 8 "##" pieces.
SHARD_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)] + [f"##s{i}" for i in range(8)]
)


def make_data(out: Path, nsp: bool = True, n_train: int = 96, n_val: int = 24, max_len: int = 32) -> Path:
    """Tiny learnable shards (runs of consecutive word ids), vocab.txt and manifest.json."""
    from data_prep.store import write_shard

    (out).mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(SHARD_VOCAB) + "\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        toks, rows, off = [], [], 0
        for i in range(n):
            length = int(rng.integers(12, max_len + 1))
            start = int(rng.integers(0, 59))
            body = [5 + (start + k) % 59 for k in range(length - 3)]
            a = len(body) // 2
            ids = [2, *body[:a], 3, *body[a:], 3] if nsp else [2, *body, 3]
            a_len = a + 2 if nsp else len(ids)
            rows.append([off, len(ids), a_len, i % 2 if nsp else -1, i, i if nsp else -1])
            toks += ids
            off += len(ids)
        index = np.array(rows, dtype=np.int64).reshape(-1, 6)
        write_shard(out / split, "shard-00000", np.array(toks, dtype=np.uint16), index)
    manifest = {
        "vocab_size": len(SHARD_VOCAB),
        "nsp": nsp,
        "max_seq_length": max_len,
        "mode": "bert" if nsp else "roberta",
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ---------------------------------------------------------------------------------------------- the tiny run

# The words of the tiny run's corpus (conftest.py's tiny_run fixture), also those of the toy fine-tuning tasks.
TINY_WORDS = "the a river stone light house north old green quiet city wind came went over under".split()
TINY_MICRO, TINY_EVAL_BATCHES = 8, 2  # the tiny run's micro (and global) batch and its validation batches


def tiny_corpus(path: Path, docs: int, seed: int = 3) -> Path:
    """A text file of ``docs`` blank-line separated documents of 20 sentences of TINY_WORDS."""
    rng = np.random.default_rng(seed)
    text = [
        " ".join("The " + " ".join(rng.choice(TINY_WORDS, size=rng.integers(5, 12)).tolist()) + "." for _ in range(20))
        for _ in range(docs)
    ]
    path.write_text("\n\n".join(text) + "\n")
    return path


BOOKS_RUN_BOOKS = ("tale_of_two_cities", "huckleberry_finn")  # the shared books conftest.py's books_run reads


# ---------------------------------------------------------------------------------------------- fine-tuning


FINETUNE_FAST = ["trainer.micro_batch_size=16", "trainer.global_batch_size=16", "trainer.log_every=1",
                 "optim.lr=1e-3", "trainer.max_seq_length=64"]  # fmt: skip


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A ``text,label`` CSV file of the given rows."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def classification_task(tmp: Path, n: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """Train and dev CSVs of a toy task, does the sentence mention a river: learnable from one word."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = rng.choice(TINY_WORDS, size=int(rng.integers(4, 10))).tolist()
        rows.append((" ".join(words), "yes" if "river" in words else "no"))
    return write_csv(tmp / "train.csv", rows[: n * 3 // 4]), write_csv(tmp / "dev.csv", rows[n * 3 // 4 :])


# ---------------------------------------------------------------------------------------------- masking samples

# Synthetic samples for the masking collator: six specials at ids 0..5, 1,500 words, then 500 "##" pieces.
MASKING_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"]
    + [f"w{i}" for i in range(1500)]
    + [f"##p{i}" for i in range(500)]
)
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, UNUSED_ID = range(6)  # the specials' ids in MASKING_VOCAB
FIRST_WORD_ID, FIRST_PIECE_ID = 6, 6 + 1500  # the first word and the first "##" piece in MASKING_VOCAB


def make_sample(rng: np.random.Generator, index: int, epoch: int = 0, nsp: bool = True) -> dict:
    """[CLS] A [SEP] B [SEP] of random words (some with ## pieces, some [UNK]), length 12..128."""
    n = int(rng.integers(12, 129))
    ids = rng.integers(FIRST_WORD_ID, len(MASKING_VOCAB), n)
    ids[rng.random(n) < 0.01] = UNK_ID
    a_len = int(rng.integers(3, n - 2))
    ids[0], ids[a_len - 1], ids[-1] = CLS_ID, SEP_ID, SEP_ID
    ids[1] = FIRST_WORD_ID + 1  # a word head right after [CLS]
    return {
        "input_ids": ids.astype(np.uint16),
        "a_len": a_len,
        "nsp_label": int(index % 2) if nsp else -1,
        "index": index,
        "epoch": epoch,
    }


# ---------------------------------------------------------------------------------------------- data preparation

# The words of random_parts' sentences, cased and with non-ASCII letters.
PARTS_WORDS = (
    "The quick brown Fox jumps over the lazy dog near the Riverbank . Café owners in Zürich sell "
    "coffee , tea and cakes every morning while children play football outside the old school"
).split()


def write_parts(out: Path, docs_per_part: list[list[list[str]]]) -> None:
    """Read-stage output: part-K.txt (sentence per line, blank line after each document) and docs.jsonl."""
    d = out / "work" / "documents"
    d.mkdir(parents=True, exist_ok=True)
    for k, docs in enumerate(docs_per_part):
        (d / f"part-{k:05d}.txt").write_text("".join("".join(s + "\n" for s in doc) + "\n" for doc in docs))
        (d / f"part-{k:05d}.docs.jsonl").write_text(
            "".join(
                json.dumps({"source": "t", "id": str(i), "sentences": len(doc), "chars": sum(map(len, doc))}) + "\n"
                for i, doc in enumerate(docs)
            )
        )


def random_parts(n_parts: int = 3, n_docs: int = 12, seed: int = 0) -> list[list[list[str]]]:
    """Per read-stage part, ``n_docs`` documents of 1 to 7 random sentences of PARTS_WORDS."""
    rng = np.random.default_rng(seed)
    return [
        [
            [" ".join(rng.choice(PARTS_WORDS, size=rng.integers(3, 25))) for _ in range(rng.integers(1, 8))]
            for _ in range(n_docs)
        ]
        for _ in range(n_parts)
    ]


def cfg_for(out: Path, **kw) -> PrepareConfig:
    """A PrepareConfig writing to ``out``: vocabulary 200, min_frequency 1, one worker, unless ``kw`` says else."""
    from data_prep.config import PrepareConfig

    return PrepareConfig(output_dir=str(out), **{"vocab_size": 200, "min_frequency": 1, "num_workers": 1, **kw})


def small_vocab(path: Path, specials_first: bool = False) -> Path:
    """A WordPiece vocab.txt covering PARTS_WORDS (uncased) and single letters; specials first or scattered."""
    from data_prep.vocab import SPECIALS

    words = sorted({w.lower() for w in PARTS_WORDS} | set("abcdefghijklmnopqrstuvwxyz.,"))
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens = (
        (SPECIALS + words + pieces)
        if specials_first
        else (["[PAD]"] + words[:5] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[5:] + pieces)
    )
    path.write_text("".join(t + "\n" for t in tokens))
    return path


def read_documents(spec, **overrides):
    """The documents a reader yields for an input spec, and its Report (``strict`` and ``hf`` loader in overrides)."""
    from data_prep.config import PrepareConfig
    from data_prep.corpora import expand_units, iter_unit_documents
    from data_prep.report import Report

    report = Report(strict=overrides.pop("strict", False))
    hf_loader = overrides.pop("hf", None)
    cfg = PrepareConfig(**overrides)
    docs = [d for u in expand_units(spec) for d in iter_unit_documents(u, cfg, report, hf_loader)]
    return docs, report


SPECIAL_BASE = 100  # MemCorpus: [PAD] [UNK] [CLS] [SEP] [MASK] at ids 100..104: never assume 0..4


class MemCorpus:
    """A tiny token store over numpy arrays; calling it returns itself (the picklable opener workers use)."""

    def __init__(self, docs: list[list[int]], seed: int = 0):
        lens = [n for doc in docs for n in doc]
        pos = np.arange(sum(lens), dtype=np.int64)
        self.tokens = np.where(pos < SPECIAL_BASE, pos, pos + 5)  # unique ids around the specials
        self.num_docs = len(docs)
        self.sent_bounds = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
        self.doc_bounds = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
        self.doc_offsets, self.sentence_offsets = self.doc_bounds, self.sent_bounds  # n + 1 boundaries, as TokenStore
        self.vocab_size = int(self.tokens.max(initial=SPECIAL_BASE + 4)) + 1

    def __call__(self) -> MemCorpus:
        return self

    def doc_sentences(self, d: int) -> tuple[int, int]:
        return int(self.doc_bounds[d]), int(self.doc_bounds[d + 1])

    def sentence_tokens(self, s: int) -> np.ndarray:
        return self.tokens[self.sent_bounds[s] : self.sent_bounds[s + 1]]

    def doc_num_tokens(self, d: int) -> int:
        a, b = self.doc_sentences(d)
        return int(self.sent_bounds[b] - self.sent_bounds[a])

    # provenance helpers for the tests
    def position(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids < SPECIAL_BASE, ids, ids - 5)

    def doc_of(self, pos: np.ndarray) -> np.ndarray:
        sent = np.searchsorted(self.sent_bounds, pos, side="right") - 1
        return np.searchsorted(self.doc_bounds, sent, side="right") - 1


def write_pairs_vocab(out: Path, size: int) -> None:
    """A vocab.txt of ``size`` tokens with MemCorpus's specials at SPECIAL_BASE."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f"t{i}" for i in range(size)]
    names[SPECIAL_BASE : SPECIAL_BASE + 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (out / "vocab.txt").write_text("\n".join(names) + "\n")


def build_shards(out: Path, corpus: MemCorpus, **kw) -> tuple[dict, Report]:
    """The shards stage on a MemCorpus (max_seq_length 64, 200 samples a shard, seed 3, unless ``kw`` says else)."""
    from data_prep.config import PrepareConfig
    from data_prep.report import Report
    from data_prep.shards import run_shards

    write_pairs_vocab(out, max(corpus.vocab_size, 200))
    cfg = PrepareConfig(
        output_dir=str(out),
        **{
            "max_seq_length": 64,
            "samples_per_shard": 200,
            "num_workers": 1,
            "validation_fraction": 0.05,
            "seed": 3,
            **kw,
        },
    )
    report = Report()
    return run_shards(cfg, report, open_corpus=corpus), report


NEEDS_ROOT = "needs root"  # the reason prefix of a skip that CI=true turns into a failure (conftest.py)
SHARED_MISSING = "shared corpora not found"  # likewise


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``mnt`` (``options`` as ``mount -o``: ``size=1m``, ``size=1m,ro``) for a fault
    test: a real full or read-only disk; unmounted afterwards. A user without root skips, with the reason (under
    ``CI=true`` that skip fails the run: conftest.py); as root, a mount that fails is a failure."""
    if os.geteuid() != 0:
        pytest.skip(f"{NEEDS_ROOT}: mounting a tmpfs for a real full or read-only disk (run as root)")
    mnt.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.fail(f"cannot mount a tmpfs ({options}) here (these fault tests need root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def newest_bundle(root: Path) -> Path | None:
    """The checkpoint a run dir's ``checkpoints/`` means (the one rule: newest that verifies), looked at quietly."""
    from pretrain.checkpoint.bundle import complete_bundles
    from pretrain.checkpoint.locate import newest_good

    return newest_good(complete_bundles(root), quiet=True)
