"""Statistics of one split of a prepared data folder: ``python -m data_prep.inspect OUT_DIR --stats``.

Sample lengths, IsNext/NotNext balance (BERT mode), token frequencies (head and tail of the vocabulary), the
``[UNK]`` rate and the padding a batch of rows at ``max_seq_length`` would carry. Everything is counted from the
memory-mapped shards with numpy (``np.bincount`` over the token arrays in fixed-size blocks, over the index
columns for lengths and labels): a split of billions of tokens is read once, in bounded memory, with no Python
loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.errors import DataPrepError

from .manifest import read_manifest
from .store import LENGTH, NSP_LABEL, SplitReader
from .vocab import SPECIALS, load_tokenizer

BLOCK = 1 << 24  # tokens per bincount: np.bincount widens its input to int64, so 128 MB at a time at most
HEAD = 20
HIST_BINS = 16  # rows of the printed length histogram
DPI = 100
PANEL_W, PANEL_H = 5.0, 4.5  # inches per panel: 3 panels in BERT mode, 2 in RoBERTa mode


@dataclass
class SplitStats:
    out_dir: Path
    split: str
    nsp: bool
    max_seq_length: int
    length_source: str  # where max_seq_length came from: the manifest, --max-seq-length, or the longest sample
    length_counts: np.ndarray  # [longest + 1]: samples of each length (special tokens included)
    labels: np.ndarray  # [3]: samples with nsp_label -1 (none), 0 (IsNext), 1 (NotNext)
    freq: np.ndarray  # [vocab]: occurrences of each token id in the split's samples
    special_ids: dict[str, int]
    vocab: list[str]  # id -> token string

    @property
    def samples(self) -> int:
        return int(self.length_counts.sum())

    @property
    def tokens(self) -> int:
        return int((self.length_counts * np.arange(len(self.length_counts))).sum())

    @property
    def longest(self) -> int:
        return int(np.flatnonzero(self.length_counts)[-1])

    @property
    def shortest(self) -> int:
        return int(np.flatnonzero(self.length_counts)[0])

    @property
    def positions(self) -> int:
        return self.samples * self.max_seq_length

    @property
    def padding_fraction(self) -> float:
        """Share of the ``samples x max_seq_length`` positions that are padding; a sample longer than the length
        (only with a shorter --max-seq-length) fills its row and is cut."""
        lengths = np.arange(len(self.length_counts))
        real = int((self.length_counts * np.minimum(lengths, self.max_seq_length)).sum())
        return 1.0 - real / self.positions

    @property
    def longer_than_max(self) -> int:
        return int(self.length_counts[self.max_seq_length + 1 :].sum())

    @property
    def is_next(self) -> int:
        return int(self.labels[1])

    @property
    def not_next(self) -> int:
        return int(self.labels[2])

    @property
    def text_mask(self) -> np.ndarray:
        """Ids of ordinary vocabulary entries: the special tokens are placed by the pipeline, not read."""
        mask = np.ones(len(self.freq), dtype=bool)
        mask[[i for i in self.special_ids.values() if i < len(mask)]] = False
        return mask

    @property
    def text_tokens(self) -> int:
        """Tokens that came from corpus text: ``[UNK]`` included (it stands for text), other specials not."""
        unk = self.special_ids.get("[UNK]")
        return int(self.freq[self.text_mask].sum()) + (int(self.freq[unk]) if unk is not None else 0)

    @property
    def unk(self) -> int:
        unk = self.special_ids.get("[UNK]")
        return int(self.freq[unk]) if unk is not None and unk < len(self.freq) else 0

    @property
    def unk_rate(self) -> float:
        return self.unk / self.text_tokens if self.text_tokens else 0.0

    def head(self, n: int = HEAD) -> list[tuple[str, int, float]]:
        """The ``n`` most frequent text tokens: (token, count, share of text tokens); ties by id."""
        counts = np.where(self.text_mask, self.freq, -1)
        order = np.argsort(-counts, kind="stable")[:n]
        total = max(self.text_tokens, 1)
        return [(self.token(int(i)), int(self.freq[i]), int(self.freq[i]) / total) for i in order if counts[i] > 0]

    @property
    def vocab_entries(self) -> int:
        """Ordinary (non-special) vocabulary entries."""
        return int(self.text_mask[: len(self.vocab)].sum())

    @property
    def never(self) -> int:
        """Ordinary vocabulary entries that never occur in the split."""
        return int(((self.freq[: len(self.vocab)] == 0) & self.text_mask[: len(self.vocab)]).sum())

    @property
    def once(self) -> int:
        return int(((self.freq[: len(self.vocab)] == 1) & self.text_mask[: len(self.vocab)]).sum())

    def token(self, i: int) -> str:
        return self.vocab[i] if i < len(self.vocab) else f"<id {i} beyond the vocabulary>"

    def rank_counts(self) -> np.ndarray:
        """Counts of the text tokens that occur, most frequent first (the rank-frequency curve)."""
        counts = self.freq[self.text_mask]
        return np.sort(counts[counts > 0])[::-1]


def _vocab_list(tokenizer: Any) -> list[str]:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out = [""] * (max(vocab.values()) + 1 if vocab else 0)
    for tok, i in vocab.items():
        out[i] = tok
    return out


def compute_stats(out_dir: str | Path, split: str = "train", max_seq_length: int | None = None) -> SplitStats:
    """Count one split; ``DataPrepError`` (one line) for a missing folder or split, an empty split or a bad
    ``max_seq_length``."""
    out = Path(out_dir)
    if max_seq_length is not None and max_seq_length < 1:
        raise DataPrepError(f"--max-seq-length {max_seq_length}: give a positive number of tokens")
    manifest = read_manifest(out)
    tokenizer = load_tokenizer(out)
    vocab = _vocab_list(tokenizer)
    reader = SplitReader(out, split)
    if len(reader) == 0:
        raise DataPrepError(f"{out / split}: no samples; rerun launch/prepare_data.py or pick another --split")
    length_counts = np.zeros(1, dtype=np.int64)
    labels = np.zeros(3, dtype=np.int64)
    freq = np.zeros(len(vocab), dtype=np.int64)
    total = sum(len(s.tokens) for s in reader.shards)
    with tqdm(total=total, desc=f"stats {split}", unit="tok", unit_scale=True, disable=None) as bar:
        for shard in reader.shards:
            index = shard.index
            lengths = np.bincount(np.asarray(index[:, LENGTH]))
            if len(lengths) > len(length_counts):
                length_counts = np.pad(length_counts, (0, len(lengths) - len(length_counts)))
            length_counts[: len(lengths)] += lengths
            labels += np.bincount(np.asarray(index[:, NSP_LABEL]) + 1, minlength=3)[:3]
            for start in range(0, len(shard.tokens), BLOCK):
                block = np.bincount(shard.tokens[start : start + BLOCK], minlength=len(freq))
                if len(block) > len(freq):  # an id past the vocabulary (a mismatched tokenizer.json): counted
                    freq = np.pad(freq, (0, len(block) - len(freq)))
                freq[: len(block)] += block
                bar.update(min(BLOCK, len(shard.tokens) - start))
    nsp = bool(manifest.nsp) if manifest is not None and manifest.nsp is not None else bool(labels[1:].any())
    if max_seq_length is not None:
        length, source = max_seq_length, "--max-seq-length"
    elif manifest is not None and manifest.max_seq_length:
        length, source = int(manifest.max_seq_length), "manifest"
    else:  # hand-made data without a manifest: the longest sample is the shortest length that holds them all
        length, source = int(np.flatnonzero(length_counts)[-1]), "longest sample, no manifest"
    special_ids = {t: i for t in SPECIALS if (i := tokenizer.token_to_id(t)) is not None}
    return SplitStats(out, split, nsp, length, source, length_counts, labels, freq, special_ids, vocab)


def length_histogram(stats: SplitStats, bins: int = HIST_BINS) -> list[tuple[int, int, int]]:
    """(first length, last length, samples) for ``bins`` equal ranges over 1 .. max(longest, max_seq_length)."""
    top = max(stats.longest, stats.max_seq_length)
    width = max(1, -(-top // bins))
    rows = []
    for lo in range(1, top + 1, width):
        hi = min(lo + width - 1, top)
        rows.append((lo, hi, int(stats.length_counts[lo : hi + 1].sum())))
    return rows


def format_stats(stats: SplitStats, png: Path | None = None) -> str:
    """The plain-text block ``--stats`` prints."""
    s = stats
    mode = "BERT mode: sentence pairs with NSP labels" if s.nsp else "RoBERTa mode: packed full sentences, no NSP"
    lines = [
        f"{s.out_dir}  split {s.split}  ({mode})",
        f"  samples          {s.samples:,}",
        f"  tokens           {s.tokens:,} ({s.tokens / s.samples:.1f} per sample; shortest {s.shortest}, longest "
        f"{s.longest}; special tokens included)",
        f"  padding          {s.padding_fraction:.1%} of {s.positions:,} positions at max_seq_length "
        f"{s.max_seq_length} ({s.length_source})"
        + (f"; {s.longer_than_max:,} samples longer, would be cut" if s.longer_than_max else ""),
    ]
    if s.nsp:
        pairs = max(s.is_next + s.not_next, 1)
        lines.append(
            f"  IsNext/NotNext   {s.is_next:,} ({s.is_next / pairs:.1%}) / {s.not_next:,} ({s.not_next / pairs:.1%})"
        )
    else:
        lines.append("  IsNext/NotNext   n/a (RoBERTa mode)")
    specials = "   ".join(f"{t} {int(s.freq[i]):,}" for t, i in s.special_ids.items() if i < len(s.freq) and s.freq[i])
    lines += [
        f"  [UNK]            {s.unk:,} of {s.text_tokens:,} text tokens ({s.unk_rate:.3%})",
        f"  special tokens   {specials or 'none'}",
        f"  vocabulary       {s.vocab_entries:,} ordinary entries: {s.vocab_entries - s.never:,} occur, "
        f"{s.never:,} never ({s.never / max(s.vocab_entries, 1):.1%}), {s.once:,} once",
        "  sample lengths (tokens: samples)",
    ]
    hist = length_histogram(s)
    peak = max(n for _, _, n in hist) or 1
    lines += [f"    {lo:>5}-{hi:<5} {n:>10,}  {'#' * round(40 * n / peak)}".rstrip() for lo, hi, n in hist]
    lines.append(f"  top {HEAD} tokens (count, share of text tokens)")
    lines += [f"    {r:>3}  {tok:<16} {n:>12,}  {share:6.2%}" for r, (tok, n, share) in enumerate(s.head(), 1)]
    if png is not None:
        lines.append(f"  plot             {png}")
    return "\n".join(lines)


def figure_pixels(nsp: bool) -> tuple[int, int]:
    """(width, height) of the stats PNG: three panels in BERT mode, two without NSP labels."""
    return round(PANEL_W * (3 if nsp else 2) * DPI), round(PANEL_H * DPI)


def plot_stats(stats: SplitStats, path: str | Path) -> Path:
    """Length histogram, rank-frequency plot (log-log) and, in BERT mode, the IsNext/NotNext balance."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

    s, path = stats, Path(path)
    width, height = figure_pixels(s.nsp)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3 if s.nsp else 2, squeeze=True)
    fig.suptitle(f"{s.out_dir.name}/{s.split}: {s.samples:,} samples, {s.tokens:,} tokens", fontweight="bold")

    ax = axes[0]
    lengths = np.arange(len(s.length_counts))
    ax.bar(lengths[1:], s.length_counts[1:], width=1.0, color="C0")
    ax.axvline(s.max_seq_length + 0.5, color="C3", linestyle="--", label=f"max_seq_length {s.max_seq_length}")
    ax.set_title(f"Sample length (padding {s.padding_fraction:.1%})")
    ax.set_xlabel("tokens per sample (special tokens included)")
    nonzero = s.length_counts[s.length_counts > 0]
    if nonzero.max() >= 100 * nonzero.min():  # BERT-mode samples pile up at full length: linear hides the rest
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("samples (log scale)")
    else:
        ax.set_ylabel("samples")
    ax.legend(loc="upper left", frameon=False)

    ax = axes[1]
    counts = s.rank_counts()
    ax.loglog(np.arange(1, len(counts) + 1), counts, color="C0")
    ax.set_title("Token frequency by rank (log-log)")
    ax.set_xlabel("rank (text tokens, most frequent first)")
    ax.set_ylabel("occurrences")
    ax.grid(True, which="major", alpha=0.3)
    top = "  ".join(f"'{tok}'" for tok, _, _ in s.head(5))  # quoted: '.' and ',' are tokens too
    tail = f"{len(counts):,} of {s.vocab_entries:,} entries occur, {s.never:,} never, {s.once:,} once"
    box = {"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9}
    ax.text(0.03, 0.03, f"most frequent: {top}\n{tail}", transform=ax.transAxes, fontsize=8, va="bottom", bbox=box)

    if s.nsp:
        ax = axes[2]
        pairs = max(s.is_next + s.not_next, 1)
        shares = [s.is_next / pairs, s.not_next / pairs]
        bars = ax.bar(["IsNext", "NotNext"], shares, color=["C2", "C1"], width=0.6)
        for bar, n, share in zip(bars, (s.is_next, s.not_next), shares, strict=True):
            ax.annotate(f"{n:,} ({share:.1%})", (bar.get_x() + bar.get_width() / 2, share), ha="center",
                        textcoords="offset points", xytext=(0, 3))  # fmt: skip
        ax.axhline(0.5, color="0.5", linestyle=":", label="50%")
        ax.set_ylim(0, max(0.75, max(shares) * 1.15))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title("Next-sentence labels")
        ax.set_ylabel("share of samples")
        ax.legend(loc="upper right", frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
