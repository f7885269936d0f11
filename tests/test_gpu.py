"""GPU override matrix: bf16 kernels and the fused optimizers. Skipped cleanly where there is no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.config import PrepareConfig
from data_prep.pipeline import prepare
from pretrain.models.bert import BertConfig, BertForPreTraining
from tests.helpers import FINETUNE, FINETUNE_FAST, ROOT, classification_task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    model = BertForPreTraining(cfg).eval()
    ids = torch.randint(5, 1000, (4, 64))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0  # padding: SDPA with a mask (memory-efficient kernel)
    with torch.no_grad():
        ref = model.encode(ids, attention_mask=mask)
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu.encode(ids.cuda(), attention_mask=mask.cuda()).float().cpu()
            no_pad = gpu.encode(ids.cuda()).float().cpu()  # no mask: the flash kernel
    keep = mask.bool()
    assert torch.allclose(out[keep], ref[keep], atol=0.1, rtol=0.05)
    assert torch.allclose(no_pad[0], out[0], atol=0.1, rtol=0.05)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_data")
    prepare(PrepareConfig(inputs=["builtin:pydocs"], output_dir=str(out), vocab_size=4000, num_workers=2))
    return out


@pytest.mark.parametrize(
    ("deepspeed", "optim", "precision"),
    [("zero2", "lamb", "bf16"), ("zero1", "adamw", "fp16"), ("zero3", "adamw", "bf16")],
)
def test_trainer_on_gpu(data_dir: Path, tmp_path: Path, deepspeed: str, optim: str, precision: str):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "pretrain.py"),
            f"data.dir={data_dir}",
            f"run_dir={run}",
            f"deepspeed={deepspeed}",
            f"optim={optim}",
            f"trainer.precision={precision}",
            "trainer.max_steps=60",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if optim == "lamb":
        assert "Fused" in proc.stdout  # apex's or DeepSpeed's fused LAMB, not the CPU fallback
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert losses[-1] < losses[0]
    assert (run / "hf" / "model.safetensors").is_file()


def test_modernbert_trains_on_gpu_bf16_packed_with_varlen(data_dir: Path, tmp_path: Path):
    """A ModernBERT run on the device: bf16, packed rows, FlashAttention varlen for the global and local layers;
    the loss falls, the export is transformers' class."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "model=modernbert-tiny", f"data.dir={data_dir}",
         f"run_dir={run}", "trainer.precision=bf16", "data.pack=true", "trainer.max_steps=60"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert losses[-1] < losses[0]
    assert json.loads((run / "hf" / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]


def test_fp16_resume_keeps_loss_scale(data_dir: Path, tmp_path: Path):
    """fp16 with dynamic loss scaling, stopped and resumed: the loss scale continues where it was (no overflow
    burst from a reset scale after the resume) and the skipped-step log matches an uninterrupted run."""
    args = [
        f"data.dir={data_dir}",
        "deepspeed=zero1",
        "optim=adamw",
        "trainer.precision=fp16",
        "trainer.max_steps=40",
        "trainer.log_every=1",
        "trainer.checkpoint_every=20",
        "trainer.eval_every=0",
        "trainer.deterministic=true",
    ]

    def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"run_dir={run_dir}", *args, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            env={**os.environ, "WANDB_MODE": "offline"},
        )

    def scales(run_dir: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss_scale"] for r in records if r.get("kind") in ("train", "skipped")}

    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full).returncode == 0
    assert run(part, "trainer.stop_at_step=20").returncode == 0
    r = run(part)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert scales(part) == scales(full)


def test_finetune_on_gpu_bf16(data_dir: Path, tmp_path: Path):
    """Fine-tuning on the GPU in bf16 under ZeRO-2: the loss falls, best/ holds fp32 weights, predict works."""
    from safetensors.torch import load_file

    env = {**os.environ, "WANDB_MODE": "offline"}
    pre = tmp_path / "pre"
    argv = [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"data.dir={data_dir}", f"run_dir={pre}",
            "trainer.max_steps=20"]  # fmt: skip
    assert subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env).returncode == 0
    train, dev = classification_task(tmp_path, n=256)
    run = tmp_path / "ft"
    argv = [sys.executable, FINETUNE, f"pretrained={pre}", f"run_dir={run}", "finetune=classification",
            f"task.train={train}", f"task.validation={dev}", "task.text_column=text", "epochs=3",
            "deepspeed=zero2", "trainer.precision=bf16", *FINETUNE_FAST]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]  # fmt: skip
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(t.dtype == torch.float32 for t in load_file(run / "best" / "model.safetensors").values())


