"""Data-prep throughput against the bare tokenizer, per worker, on the shared books (and the wiki sample).

    python benchmarks/prep_throughput.py                       # trains a vocabulary once on the books first
    python benchmarks/prep_throughput.py --vocab VOCAB.txt --wiki --workers 1 2

(a) reference: ``tokenizers`` alone, one thread, ``encode_batch`` over the raw text's non-empty lines, in
MB of raw (decompressed) text per second; (b) the pipeline's read + tokenize + shards stages with the same
vocabulary at each worker count, per stage and in total, in MB of the same raw text per second per worker.
Prints markdown rows for ``docs/benchmarks.md``. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the reference runs on one core, as one pipeline worker does
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import bz2  # noqa: E402
import gzip  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.config import PrepareConfig  # noqa: E402
from data_prep.report import Report  # noqa: E402
from data_prep.vocab import load_tokenizer, run_vocab  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def raw_text(paths: list[Path]) -> str:
    texts = []
    for p in paths:
        opener = gzip.open if p.suffix == ".gz" else bz2.open if p.suffix == ".bz2" else open
        with opener(p, "rt", encoding="utf-8-sig") as f:
            texts.append(f.read())
    return "\n".join(texts)


def reference(tokenizer_dir: Path, text: str, repeats: int = 2) -> dict:
    tok = load_tokenizer(tokenizer_dir)
    lines = [line for line in text.split("\n") if line.strip()]
    mb = len(text.encode()) / 1e6
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok, name)
        best = min(_timed(lambda encode=encode: encode(lines, add_special_tokens=False)) for _ in range(repeats))
        out[name] = mb / best
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pipeline(inputs: list[str], vocab: Path, workers: int, root: Path) -> dict:
    from data_prep.read import run_read
    from data_prep.shards import run_shards
    from data_prep.tokenize import run_tokenize

    cfg = PrepareConfig(inputs=inputs, output_dir=str(root / f"w{workers}"), vocab=str(vocab), num_workers=workers)
    report, times = Report(), {}
    for name, stage in (("read", run_read), ("vocab", run_vocab), ("tokenize", run_tokenize), ("shards", run_shards)):
        times[name] = _timed(lambda stage=stage: stage(cfg, report))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", help="vocab.txt to use (default: train one on the books first, untimed)")
    parser.add_argument("--wiki", action="store_true", help="also the Wikipedia sample (its own rows)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="read the books N times (N inputs), so fixed start-up costs weigh as on a real corpus",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    books = SHARED / "books"
    if not books.is_dir():
        print(f"skipped: shared books not found at {books}")
        return 0
    corpora = {"books": (sorted(books.glob("*.txt*")) * args.repeat, [f"books:{books}"])}
    wiki = SHARED / "wikipedia" / "enwiki-sample-pages-articles.xml.bz2"
    if args.wiki and wiki.exists():
        corpora["wiki"] = ([wiki], [f"wiki:{wiki}"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.repeat > 1:  # distinct paths (links to the same books): the pipeline reads a given file once
            copies = [root / f"books-{i}" for i in range(args.repeat)]
            for d in copies:
                d.mkdir()
                for f in sorted(books.glob("*.txt*")):
                    (d / f.name).symlink_to(f)
            corpora["books"] = (corpora["books"][0], [f"books:{d}" for d in copies])
        vocab = Path(args.vocab) if args.vocab else None
        if vocab is None:  # untimed: WordPiece training is not what this benchmark measures
            from data_prep.read import run_read

            cfg = PrepareConfig(inputs=corpora["books"][1], output_dir=str(root / "vocab"), lowercase=args.lowercase)
            run_read(cfg, Report())
            run_vocab(cfg, Report())
            vocab = root / "vocab" / "vocab.txt"
        run_vocab(PrepareConfig(output_dir=str(root / "ref"), vocab=str(vocab), lowercase=args.lowercase), Report())
        rows = [
            "| corpus | MB raw | what | workers | read s | tokenize s | shards s | total s | MB/s/worker "
            "| vs reference |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, (files, inputs) in corpora.items():
            text = raw_text(files)
            mb = len(text.encode()) / 1e6
            ref = reference(root / "ref", text)
            for kind, rate in ref.items():
                rows.append(
                    f"| {name} | {mb:.1f} | tokenizers `{kind}` (1 thread) | 1 | | {mb / rate:.2f} | | "
                    f"{mb / rate:.2f} | {rate:.2f} | 1.00{'' if kind == 'encode_batch' else ' (own)'} |"
                )
            per_worker = {}
            for w in args.workers:
                t = pipeline(inputs, vocab, w, root / name)
                total = t["read"] + t["tokenize"] + t["shards"]  # vocab (a copy of the given file) is negligible
                per_worker[w] = mb / total / w
                tok_only = mb / t["tokenize"] / w
                rows.append(
                    f"| {name} | {mb:.1f} | pipeline read+tokenize+shards | {w} | {t['read']:.2f} | "
                    f"{t['tokenize']:.2f} | {t['shards']:.2f} | {total:.2f} | {per_worker[w]:.2f} | "
                    f"{per_worker[w] / ref['encode_batch']:.2f} (tokenize stage alone: "
                    f"{tok_only / ref['encode_batch']:.2f}) |"
                )
            if 1 in per_worker and len(per_worker) > 1:
                w = max(per_worker)
                print(
                    f"{name}: 1 -> {w} workers: {per_worker[w] * w / per_worker[1]:.2f}x total throughput "
                    f"(ideal {w}x; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"
                )
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
