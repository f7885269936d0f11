"""Long context on CPU: peak memory and time of one training forward + backward of our ModernBERT per row length.

    python benchmarks/long_context.py                                   # tiny and base, 512 ... 8,192 tokens
    python benchmarks/long_context.py --models modernbert-tiny --lengths 512 1024 --batch 2
    python benchmarks/long_context.py --full-masks          # local layers as one full masked SDPA: the band's share

Each (model, length) runs in a fresh child process (``--one``): the model of ``conf/model/MODEL.yaml`` (vocabulary
50,368 as ModernBERT's, ``max_position_embeddings`` raised to the length: RoPE has no table), train mode, one
batch of ``--batch`` full rows of random ids with 15% of the positions masked, ``--steps`` forward + backward passes
(``model(...).loss.backward()``, gradients dropped after each; no optimizer). Reported per case:

- ``peak GiB``: the child's resident high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), model and
  Python included;
- ``above model GiB``: that peak less the resident size just before the first pass (``/proc/self/statm``:
  weights, imports, the batch): what the passes themselves needed (activations kept for backward, gradients,
  temporaries). The CPU allocator keeps no statistics of its own; RSS is what the machine must have (memory that
  glibc keeps after freeing counts too);
- ``s/pass``: the fastest pass (with ``--steps 1`` the only one, first-call allocations included).

``--full-masks`` turns the band off (``attention.use_band``): the local layers then run SDPA over whole rows with
the window as a mask, as transformers does on CPU.

A global layer's attention is quadratic in time (every third layer) and, with SDPA's blocked CPU kernel, linear in
memory; the local layers run the band only (``pretrain.models.attention``), linear in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def model_kwargs(name: str, length: int) -> dict:
    """``conf/model/NAME.yaml`` (a ModernBERT one) as model kwargs, the vocabulary and context filled in."""
    from omegaconf import OmegaConf

    kw = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")).items()
          if k != "defaults"}  # fmt: skip
    if kw.get("vocab_size") is None:
        kw["vocab_size"] = 50368
    kw["max_position_embeddings"] = max(length, kw.get("max_position_embeddings", 0))
    return {**kw, "family": "modernbert"}


def one(name: str, length: int, batch: int, steps: int, full_masks: bool = False) -> dict:
    """The child: build, one batch, ``steps`` forward + backward passes; returns the measurements."""
    import torch

    from pretrain.models import attention, build
    from pretrain.runtime.distributed import set_threads

    set_threads()
    if full_masks:
        attention.use_band = lambda window, max_seqlen: False
    torch.manual_seed(0)
    model = build(model_kwargs(name, length)).train()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(5, V, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.where(torch.rand(batch, length, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1024  # KiB, now
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, the high-water mark
    return {"model": name, "length": length, "batch": batch, "threads": torch.get_num_threads(),
            "peak_gib": peak / 2**20, "above_model_gib": (peak - before) / 2**20, "s_per_pass": min(times),
            "params_m": model.num_parameters() / 1e6}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["modernbert-tiny", "modernbert-base"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="passes per case (the fastest is reported)")
    p.add_argument("--full-masks", action="store_true", help="local layers without the band (full masked SDPA)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)  # the child
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.batch, a.steps, a.full_masks)), flush=True)
        return
    print("| model | tokens | batch | peak GiB | above model GiB | s/pass | vs previous length: memory, time |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        prev = None
        for length in a.lengths:
            cmd = [sys.executable, __file__, "--one", name, str(length), "--batch", str(a.batch), "--steps",
                   str(a.steps), *(["--full-masks"] if a.full_masks else [])]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                print(f"| {name} | {length} | {a.batch} | failed: {r.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            growth = "" if prev is None else (f"{m['above_model_gib'] / prev['above_model_gib']:.2f}x, "
                                              f"{m['s_per_pass'] / prev['s_per_pass']:.2f}x")  # fmt: skip
            print(f"| {name} | {length:,} | {a.batch} | {m['peak_gib']:.2f} | {m['above_model_gib']:.2f} | "
                  f"{m['s_per_pass']:.2f} | {growth} |", flush=True)  # fmt: skip
            prev = m


if __name__ == "__main__":
    main()
