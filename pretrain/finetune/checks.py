"""What makes a fine-tuning row usable: a text that is not empty, and (classification, regression) a label that
is not empty or a stand-in for none. Rows with an empty text are dropped and counted; a missing label is refused
(``TaskError``), naming the row and the value."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from pretrain.finetune.tasks import TaskError


def missing_label(value: Any) -> bool:
    """An empty label, or one that stands for none (NaN, None, null: what spreadsheets and pandas write)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", "na", "n/a")


def blank(value: Any) -> bool:
    """An empty or blank text (or an empty word list)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def usable_rows(rows: list[dict[str, Any]], texts: Sequence[str], labelled: bool, gold: str,
                source: str) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """The rows to train or score on: those with an empty or blank text are dropped (counted, named in a
    warning; none left is a ``TaskError``); an empty or NaN label (``labelled``) is a ``TaskError`` naming the row
    and the value. Returns the rows and ``{reason: count}`` of what was dropped."""
    dropped = [i for i, r in enumerate(rows, 1) if any(blank(r[f]) for f in texts if f in r)]
    if dropped and len(dropped) == len(rows):
        raise TaskError(f"{source}: no usable row: every one of the {len(rows)} has an empty text")
    if dropped:
        shown = ", ".join(map(str, dropped[:8])) + (" ..." if len(dropped) > 8 else "")
        warnings.warn(f"{source}: {len(dropped)} row(s) with an empty text dropped (rows {shown})", stacklevel=2)
    gone = set(dropped)
    kept = [r for i, r in enumerate(rows, 1) if i not in gone]
    for i, r in enumerate(rows, 1):
        if labelled and i not in gone and gold in r and missing_label(r[gold]):
            raise TaskError(f"{source}: row {i}: label {r[gold]!r} is empty or missing; give the row a label or "
                            "remove it")  # fmt: skip
    return kept, ({"empty text": len(dropped)} if dropped else {})
