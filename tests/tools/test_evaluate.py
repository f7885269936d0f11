"""launch/evaluate.py and pretrain/tools/evaluate.py on a real tiny run: the model from a run dir, a checkpoint or its
HF export (same numbers, and the trainer's own validation figures), the unigram baseline at the same masked
positions, --text prepared on the fly, the metrics.jsonl record, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.store import SplitReader
from data_prep.vocab import read_vocab
from pretrain.checkpoint.hf import export_hf
from pretrain.checkpoint.weights import load_model
from pretrain.models.bert import IGNORE_INDEX
from pretrain.tools.evaluate import evaluate_model, run_evaluate
from pretrain.training.data import build_dataloader
from pretrain.training.masking import MaskingConfig
from pretrain.training.scores import most_frequent_token, token_counts
from tests.helpers import ROOT, SMALL, TINY_EVAL_BATCHES, TINY_MICRO, make_data, run_env, run_main, tiny_corpus

EVALUATE = ROOT / "launch" / "evaluate.py"
SEED = 1234  # the seed the tiny run trained with (the default)


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    return tiny_run


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    return run_main(capsys, EVALUATE, *argv)


def test_most_frequent_token_is_the_bincount_argmax_without_unmaskable_specials(trained):
    data, _ = trained
    tokens = np.concatenate([s.input_ids for s in SplitReader(data, "train")])
    vocab = read_vocab(data / "vocab.txt")
    assert np.array_equal(token_counts(data, "train")[: max(tokens) + 1], np.bincount(tokens))
    counts = {vocab[i]: int(n) for i, n in enumerate(np.bincount(tokens))}
    for special in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"):
        counts.pop(special, None)
    expected = max(counts, key=counts.get)
    assert vocab[most_frequent_token(data)] == expected == "the"
    assert most_frequent_token(data, exclude=[vocab.index("the")]) != vocab.index("the")


def test_accuracy_and_unigram_baseline_are_scored_at_the_same_masked_positions(trained, capsys):
    data, run = trained
    rec = run_evaluate(str(run), str(data), batch_size=4, log=False)
    out = capsys.readouterr().out
    # The masks the tool used, drawn again here from the same loader settings: same count, same unigram share.
    loader, _ = build_dataloader(data, "validation", 4, seed=SEED, masking=MaskingConfig(), shuffle=False,
                                 drop_last=False)  # fmt: skip
    labels = np.concatenate([b["labels"].numpy().ravel() for b in loader])
    labels = labels[labels != IGNORE_INDEX]
    the = read_vocab(data / "vocab.txt").index("the")
    assert rec["masked_tokens"] == len(labels) > 50 and rec["samples"] == len(SplitReader(data, "validation"))
    assert rec["unigram_token"] == "the" and rec["val_unigram_acc"] == pytest.approx(np.mean(labels == the))
    assert 0 <= rec["val_mlm_acc"] <= 1 and 0 < rec["val_unigram_acc"] < 1 and 0 <= rec["val_nsp_acc"] <= 1
    assert rec["val_perplexity"] == pytest.approx(math.exp(rec["val_mlm_loss"]), rel=1e-12)
    assert 0.5 <= rec["val_nsp_majority_acc"] <= 1 and rec["val_nsp_loss"] > 0
    assert f"{rec['val_mlm_acc']:.2%}" in out and f"{rec['val_unigram_acc']:.2%}" in out and "unigram" in out
    # stdout is not a terminal here: plain progress lines instead of a bar
    assert f"evaluate: batch {rec['batches']}/{rec['batches']}" in out


def test_run_dir_checkpoint_and_export_agree_with_the_trainers_own_validation(trained, capsys):
    data, run = trained
    before = len(_records(run, "evaluate"))
    kw = dict(batches=TINY_EVAL_BATCHES, batch_size=TINY_MICRO, seed=SEED, device="cpu")  # where the test run trained
    from_run = run_evaluate(str(run), **kw)  # the run's own data (data.dir of its config)
    from_tag = run_evaluate(str(run / "checkpoints" / "step00000004"), str(data), **kw)
    from_hf = run_evaluate(str(run / "hf"), str(data), **kw)
    keys = [k for k in from_run if k.startswith("val_")]
    assert len(keys) == 7
    for k in keys:
        assert from_hf[k] == pytest.approx(from_run[k], rel=1e-5, abs=1e-7), k
        assert from_tag[k] == from_run[k], k
    # Same samples, masks (seed, static masking) and weights as the evaluation at the end of training; the
    # trainer's unigram baseline too, so its accuracy and its baseline were scored at the same masked positions.
    trainer = _records(run, "eval")[-1]
    for k in ("val_mlm_loss", "val_mlm_acc", "val_unigram_acc", "val_nsp_loss", "val_nsp_acc"):
        assert from_run[k] == pytest.approx(trainer[k], rel=1e-5), k
    # One record per evaluation of the run or its checkpoint, none for the export (no run step to name).
    records = _records(run, "evaluate")
    assert len(records) == before + 2
    last = records[-1]
    assert last["step"] == 4 and last["source"] == str((run / "checkpoints" / "step00000004").resolve())
    assert last["data"] == str(data.resolve()) and last["split"] == "validation" and isinstance(last["time"], float)
    assert {k: last[k] for k in keys} == pytest.approx({k: from_tag[k] for k in keys})
    assert "recorded in" in capsys.readouterr().out


def test_text_file_is_prepared_with_the_models_vocabulary(trained, tmp_path, capsys):
    _, run = trained
    text = tiny_corpus(tmp_path / "held_out.txt", 6, seed=11)
    rec = run_evaluate(str(run), text=str(text), log=False)
    captured = capsys.readouterr()
    assert rec["data"] == str(text.resolve()) and rec["split"] is None and rec["masked_tokens"] > 20
    assert rec["unigram_token"] == "the"  # "The" opens every sentence of the text (lowercased by the vocabulary)
    assert 0 <= rec["val_mlm_acc"] <= 1 and 0 <= rec["val_unigram_acc"] <= 1 and "val_nsp_acc" in rec
    assert rec["val_perplexity"] == pytest.approx(math.exp(rec["val_mlm_loss"]))
    assert f"on {text}" in captured.out and "preparing" in captured.err
    # A single line of text: too little for sentence pairs, still MLM figures.
    one = tmp_path / "one.txt"
    one.write_text("the old river came over the quiet city.\n")
    rec = run_evaluate(str(run), text=str(one), log=False)
    assert rec["masked_tokens"] >= 1 and "val_nsp_acc" not in rec and "NSP is not evaluated" in capsys.readouterr().err


def test_plain_bert_directories_load_with_vocab_txt_or_tokenizer_json(trained, tmp_path):
    data, run = trained
    model = load_model(run / "hf").model
    only_vocab = export_hf(model, None, tmp_path / "vocab_only")  # config.json + model.safetensors, as HF writes
    shutil.copy(data / "vocab.txt", only_vocab / "vocab.txt")
    only_json = export_hf(model, None, tmp_path / "json_only")
    shutil.copy(data / "tokenizer.json", only_json / "tokenizer.json")
    loader, _ = build_dataloader(data, "validation", TINY_MICRO, seed=SEED, shuffle=False, drop_last=False)
    results = []
    for d in (run / "hf", only_vocab, only_json):
        src = load_model(d)
        assert src.kind == "hf" and src.vocab == read_vocab(data / "vocab.txt") and src.lowercase
        assert src.tokenizer.encode("The river came").tokens == ["[CLS]", "the", "river", "came", "[SEP]"]
        results.append(evaluate_model(src.model, loader, 2, torch.device("cpu")))
    assert results[0] == results[1] == results[2]


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    data, run = trained
    (tmp_path / "run_without_checkpoints" / "checkpoints" / "step00000002").mkdir(parents=True)  # never completed
    other = make_data(tmp_path / "other_vocab")  # shards with another vocabulary
    no_val = tmp_path / "no_validation"
    shutil.copytree(data, no_val)
    shutil.rmtree(no_val / "validation")
    (tmp_path / "empty.txt").write_text("\n  \n")
    cases = [
        ((tmp_path / "missing",), ["missing: not found"]),
        ((tmp_path / "run_without_checkpoints",), ["without a complete checkpoint"]),
        ((run, "--data", no_val), ["no 'validation' split", "--split train"]),
        ((run, "--data", other), ["vocabulary mismatch", str(other / "vocab.txt"), "72 tokens"]),
        ((run / "hf", "--text", tmp_path / "empty.txt"), ["empty.txt: the file is empty"]),
        ((run, "--data", tmp_path / "nowhere"), ["--data", "nowhere: directory not found"]),
    ]
    for argv, expected in cases:
        code, out, err = _main(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert all(e in lines[0] for e in expected), (argv, lines[0])
        assert "evaluate " not in out  # no table


@pytest.mark.slow
@pytest.mark.long  # CI time: `make test-all` runs it
def test_zero3_checkpoint_is_read_through_deepspeed(trained, tmp_path, capsys):
    """A ZeRO-3 bundle (partitioned fp32 weights, zero_pp_rank_* model states): same figures as its export and as
    the trainer's validation (a second tiny run, about 6 s)."""
    data, _ = trained
    run = tmp_path / "zero3"
    args = [f"data.dir={data}", f"run_dir={run}", "deepspeed=zero3", *SMALL, "trainer.max_steps=2",
            "trainer.eval_every=2", f"trainer.eval_batches={TINY_EVAL_BATCHES}",
            f"trainer.global_batch_size={TINY_MICRO}", f"trainer.micro_batch_size={TINY_MICRO}"]  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], capture_output=True,
                       text=True, env=run_env(), timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert list((run / "checkpoints" / "step00000002").glob("zero_pp_rank_0_*model_states.pt"))
    kw = dict(batches=TINY_EVAL_BATCHES, batch_size=TINY_MICRO, device="cpu", log=False)
    from_run, from_hf = run_evaluate(str(run), **kw), run_evaluate(str(run / "hf"), str(data), **kw)
    trainer = _records(run, "eval")[-1]
    for k in ("val_mlm_loss", "val_mlm_acc", "val_nsp_loss", "val_nsp_acc"):
        assert from_run[k] == pytest.approx(from_hf[k], rel=1e-6), k
        assert from_run[k] == pytest.approx(trainer[k], rel=1e-5), k
    assert "Gathering" not in capsys.readouterr().err  # DeepSpeed's progress bars stay out of the tool's output


def test_cli_help_and_error_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, str(EVALUATE), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--text FILE" in r.stdout and "metrics.jsonl" in r.stdout
    r = subprocess.run([sys.executable, str(EVALUATE), str(tmp_path / "nope"), "--data", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: model={tmp_path / 'nope'}: not found")
