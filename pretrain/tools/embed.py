"""Contextual embeddings from a trained model (``launch/embed.py``): one vector per sentence (mean of its tokens or
its ``[CLS]``) or one per token, from any layer, written in input order to ``.npy`` or ``.parquet``.

Input: a text file, one sentence per line (``.gz`` too; blank lines skipped and counted), or a table
(``.csv``, ``.tsv``, ``.jsonl``/``.json`` JSON lines, ``.parquet``) whose text column ``column`` names (empty or
missing cells skipped and counted). Sentences run in batches sorted by length (little padding); rows are written
in input order. Output layouts:

- ``mean`` / ``cls`` to ``.npy``: float32 ``[N, H]``, row i = the i-th non-blank input.
- ``mean`` / ``cls`` to ``.parquet``: columns ``sentence`` (0..N-1), ``line`` (1-based line of the text file or
  record of the table), ``text``, ``embedding`` (H float32).
- ``tokens`` to ``.parquet``: one row per token: ``sentence``, ``line``, ``position`` (0 = ``[CLS]``), ``token``,
  ``embedding``; to ``.npy``: a structured array with the same fields (``np.load`` reads it, no pickle needed;
  ``a["embedding"]`` is ``[T, H]``, ``a[a["sentence"] == 3]`` the tokens of sentence 3).

Mean pooling averages every real token, ``[CLS]`` and ``[SEP]`` included and padding excluded, as
sentence-transformers' mean pooling does (so vectors match a Hugging Face pipeline on the exported model).
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.atomic import atomic_path, save_npy
from data_prep.errors import UserError
from pretrain.checkpoint.weights import load_model
from pretrain.runtime.device import pick_device
from pretrain.training.metrics import Progress

POOLINGS = ("mean", "cls", "tokens")
OUTPUTS = (".npy", ".parquet")
TABLES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class Texts:
    """The sentences to embed, in input order, and where each came from."""

    texts: list[str]
    lines: list[int]  # 1-based line of the text file, or record of the table
    blank: int  # blank lines / empty or missing cells skipped
    unit: str  # "line" or "row": how messages name a place in the input


def _read_lines(path: Path) -> Texts:
    opener = gzip.open if path.suffix == ".gz" else open
    texts, lines, blank = [], [], 0
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # utf-8-sig: a leading byte-order mark is not text
            for n, line in enumerate(f, 1):
                if line.strip():
                    texts.append(line.strip())
                    lines.append(n)
                else:
                    blank += 1
    except UnicodeDecodeError as e:
        raise UserError(f"--input {path}: not UTF-8 text (byte {e.start} of a line: {e.reason})") from None
    except (OSError, EOFError) as e:  # a truncated or mislabelled .gz
        raise UserError(f"--input {path}: unreadable ({e})") from None
    return Texts(texts, lines, blank, "line")


def _read_table(path: Path, column: str) -> Texts:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = _kind(path)
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix in (".csv", ".tsv"):
            table = pcsv.read_csv(
                path,
                parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(column_types={column: pa.string()}),  # "42" stays text
            )
        else:
            table = pjson.read_json(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid for a malformed file, ArrowTypeError, ...
        what = "one JSON object per line" if suffix in (".json", ".jsonl") else f"a {suffix[1:]} file"
        raise UserError(f"--input {path}: not {what} ({str(e).splitlines()[0][:200]})") from None
    if column not in table.column_names:
        raise UserError(
            f"--input {path}: no column {column!r}; its columns are: {', '.join(table.column_names) or '(none)'}"
        )
    col = table.column(column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise UserError(f"--input {path}: column {column!r} holds {col.type}, not text; give the text column")
    texts, lines, blank = [], [], 0
    for n, value in enumerate(col.to_pylist(), 1):
        if value is not None and value.strip():
            texts.append(value.strip())
            lines.append(n)
        else:
            blank += 1
    return Texts(texts, lines, blank, "row")


def _kind(path: Path) -> str:
    """The format an input's name says: ``.csv.gz`` is a csv (pyarrow decompresses it), ``.txt.gz`` text."""
    return path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix


