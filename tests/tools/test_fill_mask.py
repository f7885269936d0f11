"""launch/fill_mask.py from a run dir, a checkpoint or an exported HF directory (same top-k), a plain Hugging Face
BERT directory (same answers as ``transformers``), and one-line errors for bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.vocab import read_vocab
from tests.helpers import ROOT, run_main

FILL_MASK = ROOT / "launch" / "fill_mask.py"
PROMPTS = ["the old [MASK] came over the city.", "the [MASK] went [MASK] the river."]
PREDICTION = re.compile(r"(\S+) \((\d\.\d\d)\)")


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    return tiny_run


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, FILL_MASK, *argv)


def _predictions(out: str) -> list[list[list[tuple[str, float]]]]:
    """Per prompt, per [MASK]: the (token, probability) pairs printed after '->'."""
    rows = [line.strip().removeprefix("-> ") for line in out.splitlines() if line.strip().startswith("->")]
    return [[[(t, float(p)) for t, p in PREDICTION.findall(m)] for m in row.split(" | ")] for row in rows]


def test_run_dir_checkpoint_and_export_give_the_same_top_k(trained, capsys):
    data, run = trained
    outputs = {}
    for source in (run, run / "checkpoints" / "step00000004", run / "hf"):
        code, out, err = _main(capsys, source, *PROMPTS, "--top-k", "4")
        assert code == 0, err
        outputs[source] = out
    assert len(set(outputs.values())) == 1  # the same text, token for token and probability for probability
    preds = _predictions(outputs[run])
    vocab = set(read_vocab(data / "vocab.txt"))
    assert [len(p) for p in preds] == [1, 2] and all(len(m) == 4 for p in preds for m in p)
    for m in (m for p in preds for m in p):
        probs = [p for _, p in m]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert len({t for t, _ in m}) == 4 and {t for t, _ in m} <= vocab


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    _, run = trained
    no_tokenizer = tmp_path / "hf_without_tokenizer"
    shutil.copytree(run / "hf", no_tokenizer)
    for name in ("vocab.txt", "tokenizer.json"):
        (no_tokenizer / name).unlink()
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    cases = [
        ((tmp_path / "missing", PROMPTS[0]), "missing: not found"),
        ((tmp_path / "empty_run", PROMPTS[0]), "without a complete checkpoint"),
        ((no_tokenizer, PROMPTS[0]), "no vocab.txt or tokenizer.json"),
        ((run, "no mask here"), "has no [MASK]"),
    ]
    for argv, expected in cases:
        code, out, err = _main(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
        assert "->" not in out


def test_cli_in_a_real_process(trained):
    """As launch/demo.sh calls it: an HF directory and prompts; --help; a bad path without a traceback."""
    _, run = trained
    r = subprocess.run([sys.executable, str(FILL_MASK), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--top-k" in r.stdout and "checkpoint" in r.stdout
    r = subprocess.run([sys.executable, str(FILL_MASK), str(run / "hf"), PROMPTS[0], "--top-k", "3"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [[len(m) for m in p] for p in _predictions(r.stdout)] == [[3]]
    r = subprocess.run([sys.executable, str(FILL_MASK), str(run / "nope"), PROMPTS[0]], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_plain_transformers_directory_matches_transformers(trained, tmp_path, capsys):
    """A directory written by transformers' own save_pretrained (no tokenizer.json, only vocab.txt): the same top-k
    as transformers' BertForMaskedLM computes (importing transformers takes about 6 s)."""
    from transformers import BertConfig, BertForMaskedLM

    data, _ = trained
    vocab = read_vocab(data / "vocab.txt")
    torch.manual_seed(0)
    hf = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
    with torch.no_grad():  # well-separated answers: a fresh model's are all about 1/V, ordered by rounding noise
        hf.cls.predictions.bias.normal_(0.0, 2.0)
    hf.save_pretrained(tmp_path / "bert")
    shutil.copy(data / "vocab.txt", tmp_path / "bert" / "vocab.txt")
    code, out, err = _main(capsys, tmp_path / "bert", PROMPTS[0], "--top-k", "5")
    assert code == 0, err
    ours = _predictions(out)[0][0]
    ids = [vocab.index(t) for t in ["[CLS]", "the", "old", "[MASK]", "came", "over", "the", "city", ".", "[SEP]"]]
    with torch.no_grad():
        probs = hf(input_ids=torch.tensor([ids])).logits[0, 3].softmax(-1)
    top = probs.topk(5)
    assert [t for t, _ in ours] == [vocab[i] for i in top.indices.tolist()]
    assert [p for _, p in ours] == pytest.approx(top.values.tolist(), abs=0.006)  # printed with 2 decimals