def test_auto_micro_batch_on_gpu_runs_at_the_probed_size(data_dir: Path, tmp_path: Path):
    """micro_batch_size=auto on the GPU (BERT-base shape, bf16, 128 tokens, the GPU's whole memory): the probe's
    choice is large, and training at it does not run out of memory."""
    run = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "launch" / "pretrain.py"), f"data.dir={data_dir}", f"run_dir={run}",
            "model=bert-base", "trainer.precision=bf16", "trainer.micro_batch_size=auto",
            "trainer.global_batch_size=1024", "trainer.max_steps=3", "trainer.eval_every=0"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads((run / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"]
    assert chosen >= 64 and 1024 % chosen == 0, chosen  # and the run at that size finished: no out-of-memory


def _modernbert_packed_batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (attention_mask = sample number) with samples longer and shorter than a 64-token window."""
    mask = torch.zeros(2, 512, dtype=torch.long)
    mask[0, :300], mask[0, 300:450], mask[1] = 1, 2, 1
    pos = torch.zeros(2, 512, dtype=torch.long)
    pos[0, :300], pos[0, 300:450], pos[1] = torch.arange(300), torch.arange(150), torch.arange(512)
    return mask.to(device), pos.to(device)


def test_modernbert_varlen_attention_matches_sdpa_fallback_bf16():
    """FlashAttention varlen (bf16) against the exact SDPA fallback in fp32, global and sliding-window, forward and
    backward; the window really is applied inside the kernel."""
    from pretrain.models.attention import attention, unpad, varlen_usable

    torch.manual_seed(0)
    mask, pos = _modernbert_packed_batch("cuda")
    u = unpad(torch.zeros_like(mask), mask, pos)
    T = u.idx.numel()
    q, k, v = (torch.randn(T, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    assert varlen_usable(q, 0.0)
    outs = {}
    for window in (None, 32):
        fast = attention(q, k, v, u, window, use_varlen=True)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = attention(q32, k32, v32, u, window, use_varlen=False)
        assert fast.dtype == torch.bfloat16 and fast.shape == q.shape
        assert torch.allclose(fast.float(), ref, atol=2e-2, rtol=2e-2)
        g = torch.randn_like(ref)
        fast_grads = torch.autograd.grad(fast, (q, k, v), g.bfloat16())
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g)
        for a, b in zip(fast_grads, ref_grads, strict=True):
            assert torch.allclose(a.float(), b, atol=5e-2, rtol=5e-2)
        outs[window] = fast.detach().float()
    assert not torch.allclose(outs[None], outs[32], atol=2e-2)


def test_modernbert_bf16_varlen_model_matches_cpu_fp32(monkeypatch):
    """A ModernBERT (global and local layers) under bf16 autocast runs FlashAttention varlen for both layer kinds
    and gives the CPU fp32 fallback's hidden states and loss; its backward is finite."""
    import pretrain.models.attention as attn_mod
    from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM

    windows = []
    kernel = attn_mod.varlen_attn
    monkeypatch.setattr(attn_mod, "varlen_attn", lambda *a, **kw: windows.append(kw["window_size"]) or kernel(*a, **kw))
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=1000, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                           num_attention_heads=2, local_attention=64)  # fmt: skip
    model = ModernBertForMaskedLM(cfg).eval()
    mask, pos = _modernbert_packed_batch("cpu")
    ids = torch.randint(5, 1000, mask.shape) * (mask > 0)
    labels = torch.where((torch.rand(mask.shape) < 0.15) & (mask > 0), ids, -100)
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        ref = model.encode(**batch)
        ref_loss = model(**batch, labels=labels).loss
    gpu = model.cuda()
    cuda = {k: t.cuda() for k, t in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            out = gpu.encode(**cuda).float().cpu()
        loss = gpu(**cuda, labels=labels.cuda()).loss
    loss.backward()
    assert set(windows) == {(-1, -1), (32, 32)}  # the kernel ran for the global and the sliding-window layers
    real = mask > 0
    assert torch.allclose(out[real], ref[real], atol=0.1, rtol=0.05)
    assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters())
