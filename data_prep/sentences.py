"""Cleaning and sentence splitting: pure functions that run in the read stage's worker processes.

``clean_document`` turns one raw document (wikitext, a Gutenberg book, plain text, docstrings) into a list of
prose paragraphs; ``split_sentences`` turns paragraphs into single-line sentences with BlingFire.
"""

from __future__ import annotations

import ctypes
import html
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import blingfire
import mwparserfromhell
from mwparserfromhell import nodes


@dataclass(frozen=True)
class RawDoc:
    source: str  # the input file (or hub/builtin name) the document came from
    doc_id: str  # page id, line number, record index, module name...
    kind: str  # wiki, books, text, jsonl, parquet, arrow, hf, pydocs: selects the cleaner
    text: str


# ---------------------------------------------------------------------------------------------- sentences

# C0/C1 control characters (tab/newline excepted): never prose, and a NUL would truncate BlingFire's output.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_SPACE = re.compile(r"\s")  # \s is str.isspace(): the characters str.split() splits on
# Text longer than this is handled in pieces of about this size: a whole 50 MB line would cost its list of
# 10 million words (~600 MB) in normalize_whitespace and several times its size inside BlingFire.
LONG_TEXT = 1 << 20


def normalize_whitespace(text: str) -> str:
    if len(text) < LONG_TEXT:
        return " ".join(_CONTROL.sub(" ", text).split())
    pieces, start = [], 0
    while start < len(text):  # pieces end at a whitespace character, so no word is cut: the result is the same
        space = _SPACE.search(text, start + LONG_TEXT)
        end = space.start() if space else len(text)
        if piece := " ".join(_CONTROL.sub(" ", text[start:end]).split()):
            pieces.append(piece)
        start = end
    return " ".join(pieces)


def _blocks(paragraph: str) -> Iterator[str]:
    """A normalised paragraph in blocks of at most LONG_TEXT characters for BlingFire, cut after a sentence end
    where one is near, else at a space (sentences that long are cut at max_sentence_chars anyway)."""
    start, n = 0, len(paragraph)
    while n - start > LONG_TEXT:
        end, floor = start + LONG_TEXT, start + LONG_TEXT // 2
        cut = max(paragraph.rfind(mark, floor, end) for mark in (". ", "! ", "? ")) + 1  # just after the mark
        cut = cut or paragraph.rfind(" ", floor, end)
        cut = cut if cut > start else end
        yield paragraph[start:cut]
        start = cut
    yield paragraph[start:]


def _cut(sentence: str, max_chars: int) -> list[str]:
    """Cut an over-long sentence into pieces of at most ``max_chars``, at whitespace where there is some.

    Walks an offset instead of re-slicing the rest: slicing made a 50 MB line cost 500 copies of 25 MB."""
    pieces = []
    start, end = 0, len(sentence)
    while end - start > max_chars:
        cut = sentence.rfind(" ", start + max_chars // 2, start + max_chars + 1)
        if cut <= start:
            cut = start + max_chars
        pieces.append(sentence[start:cut].strip())
        start = cut
        while start < end and sentence[start].isspace():
            start += 1
        while end > start and sentence[end - 1].isspace():
            end -= 1
    if start < end:
        pieces.append(sentence[start:end])
    return [p for p in pieces if p]


_buffer = ctypes.create_string_buffer(1 << 16)


def _text_to_sentences(text: str) -> str:
    """``blingfire.text_to_sentences`` with one reused output buffer: the wrapper allocates and zeroes a fresh
    buffer per call, which costs more than the splitting itself for a typical paragraph."""
    global _buffer
    data = text.encode("utf-8")
    buffer = _buffer
    if len(buffer) < 2 * len(data) + 1:
        buffer = ctypes.create_string_buffer(2 * len(data) + 1)
        if len(data) < LONG_TEXT:  # kept for the next paragraphs; a huge one's buffer is freed after use
            _buffer = buffer
    n = blingfire.blingfire.TextToSentences(ctypes.c_char_p(data), len(data), buffer, len(buffer))
    if n < 0 or n > len(buffer):
        return ""
    return ctypes.string_at(buffer, max(n - 1, 0)).decode("utf-8")  # n counts the terminating NUL


def split_sentences(paragraphs: list[str], max_sentence_chars: int) -> list[str]:
    """Sentences of the paragraphs, one line each, whitespace normalised, none empty or over the cap."""
    out: list[str] = []
    for paragraph in paragraphs:
        paragraph = normalize_whitespace(paragraph)
        if not paragraph:
            continue
        for block in _blocks(paragraph):
            # BlingFire returns '' on failure: keep the block whole rather than lose it.
            split = _text_to_sentences(block) or block
            for sentence in split.split("\n"):
                sentence = sentence.strip()
                if sentence:
                    out.extend(_cut(sentence, max_sentence_chars) if len(sentence) > max_sentence_chars else [sentence])
    return out


def blocks(text: str) -> list[list[str]]:
    """Blank-line separated blocks of stripped, non-empty lines."""
    result, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            result.append(current)
            current = []
    if current:
        result.append(current)
    return result


# ----------------------------------------------------------------------------------------------- wikitext

# Sections that hold lists of links and citations, not prose.
DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
    "notes and references", "footnotes", "citations", "works cited", "gallery", "references and notes",
}  # fmt: skip
# Tags whose content is not running prose: citations, galleries, formulas, code, tables, timelines...
DROP_TAGS = {
    "ref", "references", "gallery", "math", "chem", "ce", "score", "timeline", "imagemap", "graph", "syntaxhighlight",
    "source", "pre", "code", "table", "tr", "td", "th", "caption", "templatedata", "mapframe", "maplink", "nowiki",
    "inputbox", "categorytree", "hiero", "poem", "hr", "noinclude", "includeonly", "onlyinclude",
}  # fmt: skip
_DROP_LINK_NAMESPACES = {"file", "image", "media", "category", "wikipedia", "wp", "wikt", "wiktionary", "template"}
_HEADING, _ITEM = "\ue000", "\ue001"  # line markers between rendering and line post-processing
_LEFTOVER_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:–-]\s*)*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_MAGIC = re.compile(r"__[A-Z]+__")
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_TABLE_START = re.compile(r"^[:*#;\s]*\{\|")


