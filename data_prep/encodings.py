"""Text files in UTF-16 or UTF-32, known by their byte-order mark, read as a stream of UTF-8 bytes.

Everything downstream of the readers handles UTF-8 only; a byte-order mark makes these encodings certain, so such
files are decoded rather than skipped. Encodings without a mark (latin-1, cp1252) cannot be told apart reliably:
those files stay skipped as "not valid UTF-8", counted and named in the manifest.
"""

from __future__ import annotations

import io
from typing import BinaryIO

# Byte-order marks that make a text file's encoding certain (UTF-32 first: its LE mark starts like UTF-16's).
BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


class EncodingError(ValueError):
    """Bytes that are not the UTF-16/32 their byte-order mark announced (the file is skipped)."""


class _Recoded(io.RawIOBase):
    """A UTF-16 or UTF-32 file (known by its byte-order mark) as a stream of UTF-8 bytes, decoded as it is read:
    everything downstream handles UTF-8 only, and a large file is never held whole."""

    def __init__(self, f: BinaryIO, encoding: str):
        self.text = io.TextIOWrapper(f, encoding=encoding, newline="")  # newline="": line ends kept as they are
        self.encoding, self.pending, self.pos = encoding, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if self.pos >= len(self.pending):
            try:
                self.pending, self.pos = self.text.read(1 << 16).encode("utf-8"), 0
            except UnicodeError as e:
                raise EncodingError(f"not valid {self.encoding.upper()}") from e
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = self.pending[self.pos : self.pos + n]
        self.pos += n
        return n


def as_utf8(f: BinaryIO) -> BinaryIO:
    """``f`` itself, or a UTF-8 re-encoding of it when it starts with a UTF-16/32 byte-order mark."""
    start = f.peek(4)[:4] if hasattr(f, "peek") else b""
    encoding = next((enc for bom, enc in BOMS if start.startswith(bom)), None)
    return io.BufferedReader(_Recoded(f, encoding), 1 << 17) if encoding else f
