"""Document structure: sections (with heading breadcrumbs) and blocks, and finer splits.

Everything here works on character offsets into ``Document.text`` so that a chunk's
body is always an exact slice of the source and its line range is trivially right.
A block span ``(start, end)`` has no leading or trailing whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

from repd.core.types import Document

Span = tuple[int, int]


@dataclass(slots=True)
class Section:
    """A run of blocks under one heading path; chunks never cross sections."""

    crumb: str
    blocks: list[Span] = field(default_factory=list)


_BLANK_SEP = re.compile(r"\n[ \t\f\v\r]*\n")
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+|$)(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r" {0,3}(=+|-{2,})[ \t]*$")
_THEMATIC = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_RST_ADORN = re.compile(r"([!-/:-@\[-`{-~])\1{2,}[ \t]*$")


def _line_offsets(lines: list[str]) -> list[int]:
    offs = [0] * (len(lines) + 1)
    pos = 0
    for i, line in enumerate(lines):
        offs[i] = pos
        pos += len(line) + 1
    offs[len(lines)] = pos
    return offs


def _span_of_lines(text: str, offs: list[int], first: int, last: int) -> Span | None:
    """Offsets of lines ``first..last`` (inclusive) with surrounding whitespace trimmed."""
    start, end = offs[first], offs[last + 1] - 1
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    """Blank-line separated blocks of ``text[start:end]``, trimmed."""
    end = len(text) if end is None else end
    spans: list[Span] = []
    pos = start
    for m in _BLANK_SEP.finditer(text, start, end):
        spans.extend(_trimmed(text, pos, m.start()))
        pos = m.end()
    spans.extend(_trimmed(text, pos, end))
    return spans


def _trimmed(text: str, start: int, end: int) -> list[Span]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return [(start, end)] if end > start else []


def _heading(stack: list[tuple[int, str]], level: int, title: str) -> str:
    """Push a heading onto the path and return the new breadcrumb."""
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, " ".join(title.split())))
    return " > ".join(t for _, t in stack if t)


def markdown_sections(text: str) -> list[Section]:
    """ATX and setext headings start sections; fences and lists stay whole blocks."""
    lines = text.split("\n")
    offs = _line_offsets(lines)
    n = len(lines)
    sections = [Section("")]
    stack: list[tuple[int, str]] = []
    para: int | None = None  # first line of the pending block
    is_list = False

    def flush(last: int) -> None:
        nonlocal para
        if para is not None:
            span = _span_of_lines(text, offs, para, last)
            if span:
                sections[-1].blocks.append(span)
        para = None

    i = 0
    if lines[0].strip() == "---":  # YAML front matter, or its `---` would read as setext
        for j in range(1, n):
            if lines[j].strip() in ("---", "..."):
                para = 0
                flush(j)
                i = j + 1
                break
    while i < n:
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            mark = fence.group(1)
            j = i + 1
            while j < n and not lines[j].lstrip().startswith(mark[0] * len(mark)):
                j += 1
            j = min(j, n - 1)
            if not (para is not None and is_list and line[:1].isspace()):
                flush(i - 1)
                para, is_list = i, False
                flush(j)
            i = j + 1
            continue
        if not line.strip():
            if para is not None and is_list:
                k = i + 1
                while k < n and not lines[k].strip():
                    k += 1
                if k < n and (_LIST_ITEM.match(lines[k]) or lines[k][:2].isspace()):
                    i = k  # a loose list continues past its blank lines
                    continue
            flush(i - 1)
        elif (atx := _ATX.match(line)) is not None:
            flush(i - 1)
            sections.append(Section(_heading(stack, len(atx.group(1)), atx.group(2))))
        elif para is not None and not is_list and _SETEXT.match(line):
            title = " ".join(lines[para:i])
            para = None
            sections.append(Section(_heading(stack, 1 if line.strip()[0] == "=" else 2, title)))
        elif _THEMATIC.match(line):
            flush(i - 1)
        elif para is None:
            para, is_list = i, _LIST_ITEM.match(line) is not None
        i += 1
    flush(n - 1)
    return sections


def rst_sections(text: str) -> list[Section]:
    """Underlined (and overlined) titles start sections; indented blocks join the one above."""
    lines = text.split("\n")
    offs = _line_offsets(lines)
    n = len(lines)
    sections = [Section("")]
    stack: list[tuple[int, str]] = []
    styles: list[tuple[str, bool]] = []  # reST ranks title styles by first appearance
    ranges: list[list[int]] = []  # [first, last] line ranges of the current section

    def close_section() -> None:
        for first, last in ranges:
            span = _span_of_lines(text, offs, first, last)
            if span:
                sections[-1].blocks.append(span)
        ranges.clear()

    def title(name: str, style: tuple[str, bool]) -> None:
        close_section()
        if style not in styles:
            styles.append(style)
        sections.append(Section(_heading(stack, styles.index(style), name)))

    para: int | None = None
    i = 0
    while i < n:
        line = lines[i]
        adorn = _RST_ADORN.match(line)
        if adorn and para is None and i + 2 < n and lines[i + 1].strip():
            under = _RST_ADORN.match(lines[i + 2])
            if under and under.group(1) == adorn.group(1):
                title(lines[i + 1].strip(), (adorn.group(1), True))
                i += 3
                continue
        if (
            para is None
            and line.strip()
            and not line[0].isspace()
            and i + 1 < n
            and (under := _RST_ADORN.match(lines[i + 1])) is not None
            and len(lines[i + 1].rstrip()) >= min(len(line.rstrip()), 4)
        ):
            title(line.strip(), (under.group(1), False))
            i += 2
            continue
        if not line.strip() or (adorn and para is None):
            if para is not None:
                indented = lines[para][:1].isspace()
                if indented and ranges:
                    ranges[-1][1] = i - 1
                else:
                    ranges.append([para, i - 1])
            para = None
        elif para is None:
            para = i
        i += 1
    if para is not None:
        if lines[para][:1].isspace() and ranges:
            ranges[-1][1] = n - 1
        else:
            ranges.append([para, n - 1])
    close_section()
    return sections


# --- source code -------------------------------------------------------------------

_DEF = re.compile(
    r"[ \t]*(?:(?:export|default|public|private|protected|internal|static|final|abstract|"
    r"async|pub(?:\([^)]*\))?|unsafe|extern(?:[ \t]+\"[^\"]*\")?|inline|virtual|override|"
    r"sealed|partial|open|data|declare|local|template[ \t]*<[^>]*>)[ \t]+)*"
    r"(?:def|function\*?|fn|func|class|struct|impl|interface|enum|type|trait|module|mod|"
    r"object|record|union|namespace|sub|proc|macro_rules!|protocol|extension|typedef|"
    r"let|val|var|const)\b"
)
# Comments, decorators and attributes that belong to the definition below them.
_ATTACH = re.compile(
    r"[ \t]*(?:#(?!(?:include|define|if|ifdef|ifndef|else|elif|endif|pragma|undef|import)\b)"
    r"|//|/\*|\*|--|;|@|\[|%)"
)
# Lines that close or continue the construct above; they never start a block.
_CLOSER = re.compile(
    r"[ \t]*(?:[}\])]|(?:end|fi|done|esac|else|elif|except|finally|catch|rescue|ensure)\b)"
)


def _python_string_lines(lines: list[str]) -> list[bool]:
    """Which lines begin inside a triple-quoted string, where no definition can start."""
    inside = [False] * len(lines)
    state: str | None = None
    for i, line in enumerate(lines):
        inside[i] = state is not None
        if '"""' in line or "'''" in line:
            for m in re.finditer(r"\"\"\"|'''", line):
                if state is None:
                    state = m.group()
                elif state == m.group():
                    state = None
    return inside


