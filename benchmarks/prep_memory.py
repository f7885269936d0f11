"""Peak resident memory of data preparation (the launcher and all its worker processes) against corpus size.

    nice python benchmarks/prep_memory.py                         # ~50 MB and ~200 MB of books, 2 workers
    nice python benchmarks/prep_memory.py --sizes 50 200 --vocab VOCAB.txt --workers 2

Each corpus is the 13 shared Gutenberg books linked N times under distinct paths (as prep_throughput.py
``--repeat`` does), run through ``launch/prepare_data.py`` in a child process with a given vocabulary
(trained once on the books, untimed). The process tree (the launcher and every pool worker) is sampled every
0.1 s from ``/proc/PID/smaps_rollup``:

- ``PSS`` sums proportional set sizes: every resident page counted once, shared pages split among the
  processes that map them, so forked workers' copy-on-write pages are not double counted;
- ``anon PSS`` keeps the anonymous pages only: the memory the tree allocated. The rest is page cache of
  memory-mapped files (token store, shards), which the kernel drops under pressure and which grows with the
  corpus by design; it is not memory the job needs. The growth check is on this figure, at its peak;
- ``max RSS`` is the largest single process (``ru_maxrss`` of the launcher's ``wait4``), the figure a per-process limit
  would see.

The goal is that memory does not grow with the corpus: under 1.5x from the smallest to the largest size. Not a
test: numbers depend on the machine, its load and the sampling (a peak shorter than 0.1 s can be missed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
LAUNCH = ROOT / "launch" / "prepare_data.py"
GOAL = 1.5


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) of one process in bytes; (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = dict(re.findall(r"^(Pss|Pss_Anon):\s+(\d+) kB", text, re.M))
    return int(fields.get("Pss", 0)) << 10, int(fields.get("Pss_Anon", 0)) << 10


class TreeSampler(threading.Thread):
    """Samples the process tree under ``pid`` and keeps the peaks, overall and per data-prep stage."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval, self.stage = psutil.Process(pid), interval, "start"
        self.peak_pss = self.peak_anon = self.max_procs = 0
        self.stage_anon: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            pss, anon = map(sum, zip(*(_rollup(p.pid) for p in procs), strict=True))
            self.peak_pss, self.peak_anon = max(self.peak_pss, pss), max(self.peak_anon, anon)
            self.stage_anon[self.stage] = max(self.stage_anon.get(self.stage, 0), anon)
            self.max_procs = max(self.max_procs, len(procs))
            time.sleep(self.interval)


def build_corpus(root: Path, target_mb: float, books: list[Path]) -> tuple[list[str], float]:
    """Link the books into as many distinct folders as reach ``target_mb`` of raw text; return inputs and MB."""
    import gzip

    raw = 0
    for b in books:
        with gzip.open(b) as f:
            raw += len(f.read())
    raw_mb = raw / 1e6
    copies = max(1, round(target_mb / raw_mb))
    inputs = []
    for i in range(copies):
        d = root / f"books-{i:03d}"
        d.mkdir(parents=True)
        for b in books:
            (d / b.name).symlink_to(b)
        inputs.append(f"books:{d}")
    return inputs, copies * raw_mb


def measure(inputs: list[str], out: Path, vocab: Path, workers: int, samples_per_shard: int) -> dict:
    """Run the launcher under a sampler; the wrapper process reports the largest descendant's max RSS."""
    cmd = [
        sys.executable,
        str(LAUNCH),
        f"inputs=[{','.join(inputs)}]",
        f"output_dir={out}",
        f"vocab={vocab}",
        f"num_workers={workers}",
        f"samples_per_shard={samples_per_shard}",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    for line in proc.stdout:  # stage lines move the per-stage attribution of the peaks
        if m := re.match(r"stage (\w+): starting", line):
            sampler.stage = m.group(1)
    # wait4, not wait: its rusage is this run's own (the launcher and every worker it waited for), where
    # getrusage(RUSAGE_CHILDREN) would also hold the vocabulary training run.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return {
        "seconds": time.perf_counter() - start,
        "pss": sampler.peak_pss,
        "anon": sampler.peak_anon,
        "stages": sampler.stage_anon,
        "procs": sampler.max_procs,
        "max_rss": usage.ru_maxrss << 10,
    }  # KiB on Linux: the largest single process of the tree


def train_vocab(books_dir: Path, root: Path) -> Path:
    out = root / "vocab"
    for stage in ("read", "vocab"):
        subprocess.run(
            [
                sys.executable,
                str(LAUNCH),
                f"inputs=[books:{books_dir}]",
                f"output_dir={out}",
                "vocab_size=8000",
                f"stage={stage}",
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
    return out / "vocab.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200], help="corpus sizes, MB of raw text")
    parser.add_argument("--vocab", type=Path, help="vocab.txt to use (default: train an 8,000-token one first)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=100_000, help="the default of prepare_data")
    args = parser.parse_args()
    books_dir = SHARED / "books"
    books = sorted(books_dir.glob("*.txt.gz"))
    if not books:
        print(f"skipped: shared books not found at {books_dir}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vocab = args.vocab or train_vocab(books_dir, root)
        for size in sorted(args.sizes):
            inputs, mb = build_corpus(root / f"in-{size:g}", size, books)
            r = measure(inputs, root / f"out-{size:g}", vocab, args.workers, args.samples_per_shard)
            rows.append((mb, r))
            print(f"{mb:.0f} MB done in {r['seconds']:.0f}s", file=sys.stderr, flush=True)
    mib = lambda b: f"{b / 2**20:,.0f}"
    stages = ("read", "vocab", "tokenize", "shards")
    print(
        f"workers={args.workers} samples_per_shard={args.samples_per_shard} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f}"
    )
    print(
        "| corpus MB | time s | processes | peak PSS MiB | peak anon PSS MiB | max RSS MiB | "
        + " | ".join(f"{s} anon MiB" for s in stages)
        + " |"
    )
    print("|---" * (6 + len(stages)) + "|")
    for mb, r in rows:
        print(
            f"| {mb:.0f} | {r['seconds']:.0f} | {r['procs']} | {mib(r['pss'])} | {mib(r['anon'])} | "
            f"{mib(r['max_rss'])} | " + " | ".join(mib(r["stages"].get(s, 0)) for s in stages) + " |"
        )
    growth = rows[-1][1]["anon"] / rows[0][1]["anon"]
    ok = growth < GOAL
    print(
        f"anon PSS growth {rows[0][0]:.0f} -> {rows[-1][0]:.0f} MB: {growth:.2f}x (goal < {GOAL}x): "
        f"{'ok' if ok else 'FAILS'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
