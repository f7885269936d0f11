"""Fine-tuning data is checked for meaning, not only structure: an empty or NaN label, a label only validation
has, an unclosed quote that swallows rows are one line naming the row (or line, or label), exit 2; rows with an
empty text are dropped, counted in a warning and in results.json; a file with no usable row is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.finetune import tasks as T
from pretrain.finetune.checks import usable_rows
from tests.helpers import FINETUNE, FINETUNE_FAST, ROOT, classification_task, run_env, write_csv


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("label", ["", "NaN", "nan", "None", "null", "  "])
def test_an_empty_or_nan_label_is_refused_naming_the_row_and_value(tmp_path, label):
    rows = T.read_table(str(_csv(tmp_path / "t.csv", f"text,label\na b,yes\nc d,{label}\ne f,no\n")),
                        columns=["text", "label"])  # fmt: skip
    rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    with pytest.raises(T.TaskError, match=rf"t\.csv: row 2: label {label!r} is empty or missing"):
        usable_rows(rows, ("text",), True, "label", str(tmp_path / "t.csv"))


def test_empty_texts_are_dropped_counted_and_warned_and_none_left_is_refused(tmp_path):
    rows = [{"text": "a b", "label": "yes"}, {"text": "  ", "label": "no"}, {"text": "", "label": float("nan")},
            {"text": "c", "label": "no"}]  # fmt: skip
    with pytest.warns(UserWarning, match=r"src\.csv: 2 row\(s\) with an empty text dropped \(rows 2, 3\)"):
        kept, dropped = usable_rows(rows, ("text", "pair"), True, "label", "src.csv")
    assert [r["text"] for r in kept] == ["a b", "c"] and dropped == {"empty text": 2}  # NaN label of a dropped row
    with pytest.raises(T.TaskError, match=r"src\.csv: no usable row: every one of the 2 has an empty text"):
        usable_rows([{"text": ""}, {"text": " "}], ("text",), False, "label", "src.csv")
    ner = [{"tokens": [], "tags": []}, {"tokens": ["a"], "tags": ["O"]}]
    with pytest.warns(UserWarning):
        assert usable_rows(ner, ("tokens",), False, "tags", "ner.jsonl")[1] == {"empty text": 1}


def test_a_quoted_field_over_line_breaks_is_reported_where_it_started(tmp_path):
    path = _csv(tmp_path / "q.csv", 'text,label\na b,yes\n"c d,no\ne f,yes\ng h",no\ni j,yes\n')
    with pytest.raises(T.TaskError, match=r"q\.csv: line 3: a quoted field runs on to line 5 \(an unclosed quote"):
        T.read_table(str(path), columns=["text", "label"])


def test_a_label_only_in_validation_is_named():
    labels = T.LabelMap.infer(["yes", "no", "yes"])
    with pytest.raises(T.TaskError, match=r"dev\.csv: row 4: label 'maybe' is not in the training data"):
        labels.index("maybe", "dev.csv", 4)


@pytest.mark.slow
def test_end_to_end_one_line_each_and_the_counts_in_results(tiny_run, tmp_path):
    train, dev = classification_task(tmp_path)
    base = [FINETUNE, f"pretrained={tiny_run[1]}", "finetune=classification", "task.text_column=text", "epochs=1",
            *FINETUNE_FAST]  # fmt: skip

    def run(train_file: Path, dev_file: Path, name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *base, f"task.train={train_file}", f"task.validation={dev_file}",
                               f"run_dir={tmp_path / name}"], capture_output=True, text=True, env=run_env(),
                              timeout=600, cwd=ROOT)  # fmt: skip

    rows = [line.split(",") for line in train.read_text().splitlines()[1:]]
    blanks = write_csv(tmp_path / "blanks.csv", [("", "yes"), (" ", "no"), *map(tuple, rows)])
    r = run(blanks, dev, "blanks")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:") and "empty text" in line]
    assert len(warned) == 1 and "rows 1, 2" in warned[0]
    assert json.loads((tmp_path / "blanks" / "results.json").read_text())["dropped_rows"] == {
        "train": {"empty text": 2}, "validation": {}}  # fmt: skip
    bad = {
        "nan": (write_csv(tmp_path / "nan.csv", [*map(tuple, rows[:5]), ("a b", "NaN")]), dev, "row 6: label 'NaN'"),
        "only_dev": (train, write_csv(tmp_path / "dev2.csv", [("a b", "yes"), ("c d", "maybe")]),
                     "row 2: label 'maybe' is not in the training data"),
        "quote": (_csv(tmp_path / "q.csv", 'text,label\na b,yes\n"c d,no\ne f,yes\n'), dev, "line 3: a quoted field"),
        "all_blank": (write_csv(tmp_path / "empty.csv", [("", "yes"), (" ", "no")]), dev, "no usable row"),
    }  # fmt: skip
    for name, (tr, dv, expected) in bad.items():
        r = run(tr, dv, name)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in r.stderr and r.returncode == 2 and len(errors) == 1, (name, r.stderr[-2000:])
        assert expected in errors[0], (name, errors[0])
