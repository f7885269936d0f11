"""Time one full training step (forward, backward, AdamW) of pretrain.model vs transformers' BERT, side by side.

    python benchmarks/train_step.py --model small --batch 8            # CPU, about a minute
    python benchmarks/train_step.py --suite                            # CUDA: bert-base/large at 128 and 512

Both models get the same config, the same batch (15% of positions masked, -100 elsewhere, NSP labels) and
AdamW; iterations alternate between the two so machine noise hits both alike. On CUDA the step runs under bf16
autocast and the table adds sequences/s and MFU (model FLOPs from ``flops_per_token``, dense MLM head for both,
over ``--peak-tflops``, the H100 SXM bf16 dense peak by default) and the peak GPU memory of each implementation's
step (its parameters and optimizer state plus the step's high-water mark). Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pretrain.model import BertConfig, BertForPreTraining  # noqa: E402

MODELS = ("tiny", "mini", "small", "bert-base", "bert-large", "roberta-base")
HEADER = (
    "| model | seq | batch | device | implementation | ms/step | seq/s | tokens/s | MFU | peak GiB | speed-up |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def make_models(name: str, vocab: int, device: torch.device):
    import transformers

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    cfg = BertConfig(**{**raw, "vocab_size": vocab})
    torch.manual_seed(0)
    ours = BertForPreTraining(cfg).to(device).train()
    hf_cls = transformers.BertForPreTraining if cfg.nsp else transformers.BertForMaskedLM
    hf = hf_cls(transformers.BertConfig(**cfg.to_hf_dict())).to(device).train()
    return cfg, ours, hf


def make_batch(cfg: BertConfig, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, cfg.vocab_size, (batch, seq_len), generator=g)
    token_type_ids = torch.zeros_like(input_ids)
    if cfg.type_vocab_size > 1:
        token_type_ids[:, seq_len // 2 :] = 1
    masked = torch.rand(batch, seq_len, generator=g) < 0.15
    labels = torch.where(masked, torch.randint(5, cfg.vocab_size, (batch, seq_len), generator=g), -100)
    b = dict(
        input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=torch.ones_like(input_ids), labels=labels
    )
    if cfg.nsp:
        b["next_sentence_label"] = torch.randint(0, 2, (batch,), generator=g)
    return {k: v.to(device) for k, v in b.items()}


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Resident training state of one implementation: parameters and optimizer moments."""
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, device: torch.device, peak: list[int]
) -> float:
    """Seconds for one step; appends to ``peak`` the step's GPU memory high-water mark above what was allocated
    before it (activations, gradients, workspace), so two models resident side by side do not count each other."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak.append(torch.cuda.max_memory_allocated(device) - before)
    return time.perf_counter() - t0


def bench(
    name: str,
    seq_len: int,
    batch_size: int,
    iters: int,
    warmup: int,
    vocab: int,
    peak_tflops: float,
    device: torch.device,
) -> list[str]:
    cfg, ours, hf = make_models(name, vocab, device)
    batch = make_batch(cfg, batch_size, seq_len, device)
    fused = {"fused": True} if device.type == "cuda" else {}
    runs = {"ours (pretrain.model)": ours, "transformers": hf}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, **fused) for k, m in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, list[int]] = {k: [] for k in runs}
    for i in range(warmup + iters):  # interleaved, so drift and noise hit both implementations alike
        for k, m in runs.items():
            t = timed_step(m, opts[k], batch, device, peaks[k])
            if i >= warmup:
                times[k].append(t)
    peaks = {k: v[warmup:] or [0] for k, v in peaks.items()}  # the first step also allocates optimizer state
    flops = ours.flops_per_token(seq_len)  # same model FLOPs for both: MFU compares like with like
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ref = ms["transformers"]
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    rows = []
    for k, v in ms.items():
        seq_s = batch_size / (v / 1e3)
        cuda = device.type == "cuda"
        mfu = f"{100 * flops * seq_s * seq_len / (peak_tflops * 1e12):.1f}%" if cuda else "-"
        gib = f"{(max(peaks[k]) + state_bytes(runs[k], opts[k])) / 2**30:.1f}" if cuda else "-"
        rows.append(
            f"| {name} | {seq_len} | {batch_size} | {dev} | {k} | {v:.1f} | {seq_s:,.0f} | "
            f"{seq_s * seq_len:,.0f} | {mfu} | {gib} | {ref / v:.2f}x |"
        )
    del runs, opts, ours, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="bert-base")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=30522, help="true vocabulary size (ours pads it per the YAML)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator dense bf16 peak, for MFU")
    p.add_argument("--suite", action="store_true", help="CUDA: bert-base and bert-large at seq 128 and 512")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.suite and device.type != "cuda":
        p.error("--suite needs a CUDA device; on CPU pick one --model/--seq-len/--batch")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cases = (
        [(m, s, a.batch if s == 128 else max(1, a.batch // 4)) for m in ("bert-base", "bert-large") for s in (128, 512)]
        if a.suite
        else [(a.model, a.seq_len, a.batch)]
    )
    print(HEADER, flush=True)
    for name, seq_len, bs in cases:
        for row in bench(name, seq_len, bs, a.iters, a.warmup, a.vocab, a.peak_tflops, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