def _render(code) -> str:
    """Visible prose of parsed wikitext: link text kept, templates/tables/refs/files/comments dropped."""
    out = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Wikilink):
            title = str(node.title).strip()
            prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
            # Interlanguage links ([[de:...]]) have a 2-3 letter (or xx-yy) code as prefix.
            if prefix in _DROP_LINK_NAMESPACES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix):
                continue
            out.append(_render(node.text) if node.text is not None else title.lstrip(":"))
        elif isinstance(node, nodes.ExternalLink):
            out.append(_render(node.title) if node.title is not None and node.brackets else "")
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, nodes.Heading):
            out.append(f"\n{_HEADING}{node.level}{_render(node.title).strip()}\n")
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in ("li", "dt", "dd") and node.wiki_markup:
                out.append(f"\n{_ITEM}")
            elif tag == "br":
                out.append(" ")
            elif tag not in DROP_TAGS and node.contents is not None:
                out.append(_render(node.contents))
        # Templates, comments, arguments ({{{x}}}) and parser functions carry no prose here.
    return "".join(out)


def _looks_like_prose(line: str, min_words: int) -> bool:
    return (
        len(line.split()) >= min_words and line[-1:] in ".!?\"'”’)" and sum(c.isalpha() for c in line) > len(line) / 2
    )


def _strip_tables(text: str) -> str:
    """Drop wiki tables line by line, indented ones (``:{|``) included, which the parser leaves as text."""
    out, depth = [], 0
    for line in text.split("\n"):
        if _TABLE_START.match(line):
            depth += 1
        elif depth and line.lstrip().startswith("|}"):
            depth -= 1
        elif not depth:
            out.append(line)
    return "\n".join(out)


def clean_wikitext(text: str) -> list[str]:
    text = _strip_tables(_COMMENT.sub("", text))
    rendered = html.unescape(_render(mwparserfromhell.parse(text)))
    paragraphs: list[str] = []
    current: list[str] = []
    skip_level = 0  # inside a dropped section ("References"...) until a heading of the same or higher level

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in rendered.splitlines():
        line = _MAGIC.sub("", _LEFTOVER_TAG.sub("", line)).strip()
        if line.startswith(_HEADING):
            flush()
            level, title = int(line[1]), line[2:].strip().rstrip(":").lower()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title in DROP_SECTIONS else 0
            continue  # headings are titles, not sentences
        if skip_level:
            continue
        if not line or line.startswith(("{|", "|", "!")):  # blank, or a table remnant the parser left as text
            flush()
            continue
        line = line.replace("{{", "").replace("}}", "").replace("[[", "").replace("]]", "")
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", line)).strip()
        if line.startswith(_ITEM):
            # List items are kept, as their own paragraph, only when they read as sentences (six or more
            # words ending in sentence punctuation); lists of names, links and dates are not prose.
            flush()
            item = line.lstrip(_ITEM + " *#:;").strip()
            if _looks_like_prose(item, 6):
                paragraphs.append(item)
        elif line:
            current.append(line)
    flush()
    return [p for p in paragraphs if sum(c.isalpha() for c in p) >= 3]


# -------------------------------------------------------------------------------------------------- books

