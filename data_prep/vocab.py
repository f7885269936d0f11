"""Vocabulary stage: train a WordPiece vocabulary on the read stage's sentences, or take an existing ``vocab.txt``.

Writes, in the output folder (``OUTDIR``, see ``output_dir``), the standard Hugging Face tokenizer files:

- ``vocab.txt``: one token per line in id order (the BERT format; a given vocabulary is copied verbatim);
- ``tokenizer.json``: the full ``tokenizers`` pipeline (BertNormalizer, BertPreTokenizer, WordPiece, the
  ``[CLS] A [SEP] B [SEP]`` post-processor, WordPiece decoder);
- ``tokenizer_config.json`` and ``special_tokens_map.json``, so ``AutoTokenizer.from_pretrained(OUTDIR)``
  and ``BertTokenizerFast(vocab_file=..., do_lower_case=...)`` load it as they load bert-base-uncased.

Determinism: the WordPiece trainer is not deterministic (huggingface/tokenizers issue 1794: ties between
equally frequent pairs are broken in hash order), so two trainings on the same corpus can differ slightly.
The pipeline therefore promises identical shards *given a vocabulary*: pass ``vocab=PATH/vocab.txt`` to
reproduce a run exactly. A trained vocabulary is reused on re-runs while corpus and settings are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data_prep.errors import DataPrepError

from .atomic import atomic_path, write_text
from .config import PrepareConfig, task_dir
from .report import Report
from .store import sha256_file

log = logging.getLogger("data_prep")

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
SPECIALS = list(SPECIAL_TOKENS.values())  # trained vocabularies get exactly these ids 0..4
MODEL_MAX_LENGTH = 512  # BERT's position embeddings; samples themselves are cfg.max_seq_length long
DOCUMENTS_DIR = Path("work") / "documents"


def document_parts(outdir: str | os.PathLike) -> tuple[list[tuple[int, Path, Path]], list[Path]]:
    """Completed read-stage parts ``[(k, part-k.txt, part-k.docs.jsonl)]`` in order, and incomplete ``.txt`` files.

    ``part-k.docs.jsonl`` is written last by the read stage, so a ``.txt`` without it is unfinished.
    """
    docs_dir = Path(outdir) / DOCUMENTS_DIR
    done, unfinished = [], []
    for txt in sorted(docs_dir.glob("part-*.txt")):
        stem = txt.name[: -len(".txt")]
        jsonl = docs_dir / f"{stem}.docs.jsonl"
        if not jsonl.exists():
            unfinished.append(txt)
            continue
        done.append((int(stem[len("part-") :]), txt, jsonl))
    return done, unfinished


def completed_parts(outdir: Path, report: Report) -> list[tuple[int, Path, Path]]:
    """``document_parts`` for a stage that needs them: unfinished parts warned about, none at all an error."""
    parts, unfinished = document_parts(outdir)
    if unfinished:
        report.warn(
            f"{len(unfinished)} unfinished read-stage part(s) ignored, e.g. {unfinished[0]} "
            "(no .docs.jsonl); re-run stage=read to complete them"
        )
    if not parts:
        raise DataPrepError(f"{outdir / DOCUMENTS_DIR}: no completed document parts; run stage=read first")
    return parts


def build_tokenizer(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
    """The standard BERT WordPiece tokenizer over ``vocab`` (which must hold the five special tokens)."""
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase or None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIALS)  # never split, skipped by decode(skip_special_tokens=True)
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def model_dir_lowercase(d: str | os.PathLike) -> bool | None:
    """Whether a model directory's tokenizer is uncased: ``do_lower_case`` in ``tokenizer_config.json``, else a
    lowercasing normalizer in ``tokenizer.json``; None where neither file says."""
    d = Path(d)
    if (d / "tokenizer_config.json").is_file():
        value = json.loads((d / "tokenizer_config.json").read_text()).get("do_lower_case")
        if value is not None:
            return bool(value)
    if (d / "tokenizer.json").is_file():
        norm = json.loads((d / "tokenizer.json").read_text()).get("normalizer") or {}
        parts = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
        return any(p.get("type") == "Lowercase" or p.get("lowercase", False) for p in parts)
    return None


def read_vocab(path: str | os.PathLike) -> list[str]:
    """The tokens of a BERT ``vocab.txt``, each one's id its line number: the one reader of the format. Lines end
    at "\\n" only ("\\x85" and other Unicode line breaks are tokens), a Windows "\\r\\n" too."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: vocabulary not found (a BERT vocab.txt: one token per line, the id is the line)")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return [t.removesuffix("\r") for t in text.removesuffix("\n").split("\n")]