def code_block_starts(
    lines: list[str], lo: int, hi: int, indent: int, in_string: list[bool]
) -> list[int]:
    """Lines in ``lo..hi`` that open a definition or statement group at ``indent``.

    A group opens at a line of exactly that indentation after a blank line or a
    closing line, or at a definition/comment/decorator whose line above is not
    itself a comment or decorator (so a doc comment stays with what it documents).
    """
    starts = [lo]
    for i in range(lo + 1, hi + 1):
        line = lines[i]
        if len(line) <= indent or line[indent].isspace() or in_string[i]:
            continue
        if indent and not line[:indent].isspace():
            continue
        if _CLOSER.match(line):
            continue
        prev = lines[i - 1]
        prev_ind = len(prev) - len(prev.lstrip())
        if (
            not prev.strip()
            or (prev_ind == indent and _CLOSER.match(prev))
            or (
                (_DEF.match(line) or _ATTACH.match(line))
                and not (prev_ind == indent and _ATTACH.match(prev))
            )
        ):
            starts.append(i)
    return starts


def code_sections(text: str, language: str | None) -> list[Section]:
    """One section whose blocks are top-level definitions and statement groups."""
    lines = text.split("\n")
    offs = _line_offsets(lines)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return [Section("")]
    in_string = _python_string_lines(lines) if language == "python" else [False] * len(lines)
    starts = code_block_starts(lines, first, len(lines) - 1, 0, in_string)
    bounds = [*starts, len(lines)]
    section = Section("")
    for a, b in pairwise(bounds):
        span = _span_of_lines(text, offs, a, b - 1)
        if span:
            section.blocks.append(span)
    return [section]


