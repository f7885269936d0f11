"""A ModernBERT through the whole product, on the engine, checkpoint rule and tools BERT uses: a directory that
transformers itself wrote (``ModernBertForMaskedLM.save_pretrained``, random weights) continues pretraining with
``trainer.init_from=``; the run's export is transformers' own class and tokenizer (``AutoModelForMaskedLM``,
``AutoTokenizer``, ``pipeline("fill-mask")``) with our logits; evaluate, fill-mask and embed read the run and the
directory; a wrong family or vocabulary is one line, exit 2, before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.errors import UserError
from data_prep.vocab import build_tokenizer
from pretrain.checkpoint.weights import continue_from, load_model
from tests.helpers import ROOT, SHARD_VOCAB, make_data, run_env, run_main

PRETRAIN = ROOT / "launch" / "pretrain.py"
SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
         "local_attention": 8, "global_attn_every_n_layers": 3, "max_position_embeddings": 128}  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PRETRAIN), *args], capture_output=True, text=True,
                          env={**run_env(), "OMP_NUM_THREADS": "2"}, timeout=300, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("mb") / "data")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """What a user downloads: transformers' ModernBertForMaskedLM directory (its token ids as our vocabulary's),
    with a tokenizer of the data's vocabulary."""
    import transformers

    out = tmp_path_factory.mktemp("mb") / "published"
    torch.manual_seed(3)
    cfg = transformers.ModernBertConfig(vocab_size=len(SHARD_VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                        cls_token_id=2, sep_token_id=3, **SHAPE)  # fmt: skip
    transformers.ModernBertForMaskedLM(cfg).save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(SHARD_VOCAB) + "\n")
    build_tokenizer({t: i for i, t in enumerate(SHARD_VOCAB)}, True).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def run(data, published, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mb") / "run"
    steps = ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.max_seq_length=32"]
    r = _run(
        "model=modernbert-tiny", f"trainer.init_from={published}", f"data.dir={data}", f"run_dir={run_dir}", *steps
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "model.hidden_size=128 -> 64" in r.stderr and "model.local_attention=32 -> 8" in r.stderr  # config.json's
    assert "ModernBERT" in r.stdout and "MLM head only" in r.stdout
    return run_dir


@pytest.mark.slow
def test_continued_run_exports_transformers_own_class_with_our_logits(run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    hf_dir = run / "hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "modernbert" and config["architectures"] == ["ModernBertForMaskedLM"]
    tok, hf = AutoTokenizer.from_pretrained(hf_dir), AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    texts = ["w1 w2 w3 [MASK] w5 w6 w7 w8 w9 w10 w11 w12 w13", "w7 [MASK]"]  # padded; the longer passes the window
    enc = tok(texts, return_tensors="pt", padding=True)
    assert set(enc) == {"input_ids", "attention_mask"}  # no segment ids: ModernBERT has none
    ours = load_model(run).model
    with torch.no_grad():
        theirs = hf(**enc).logits
        mine = ours.mlm_logits_dense(ours.encode(enc["input_ids"], None, enc["attention_mask"]))
    real = enc["attention_mask"].bool()
    assert (theirs - mine)[real].abs().max() < 1e-4
    top = pipeline("fill-mask", model=str(hf_dir), top_k=3)(texts[0])
    assert len(top) == 3 and all(t["sequence"].startswith("w1 w2 w3") for t in top)


@pytest.mark.slow
def test_tools_read_the_run_and_the_published_directory(run, published, data, tmp_path, capsys):
    launch = ROOT / "launch"
    text = tmp_path / "lines.txt"
    text.write_text("w1 w2 w3\nw4 w5 w6 w7\n")
    for source in (run, published):
        code, out, err = run_main(capsys, launch / "fill_mask.py", source, "w1 w2 [MASK] w4", "--top-k", "2")
        assert code == 0, err
        assert [line.count("(") for line in out.splitlines() if "->" in line] == [2]
        vectors = tmp_path / f"{source.name}.npy"
        code, out, err = run_main(capsys, launch / "embed.py", source, "--input", text, "--output", vectors)
        assert code == 0, err
        assert np.load(vectors).shape == (2, SHAPE["hidden_size"])
        code, out, err = run_main(capsys, launch / "evaluate.py", source, "--data", data, "--batches", "2", "--no-log")
        assert code == 0, err
        assert "MLM" in out and "NSP" not in out


def test_a_wrong_family_or_vocabulary_is_one_line(published, data, tmp_path):
    model = {"family": "bert", "vocab_size": None, "nsp": True}
    with pytest.raises(UserError, match=r"is a ModernBERT model .* but the run's model is BERT; choose a model=mod"):
        continue_from(str(published), model, str(data), True)
    other = make_data(tmp_path / "other")
    (other / "vocab.txt").write_text("\n".join([*SHARD_VOCAB[:-1], "##zz"]) + "\n")
    model = {"family": "modernbert", "vocab_size": None, "nsp": False}
    with pytest.raises(UserError, match=r"prepared with another vocabulary than trainer.init_from=.* at id 71"):
        continue_from(str(published), model, str(other), True)


@pytest.mark.slow
def test_objective_nsp_with_modernbert_exits_2_before_any_work(data, tmp_path):
    r = _run("model=modernbert-tiny", "objective=nsp", f"data.dir={data}", f"run_dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: objective=nsp: ModernBERT has no sentence-pair head (transformers' ModernBERT masked-LM class has "
        "none); drop objective= or use objective=mlm"
    ]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
def test_init_from_a_checkpoint_of_the_other_family_is_one_line(run):
    from pretrain.checkpoint.weights import pretraining_model

    bert = {"family": "bert", "vocab_size": len(SHARD_VOCAB), "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
    with pytest.raises(UserError, match=r"none of its tensors is a BERT weight \(its first: model\.embeddings"):
        pretraining_model(bert, str(run))