def read_texts(path: str | Path, column: str | None) -> Texts:
    """The non-blank sentences of a text file or of a table's ``column``; UserError for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--input {path}: file not found")
    if not path.is_file():
        raise UserError(f"--input {path}: not a file; give a text file (a sentence per line) or a table")
    is_table = _kind(path) in TABLES
    if is_table and column is None:
        raise UserError(f"--input {path}: a table; name its text column with --column NAME")
    if not is_table and column is not None:
        raise UserError(f"--column {column}: only for tables ({', '.join(TABLES)}); {path} is read as plain text")
    texts = _read_table(path, column) if is_table else _read_lines(path)
    if not texts.texts:
        where = f"column {column!r}" if is_table else "the file"
        raise UserError(f"--input {path}: nothing to embed ({where} is empty or blank)")
    return texts


def tokenize(
    tokenizer: Any, data: Texts, max_length: int, truncate: bool, input_name: str
) -> tuple[list[list[int]], list[list[str]], int]:
    """(ids, token strings, number truncated) per sentence, with the tokenizer's own special tokens. Too long: cut
    to ``max_length`` by ``tokenizers`` (its special tokens kept), or an error naming the line."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the loaded one may carry a tokenizer.json's padding
    tok.no_padding()
    tok.no_truncation()
    encodings = tok.encode_batch(data.texts)
    long = [i for i, e in enumerate(encodings) if len(e.ids) > max_length]
    if long and not truncate:
        i = long[0]
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        raise UserError(
            f"--input {input_name} {data.unit} {data.lines[i]}: {len(encodings[i].ids)} tokens, longer than the "
            f"maximum {max_length}{more}; shorten it, raise --max-length or drop --no-truncate"
        )
    if long:
        tok.enable_truncation(max_length)
        for i, e in zip(long, tok.encode_batch([data.texts[i] for i in long]), strict=True):
            encodings[i] = e
    return [e.ids for e in encodings], [e.tokens for e in encodings], len(long)


