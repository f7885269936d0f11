"""The read stage: part files, determinism across workers, resume after interruption, errors and warnings."""

from __future__ import annotations

import json
import os

import pytest

from data_prep.config import PrepareConfig
from data_prep.errors import DataPrepError
from data_prep.read import documents_dir, run_read, task_dir
from data_prep.report import Report


def make_corpus(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("The first book starts here.\nIt has wrapped\nlines.\n\nA second paragraph. It ends.\n")
    doc0 = "".join(f"Line {i} of doc 0 is a sentence.\n" for i in range(4))
    (root / "b.txt").write_text(doc0 + "\n" + "".join(f"Doc one line {i} is here.\n" for i in range(4)))
    (root / "c.jsonl").write_text("".join(json.dumps({"text": f"Record {i} says hello. Then more words."}) + "\n"
                                          for i in range(30)) + '{"text": "   "}\n')  # fmt: skip
    return [str(root / "a.txt"), str(root / "b.txt"), str(root / "c.jsonl")]


def run(inputs, out, **kw):
    report = Report(strict=kw.pop("strict", False))
    result = run_read(PrepareConfig(inputs=inputs, output_dir=str(out), **kw), report)
    return result, report


def part_bytes(out):
    d = documents_dir(PrepareConfig(output_dir=str(out)))
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_part_files_format_and_counts(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    result, report = run(inputs, tmp_path / "out", num_workers=1)
    assert result["parts"] == ["part-00000.txt", "part-00001.txt", "part-00002.txt"]
    d = tmp_path / "out" / "work" / "documents"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        f"part-{k:05d}.{ext}" for k in range(3) for ext in ("txt", "docs.jsonl", "meta.json"))  # fmt: skip
    assert (d / "part-00000.txt").read_text() == (
        "The first book starts here.\nIt has wrapped lines.\nA second paragraph.\nIt ends.\n\n"
    )
    b_docs = (d / "part-00001.txt").read_text().split("\n\n")
    assert len(b_docs) == 3 and b_docs[-1] == "" and b_docs[1].split("\n")[0] == "Doc one line 0 is here."
    meta = [json.loads(line) for line in (d / "part-00001.docs.jsonl").read_text().splitlines()]
    assert meta == [
        {"source": inputs[1], "id": "line1", "sentences": 4, "chars": 4 * len("Line 0 of doc 0 is a sentence.")},
        {"source": inputs[1], "id": "line6", "sentences": 4, "chars": 4 * len("Doc one line 0 is here.")},
    ]
    c = report.counts
    assert c["documents_read"] == 34 and c["documents_written"] == 33 and result["documents"] == 33
    assert c["documents_text"] == 3 and c["documents_jsonl"] == 30
    assert c["sentences"] == 4 + 8 + 60 == result["sentences"]
    assert c["input_bytes"] == sum(os.path.getsize(p) for p in inputs)
    assert report.skipped["document: no text after cleaning"] == [f"{inputs[2]}#line31"]
    assert [i["path"] for i in result["inputs"]] == inputs and all(len(i["sha256"]) == 64 for i in result["inputs"])


def test_output_identical_whatever_the_number_of_workers(tmp_path, shared_data):
    inputs = make_corpus(tmp_path / "in") + [str(shared_data / "wikipedia/enwiki-sample-pages-articles.xml.bz2")]
    r1, rep1 = run(inputs, tmp_path / "w1", num_workers=1)
    r2, rep2 = run(inputs, tmp_path / "w2", num_workers=2)
    assert part_bytes(tmp_path / "w1") == part_bytes(tmp_path / "w2")
    assert rep1.to_dict() == rep2.to_dict() and r1["documents"] == r2["documents"] == 33 + 31
    assert rep2.counts["wiki_redirects_dropped"] == 11 and rep2.skipped_counts["document: no text after cleaning"] == 1


def test_interrupted_run_is_finished_by_a_rerun(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    _, report = run(inputs, out, num_workers=1)
    complete = part_bytes(out)
    d = documents_dir(PrepareConfig(output_dir=str(out)))
    # Simulate a crash: part 1 lost its completion marker and left a half-written temporary file behind.
    (d / "part-00001.docs.jsonl").unlink()
    (d / "part-00001.txt").write_text("half a par")
    (d / "part-00002.txt.tmp").write_text("partial")
    (d / "part-00002.docs.jsonl").rename(d / "part-00002.docs.jsonl.tmp")
    before = (d / "part-00000.txt").stat().st_mtime_ns
    _, again = run(inputs, out, num_workers=1)
    assert (d / "part-00000.txt").stat().st_mtime_ns == before  # complete part skipped, not rewritten
    assert part_bytes(out) == complete
    assert again.counts == report.counts and again.skipped == report.skipped
    assert any("resuming: 1 of 3 parts" in w for w in again.warnings)


def test_changed_input_redoes_its_part(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    run(inputs, out, num_workers=1)
    (tmp_path / "in" / "a.txt").write_text("Completely new text. Two sentences.\n")
    _, report = run(inputs, out, num_workers=1)
    assert (out / "work/documents/part-00000.txt").read_text() == "Completely new text.\nTwo sentences.\n\n"
    assert report.counts["documents_written"] == 33


def test_tasks_split_units(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    cfg = PrepareConfig(inputs=inputs, output_dir=str(tmp_path / "out"), num_tasks=2, task_index=1, num_workers=1)
    assert task_dir(cfg) == tmp_path / "out" / "tasks" / "task-00001"
    result = run_read(cfg, Report())
    assert result["parts"] == ["part-00001.txt"] and [i["path"] for i in result["inputs"]] == [inputs[1]]
    assert (task_dir(cfg) / "work/documents/part-00001.docs.jsonl").exists()
    with pytest.raises(DataPrepError, match="task_index=5"):
        run(inputs, tmp_path / "x", num_tasks=8, task_index=5)
    with pytest.raises(DataPrepError, match="task_index=3"):
        run(inputs, tmp_path / "x", num_tasks=2, task_index=3)


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(DataPrepError, match=r"input not found: .*missing\.txt"):
        run([str(tmp_path / "missing.txt")], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(DataPrepError, match="empty corpus.*empty file"):
        run([str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")], tmp_path / "out", num_workers=1)


def test_strict_stops_at_first_bad_file_without_completing_its_part(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    (tmp_path / "in" / "b.txt").write_bytes(b"bad \xff byte.\n")
    with pytest.raises(DataPrepError, match=r"b\.txt: not valid UTF-8"):
        run(inputs, tmp_path / "out", num_workers=1, strict=True)
    d = tmp_path / "out" / "work" / "documents"
    assert not (d / "part-00001.docs.jsonl").exists() and not (d / "part-00002.docs.jsonl").exists()


def test_preflight_warnings(tmp_path):
    (tmp_path / "one.txt").write_text("Just one document. With two sentences.\n")
    _, report = run([str(tmp_path / "one.txt")], tmp_path / "o1", num_workers=1)
    assert any("single document" in w for w in report.warnings)
    lines = "".join(f"Sentence number {i} stands alone.\n\n" for i in range(20))
    (tmp_path / "spaced.txt").write_text(lines)
    _, report = run([str(tmp_path / "spaced.txt")], tmp_path / "o2", num_workers=1, text_documents="blank_line")
    assert report.counts["documents_written"] == 20
    assert any("text_documents=file" in w for w in report.warnings)