_GUTENBERG_START = re.compile(r"^\s*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\s*\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK", re.I | re.M)
# "CHAPTER I.", "Chapter 12: Title", "BOOK THE FIRST", "STAVE ONE" (numerals are matched case-sensitively so that
# "Part of the..." stays prose).
_HEADING_WORDS = re.compile(
    r"^(?i:chapter|book|part|volume|letter|stave|section|act|scene|canto|preface|contents)\b"
    r"(\s*$|\.?\s+([IVXLCDM]+|\d+|[A-Z]+)\b.{0,70}$)"
)
_ROMAN = re.compile(r"^[IVXLCDM]+\.?$")
_ILLUSTRATION = re.compile(r"\[(Illustration|Footnote|Sidenote)[^\]]*\]", re.I)
_SENTENCE_END = tuple(".!?…\"'”’)]:;—-")


def is_gutenberg(text: str) -> bool:
    return _GUTENBERG_START.search(text[:100_000]) is not None


def strip_gutenberg(text: str) -> str:
    """Text between the ``*** START OF ... ***`` line and the ``*** END OF ...`` line (licence removed)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


_LETTER = re.compile(r"[^\W\d_]")


def _is_heading(paragraph: str, n_lines: int) -> bool:
    # Cheap tests first: this runs on every paragraph of every book.
    if _HEADING_WORDS.match(paragraph) or _ROMAN.match(paragraph) or not _LETTER.search(paragraph):
        return True
    if len(paragraph) > 80 or n_lines > 2:
        return False
    # Titles and headings are short and unpunctuated ("Down the Rabbit-Hole", "THE END"); dialogue is punctuated.
    return paragraph.isupper() or not paragraph.endswith(_SENTENCE_END)


def clean_book(text: str) -> list[str]:
    """Paragraphs of a book: licence header/footer gone, hard-wrapped lines joined, headings dropped."""
    text = _ILLUSTRATION.sub("", strip_gutenberg(text))
    paragraphs = []
    for lines in blocks(text):
        # A block of "CHAPTER I. Title" lines is a table of contents.
        kept = [ln for ln in lines if not _HEADING_WORDS.match(ln)]
        if not kept or (len(kept) < len(lines) and len(kept) <= 2 and len(" ".join(kept)) <= 80):
            continue  # a heading block: "CHAPTER XI." and its title ("Who Stole the Tarts?")
        lines = kept
        paragraph = re.sub(r"(?<!\w)_|_(?!\w)", "", " ".join(lines))  # _italics_ markers
        if not _is_heading(paragraph, len(lines)):
            paragraphs.append(paragraph)
    return paragraphs


# ------------------------------------------------------------------------------------------ text, pydocs


def clean_text(text: str) -> list[str]:
    """Plain text: blank-line separated paragraphs, the lines of each joined."""
    return [" ".join(lines) for lines in blocks(text)]


_RST_ROLE = re.compile(r":[\w-]+(?::[\w-]+)*:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`_{0,2}")
_UNDERLINE = re.compile(r"^([*=~^+#-])\1{2,}$")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


_CODE_MARKS = re.compile(r"::=|>>>|\s=\s|[{}]|^\s*(def|class|import|from|return|print)\b", re.M)


def _indented_prose(block: str) -> bool:
    """An indented block that reads as sentences rather than code or grammar: no code marks, ends a sentence."""
    words = block.split()
    return len(words) >= 6 and block.rstrip()[-1:] in '.!?:)"”' and not _CODE_MARKS.search(block)


def clean_pydocs(text: str) -> list[str]:
    """Prose of docstrings: doctest examples, code and literal blocks, signatures and reST markup dropped."""
    paragraphs = []
    for raw in text.split("\n\n"):
        if raw.startswith((" ", "\t")) and _indented_prose(raw):
            raw = textwrap.dedent(raw)  # a definition's body ("object.__call__(self)" then its description)
        lines = raw.split("\n")
        kept = []
        for i, line in enumerate(lines):
            stripped = line.strip()
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if (
                not stripped
                or line.startswith((" ", "\t"))  # indented: a code or literal block, or a grammar rule
                or stripped.startswith((">>>", "...", ".. ", "$ ", "%"))
                or _UNDERLINE.match(stripped)
                or _UNDERLINE.match(nxt)  # a section title over its underline
                or _SIGNATURE.match(stripped)
            ):
                continue
            kept.append(stripped)
        paragraph = " ".join(kept).replace("::", ":")
        paragraph = _RST_LITERAL.sub(lambda m: m.group(1) or m.group(2) or "", _RST_ROLE.sub(r"\1", paragraph))
        if len(paragraph.split()) >= 4 and sum(c.isalpha() for c in paragraph) > 0.6 * len(paragraph.replace(" ", "")):
            paragraphs.append(paragraph)
    return paragraphs


def clean_document(raw: RawDoc) -> list[str]:
    """Prose paragraphs of one raw document, by kind (records of jsonl/parquet/arrow/hub are plain text)."""
    if raw.kind == "wiki":
        return clean_wikitext(raw.text)
    if raw.kind == "books":
        return clean_book(raw.text)
    if raw.kind == "pydocs":
        return clean_pydocs(raw.text)
    return clean_text(raw.text)
