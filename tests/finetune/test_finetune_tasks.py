"""Fine-tuning data and metrics (pretrain/finetune/tasks.py, spans.py, metrics.py, kinds.py): readers, label maps,
encoders, QA windows and their post-processing, metrics against hand-computed and published reference values, and
each kind's encode/decode/score round trip (the kinds x families registry: test_finetune_modernbert.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_prep.vocab import SPECIALS, build_tokenizer
from pretrain.finetune import metrics as M
from pretrain.finetune.kinds import KINDS
from pretrain.finetune.spans import decode_ner, encode_ner, encode_qa, postprocess_qa
from pretrain.finetune.tasks import (
    IGNORE,
    LabelMap,
    Specials,
    TaskError,
    _hub_name,
    collate,
    encode_pairs,
    read_conll,
    read_table,
    regression_targets,
)

WORDS = (
    ". , ? ' the cat sat on a mat dog ran in park who what lives john smith london paris is capital of france "
    "un ##believ ##able new york"
).split() + [f"w{k}" for k in range(60)]
VOCAB = SPECIALS + WORDS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer({t: i for i, t in enumerate(VOCAB)}, lowercase=True)


@pytest.fixture(scope="module")
def sp() -> Specials:
    return Specials.from_vocab(VOCAB)


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------------ readers


def test_read_csv_tsv_jsonl_json_parquet(tmp_path: Path) -> None:
    rows = [{"sentence": 'the cat, "sat"', "label": "1"}, {"sentence": "a dog ran", "label": "0"}]
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["sentence", "label"])
        w.writeheader()
        w.writerows(rows)
    assert read_table(str(tmp_path / "t.csv"), None, ["sentence", "label"]) == rows
    # GLUE .tsv: quotes are part of the text, never CSV quoting.
    (tmp_path / "t.tsv").write_text("sentence\tlabel\nit's \"great\t1\n", encoding="utf-8")
    assert read_table(str(tmp_path / "t.tsv"), None, ["sentence"]) == [{"sentence": "it's \"great"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({**r, "x": 1}) for r in rows) + "\n\n")
    assert read_table(str(tmp_path / "t.jsonl"), None, ["sentence", "label"]) == rows
    (tmp_path / "t.json").write_text(json.dumps(rows))
    assert read_table(str(tmp_path / "t.json"), None, ["label"]) == [{"label": "1"}, {"label": "0"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": ["x", "y"], "label": [1, 0]}), tmp_path / "t.parquet")
    assert read_table(str(tmp_path / "t.parquet"), None, ["label"]) == [{"label": 1}, {"label": 0}]
    # A folder: the split picks the file.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert read_table(str(tmp_path / "d"), "validation", ["label"]) == [{"label": "1"}]


def test_read_squad_json_flattens_questions(tmp_path: Path) -> None:
    doc = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "john lives in paris",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "who lives in paris?",
                                "answers": [{"text": "john", "answer_start": 0}],
                            },
                            {"id": "q2", "question": "where?", "answers": [{"text": "paris", "answer_start": 14}]},
                        ],
                    }
                ],
            }
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(doc))
    rows = read_table(str(tmp_path / "squad.json"), "train", ["id", "context", "answers"])
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[1]["answers"] == {"text": ["paris"], "answer_start": [14]}
    assert rows[0]["context"] == "john lives in paris"


def test_read_errors_name_file_column_row(tmp_path: Path) -> None:
    f = tmp_path / "train.csv"
    f.write_text("text,gold\nthe cat,1\n")
    with pytest.raises(TaskError) as e:
        read_table(str(f), "train", ["text", "label"])
    msg = str(e.value)
    assert str(f) in msg and "'label'" in msg and "text, gold" in msg and "\n" not in msg
    f.write_text("")
    with pytest.raises(TaskError, match="no rows"):
        read_table(str(f), None, ["text"])
    f.write_text("text,label\n")  # a header and nothing else
    with pytest.raises(TaskError, match="no rows"):
        read_table(str(f), None, ["text"])
    f.write_text("text,label\nthe cat,1\nthe dog\n")
    with pytest.raises(TaskError, match=r"row 2 .*1 fields, the header 2"):
        read_table(str(f), None, ["text"])
    with pytest.raises(TaskError, match="file not found"):
        read_table(str(tmp_path / "nope.csv"), None, ["text"])
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(TaskError, match=r"t.jsonl: row 2 has no field 'label'"):
        read_table(str(j), None, ["text", "label"])
    j.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(TaskError, match="line 2 is not JSON"):
        read_table(str(j), None, ["text"])
    with pytest.raises(TaskError, match="needs a split"):
        read_table("glue/sst2", None, ["sentence"])


def test_hub_names_and_hub_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _hub_name("glue/sst2") == ("glue", "sst2")
    assert _hub_name("squad") == ("squad", None)
    assert _hub_name("rajpurkar/squad") == ("rajpurkar/squad", None)
    assert _hub_name("nyu-mll/glue/mrpc") == ("nyu-mll/glue", "mrpc")
    assert _hub_name("hf:conll2003:conll2003") == ("conll2003", "conll2003")
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):  # the hub is out of reach in tests: same call, local rows
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_table("glue/sst2", "train", ["sentence", "label"]) == [
        {"sentence": "a", "label": 0},
        {"sentence": "b", "label": 1},
    ]
    assert calls == [("glue", "sst2", "train")]
    with pytest.raises(TaskError, match=r"glue/sst2 \(train\): no column 'text' \(columns: sentence, label, idx\)"):
        read_table("glue/sst2", "train", ["text"])
    # NER tag sequences come back as names (entity metrics need the B-/I- prefixes).
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
        }
    )
    data = {"tokens": [["John", "Smith", "ran"]], "ner_tags": [[1, 2, 0]]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(data, features=features))
    assert read_table("some/ner", "train", ["tokens", "ner_tags"]) == [
        {"tokens": ["John", "Smith", "ran"], "ner_tags": ["B-PER", "I-PER", "O"]}
    ]


def test_read_conll(tmp_path: Path) -> None:
    f = tmp_path / "ner.txt"
    f.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nJohn\tB-PER\nSmith\tI-PER\n")
    assert read_conll(f) == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
        {"tokens": ["John", "Smith"], "tags": ["B-PER", "I-PER"]},
    ]
    assert read_table(str(f), None, ["tokens"]) == [{"tokens": ["EU", "rejects"]}, {"tokens": ["John", "Smith"]}]
    f.write_text("John\tB-PER\nSmith\n")
    with pytest.raises(TaskError, match="line 2 has no tag"):
        read_conll(f)
    f.write_text("\n\n")
    with pytest.raises(TaskError, match="no sentences"):
        read_conll(f)


# ------------------------------------------------------------------------------------------------------- labels


def test_label_map_declared_inferred_and_errors() -> None:
    assert LabelMap.infer(["10", 2, "1", 2.0, np.int64(1)]).labels == ("1", "2", "10")  # one class per value
    assert LabelMap.infer(["neg", "pos", "neg"]).labels == ("neg", "pos")
    lm = LabelMap.build(["pos", "neg"], ["neg"])  # declared order wins
    assert lm.encode(["neg", "pos"], "f.csv").tolist() == [1, 0] and lm.num_labels == 2
    assert lm.decode([0, 1]) == ["pos", "neg"]
    with pytest.raises(TaskError) as e:
        lm.encode(["pos", "neg", "neutral"], "data/train.csv")
    assert "data/train.csv" in str(e.value) and "row 3" in str(e.value) and "'neutral'" in str(e.value)
    with pytest.raises(TaskError, match="more than once"):
        LabelMap.declared(["a", "b", "a"])
    assert regression_targets(["3.5", 1, 0.25], "s.tsv").tolist() == [3.5, 1.0, 0.25]
    with pytest.raises(TaskError, match=r"s.tsv: row 2: label 'high' is not a number"):
        regression_targets(["1", "high"], "s.tsv")
    with pytest.raises(TaskError, match="missing special token"):
        Specials.from_vocab(["[PAD]", "[CLS]", "the"])


# -------------------------------------------------------------------------------------------- pairs and collate


def test_encode_pairs_layout_matches_bert_template(tok, sp: Specials) -> None:
    a, b = ["The cat sat.", "a dog"], ["on the mat", "ran in the park?"]
    rows = encode_pairs(tok, sp, a, b, max_length=64, labels=np.array([1, 0]))
    for row, x, y in zip(rows, a, b, strict=True):
        ref = tok.encode(x, y)  # the tokenizer's own [CLS] A [SEP] B [SEP] post-processor
        assert row["input_ids"].tolist() == ref.ids and row["token_type_ids"].tolist() == ref.type_ids
        assert row["input_ids"].dtype == np.int64
    assert rows[0]["input_ids"].tolist() == [sp.cls, *ids_of(tok, a[0]), sp.sep, *ids_of(tok, b[0]), sp.sep]
    assert rows[0]["token_type_ids"].tolist() == [0] * 6 + [1] * 4
    assert [r["labels"] for r in rows] == [1, 0]
    single = encode_pairs(tok, sp, ["the cat"], max_length=8)[0]
    assert single["input_ids"].tolist() == [sp.cls, *ids_of(tok, "the cat"), sp.sep]
    assert single["token_type_ids"].tolist() == [0, 0, 0, 0]


def test_longest_first_truncation_matches_tokenizers(tok, sp: Specials) -> None:
    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_str(tok.to_str())
    for max_length in (5, 8, 11):
        ref_tok.enable_truncation(max_length, strategy="longest_first")
        for la in range(1, 10):
            for lb in range(1, 10):
                a, b = " ".join(f"w{k}" for k in range(la)), " ".join(f"w{30 + k}" for k in range(lb))
                ours = encode_pairs(tok, sp, [a], [b], max_length=max_length)[0]
                ref = ref_tok.encode(a, b)
                assert ours["input_ids"].tolist() == ref.ids, (max_length, la, lb)
                assert ours["token_type_ids"].tolist() == ref.type_ids
    # A single text keeps its beginning; the given tokenizer is left as it was.
    assert encode_pairs(tok, sp, ["w1 w2 w3 w4"], max_length=4)[0]["input_ids"].tolist() == [
        sp.cls,
        *ids_of(tok, "w1 w2"),
        sp.sep,
    ]
    assert tok.truncation is None


def test_too_long_without_truncation_names_row_and_length(tok, sp: Specials) -> None:
    with pytest.raises(TaskError) as e:
        encode_pairs(
            tok, sp, ["the cat", "w1 w2 w3 w4 w5"], ["a dog", "the mat"], max_length=8, truncate=False, source="dev.tsv"
        )
    assert str(e.value).startswith("dev.tsv: row 2: 10 tokens") and "max_length=8" in str(e.value)


def test_collate_pads_and_masks(tok, sp: Specials) -> None:
    rows = encode_pairs(tok, sp, ["the cat sat", "a"], max_length=16, labels=np.array([0.5, 2.0]))
    batch = collate(rows, sp.pad)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == np.int64
    assert batch["input_ids"][1].tolist() == [sp.cls, *ids_of(tok, "a"), sp.sep, sp.pad, sp.pad]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"].dtype == np.float32 and batch["labels"].tolist() == [0.5, 2.0]
    assert collate(rows, sp.pad, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    assert "labels" not in collate(rows, sp.pad, with_labels=False)


# ---------------------------------------------------------------------------------------------------------- NER


def test_ner_labels_on_first_piece_and_decode(tok, sp: Specials) -> None:
    lm = LabelMap.infer(["O", "B-PER", "I-PER", "B-LOC", "B-MISC"])
    rows = [
        {"tokens": ["John", "unbelievable", "york"], "tags": ["B-PER", "B-MISC", "B-LOC"]},
        {"tokens": ["Smith", "ran"], "tags": ["I-PER", "O"]},
    ]
    feats = encode_ner(tok, sp, rows, lm, max_length=16)
    f = feats[0]
    pieces = [VOCAB[i] for i in f["input_ids"]]
    assert pieces == ["[CLS]", "john", "un", "##believ", "##able", "york", "[SEP]"]
    assert f["word_ids"] == [None, 0, 1, 1, 1, 2, None]
    idx = lm.labels.index
    assert f["labels"].tolist() == [IGNORE, idx("B-PER"), idx("B-MISC"), IGNORE, IGNORE, idx("B-LOC"), IGNORE]
    batch = collate(feats, sp.pad)
    assert batch["labels"][1].tolist() == [IGNORE, idx("I-PER"), idx("O"), IGNORE] + [IGNORE] * 3  # padded -100
    # Predictions are read at each word's first piece (other positions deliberately wrong).
    preds = np.full(batch["labels"].shape, idx("O"))
    preds[batch["labels"] != IGNORE] = batch["labels"][batch["labels"] != IGNORE]
    decoded = decode_ner(preds, [x["word_ids"] for x in feats], lm, [x["num_words"] for x in feats])
    assert decoded == [r["tags"] for r in rows]
    # Truncation drops the last pieces; their words are decoded as O.
    cut = encode_ner(tok, sp, rows[:1], lm, max_length=4)[0]
    assert cut["word_ids"] == [None, 0, 1, None]
    assert decode_ner([[0, idx("B-PER"), idx("B-MISC"), 0]], [cut["word_ids"]], lm, [3]) == [["B-PER", "B-MISC", "O"]]
    with pytest.raises(TaskError, match=r"ner.jsonl: row 1: 7 tokens .* max_length=4"):
        encode_ner(tok, sp, rows[:1], lm, max_length=4, truncate=False, source="ner.jsonl")
    with pytest.raises(TaskError, match=r"ner.jsonl: row 2: label 'B-ORG' is not in the training data"):
        encode_ner(tok, sp, [rows[0], {"tokens": ["x"], "tags": ["B-ORG"]}], lm, source="ner.jsonl")
    with pytest.raises(TaskError, match="row 1: 2 words but 1 tags"):
        encode_ner(tok, sp, [{"tokens": ["a", "b"], "tags": ["O"]}], lm)
    assert "labels" not in encode_ner(tok, sp, [{"tokens": ["a"]}], lm)[0]  # predict mode: no tags


# ----------------------------------------------------------------------------------------------------------- QA

BEFORE = " ".join(f"w{k}" for k in range(26))
AFTER = " ".join(f"w{k}" for k in range(26, 60))
CONTEXT = f"{BEFORE} John Smith lives in London. {AFTER}"
QA_ROW = {
    "question": "Who lives in London?",
    "context": CONTEXT,
    "answers": {"text": ["John Smith"], "answer_start": [len(BEFORE) + 1]},
}


def test_qa_windows_answer_in_second_window(tok, sp: Specials) -> None:
    feats = encode_qa(tok, sp, [QA_ROW], max_length=32, doc_stride=8, max_query_length=16)
    # 5 question tokens leave 24 context tokens per window; 66 context tokens -> windows at 0, 16, 32, 48.
    assert len(feats) == 4 and all(f["example_index"] == 0 for f in feats)
    head = 2 + 5
    q = [sp.cls, *ids_of(tok, QA_ROW["question"]), sp.sep]
    ctx = ids_of(tok, CONTEXT)
    for k, f in enumerate(feats):
        assert f["input_ids"].tolist() == q + ctx[16 * k : 16 * k + 24] + [sp.sep]
        assert f["token_type_ids"].tolist() == [0] * head + [1] * (len(f["input_ids"]) - head)
        assert f["offsets"][:head] == [None] * head and f["offsets"][-1] is None
    assert feats[0]["input_ids"][-9:-1].tolist() == feats[1]["input_ids"][head : head + 8].tolist()  # the overlap
    # The answer is tokens 26-27 of the context: outside window 0, inside window 1 only.
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (0, 0)
    s, e = feats[1]["start_positions"], feats[1]["end_positions"]
    assert (s, e) == (head + 26 - 16, head + 27 - 16)
    assert [VOCAB[i] for i in feats[1]["input_ids"][s : e + 1]] == ["john", "smith"]
    assert CONTEXT[feats[1]["offsets"][s][0] : feats[1]["offsets"][e][1]] == "John Smith"
    assert all((f["start_positions"], f["end_positions"]) == (0, 0) for f in feats[2:])
    # Each context token has its maximum context in exactly one window.
    assert sum(sum(f["max_context"]) for f in feats) == len(ctx)
    # Logits peaking at the answer give back exactly the gold text (original case), other windows lower.
    width = max(len(f["input_ids"]) for f in feats)
    start_logits, end_logits = np.full((4, width), -10.0), np.full((4, width), -10.0)
    start_logits[1, s], end_logits[1, e] = 9.0, 8.0
    start_logits[0, head + 3], end_logits[0, head + 2] = 20.0, 20.0  # end before start: never a span
    assert postprocess_qa([QA_ROW], feats, start_logits, end_logits) == {0: "John Smith"}
    assert M.squad_metrics({0: "John Smith"}, {0: QA_ROW["answers"]["text"]}) == {"exact_match": 100.0, "f1": 100.0}


def test_qa_answer_cut_by_a_window_edge_points_at_cls(tok, sp: Specials) -> None:
    text = "w22 w23 w24"  # context tokens 22-24: window 0 ends after token 23, window 1 (16-39) holds them all
    row = {**QA_ROW, "answers": {"text": [text], "answer_start": [CONTEXT.index(text)]}}
    feats = encode_qa(tok, sp, [row], max_length=32, doc_stride=8, max_query_length=16)
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (0, 0)
    assert (feats[1]["start_positions"], feats[1]["end_positions"]) == (7 + 22 - 16, 7 + 24 - 16)


def test_qa_windows_match_hf_overflowing_tokens(tok, sp: Specials) -> None:
    import transformers
    from tokenizers import Tokenizer

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    ref = hf(
        QA_ROW["question"],
        CONTEXT,
        truncation="only_second",
        max_length=32,
        stride=8,
        return_overflowing_tokens=True,
        return_token_type_ids=True,
    )
    ours = encode_qa(tok, sp, [QA_ROW], max_length=32, doc_stride=8, max_query_length=16)
    assert [f["input_ids"].tolist() for f in ours] == ref["input_ids"]
    assert [f["token_type_ids"].tolist() for f in ours] == ref["token_type_ids"]


def test_qa_questions_offsets_and_errors(tok, sp: Specials) -> None:
    row = {**QA_ROW, "question": " ".join(["who"] * 20), "answers": {"text": ["London"], "answer_start": [3]}}
    feats = encode_qa(tok, sp, [row], max_length=48, doc_stride=4, max_query_length=6)
    assert feats[0]["input_ids"][:8].tolist() == [sp.cls] + ids_of(tok, "who") * 6 + [sp.sep]  # question cut to 6
    # answer_start off: the nearest occurrence of the text is used.
    f = next(f for f in feats if f["start_positions"])
    assert CONTEXT[f["offsets"][f["start_positions"]][0] : f["offsets"][f["end_positions"]][1]] == "London"
    # No answers key: predict mode, no positions; empty answers: unanswerable, [CLS].
    assert "start_positions" not in encode_qa(tok, sp, [{"question": "who", "context": "john"}])[0]
    unanswerable = {"question": "who", "context": "john", "answers": {"text": [], "answer_start": []}}
    assert encode_qa(tok, sp, [unanswerable])[0]["start_positions"] == 0
    with pytest.raises(TaskError, match="row 1: answer 'Paris' is not in the context"):
        encode_qa(tok, sp, [{**QA_ROW, "answers": {"text": ["Paris"], "answer_start": [0]}}])
    with pytest.raises(TaskError, match="doc_stride=30 must be below"):
        encode_qa(tok, sp, [QA_ROW], max_length=48, doc_stride=30, max_query_length=16)
    # A span longer than max_answer_length is not chosen; with nothing valid the answer is empty.
    one = encode_qa(tok, sp, [QA_ROW], max_length=128, doc_stride=16)
    assert len(one) == 1 and len(one[0]["input_ids"]) == 7 + 66 + 1
    s_log, e_log = np.zeros(128), np.zeros(128)  # longer than the feature, as a padded batch's logits are
    s_log[10], e_log[50] = 5.0, 5.0  # tokens 10..50: 41 > 30, refused; the best valid span is token 10 alone
    assert postprocess_qa([QA_ROW], one, [s_log], [e_log], max_answer_length=30) == {0: "w3"}
    empty = postprocess_qa([QA_ROW], [{**one[0], "offsets": [None] * len(one[0]["offsets"])}], [s_log], [e_log])
    assert empty == {0: ""}


# ------------------------------------------------------------------------------------------------------ metrics


def test_classification_and_correlation_metrics() -> None:
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]  # TP 2, FP 1, TN 2, FN 0
    assert M.accuracy(preds, labels) == pytest.approx(0.8)
    assert M.f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 2 * 3))
    assert M.matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1, 0, 1], [0, 1, 0]) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # one predicted class: undefined -> 0
    assert M.classification_metrics(preds, labels, 2)["f1"] == pytest.approx(0.8)
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    # By hand: deviations (-2,-1,0,1,2) and (-2,0,1,0,1): 6 / sqrt(10 * 6).
    assert M.pearson(x, y) == pytest.approx(6 / math.sqrt(60))
    # Ranks of y with ties averaged: (1, 2.5, 4.5, 2.5, 4.5) -> 7 / sqrt(10 * 9).
    assert M.rank_average(y).tolist() == [1, 2.5, 4.5, 2.5, 4.5]
    assert M.spearman(x, y) == pytest.approx(7 / math.sqrt(90))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    r = M.regression_metrics(x, y)
    assert r["corr"] == pytest.approx((r["pearson"] + r["spearman"]) / 2)


def test_ner_metrics_as_seqeval() -> None:
    # seqeval's README: MISC predicted one word too early (wrong span), PER right.
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = M.ner_metrics(y_true, y_pred)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == pytest.approx((0.5, 0.5, 0.5, 0.8))
    assert m["per_type"]["MISC"]["f1"] == 0.0 and m["per_type"]["PER"] == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "support": 1,
    }
    # seqeval's per-type example: MISC 0.5, PER 1.0; micro 2 of 3 either way.
    y_true = [["O", "O", "B-MISC", "I-MISC", "B-MISC", "O", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "B-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = M.ner_metrics(y_true, y_pred)
    assert m["per_type"]["MISC"]["f1"] == pytest.approx(0.5) and m["f1"] == pytest.approx(2 / 3)
    # Default (conlleval) mode: an I- after O starts an entity, so these match (strict mode would not).
    assert M.ner_metrics([["B-NP", "I-NP", "O"]], [["I-NP", "I-NP", "O"]])["f1"] == 1.0
    assert M.get_entities(["B-PER", "I-LOC", "I-LOC", "B-PER", "B-PER", "O", "I-ORG"]) == [
        ("PER", 0, 0),
        ("LOC", 1, 2),
        ("PER", 3, 3),
        ("PER", 4, 4),
        ("ORG", 6, 6),
    ]
    assert M.get_entities(["S-PER", "B-LOC", "E-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]
    # Entities never cross sentences.
    assert M.ner_metrics([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])["f1"] == 1.0
    with pytest.raises(ValueError, match="'PER' is not BIO"):
        M.get_entities(["PER"])


def test_squad_normalisation_and_scores() -> None:
    assert M.normalize_answer("The  Cat!") == "cat"
    assert M.normalize_answer("an apple, a pear and THE theatre.") == "apple pear and theatre"
    assert M.squad_exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred (cat, sat) vs gold (cat, sat, on, mat): precision 1, recall 1/2.
    assert M.squad_f1("the cat sat", "cat sat on a mat") == pytest.approx(2 / 3)
    assert M.squad_f1("dog", "cat") == 0.0
    preds = {"q1": "Denver Broncos", "q2": "the cat sat"}
    refs = {"q1": ["Broncos", "Denver Broncos"], "q2": ["cat sat on a mat", "a cat sat"], "q3": ["x"]}
    out = M.squad_metrics(preds, refs)  # best gold per question; q3 has no prediction and scores 0
    assert out["exact_match"] == pytest.approx(100 * 2 / 3) and out["f1"] == pytest.approx(100 * 2 / 3)


# ------------------------------------------------------------------------------------------------------- kinds


def _task(**kw):
    """A task section with the fields the kinds read (config.TaskConfig's defaults)."""
    from types import SimpleNamespace

    defaults = dict(text_column="sentence", text_pair_column=None, label_column="label", labels=None,
                    tokens_column="tokens", tags_column="tags", question_column="question", context_column="context",
                    answers_column="answers", doc_stride=128, max_query_length=64, max_answer_length=30,
                    truncate=True)  # fmt: skip
    return SimpleNamespace(**{**defaults, **kw})


def test_kinds_encode_decode_and_score_their_own_gold(tok, sp: Specials) -> None:
    """Every kind: rows read under the configured columns, encoded, logits that pick the gold decoded back to the
    gold and scored perfect on the kind's own metric."""
    cases = {
        "classification": (
            _task(text_column="s", text_pair_column="p", label_column="y"),
            [{"s": "the cat", "p": "a mat", "y": "pos"}, {"s": "a dog ran", "p": "the park", "y": "neg"}],
        ),
        "regression": (_task(text_column="s", label_column="y"), [{"s": "the cat", "y": 1.5}, {"s": "a", "y": 4}]),
        "ner": (
            _task(tokens_column="w", tags_column="t"),
            [{"w": ["John", "Smith", "ran"], "t": ["B-PER", "I-PER", "O"]}, {"w": ["paris"], "t": ["B-LOC"]}],
        ),
        "qa": (
            _task(question_column="q", context_column="c", answers_column="a", doc_stride=8, max_query_length=8),
            [{"q": QA_ROW["question"], "c": CONTEXT, "a": QA_ROW["answers"]}],
        ),
    }
    for name, (task, table) in cases.items():
        kind = KINDS[name]
        assert set(kind.columns(task).values()) >= {kind.gold}
        rows = [{kind.columns(task)[k]: v for k, v in r.items()} for r in table]
        labels = kind.label_map(task, rows)
        feats = kind.encode(task, rows, labels, tok, sp, 32, "t.jsonl")
        batch = kind.collate(feats, sp.pad)
        assert batch["input_ids"].shape[0] == len(feats) and "attention_mask" in batch
        unlabelled = kind.encode(task, [{k: v for k, v in r.items() if k != kind.gold} for r in rows], None, tok, sp,
                                 32, "t.jsonl", labelled=False)  # fmt: skip
        assert not set(kind.collate(unlabelled, sp.pad)) & {"labels", "start_positions", "end_positions"}
        n = kind.num_labels(labels)
        logits = []
        for f in feats:  # logits that pick the gold target of each feature
            if name == "classification":
                logits.append(np.eye(n)[f["labels"]])
            elif name == "regression":
                logits.append(np.float32(f["labels"]))
            elif name == "ner":
                logits.append(np.eye(n)[np.where(f["labels"] == IGNORE, 0, f["labels"])])
            else:
                x = np.zeros((len(f["input_ids"]), 2))
                x[f["start_positions"], 0] = x[f["end_positions"], 1] = 10.0 if f["start_positions"] else -10.0
                logits.append(x)
        preds = kind.decode(task, labels, rows, feats, logits)
        gold = {"classification": "label", "regression": "label", "ner": "tags", "qa": "answers"}[name]
        expected = [r[gold]["text"][0] if name == "qa" else r[gold] for r in rows]
        assert preds == ([float(x) for x in expected] if name == "regression" else expected)
        perfect = 100.0 if name == "qa" else 1.0
        if name == "regression":
            preds = [p + 0.5 for p in preds]  # correlation is perfect, whatever the offset
        assert kind.score(labels, rows, preds)[kind.metric] == pytest.approx(perfect)
