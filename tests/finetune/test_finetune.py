"""launch/finetune.py end to end: NER and QA on small built data, the same first loss from a run and from its HF
export, exact resume, predictions, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    BOOKS_RUN_BOOKS,
    FINETUNE,
    FINETUNE_FAST,
    ROOT,
    TINY_WORDS,
    classification_task,
    free_port,
    run_env,
    write_csv,
)


def _run(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, FINETUNE, *overrides], capture_output=True, text=True, env=run_env(),
                          timeout=timeout, cwd=ROOT)  # fmt: skip


# ----------------------------------------------------------------------------- built data on the tiny test run


@pytest.fixture(scope="module")
def tiny(tiny_run) -> Path:
    return tiny_run[1]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_ner_and_qa_end_to_end_on_built_data(tiny, tmp_path):
    rng = np.random.default_rng(1)
    tag = {"river": "B-LOC", "city": "B-LOC", "north": "B-DIR"}
    ner = []
    for _ in range(60):
        words = rng.choice(TINY_WORDS, size=int(rng.integers(4, 9))).tolist()
        ner.append({"tokens": words, "tags": [tag.get(w, "O") for w in words]})
    train, dev = _jsonl(tmp_path / "ner_train.jsonl", ner[:45]), _jsonl(tmp_path / "ner_dev.jsonl", ner[45:])
    r = _run(f"pretrained={tiny}", f"run_dir={tmp_path / 'ner'}", "finetune=ner", f"task.train={train}",
             f"task.validation={dev}", "epochs=2", *FINETUNE_FAST)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    best = json.loads((tmp_path / "ner" / "results.json").read_text())["best"]
    assert 0.0 <= best["f1"] <= 1.0 and 0.0 <= best["precision"] <= 1.0 and 0.0 <= best["accuracy"] <= 1.0

    qa = []
    for i in range(40):  # contexts longer than one 64-token window: the answer lands in varied windows
        filler = [" ".join(rng.choice(TINY_WORDS, size=8).tolist()) + " ." for _ in range(12)]
        k = int(rng.integers(0, len(filler)))
        filler[k] = "the green house came north ."
        context = " ".join(filler)
        answers = {"text": ["the green house"], "answer_start": [context.index("the green house")]}
        qa.append({"id": str(i), "question": "what came north ?", "context": context, "answers": answers})
    train, dev = _jsonl(tmp_path / "qa_train.jsonl", qa[:30]), _jsonl(tmp_path / "qa_dev.jsonl", qa[30:])
    r = _run(f"pretrained={tiny}", f"run_dir={tmp_path / 'qa'}", "finetune=qa", f"task.train={train}",
             f"task.validation={dev}", "epochs=1", "task.doc_stride=16", "task.max_query_length=16",
             *FINETUNE_FAST)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    best = json.loads((tmp_path / "qa" / "results.json").read_text())["best"]
    assert 0.0 <= best["exact_match"] <= 100.0 and 0.0 <= best["f1"] <= 100.0
    r = _run(f"run_dir={tmp_path / 'qa'}", "pretrained=unused", "mode=predict", f"predict_file={dev}", *FINETUNE_FAST)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    preds = [json.loads(x) for x in (tmp_path / "qa" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 10 and all(isinstance(p["prediction"], str) for p in preds)


@pytest.mark.slow
def test_export_gives_the_same_first_loss_and_resume_the_same_weights(tiny, tmp_path):
    import torch

    train, dev = classification_task(tmp_path)
    task = ["finetune=classification", f"task.train={train}", f"task.validation={dev}", "task.text_column=text",
            "epochs=2", *FINETUNE_FAST]  # fmt: skip

    def first_loss(run: Path) -> float:
        return next(r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                    if r["kind"] == "train")  # fmt: skip

    for name, model in (("from_run", tiny), ("from_hf", tiny / "hf")):
        r = _run(f"pretrained={model}", f"run_dir={tmp_path / name}", *task, "trainer.stop_at_step=1")
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert first_loss(tmp_path / "from_hf") == pytest.approx(first_loss(tmp_path / "from_run"), rel=1e-5)

    def weights(run: Path) -> dict:
        tag = sorted((run / "checkpoints").glob("step*"))[-1]
        return torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]

    r = _run(f"pretrained={tiny}", f"run_dir={tmp_path / 'whole'}", *task)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for stop in ("trainer.stop_at_step=3", "trainer.stop_at_step=null"):  # mid-epoch stop, then to the end
        r = _run(f"pretrained={tiny}", f"run_dir={tmp_path / 'resumed'}", *task, stop)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = _run(
        f"run_dir={tmp_path / 'whole'}", "pretrained=unused", "mode=predict", f"predict_file={dev}", *FINETUNE_FAST
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and set(preds) <= {"yes", "no"}
    # RUN_DIR/best is a Hugging Face directory: transformers' BertForSequenceClassification gives the same logits.
    import transformers

    from pretrain.finetune.loop import load_task_model

    best = tmp_path / "whole" / "best"
    ours, theirs = load_task_model(best), transformers.BertForSequenceClassification.from_pretrained(best).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def _best_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "best" / "model.safetensors")


@pytest.mark.slow
def test_two_ranks_under_zero3_write_the_whole_best_model(tiny, tmp_path, deepspeed_cpu_comm):
    """Two gloo ranks: ZeRO-3's partitioned fine-tuning ends with ZeRO-0's weights (up to reduction order; the
    same ranks draw the same dropout), and its best/ holds whole tensors (from the epoch checkpoint's master
    weights, not the partitioned module)."""
    import torch

    train, dev = classification_task(tmp_path)
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
    task = [f"pretrained={tiny}", "finetune=classification", f"task.train={train}", f"task.validation={dev}",
            "task.text_column=text", "epochs=2", "trainer.log_every=1", "optim.lr=1e-3", "trainer.max_seq_length=64",
            "trainer.global_batch_size=16", "trainer.micro_batch_size=8"]  # fmt: skip
    zero3 = ["deepspeed=zero3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]  # all split
    runs = {"zero0": ["deepspeed=zero0"], "zero3": zero3}
    for name, extra in runs.items():
        argv = [*deepspeed, str(free_port()), FINETUNE, f"run_dir={tmp_path / name}", *task, *extra]
        r = subprocess.run(argv, capture_output=True, text=True, env=run_env(), timeout=600, cwd=ROOT)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    zero0, zero3 = (_best_weights(tmp_path / n) for n in runs)
    assert zero0.keys() == zero3.keys()
    for k in zero0:
        assert zero3[k].shape == zero0[k].shape and zero3[k].dtype == torch.float32, k
        torch.testing.assert_close(zero3[k], zero0[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_stop_before_best_is_written_is_recovered_on_resume(tiny, tmp_path):
    """Killed after the best epoch's checkpoint but before best/ was written (here: best/ removed after the
    run): the resumed run writes best/ from that checkpoint, the same weights. In bf16: best/ holds the fp32
    master weights of the checkpoint, not the bf16 module."""
    import torch

    train, dev = classification_task(tmp_path)
    args = [f"pretrained={tiny}", f"run_dir={tmp_path / 'run'}", "finetune=classification", f"task.train={train}",
            f"task.validation={dev}", "task.text_column=text", "epochs=1", "trainer.precision=bf16",
            *FINETUNE_FAST]  # fmt: skip
    r = _run(*args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    before = _best_weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in before.values())
    import shutil

    shutil.rmtree(tmp_path / "run" / "best")
    r = _run(*args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "resumed from" in r.stdout
    after = _best_weights(tmp_path / "run")
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


@pytest.mark.slow
def test_a_directory_saved_by_transformers_fine_tunes(tiny, tmp_path):
    """The layout of the original BERT checkpoints on the hub (``BertForPreTraining.save_pretrained``: pooler, NSP
    and MLM heads, vocab.txt only): the task model's encoder and pooler compute what transformers' do, and a
    fine-tuning run on it completes."""
    import shutil

    import torch
    from transformers import BertConfig, BertForPreTraining

    from pretrain.checkpoint.weights import load_model
    from pretrain.finetune.heads import from_pretrained

    vocab = (tiny / "hf" / "vocab.txt").read_text().splitlines()
    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
    hf.save_pretrained(tmp_path / "bert")
    shutil.copy(tiny / "hf" / "vocab.txt", tmp_path / "bert" / "vocab.txt")
    ours = from_pretrained(load_model(str(tmp_path / "bert")).model, "classification", 2).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 14, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        theirs = hf.bert(input_ids=ids, attention_mask=mask)
        hidden = ours.bert(ids, None, mask)
        torch.testing.assert_close(hidden[mask.bool()], theirs.last_hidden_state[mask.bool()], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bert.pooler(hidden[:, 0]), theirs.pooler_output, rtol=1e-4, atol=1e-5)
    train, dev = classification_task(tmp_path)
    r = _run(f"pretrained={tmp_path / 'bert'}", f"run_dir={tmp_path / 'run'}", "finetune=classification",
             f"task.train={train}", f"task.validation={dev}", "task.text_column=text", "epochs=1",
             *FINETUNE_FAST)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert 0.0 <= json.loads((tmp_path / "run" / "results.json").read_text())["best"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path):
    train, dev = classification_task(tmp_path)
    base = [f"run_dir={tmp_path / 'r'}", "finetune=classification", f"task.train={train}", f"task.validation={dev}",
            *FINETUNE_FAST]  # fmt: skip
    long_text = write_csv(tmp_path / "long.csv", [(" ".join(["river"] * 200), "yes")] * 4)
    cases = {
        "label column": ([f"pretrained={tiny}", *base, "task.text_column=text", "task.label_column=stars"], "stars"),
        "label outside": ([f"pretrained={tiny}", *base, "task.text_column=text", "task.labels=[no]"], "'yes'"),
        "no model": ([f"pretrained={tmp_path / 'nope'}", *base, "task.text_column=text"], "not found"),
        "too long": (
            [
                f"pretrained={tiny}",
                *base[:2],
                f"task.train={long_text}",
                f"task.validation={long_text}",
                "task.text_column=text",
                "task.truncate=false",
                *FINETUNE_FAST,
            ],
            "max_length",
        ),  # fmt: skip
        "no model given": ([*base, "task.text_column=text"], "pretrained"),
    }
    for what, (args, needle) in cases.items():
        r = _run(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, (what, r.stdout[-1000:], r.stderr[-2000:])
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (what, err)


def _task_batches(lengths: np.ndarray, rank: int, world: int, group: bool, seed: int = 7):
    from types import SimpleNamespace

    from pretrain.finetune.loop import TaskBatches

    data = SimpleNamespace(train=[{"input_ids": [0] * n} for n in lengths])
    trainer = SimpleNamespace(global_batch_size=32, micro_batch_size=8)
    return TaskBatches(data, SimpleNamespace(seed=seed, group_by_length=group, trainer=trainer), rank, world)


def test_length_grouped_batches_hold_every_row_and_pad_less():
    """group_by_length: the same rows per epoch as the plain shuffle (the last step wraps), batches cut from runs
    of global batches sorted by length, seeded per (seed, epoch); a step holds the same samples for 1 or 2 ranks."""
    from pretrain.finetune.loop import GROUP_STEPS

    lengths = np.random.default_rng(0).integers(5, 120, size=1000)
    one = _task_batches(lengths, 0, 1, True)
    two = [_task_batches(lengths, r, 2, True) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 32 and one.accum == 4 and two[0].accum == 2
    for step in range(one.steps_per_epoch):  # the samples of a step do not depend on the number of ranks
        mine = np.concatenate(one.micro_batches(3, step))
        ours = np.concatenate([b for t in two for b in t.micro_batches(3, step)])
        np.testing.assert_array_equal(mine, ours)
    plain = _task_batches(lengths, 0, 1, False)
    rows = {g: np.sort(t.plan(3).reshape(-1)) for g, t in (("plain", plain), ("grouped", one))}
    np.testing.assert_array_equal(rows["plain"], rows["grouped"])
    assert set(rows["grouped"].tolist()) == set(range(1000))
    assert one.padding(True) < 0.1 < 0.3 < one.padding(False)
    run = one.plan(3)[:GROUP_STEPS]  # the first run of GROUP_STEPS global batches: its rows sorted, then cut
    cut = np.sort(lengths[run.reshape(-1)])[::-1].reshape(-1, 32)
    assert sorted(map(tuple, cut)) == sorted(tuple(np.sort(lengths[b])[::-1]) for b in run)
    np.testing.assert_array_equal(one.plan(3), _task_batches(lengths, 0, 1, True).plan(3))
    assert not np.array_equal(one.plan(3), one.plan(4))
    batches = _task_batches(lengths, 0, 1, True)  # the position: every micro-batch once, then the next epoch
    batches.data.collate = len
    assert sum(batches() for _ in range(4 * batches.steps_per_epoch)) == 32 * 32 and batches.epoch_done
    batches.load_state_dict({"epoch": 1, "step": 5})
    assert batches.state_dict() == {"epoch": 1, "step": 5} and not batches.epoch_done


# ------------------------------------------------------------------- pretraining pays: a model pretrained on books


def _book_sentences(book: Path, min_words: int, max_words: int) -> list[str]:
    """Sentences of ``min_words``-``max_words`` words from a Gutenberg book, past the licence and front matter."""
    import gzip
    import re

    text = gzip.open(book, "rt", encoding="utf-8-sig").read()
    body = text.split("*** START OF", 1)[-1].split("*** END OF", 1)[0]
    sentences = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", body))
    return [s.strip() for s in sentences if min_words <= len(s.split()) <= max_words][200:]


def _word_order_task(books: list[Path], tmp: Path, n_train: int, n_dev: int) -> tuple[Path, Path]:
    """Is the sentence as written, or are its inner words shuffled (first and last kept, so neither the capital
    nor the full stop gives it away)? The same words either way: a bag of words learns nothing, only a model that
    knows which orders English uses can tell them apart."""
    rng = np.random.default_rng(0)
    per_book = (n_train + n_dev) // len(books)
    sentences = [s for b in books for s in _book_sentences(b, 8, 20)[:per_book]]
    rows = []
    for i, s in enumerate(sentences):
        words = s.split()
        if i % 2:
            inner = words[1:-1]
            rng.shuffle(inner)
            rows.append((" ".join([words[0], *inner, words[-1]]), "shuffled"))
        else:
            rows.append((s, "original"))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return write_csv(tmp / "train.csv", rows[:n_train]), write_csv(tmp / "dev.csv", rows[n_train:])


@pytest.mark.slow
@pytest.mark.long
def test_pretrained_encoder_beats_random_initialisation(books_run, shared_data, tmp_path):
    """Word order of sentences from the pretraining books (unlabelled text the encoder has read; the labels are
    new): fine-tuned from the books model, accuracy 0.82 on 400 held-out sentences here; the same fine-tuning
    from random initialisation stays near chance (0.57), since the two classes share every word. A which-book
    task is no such test: a bag of words from scratch separates two books as well (docs/benchmarks.md)."""

    books = [shared_data / "books" / f"{b}.txt.gz" for b in BOOKS_RUN_BOOKS]
    train, dev = _word_order_task(books, tmp_path, n_train=2000, n_dev=400)
    common = [f"task.train={train}", f"task.validation={dev}", "task.text_column=text", "epochs=4", "optim.lr=5e-4",
              "trainer.micro_batch_size=16", "trainer.global_batch_size=16", "trainer.max_seq_length=32"]  # fmt: skip
    best, procs = {}, {}
    for name, extra in (("pretrained", []), ("random", ["random_init=true"])):  # side by side, a core each
        argv = [sys.executable, FINETUNE, f"pretrained={books_run}", f"run_dir={tmp_path / name}", *common, *extra]
        procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(),
                                       cwd=ROOT)  # fmt: skip
    for name, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        best[name] = json.loads((tmp_path / name / "results.json").read_text())["best"]["accuracy"]
    assert best["pretrained"] >= 0.70, best
    assert best["pretrained"] >= best["random"] + 0.12, best
