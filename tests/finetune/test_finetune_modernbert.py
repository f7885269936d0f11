"""Task models of both families and fine-tuning ModernBERT (issue 26): the registry of kinds x families, the task
models against transformers' own task classes (same keys, same logits), and every task kind fine-tuned from a
directory transformers itself wrote (``ModernBertForMaskedLM.save_pretrained``, random weights), exported, and
reloaded by transformers' ``AutoModelFor*`` with the same logits. The runs go through the launcher's own ``_run``
in this process: a launcher per run would cost more in start-up than the tiny runs themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # a dev dependency: the reference implementation

from pretrain.finetune import heads
from pretrain.finetune.heads import KINDS, from_pretrained
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.modernbert import ModernBertConfig, ModernBertForMaskedLM
from tests.helpers import FINETUNE, FINETUNE_FAST, ROOT, TINY_WORDS, classification_task

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *TINY_WORDS]  # the task data's every word
NUM_LABELS = {"classification": 3, "regression": 1, "ner": 5, "qa": 2}
HF_CLASS = {"classification": "SequenceClassification", "regression": "SequenceClassification",
            "ner": "TokenClassification", "qa": "QuestionAnswering"}  # fmt: skip


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter (norm weights and biases included) moved off its init, so nothing agrees by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows (lengths 24, 17, 6) that start with [CLS]: longer than the 8-token window."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, 24), generator=g)
    ids[:, 0] = 2
    mask = (torch.arange(24)[None] < torch.tensor([24, 17, 6])[:, None]).long()
    return ids * mask, mask


def _hf_logits(out, kind: str) -> torch.Tensor:
    """transformers' output as our task model returns logits."""
    if kind == "qa":
        return torch.stack([out.start_logits, out.end_logits], -1)  # [B, L, 2]
    return out.logits.squeeze(-1) if kind == "regression" else out.logits


def _same_logits(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor, tol: float) -> None:
    if ours.dim() == 3:  # per token: the real ones (at padding ours are zeros-in, HF's attend anyway)
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- the heads against transformers'


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_modernbert_task_models_are_transformers_task_classes(pooling):
    """For every kind: the state dict loads strictly into transformers' ModernBertFor<Task> (the same names, no
    more, no fewer), the logits agree in eval mode, the MLM head is what the task head starts from (as HF's
    from_pretrained of a task class takes ``head.*``), the classifier starts as HF's init, and the pooling and
    dropout fields round-trip through transformers' config."""
    config = ModernBertConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, local_attention=8, global_attn_every_n_layers=2,
                              classifier_pooling=pooling, classifier_dropout=0.1)  # fmt: skip
    torch.manual_seed(0)
    encoder = ModernBertForMaskedLM(config)
    _randomise(encoder, 1)
    ids, mask = _batch(len(VOCAB))
    for kind in KINDS:
        n = NUM_LABELS[kind]
        ours = from_pretrained(encoder, kind, n).eval()
        torch.testing.assert_close(ours.head.dense.weight, encoder.head.dense.weight, rtol=0, atol=0)
        assert (
            ours.classifier.weight.std().item() == pytest.approx(32**-0.5, rel=0.3) and not ours.classifier.bias.any()
        )
        _randomise(ours.classifier, 2)
        hf_config = transformers.ModernBertConfig(**{**config.to_hf_dict(), "num_labels": n})
        assert (hf_config.classifier_pooling, hf_config.classifier_dropout) == (pooling, 0.1)
        assert ModernBertConfig.from_hf_dict(hf_config.to_dict()) == config
        hf_config._attn_implementation = "eager"  # the plain reference
        theirs = getattr(transformers, f"ModernBertFor{HF_CLASS[kind]}")(hf_config).eval()
        sd = {k: v[: len(VOCAB)] if k in ours.vocab_keys else v for k, v in ours.state_dict().items()}
        theirs.load_state_dict(sd, strict=True)
        assert ours.hf_class == type(theirs).__name__
        with torch.no_grad():
            _same_logits(ours(ids, None, mask).logits, _hf_logits(theirs(input_ids=ids, attention_mask=mask), kind),
                         mask, 1e-5)  # fmt: skip
        ours.train()
        with torch.no_grad():  # classifier_dropout acts in training (HF's ``drop``)
            assert not torch.equal(ours(ids, None, mask).logits, ours(ids, None, mask).logits)