def special_ids(tokens: list[str], path: str | os.PathLike) -> dict[str, int]:
    """Token -> id of each of ``SPECIALS``; one-line ``DataPrepError`` naming ``path`` when one is missing."""
    ids = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in SPECIALS if t not in ids]
    if missing:
        raise DataPrepError(
            f"{path}: missing special token(s) {', '.join(missing)} (a BERT vocab.txt needs {SPECIALS})"
        )
    return {t: ids[t] for t in SPECIALS}


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataPrepError(f"vocab={path}: file not found (give a BERT vocab.txt, one token per line, or unset vocab)")
    tokens = read_vocab(path)
    special_ids(tokens, f"vocab={path}")
    return {t: i for i, t in enumerate(tokens)}


def _train(files: list[Path], cfg: PrepareConfig) -> dict[str, int]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=cfg.lowercase or None, lowercase=cfg.lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIALS,
        continuing_subword_prefix="##",
        show_progress=True,
    )
    tok.train([str(f) for f in files], trainer)  # streams the files (read line by line in Rust)
    return tok.get_vocab(with_added_tokens=True)


def _write_vocab_txt(path: Path, vocab: dict[str, int]) -> None:
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise DataPrepError(f"{path}: trained vocabulary ids are not contiguous")
    write_text(path, "".join(t + "\n" for t in tokens))


def _write_tokenizer_files(outdir: Path, tok: Tokenizer, lowercase: bool) -> None:
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "model_max_length": MODEL_MAX_LENGTH,
        **SPECIAL_TOKENS,
    }
    write_text(outdir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(outdir / "special_tokens_map.json", json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    with atomic_path(outdir / "tokenizer.json") as tmp:
        tok.save(str(tmp))


def run_vocab(cfg: PrepareConfig, report: Report) -> dict:
    """Train (or take ``cfg.vocab``) and write the tokenizer files into OUTDIR; return a summary dict."""
    outdir = task_dir(cfg)
    outdir.mkdir(parents=True, exist_ok=True)
    vocab_path = outdir / "vocab.txt"
    trained = cfg.vocab is None
    if not trained:
        src = Path(cfg.vocab).expanduser()
        vocab = _read_vocab(src)
        if not (vocab_path.exists() and os.path.samefile(src, vocab_path)):
            with atomic_path(vocab_path) as tmp:
                shutil.copyfile(src, tmp)  # verbatim: same bytes, same sha256 as the user's file
    else:
        parts = completed_parts(outdir, report)
        files = [txt for _, txt, _ in parts]
        # Reuse a vocabulary trained on the same parts with the same settings (training is not deterministic).
        key = {
            "vocab_size": cfg.vocab_size,
            "min_frequency": cfg.min_frequency,
            "lowercase": cfg.lowercase,
            "parts": [[f.name, f.stat().st_size] for f in files],
        }
        marker = outdir / "work" / "vocab.json"
        previous = json.loads(marker.read_text()) if marker.exists() else {}
        if (
            vocab_path.exists()
            and previous.get("key") == key
            and previous.get("vocab_sha256") == sha256_file(vocab_path)
        ):
            log.info("vocab: reusing %s (trained on the same parts with the same settings)", vocab_path)
            vocab = _read_vocab(vocab_path)
        else:
            log.info("vocab: training WordPiece (vocab_size=%d) on %d part(s)", cfg.vocab_size, len(files))
            vocab = _train(files, cfg)
            _write_vocab_txt(vocab_path, vocab)
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_text(marker, json.dumps({"key": key, "vocab_sha256": sha256_file(vocab_path)}) + "\n")
    tok = build_tokenizer(vocab, cfg.lowercase)
    _write_tokenizer_files(outdir, tok, cfg.lowercase)
    result = {
        "vocab_size": tok.get_vocab_size(),
        "vocab_sha256": sha256_file(vocab_path),
        "lowercase": cfg.lowercase,
        "special_tokens": {t: vocab[t] for t in SPECIALS},
        "trained": trained,
    }
    log.info(
        "vocab: %d tokens, sha256 %s…, %s",
        result["vocab_size"],
        result["vocab_sha256"][:12],
        "trained" if trained else f"from {cfg.vocab}",
    )
    return result


def load_tokenizer(outdir: str | os.PathLike) -> Tokenizer:
    """The tokenizer the vocab stage wrote into ``outdir`` (``tokenizer.json``)."""
    path = Path(outdir) / "tokenizer.json"
    if not path.is_file():
        raise DataPrepError(f"{path}: not found; run stage=vocab first")
    return Tokenizer.from_file(str(path))
