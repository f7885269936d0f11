"""Counts and skip records that every stage adds to and the manifest writes down.

Nothing is dropped silently: whatever a stage skips is recorded here with its reason, named in a warning,
and written to ``manifest.json``. With ``strict=True`` the first skip is an error instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from data_prep.errors import DataPrepError

log = logging.getLogger("data_prep")

# Warnings name at most this many individual skips; the rest are counted (and listed in the manifest).
MAX_WARNINGS = 20
# The manifest lists at most this many individual skipped items per reason; counts are always exact.
MAX_LISTED = 1000


@dataclass
class Report:
    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> names of skipped files/documents
    skipped_counts: Counter = field(default_factory=Counter)  # reason -> count
    warnings: list[str] = field(default_factory=list)
    _warned: int = 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, what: str, name: str, reason: str, detail: str = "") -> None:
        """Record that ``what`` ('file' or 'document') ``name`` was skipped for ``reason``.

        ``reason`` is a category ("not valid UTF-8"): the manifest counts skips by it, so it must not hold
        per-item facts, which go in ``detail`` ("byte offset 23") and are listed with the item's name. In strict
        mode this raises ``DataPrepError`` naming the item, instead of skipping it.
        """
        why = f"{reason} ({detail})" if detail else reason
        if self.strict:
            raise DataPrepError(f"{name}: {why} (strict=true; set strict=false to skip and count such {what}s)")
        key = f"{what}: {reason}"
        self.skipped_counts[key] += 1
        listed = self.skipped.setdefault(key, [])
        if len(listed) < MAX_LISTED:
            listed.append(f"{name} ({detail})" if detail else name)
        self.counts[f"{what}s_skipped"] += 1
        if self._warned < MAX_WARNINGS:
            log.warning("skipped %s %s: %s", what, name, why)
        elif self._warned == MAX_WARNINGS:
            log.warning("further skips are counted in manifest.json, not printed")
        self._warned += 1

    def warn(self, message: str) -> None:
        """A pre-flight warning worth reading before days of training; kept for the manifest and summary."""
        self.warnings.append(message)
        log.warning(message)

    def merge(self, other: Report) -> None:
        self.counts.update(other.counts)
        self.skipped_counts.update(other.skipped_counts)
        for key, names in other.skipped.items():
            listed = self.skipped.setdefault(key, [])
            listed.extend(names[: max(0, MAX_LISTED - len(listed))])
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)

    def to_dict(self) -> dict:
        return {
            "counts": dict(sorted(self.counts.items())),
            "skipped": {k: {"count": self.skipped_counts[k], "items": v} for k, v in sorted(self.skipped.items())},
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        r = cls()
        r.counts.update(d.get("counts", {}))
        for k, v in d.get("skipped", {}).items():
            r.skipped_counts[k] = v["count"]
            r.skipped[k] = list(v["items"])
        r.warnings = list(d.get("warnings", []))
        return r