@pytest.mark.parametrize("nsp", [True, False])
def test_bert_task_models_are_transformers_task_classes(nsp):
    """The same for BERT: pooler (pretrained, or fresh for an MLM-only encoder), dropout, classifier or
    qa_outputs load strictly into BertFor<Task> and give its logits."""
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, nsp=nsp)  # fmt: skip
    torch.manual_seed(0)
    encoder = BertForPreTraining(config)
    _randomise(encoder, 1)
    ids, mask = _batch(len(VOCAB))
    for kind in KINDS:
        n = NUM_LABELS[kind]
        ours = from_pretrained(encoder, kind, n).eval()
        if nsp and kind in ("classification", "regression"):
            torch.testing.assert_close(ours.bert.pooler.dense.weight, encoder.bert.pooler.dense.weight)
        hf_config = transformers.BertConfig(**{**config.to_hf_dict(), "num_labels": n})
        hf_config._attn_implementation = "eager"
        theirs = getattr(transformers, f"BertFor{HF_CLASS[kind]}")(hf_config).eval()
        sd = {k: v[: len(VOCAB)] if k in ours.vocab_keys else v for k, v in ours.state_dict().items()}
        theirs.load_state_dict(sd, strict=True)  # no pooler on token and span heads, as HF's
        assert ours.hf_class == type(theirs).__name__
        with torch.no_grad():
            _same_logits(ours(ids, None, mask).logits, _hf_logits(theirs(input_ids=ids, attention_mask=mask), kind),
                         mask, 1e-5)  # fmt: skip


# ------------------------------------------------------------------ the registry: kinds x families


def test_kinds_registry_names_metrics_hf_classes_and_heads() -> None:
    """Every kind on either family: the task model of the config's family, HF's attribute names and class name,
    the head's width and the logits' shape."""
    assert list(KINDS) == ["classification", "regression", "ner", "qa"] and heads.KINDS is KINDS
    assert {k: (v.name, v.metric, v.hf_task, v.level, v.classes) for k, v in KINDS.items()} == {
        "classification": ("classification", "accuracy", "SequenceClassification", "sequence", True),
        "regression": ("regression", "pearson", "SequenceClassification", "sequence", False),
        "ner": ("ner", "f1", "TokenClassification", "token", True),
        "qa": ("qa", "f1", "QuestionAnswering", "span", False),
    }
    assert "nope" not in heads.KINDS  # config.py's check
    assert set(heads.TASK_MODELS) == {"bert", "modernbert"}
    configs = {
        "bert": BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, nsp=False),
        "modernbert": ModernBertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32),
    }  # fmt: skip
    encoder = {"bert": "bert.", "modernbert": "model."}
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    mask = (ids != 0).long()
    shapes = {"classification": (2, 3), "regression": (2,), "ner": (2, 4, 3), "qa": (2, 4, 2)}
    for family, config in configs.items():
        for name, kind in KINDS.items():
            model = heads.task_model(config, name, 3).eval()
            assert type(model) is heads.TASK_MODELS[family]
            out = "qa_outputs" if (family, name) == ("bert", "qa") else "classifier"  # HF's attribute names
            head = {k for k in model.state_dict() if not k.startswith(encoder[family])}
            if family == "bert":
                # an MLM-only encoder: a new pooler for [CLS] heads
                assert (model.bert.pooler is not None) == (kind.level == "sequence")
                assert head == {f"{out}.weight", f"{out}.bias"}
            else:  # the prediction head (dense, norm without bias) before every kind's classifier
                assert head == {"head.dense.weight", "head.norm.weight", f"{out}.weight", f"{out}.bias"}
            assert model.state_dict()[f"{out}.bias"].shape == (kind.head_size(3),)
            assert model.hf_class == {"bert": "Bert", "modernbert": "ModernBert"}[family] + "For" + kind.hf_task
            assert tuple(model(ids, None, mask).logits.shape) == shapes[name]
    with pytest.raises(ValueError, match="use one of classification, regression, ner, qa"):
        heads.task_model(configs["bert"], "nope")


