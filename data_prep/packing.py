"""Shards stage, RoBERTa mode: full sentences packed back to back (no NSP).

FULL-SENTENCES packing fills a sample with whole sentences up to ``max_seq_length - 2`` tokens, a [SEP] between
documents; a sentence longer than that fills samples of its own, its rest starting the next. The worker and the
sample builder come from ``data_prep.pairs``; the stage's driver, ``run_shards``, is in ``data_prep.shards``.
"""

from __future__ import annotations

import numpy as np

from data_prep.pairs import Builder, Worker


def roberta_docs(w: Worker, b: Builder, units: np.ndarray) -> None:
    """FULL-SENTENCES packing: whole sentences back to back, a [SEP] between units (documents)."""
    cap = w.p.max_seq_length - 2
    parts: list = []
    used, first = 0, -1

    def flush() -> None:
        nonlocal parts, used, first
        if used:
            b.add(parts, -1, -1, first, -1)
        parts, used, first = [], 0, -1

    for d, s0, s1 in units.tolist():
        lens = np.diff(w.sents.span(s0, s1))
        new_doc = True
        for s in (np.flatnonzero(lens) + s0).tolist():
            ln = int(lens[s - s0])
            sep = 1 if new_doc and used else 0
            if used + sep + ln <= cap:
                if sep:
                    parts.append(None)
                if parts and not sep and parts[-1][1] == s and parts[-1][2] == 0:  # extend the running range
                    parts[-1] = (parts[-1][0], s + 1, 0, 0)
                else:
                    parts.append((s, s + 1, 0, 0))
                used, first = used + sep + ln, d if first < 0 else first
            else:
                flush()
                cut = 0
                while ln - cut > cap:
                    b.add([(s, s + 1, cut, ln - cut - cap)], -1, -1, d, -1)
                    cut += cap
                parts, used, first = [(s, s + 1, cut, 0)], ln - cut, d
            new_doc = False
    flush()
