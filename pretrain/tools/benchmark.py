"""Training throughput, measured the way training runs: the real DeepSpeed engine, optimizer, precision and data
loader built from the same config as ``launch/pretrain.py``, on real shards (or synthetic shards of the same
format when ``data.dir`` holds none), optionally side by side with ``transformers``' BERT.

The step timed is the training engine's own (``pretrain.training.engine.Engine.step``: accumulation, the agreed
non-finite check), and MFU is the one definition training logs (``pretrain.training.metrics.mfu``: our model's
training FLOPs per token times the real, non-padding tokens per second). Both implementations are credited with
the same FLOPs for the same tokens: MFU and the ratio compare like with like.
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
from pretrain.models.bert import BertConfig, BertForPreTraining
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


class Runner:
    """An engine and its own loader iterator; ``step()`` runs one optimizer step of the engine and books it."""

    def __init__(self, name: str, ds: Any, batches: Batches) -> None:
        self.t, self.ds, self.batches = Timing(name), ds, batches

    def step(self, timed: bool) -> None:
        device = self.ds.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seen = {"wait": 0.0, "seqs": 0}

        def next_batch() -> dict[str, torch.Tensor]:  # the loader's wait and the sequences, outside the step
            w0 = time.perf_counter()
            batch = self.batches()
            seen["wait"] += time.perf_counter() - w0
            seen["seqs"] += len(real_lengths(batch))  # per sample: a packed row carrying two samples counts two
            return batch

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
            if cuda:
                t.peak_gib = max(t.peak_gib or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
            else:  # the process's resident high-water mark: both implementations' when compared side by side
                t.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def hf_model(model_kw: dict[str, Any]) -> torch.nn.Module:
    """``transformers``' BERT of the same shape: ``BertForPreTraining``, or ``BertForMaskedLM`` with NSP off."""
    import transformers

    cfg = BertConfig(**model_kw)
    cls = transformers.BertForPreTraining if cfg.nsp else transformers.BertForMaskedLM
    hf_cfg = transformers.BertConfig(**{**cfg.to_hf_dict(), "vocab_size": cfg.vocab_size})
    return cls(hf_cfg)


def report(
    timings: list[Timing], world: int, flops_per_token: float, peak_tflops: float | None, device: str
) -> list[str]:
    """Markdown rows and the last ``key=value`` line."""
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
            f"| {t.name} | {device} | {1e3 * statistics.median(t.step_s):.1f} | {seq_s * world:,.1f} | "
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
        last += f" ratio_vs_hf={statistics.median(paired):.3f}"
    return [*lines, last]


def run(cfg: Any, env: Any) -> list[str]:
    """Build engines as training does, run ``bench.warmup`` then ``bench.steps`` steps (interleaved with the
    ``transformers`` reference when ``bench.compare=hf``), and return the report lines."""
    t, b = cfg.trainer, cfg.bench
    if b.compare not in ("none", "hf"):
        raise UserError(f"bench.compare={b.compare!r}: use none or hf")
    tmp = None
    if not (Path(cfg.data.dir) / "train").is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        vocab = cfg.model.vocab_size or 30522
        synthetic_data(Path(tmp.name), vocab, t.max_seq_length, b.synthetic_samples, cfg.model.nsp, cfg.seed)
        cfg.data.dir = tmp.name
    info, model_kw = preflight(cfg, env.world_size)
    device = D.init(env, t.collective_timeout_minutes, t.rendezvous_timeout_minutes, cfg.verbose)
    runners, stop = [], StopFlag()
    for name in ["ours"] + (["transformers"] if b.compare == "hf" else []):
        torch.manual_seed(cfg.seed)
        model = pretraining_model(model_kw) if name == "ours" else hf_model(model_kw)
        if t.activation_checkpointing:  # the reference too: the same memory budget for both
            if name == "ours":
                model.bert.encoder.checkpoint_layers = True
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loader, sampler, _ = run_loaders(cfg.data, t.micro_batch_size, cfg.seed, env.rank, env.world_size, False,
                                         pack=cfg.data.pack and name == "ours")  # fmt: skip
        # the reference runs as its users run it: eager
        compile = t.compile and name == "ours"
        ds = start(EngineConfig.of(cfg), env, model, device, None, sampler, stop, record=False, compile=compile)
        runners.append(Runner(name, ds, Batches(loader, sampler, device)))  # drawn as training draws them
    for i in range(b.warmup + b.steps):  # interleaved: drift and noise hit both alike
        for r in runners:
            r.step(timed=i >= b.warmup)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    flops = BertForPreTraining(BertConfig(**model_kw)).flops_per_token(t.max_seq_length)
    lines = report([r.t for r in runners], env.world_size, flops, peak_tflops(t.peak_tflops, device), where)
    D.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return lines