def split_code_block(text: str, span: Span, language: str | None) -> list[Span]:
    """Split a code block at the statement groups of its body's outermost indentation."""
    start = text.rfind("\n", 0, span[0]) + 1
    source = text[start : span[1]]
    lines = source.split("\n")
    body = [len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()]
    if not body:
        return [span]
    in_string = _python_string_lines(lines) if language == "python" else [False] * len(lines)
    starts = code_block_starts(lines, 0, len(lines) - 1, min(body), in_string)
    offs = _line_offsets(lines)
    out: list[Span] = []
    for a, b in pairwise([*starts, len(lines)]):
        piece = _span_of_lines(source, offs, a, b - 1)
        if piece:
            out.append((max(span[0], start + piece[0]), start + piece[1]))
    return out


# --- finer splits for blocks over the token budget --------------------------------

# Western sentences end in punctuation and a space; CJK ones in full-width punctuation.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|[。！？]+[」』）]*\s*")
_LINE_END = re.compile(r"\n")
_WORD = re.compile(r"\S+")


def _split_by(pattern: re.Pattern[str], text: str, span: Span) -> list[Span]:
    out: list[Span] = []
    pos = span[0]
    for m in pattern.finditer(text, span[0], span[1]):
        out.extend(_trimmed(text, pos, m.end()))
        pos = m.end()
    out.extend(_trimmed(text, pos, span[1]))
    return out


def split_lines(text: str, span: Span) -> list[Span]:
    """Each non-blank line of the span."""
    return _split_by(_LINE_END, text, span)


def split_sentences(text: str, span: Span) -> list[Span]:
    """Sentences: cut after terminal punctuation followed by whitespace."""
    return _split_by(_SENTENCE_END, text, span)


def split_words(text: str, span: Span) -> list[Span]:
    """Whitespace-separated words."""
    return [m.span() for m in _WORD.finditer(text, span[0], span[1])]


def split_chars(text: str, span: Span, size: int) -> list[Span]:
    """Fixed-size character pieces: the last resort for one enormous word."""
    size = max(1, size)
    return [(a, min(a + size, span[1])) for a in range(span[0], span[1], size)]


def sections_for(doc: Document) -> list[Section]:
    """The sections of a document according to its kind."""
    parser: Callable[[str], list[Section]] | None = {
        "markdown": markdown_sections,
        "rst": rst_sections,
    }.get(doc.kind)
    if parser is not None:
        sections = [s for s in parser(doc.text) if s.blocks]
        if sections:
            return sections
        # Headings only: index their text rather than nothing.
    elif doc.kind == "code":
        return code_sections(doc.text, doc.language)
    return [Section("", paragraph_spans(doc.text))]
