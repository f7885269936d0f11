"""Training throughput, measured the way training runs: the real DeepSpeed engine, optimizer, precision and data
loader built from the same config as ``launch/pretrain.py``, on real shards (or synthetic shards of the same
format when ``data.dir`` holds none), optionally side by side with ``transformers``' model of the same family
(``BertForPreTraining`` / ``BertForMaskedLM``, ``ModernBertForMaskedLM`` with SDPA attention).

The step timed is the training engine's own (``pretrain.training.engine.Engine.step``: accumulation, the agreed
non-finite check), and MFU is the one definition training logs (``pretrain.training.metrics.mfu``: our model's
training FLOPs per token times the real, non-padding tokens per second). Both implementations are credited with
the same FLOPs for the same tokens: MFU and the ratio compare like with like.

For ModernBERT the report also counts the arithmetic each side really does on the step's batches
(``modernbert_step_flops``: what transformers spends on padding, on the dense MLM head at unmasked positions and on
the masked-out scores of the sliding-window layers, and what ours spends instead) and gives the speed-up that
arithmetic alone allows (``bound``: transformers' FLOPs over ours) beside the measured one.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.errors import UserError
from data_prep.manifest import MANIFEST_VERSION, Manifest, write_manifest
from data_prep.store import A_LEN, DOC_A, DOC_B, INDEX_COLUMNS, LENGTH, NSP_LABEL, OFFSET, token_dtype, write_shard
from data_prep.vocab import SPECIALS
from pretrain.checkpoint.weights import pretraining_model
from pretrain.models import FAMILIES, family_of, model_config
from pretrain.models.attention import scores_computed, varlen_usable
from pretrain.models.bert import IGNORE_INDEX
from pretrain.models.modernbert import VOCAB_KEYS, ModernBertConfig
from pretrain.runtime import distributed as D
from pretrain.runtime.signals import StopFlag
from pretrain.training.config import EngineConfig
from pretrain.training.data import Batches, real_lengths, run_loaders
from pretrain.training.engine import start
from pretrain.training.metrics import mfu as model_flops_utilisation
from pretrain.training.metrics import peak_tflops
from pretrain.training.preflight import preflight

SHORT_SEQ_PROB = 0.1  # synthetic shards: the share of BERT's short rows, as data prep makes them


def synthetic_data(out: Path, vocab_size: int, max_seq_length: int, samples: int, nsp: bool, seed: int = 0) -> Path:
    """Shards of the prepared format with BERT's length mix (full rows, ``SHORT_SEQ_PROB`` short ones), random
    ids, a vocab.txt and a manifest: the benchmark's data where none is prepared."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    (out / "vocab.txt").write_text("".join(t + "\n" for t in [*SPECIALS, *words]), encoding="utf-8")
    for split, n in (("train", samples), ("validation", max(8, samples // 100))):
        short = rng.random(n) < SHORT_SEQ_PROB
        lengths = np.where(short, rng.integers(8, max_seq_length, n), max_seq_length).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = rng.integers(len(SPECIALS), vocab_size, int(lengths.sum())).astype(token_dtype(vocab_size))
        a_len = np.maximum(2, lengths // 2) if nsp else lengths
        tokens[offsets] = SPECIALS.index("[CLS]")
        tokens[offsets + lengths - 1] = SPECIALS.index("[SEP]")
        if nsp:
            tokens[offsets + a_len - 1] = SPECIALS.index("[SEP]")
        index = np.zeros((n, len(INDEX_COLUMNS)), dtype=np.int64)
        index[:, OFFSET], index[:, LENGTH], index[:, A_LEN] = offsets, lengths, a_len
        index[:, NSP_LABEL] = rng.integers(0, 2, n) if nsp else -1
        index[:, DOC_A], index[:, DOC_B] = np.arange(n), np.arange(n) if nsp else -1
        write_shard(out / split, "shard-00000", tokens, index)
    manifest = Manifest(format_version=MANIFEST_VERSION, mode="bert" if nsp else "roberta", nsp=nsp,
                        max_seq_length=max_seq_length, vocab_size=vocab_size, config={"synthetic": True})  # fmt: skip
    write_manifest(out, manifest)
    return out


@dataclass(frozen=True)
class BatchShape:
    """What a micro-batch asks of a model: its [rows, width] layout, the real and the masked tokens, and the
    samples' lengths (several per row when packed)."""

    rows: int
    width: int
    real: int
    masked: int
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> BatchShape:
        mask = batch["attention_mask"]
        real, masked = int((mask > 0).sum()), int((batch["labels"] != IGNORE_INDEX).sum())
        return cls(mask.size(0), mask.size(1), real, masked, tuple(real_lengths(batch).tolist()))


FLOP_PARTS = ("layers", "head", "attention")  # what modernbert_step_flops counts apart


def modernbert_step_flops(c: ModernBertConfig, shapes: list[BatchShape], reference: bool, varlen: bool = False
                          ) -> dict[str, float]:  # fmt: skip
    """Training FLOPs (forward + backward = 3 x forward, 2 per multiply-add; matrix products only, as MFU counts)
    that one ModernBERT implementation spends on these micro-batches, by part: ``layers`` (the encoder layers'
    weight products), ``head`` (MLM head dense + decoder), ``attention`` (scores and weighted sums).

    ``reference`` (transformers' ``ModernBertForMaskedLM``, padded rows, SDPA): every position of every row, padding
    included, through every layer and through the dense MLM head (H x H dense, H x V decoder at the true V), and
    every layer's attention over whole rows, rows x width^2 scores (a sliding window is a mask there: SDPA on CPU
    computes the masked-out scores). Ours: the real tokens through the layers, the head (padded V) at the masked
    positions only, and the scores ``attention.scores_computed`` counts for the path that runs (``varlen``: the
    FlashAttention kernel, else the SDPA fallback: samples re-padded to the longest, the band only in local layers
    when it pays)."""
    H, nL = c.hidden_size, c.num_hidden_layers
    per_token = nL * (4 * H * H + 3 * H * c.intermediate_size)  # Wqkv (3H^2), Wo (H^2), Wi (2HI), Wo (HI)
    windows = [None if c.is_global(i) else c.local_attention // 2 for i in range(nL)]  # as ModernBertAttention's
    total = dict.fromkeys(FLOP_PARTS, 0)
    for s in shapes:
        if reference:
            tokens = head_rows = s.rows * s.width
            vocab, scores = c.vocab_size, nL * s.rows * s.width**2
        else:
            tokens, head_rows, vocab = s.real, s.masked, c.padded_vocab_size
            scores = sum(scores_computed(list(s.lengths), w, varlen) for w in windows)
        total["layers"] += 6 * tokens * per_token
        total["head"] += 6 * head_rows * (H * H + H * vocab)
        total["attention"] += 12 * H * scores  # 12 hs per score, nh heads
    return {k: float(v) for k, v in total.items()}


@dataclass
class Timing:
    """One implementation's measurements over the timed steps."""

    name: str
    step_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    step_seqs: list[int] = field(default_factory=list)
    sequences: int = 0
    tokens: int = 0
    padded: int = 0
    peak_gib: float | None = None
    shapes: list[list[BatchShape]] = field(default_factory=list)  # per timed step, its micro-batches
    flops: list[dict[str, float]] = field(default_factory=list)  # per timed step, exact FLOPs by part (if counted)


class Runner:
    """An engine and its own loader iterator; ``step()`` runs one optimizer step of the engine and books it.
    ``keys``: the batch entries the model takes (None: all; transformers' ModernBERT has no segments)."""

    def __init__(self, name: str, ds: Any, batches: Batches, keys: tuple[str, ...] | None = None) -> None:
        self.t, self.ds, self.batches, self.keys = Timing(name), ds, batches, keys

    def step(self, timed: bool) -> None:
        device = self.ds.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seen: dict[str, Any] = {"wait": 0.0, "seqs": 0, "batches": []}

        def next_batch() -> dict[str, torch.Tensor]:  # the loader's wait and the sequences, outside the step
            w0 = time.perf_counter()
            batch = self.batches()
            seen["wait"] += time.perf_counter() - w0
            seen["seqs"] += len(real_lengths(batch))  # per sample: a packed row carrying two samples counts two
            seen["batches"].append(batch)  # measured after the step
            return batch if self.keys is None else {k: v for k, v in batch.items() if k in self.keys}

        t0 = time.perf_counter()
        self.batches.positions.clear()
        result = self.ds.step(next_batch)
        if cuda:
            torch.cuda.synchronize(device)
        if timed:
            t = self.t
            t.step_s.append(time.perf_counter() - t0)
            t.wait_s.append(seen["wait"])
            t.step_seqs.append(seen["seqs"])
            t.sequences += seen["seqs"]
            t.tokens += int(result.tokens)
            t.padded += int(result.positions)
            t.shapes.append([BatchShape.of(b) for b in seen["batches"]])
            if cuda:
                t.peak_gib = max(t.peak_gib or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
            else:  # the process's resident high-water mark: both implementations' when compared side by side
                t.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


HF_KEYS = {"modernbert": ("input_ids", "attention_mask", "labels")}  # the batch entries transformers' model takes


def hf_model(model_kw: dict[str, Any], ours: torch.nn.Module | None = None) -> torch.nn.Module:
    """``transformers``' model of the same family and shape: BERT's ``BertForPreTraining``, or ``BertForMaskedLM``
    with NSP off; ModernBERT's ``ModernBertForMaskedLM`` (true vocabulary size) with SDPA attention, the best it
    has off a GPU (FlashAttention 2 is CUDA only; eager is slower and exact alike), and, given ``ours``, our
    initial weights (the same names; only the vocabulary padding rows are left out)."""
    import transformers

    cfg = model_config(model_kw)
    if family_of(model_kw) == "modernbert":
        hf_cfg = transformers.ModernBertConfig(**cfg.to_hf_dict())
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.ModernBertForMaskedLM(hf_cfg)
        if ours is not None:
            sd = ours.state_dict()
            model.load_state_dict({k: v[: cfg.vocab_size] if k in VOCAB_KEYS else v for k, v in sd.items()})
        return model
    cls = transformers.BertForPreTraining if cfg.nsp else transformers.BertForMaskedLM
    hf_cfg = transformers.BertConfig(**{**cfg.to_hf_dict(), "vocab_size": cfg.vocab_size})
    return cls(hf_cfg)


def _rate(x: float) -> str:
    """A rate with one decimal, or three significant digits below 10 (long rows: 0.0512 sequences/s)."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def report(
    timings: list[Timing], world: int, flops_per_token: float, peak_tflops: float | None, device: str
) -> list[str]:
    """Markdown rows and the last ``key=value`` line; where both implementations' exact FLOPs were counted
    (ModernBERT), a second table of them and ``bound``, ``ratio_over_bound`` and ``padding`` on the last line."""
    lines = [
        "| implementation | device | ms/step (median) | seq/s | tokens/s | non-pad tokens/s | MFU | loader wait ms "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    rates = {}
    for t in timings:
        total = sum(t.step_s)
        seq_s, tok_s, real_s = t.sequences / total, t.padded / total, t.tokens / total
        mfu = model_flops_utilisation(flops_per_token, real_s, peak_tflops, 1)  # this rank's tokens, its device
        rates[t.name] = (seq_s, real_s, mfu)
        lines.append(
            f"| {t.name} | {device} | {1e3 * statistics.median(t.step_s):.1f} | {_rate(seq_s * world)} | "
            f"{tok_s * world:,.0f} | {real_s * world:,.0f} | {'-' if mfu is None else f'{mfu:.1%}'} | "
            f"{1e3 * statistics.median(t.wait_s):.2f} | {'-' if t.peak_gib is None else f'{t.peak_gib:.1f}'} |"
        )
    seq_s, real_s, mfu = rates[timings[0].name]
    last = (
        f"seq_per_s={seq_s * world:.2f} tokens_per_s={real_s * world:.0f} mfu={'n/a' if mfu is None else f'{mfu:.4f}'}"
    )
    if len(timings) > 1:  # median of the per-step ratios of interleaved steps: a stall on one side skews no mean
        a, b = timings
        steps = zip(a.step_seqs, a.step_s, b.step_seqs, b.step_s, strict=True)
        paired = [(na / ta) / (nb / tb) for na, ta, nb, tb in steps]
        ratio = statistics.median(paired)
        last += f" ratio_vs_hf={ratio:.3f}"
        if a.flops and b.flops:
            total = {t.name: sum(sum(f.values()) for f in t.flops) for t in timings}
            bound = total[b.name] / total[a.name]  # same samples in every step: the speed-up equal FLOP/s gives
            positions = sum(s.rows * s.width for step in b.shapes for s in step)
            padding = 1.0 - sum(s.real for step in b.shapes for s in step) / positions  # of the reference's rows
            lines += ["", "| implementation | exact GFLOP/step | GFLOP/s | layers | MLM head | attention |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for t in timings:
                parts = "".join(f" {sum(f[k] for f in t.flops) / total[t.name]:.1%} |" for k in FLOP_PARTS)
                lines.append(f"| {t.name} | {total[t.name] / len(t.flops) / 1e9:,.1f} | "
                             f"{total[t.name] / sum(t.step_s) / 1e9:,.1f} |{parts}")  # fmt: skip
            last += f" bound={bound:.3f} ratio_over_bound={ratio / bound:.3f} padding={padding:.4f}"
    return [*lines, last]


def run(cfg: Any, env: Any) -> list[str]:
    """Build engines as training does, run ``bench.warmup`` then ``bench.steps`` steps (interleaved with the
    ``transformers`` reference when ``bench.compare=hf``), and return the report lines."""
    t, b = cfg.trainer, cfg.bench
    if b.compare not in ("none", "hf"):
        raise UserError(f"bench.compare={b.compare!r}: use none or hf")
    tmp = None
    family = family_of(cfg.model)
    if not (Path(cfg.data.dir) / "train").is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        vocab = cfg.model.vocab_size or FAMILIES[family][0]().vocab_size  # the family's own (30,522; 50,368)
        synthetic_data(Path(tmp.name), vocab, t.max_seq_length, b.synthetic_samples, cfg.model.nsp, cfg.seed)
        cfg.data.dir = tmp.name
    info, model_kw = preflight(cfg, env.world_size)
    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    runners, stop, ours = [], StopFlag(), None
    for name in ["ours"] + (["transformers"] if b.compare == "hf" else []):
        torch.manual_seed(cfg.seed)
        if name == "ours":
            model = ours = pretraining_model(model_kw)
        else:  # ModernBERT: our initial weights too
            model = hf_model(model_kw, ours)
        if t.activation_checkpointing:  # the reference too: the same memory budget for both
            if name == "ours":
                model.checkpoint_layers = True
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loader, sampler, _ = run_loaders(cfg.data, t.micro_batch_size, cfg.seed, env.rank, env.world_size, False,
                                         pack=cfg.data.pack and name == "ours")  # fmt: skip
        # the reference runs as its users run it: eager
        compile = t.compile and name == "ours"
        ds = start(EngineConfig.of(cfg), env, model, device, None, sampler, stop, record=False, compile=compile)
        keys = HF_KEYS.get(family) if name == "transformers" else None
        runners.append(Runner(name, ds, Batches(loader, sampler, device), keys))  # drawn as training draws them
    for i in range(b.warmup + b.steps):  # interleaved: drift and noise hit both alike
        for r in runners:
            r.step(timed=i >= b.warmup)
    if family == "modernbert":
        c = runners[0].ds.module.config
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
        heads = (c.num_attention_heads, c.hidden_size // c.num_attention_heads)
        # the model's own test of whether its attention takes the varlen kernel, on queries of the run's shape
        varlen = varlen_usable(torch.empty(1, *heads, device=device, dtype=dtype), c.attention_dropout)
        for r in runners:
            r.t.flops = [modernbert_step_flops(c, shapes, r.t.name == "transformers", varlen) for shapes in r.t.shapes]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    flops = runners[0].ds.module.flops_per_token(t.max_seq_length)
    lines = report([r.t for r in runners], env.world_size, flops, peak_tflops(t.peak_tflops, device), where)
    D.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return lines