# ----------------------------------------------------- fine-tuning a directory transformers wrote, end to end


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory) -> Path:
    """A tiny random ModernBERT as transformers saves it (``ModernBertForMaskedLM.save_pretrained``: its own
    config.json keys, the tied decoder left out), with our tokenizer files (vocab.txt and an uncased
    tokenizer_config.json) beside it: the layout of a published checkpoint, at test size."""
    d = tmp_path_factory.mktemp("hf_modernbert")
    config = transformers.ModernBertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, intermediate_size=96, local_attention=16,
                                           global_attn_every_n_layers=3, max_position_embeddings=128,
                                           pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2,
                                           eos_token_id=3, classifier_pooling="mean")  # fmt: skip
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(config).save_pretrained(d)
    (d / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB))
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return d


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_finetune_inproc", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs the preemption handlers: _entry puts the test's back
    return module


def _entry(*overrides: str) -> int:
    """``launch/finetune.py``'s own ``_run`` on the composed config (the launcher's config handling, then train or
    predict), in this process, as a fresh process would run it: environment and signal handlers restored after
    (the run sets RANK, a port...), and no process group left behind."""
    import deepspeed.utils.groups
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    saved_sig = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as run_env(): the CPU path, also on a GPU machine
    try:
        launcher = _launcher()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("finetune", overrides=[*overrides, "logger=none"])
        return launcher._run(cfg)
    finally:
        if dist.is_initialized():  # a run that raised before its shutdown
            dist.destroy_process_group()
        # DeepSpeed clones the world group once per process and keeps it; the next run's group is a new one
        deepspeed.utils.groups._WORLD_GROUP = None
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)  # the run sets its own (set_threads)
        for s, h in saved_sig.items():
            signal.signal(s, h)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tasks(tmp: Path) -> dict[str, list[str]]:
    """The small task data of the BERT tests (tests/finetune/test_finetune.py), one set of overrides per kind."""
    rng = np.random.default_rng(1)
    train, dev = classification_task(tmp)
    rows = []
    for _ in range(64):
        words = rng.choice(TINY_WORDS, size=int(rng.integers(4, 10))).tolist()
        rows.append({"text": " ".join(words), "label": float(words.count("river") + words.count("city"))})
    reg = _jsonl(tmp / "reg_train.jsonl", rows[:48]), _jsonl(tmp / "reg_dev.jsonl", rows[48:])
    tag = {"river": "B-LOC", "city": "B-LOC", "north": "B-DIR"}
    ner = []
    for _ in range(48):
        words = rng.choice(TINY_WORDS, size=int(rng.integers(4, 9))).tolist()
        ner.append({"tokens": words, "tags": [tag.get(w, "O") for w in words]})
    ner = _jsonl(tmp / "ner_train.jsonl", ner[:32]), _jsonl(tmp / "ner_dev.jsonl", ner[32:])
    qa = []
    for i in range(24):  # contexts longer than one window: the answer lands in varied windows
        filler = [" ".join(rng.choice(TINY_WORDS, size=8).tolist()) + " ." for _ in range(8)]
        filler[int(rng.integers(0, len(filler)))] = "the green house came north ."
        context = " ".join(filler)
        answers = {"text": ["the green house"], "answer_start": [context.index("the green house")]}
        qa.append({"id": str(i), "question": "what came north ?", "context": context, "answers": answers})
    qa = _jsonl(tmp / "qa_train.jsonl", qa[:16]), _jsonl(tmp / "qa_dev.jsonl", qa[16:])
    return {
        "classification": ["finetune=classification", f"task.train={train}", f"task.validation={dev}",
                           "task.text_column=text", "epochs=3"],
        "regression": ["finetune=regression", f"task.train={reg[0]}", f"task.validation={reg[1]}",
                       "task.text_column=text", "epochs=2"],
        "ner": ["finetune=ner", f"task.train={ner[0]}", f"task.validation={ner[1]}", "epochs=2"],
        "qa": ["finetune=qa", f"task.train={qa[0]}", f"task.validation={qa[1]}", "epochs=1", "task.doc_stride=16",
               "task.max_query_length=16"],
    }  # fmt: skip