@torch.inference_mode()
def embed_ids(
    model: torch.nn.Module,
    ids: list[list[int]],
    pooling: str,
    layer: int,
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> np.ndarray | list[np.ndarray]:
    """``[N, H]`` float32 (mean, cls) or N arrays ``[n_i, H]`` (tokens), in the order of ``ids``. Batches hold
    sentences of similar length, the longest first so that running out of memory shows at once."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    H = model.config.hidden_size
    pooled = np.empty((len(ids), H), dtype=np.float32) if pooling != "tokens" else None
    per_token: list[np.ndarray] = [np.empty(0)] * len(ids)
    bar = Progress((len(ids) + batch_size - 1) // batch_size, desc="embed")
    try:
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            lengths = [len(ids[i]) for i in rows]
            batch = np.full((len(rows), lengths[0]), pad_id, dtype=np.int64)
            for r, i in enumerate(rows):
                batch[r, : lengths[r]] = ids[i]
            input_ids = torch.from_numpy(batch).to(device)
            mask = (torch.arange(lengths[0])[None, :] < torch.tensor(lengths)[:, None]).to(device)  # [b, L]
            h = model.hidden_states(input_ids, None, mask)[layer].float()  # [b, L, H]
            if pooling == "mean":  # padding excluded; [CLS] and [SEP] included (sentence-transformers' choice)
                m = mask[..., None].to(h.dtype)
                pooled[rows] = ((h * m).sum(1) / m.sum(1)).cpu().numpy()
            elif pooling == "cls":
                pooled[rows] = h[:, 0].cpu().numpy()
            else:
                h = h.cpu().numpy()
                for r, i in enumerate(rows):
                    per_token[i] = h[r, : lengths[r]].copy()  # a copy: a view would keep the whole batch alive
            bar.update(f"{min(start + batch_size, len(ids))}/{len(ids)} sentences")
    finally:
        bar.close()
    return pooled if pooled is not None else per_token


def write_output(
    out: Path, pooling: str, vectors: np.ndarray | list[np.ndarray], data: Texts, tokens: list[list[str]]
) -> tuple[int, ...]:
    """Write atomically (a crash leaves the old file or none); returns the shape written."""
    if pooling == "tokens":
        sentence = np.repeat(np.arange(len(vectors)), [len(v) for v in vectors])
        line = np.asarray(data.lines, dtype=np.int64)[sentence]
        position = np.concatenate([np.arange(len(v), dtype=np.int32) for v in vectors])
        flat_tokens = [t for ts in tokens for t in ts]
        matrix = np.concatenate(vectors)  # [T, H]
    else:
        sentence, line, matrix = np.arange(len(vectors)), np.asarray(data.lines, dtype=np.int64), vectors
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy" and pooling != "tokens":
        save_npy(out, matrix)
    elif out.suffix == ".npy":
        width = max(1, max(map(len, flat_tokens)))
        fields = [("sentence", "<i8"), ("line", "<i8"), ("position", "<i4"), ("token", f"<U{width}")]
        a = np.empty(len(matrix), dtype=[*fields, ("embedding", "<f4", (matrix.shape[1],))])
        a["sentence"], a["line"], a["position"], a["token"], a["embedding"] = (
            sentence, line, position, flat_tokens, matrix
        )  # fmt: skip
        save_npy(out, a)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, Any] = {"sentence": pa.array(sentence, pa.int64()), "line": pa.array(line, pa.int64())}
        if pooling == "tokens":
            columns |= {"position": pa.array(position, pa.int32()), "token": pa.array(flat_tokens, pa.string())}
        else:
            columns["text"] = pa.array(data.texts, pa.string())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        with atomic_path(out) as tmp:
            pq.write_table(pa.table(columns), tmp)
    return tuple(matrix.shape)


def run_embed(
    model_path: str,
    input_path: str,
    output: str,
    column: str | None = None,
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 64,
    max_length: int | None = None,
    truncate: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """``launch/embed.py``: read, load, tokenize, embed, write, print a one-line summary; returns the summary."""
    t0 = time.perf_counter()
    out = Path(output)
    if out.suffix not in OUTPUTS:
        raise UserError(f"--output {out}: unknown extension {out.suffix or '(none)'!r}; use .npy or .parquet")
    if pooling not in POOLINGS:
        raise UserError(f"--pooling {pooling}: use one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    dev = pick_device(device)
    data = read_texts(input_path, column)  # before the model: a wrong path fails in a second, not after loading
    source = load_model(model_path, heads=False)  # embeddings read the encoder: MLM/NSP heads may be absent
    config = source.model.config
    n_layers = config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise UserError(f"--layer {layer}: the model has {n_layers} layers; give 0 (embeddings) to {n_layers}, or -1")
    layer %= n_layers + 1
    longest = config.max_position_embeddings
    max_length = longest if max_length is None else max_length
    shortest = source.tokenizer.num_special_tokens_to_add(False) + 1
    if not shortest <= max_length <= longest:
        raise UserError(f"--max-length {max_length}: this model takes {shortest} to {longest} tokens")
    ids, tokens, truncated = tokenize(source.tokenizer, data, max_length, truncate, input_path)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    model = source.model.to(dev)
    vectors = embed_ids(model, ids, pooling, layer, batch_size, dev, pad_id)
    try:
        shape = write_output(out, pooling, vectors, data, tokens)
    except OSError as e:
        raise UserError(f"--output {out}: cannot write ({e.strerror or e})") from None
    seconds = time.perf_counter() - t0
    summary = dict(sentences=len(ids), dim=config.hidden_size, shape=shape, output=str(out), pooling=pooling,
                   layer=layer, blank=data.blank, truncated=truncated, max_length=max_length,
                   seconds=seconds)  # fmt: skip
    notes = [f"{data.blank} blank {data.unit}{'s' * (data.blank > 1)} skipped"] if data.blank else []
    notes += [f"{truncated} truncated to {max_length} tokens"] if truncated else []
    print(
        f"embedded {len(ids)} sentences{' (' + ', '.join(notes) + ')' if notes else ''}: {pooling} pooling of layer "
        f"{layer}/{n_layers}, dim {config.hidden_size} -> {out} {list(shape)} in {seconds:.1f} s",
        flush=True,
    )
    return summary