def _train_losses(run: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]


def _check_export(best: Path, kind: str) -> None:
    """RUN_DIR/best is a transformers directory of the kind's ModernBERT class: AutoModelFor<Task> builds exactly
    that class from it, loads every tensor, and gives the logits of our reloaded task model within 1e-4."""
    from pretrain.finetune.loop import load_task_model

    hf = json.loads((best / "config.json").read_text())
    assert hf["model_type"] == "modernbert" and hf["architectures"] == [f"ModernBertFor{HF_CLASS[kind]}"]
    auto = {"SequenceClassification": transformers.AutoModelForSequenceClassification,
            "TokenClassification": transformers.AutoModelForTokenClassification,
            "QuestionAnswering": transformers.AutoModelForQuestionAnswering}[HF_CLASS[kind]]  # fmt: skip
    theirs, info = auto.from_pretrained(best, output_loading_info=True)
    assert type(theirs).__name__ == f"ModernBertFor{HF_CLASS[kind]}"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = load_task_model(best)
    assert type(ours).__name__ == "ModernBertForTask" and ours.config.classifier_pooling == "mean"
    ids, mask = _batch(len(VOCAB))
    with torch.no_grad():
        _same_logits(ours(ids, None, mask).logits, _hf_logits(theirs.eval()(input_ids=ids, attention_mask=mask), kind),
                     mask, 1e-4)  # fmt: skip


def test_a_modernbert_saved_by_transformers_fine_tunes_every_kind(modernbert_dir, tmp_path):
    """pretrained= a directory transformers wrote: classification, regression, NER and QA each train (the loss
    falls, the metric ends above chance: here 0.88 accuracy where the majority class is 0.62, Pearson 0.70, NER
    F1 1.0, QA F1 63), write best/ that transformers' own classes reproduce, and mode=predict labels a file with
    it. About 10 s: four tiny runs in this process."""
    chance = {"classification": 0.63, "regression": 0.3, "ner": 0.5, "qa": 20.0}
    tasks = _tasks(tmp_path)
    for kind, overrides in tasks.items():
        run = tmp_path / kind
        code = _entry(f"pretrained={modernbert_dir}", f"run_dir={run}", *overrides, *FINETUNE_FAST)
        assert code == 0, kind
        losses = _train_losses(run)
        assert np.mean(losses[-2:]) < losses[0], (kind, losses)
        best = json.loads((run / "results.json").read_text())["best"]
        assert best[KINDS[kind].metric] > chance[kind], (kind, best)
        _check_export(run / "best", kind)
    for kind in ("classification", "qa"):  # predictions from best/: class names, answer strings
        dev = next(o.split("=", 1)[1] for o in tasks[kind] if o.startswith("task.validation="))
        code = _entry(f"run_dir={tmp_path / kind}", "pretrained=unused", "mode=predict", f"predict_file={dev}",
                      *FINETUNE_FAST)  # fmt: skip
        assert code == 0, kind
        preds = [json.loads(x)["prediction"] for x in (tmp_path / kind / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == {"classification": 24, "qa": 8}[kind]
        assert set(preds) <= {"yes", "no"} if kind == "classification" else all(isinstance(p, str) for p in preds)
