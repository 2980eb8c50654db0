"""Path globs for ``--path``: ``*`` within a folder, ``**`` across folders, ``?`` one char,
``[abc]`` / ``[a-z]`` / ``[!abc]`` one char of a class, ``{a,b}`` alternatives, ``\\``
escapes the next character (``a\\[1\\].md`` is the file ``a[1].md``).

A glob is relative to its root. One without a ``/`` may also match the file name alone
(``*.md`` matches ``docs/a.md``); one starting with ``/`` is anchored at the root and
never does (``/README.md`` is only the root's own README); a glob without wildcards also
matches everything below the folder it names (``docs`` = ``docs/**``).

Matching is linear in the path's length whatever the glob: the glob becomes a small
automaton whose set of live states is one integer (a bit per position), advanced once per
character of the path. A backtracking regex, which this replaced, took 15 s on
``"******************x"`` while holding the GIL, freezing the whole daemon. Braces expand
into at most :data:`MAX_ALTERNATIVES` globs, each matched the same way.

An invalid glob (an unbalanced ``[``, ``{`` or ``}``, a lone trailing ``\\``, too many
alternatives) raises :class:`GlobError` with the reason, rather than matching nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

# Token kinds. A STAR may match nothing or any run of characters except "/"; a GLOBSTAR
# any run at all; "**/" (DIRS) nothing, or anything that ends with a "/". ONE and CLASS
# consume one character other than "/".
_LIT, _ONE, _STAR, _GLOBSTAR, _DIRS, _CLASS = range(6)
_STARLIKE = (_STAR, _GLOBSTAR, _DIRS)

#: Most globs one ``{...}`` expansion may produce.
MAX_ALTERNATIVES = 32
#: Deepest nesting of braces.
MAX_BRACE_DEPTH = 8
_MAGIC = frozenset("*?[{")
_ESCAPE_RE = re.compile(r"([\\*?\[\]{}])")
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


class GlobError(ValueError):
    """An invalid glob; the message says what is wrong and where (1-based positions)."""


@dataclass(frozen=True, slots=True)
class _Class:
    """``[...]``: one character (never "/") in, or with ``negated`` not in, the set."""

    negated: bool
    chars: frozenset[str]
    ranges: tuple[tuple[str, str], ...]

    def accepts(self, ch: str) -> bool:
        if ch == "/":
            return False
        hit = ch in self.chars or any(lo <= ch <= hi for lo, hi in self.ranges)
        return hit != self.negated


_Token = tuple[int, str, _Class | None]


@dataclass(frozen=True, slots=True)
class _Automaton:
    """Bit ``i`` of a state set means "the first ``i`` positions have matched"."""

    size: int  # positions; bit ``size`` is the accepting state
    lit: dict[str, int]  # char -> positions that consume exactly it
    one: int  # "?": consume one char except "/"
    star: int  # "*": loop on any char except "/"
    globstar: int  # "**": loop on any char
    # "**/" is "(?:[^/]*/)*", zero or more folder names, in two positions: ``dirs`` at a
    # folder boundary (stays there on "/", goes inside on anything else, may leave on
    # nothing) and ``dirs + 1`` inside a name (loops on non-"/", back to ``dirs`` on "/").
    dirs: int
    eps1: int  # may move to i+1 on nothing ("*", "**")
    eps2: int  # may move to i+2 on nothing (a "**/" at a boundary)
    classes: tuple[tuple[int, _Class], ...] = ()  # "[...]": (position bit, class)
    #: char -> positions of classes that take it, filled as characters are first seen, so
    #: a glob of many classes costs one lookup per character like a literal.
    class_bits: dict[str, int] = field(default_factory=dict, compare=False)

    def _classes_taking(self, ch: str) -> int:
        bits = self.class_bits.get(ch)
        if bits is None:
            bits = 0
            for bit, cls in self.classes:
                if cls.accepts(ch):
                    bits |= bit
            self.class_bits[ch] = bits  # the same value from any thread
        return bits

    def closure(self, states: int) -> int:
        # Adjacent star-like tokens are merged when parsing, so this settles in a step or two.
        while True:
            grown = states | ((states & self.eps1) << 1) | ((states & self.eps2) << 2)
            if grown == states:
                return states
            states = grown

    def matches(self, text: str) -> bool:
        states = self.closure(1)
        accept = 1 << self.size
        inside = self.dirs << 1
        for ch in text:
            if ch == "/":
                states = (
                    ((states & self.lit.get(ch, 0)) << 1)
                    | (states & (self.globstar | self.dirs))
                    | ((states & inside) >> 1)
                )
            else:
                consume = self.lit.get(ch, 0) | self.one | self.dirs
                if self.classes:
                    consume |= self._classes_taking(ch)
                states = (
                    ((states & consume) << 1)
                    | (states & (self.star | self.globstar | inside))
                )
            if not states:
                return False
            states = self.closure(states)
        return bool(states & accept)


# -- parsing -------------------------------------------------------------------------------

def _normalise(glob: str) -> str:
    glob = glob.strip()
    while glob.startswith("./"):
        glob = glob[2:]
    return glob


def _class_end(glob: str, i: int) -> int:
    """Index just past the ``]`` closing the class opened at ``i``."""
    j = i + 1
    if j < len(glob) and glob[j] in "!^":
        j += 1
    if j < len(glob) and glob[j] == "]":  # "[]a]": a "]" first is a member
        j += 1
    while j < len(glob) and glob[j] != "]":
        j += 2 if glob[j] == "\\" else 1
    if j >= len(glob):
        raise GlobError(f"unbalanced '[' at position {i + 1}: a character class needs its "
                        "closing ']' (write '\\[' for a literal '[')")
    return j + 1


def _parse_class(glob: str, i: int) -> tuple[_Class, int]:
    end = _class_end(glob, i)
    body = glob[i + 1 : end - 1]
    negated = bool(body) and body[0] in "!^"
    if negated:
        body = body[1:]
    items: list[tuple[str, bool]] = []  # (character, is an unescaped "-")
    k = 0
    while k < len(body):
        if body[k] == "\\" and k + 1 < len(body):
            items.append((body[k + 1], False))
            k += 2
        else:
            items.append((body[k], body[k] == "-"))
            k += 1
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    m = 0
    while m < len(items):
        ch = items[m][0]
        if m + 2 < len(items) and items[m + 1][1]:  # "a-z"; a "-" first or last is itself
            hi = items[m + 2][0]
            if hi < ch:
                raise GlobError(f"the range '{ch}-{hi}' in the class at position {i + 1} "
                                "is backwards")
            ranges.append((ch, hi))
            m += 3
        else:
            chars.add(ch)
            m += 1
    return _Class(negated, frozenset(chars), tuple(ranges)), end


def _expand(glob: str) -> list[str]:
    """The glob's brace alternatives (escapes and classes kept as written)."""
    out, _ = _sequence(glob, 0, None, 0)
    return out


def _sequence(glob: str, i: int, opened: int | None, depth: int) -> tuple[list[str], int]:
    """Alternatives of ``glob[i:]`` up to a "," or "}" of the brace opened at ``opened``
    (None: the whole glob)."""
    results = [""]

    def add(pieces: list[str]) -> None:
        nonlocal results
        results = [r + p for r in results for p in pieces]
        if len(results) > MAX_ALTERNATIVES:
            raise GlobError(f"the braces expand to more than {MAX_ALTERNATIVES} alternatives")

    while i < len(glob):
        c = glob[i]
        if c == "\\":
            if i + 1 >= len(glob):
                raise GlobError("the glob ends with a lone '\\' (write '\\\\' for a "
                                "backslash)")
            add([glob[i : i + 2]])
            i += 2
        elif c == "[":
            j = _class_end(glob, i)
            add([glob[i:j]])
            i = j
        elif c == "{":
            if depth >= MAX_BRACE_DEPTH:
                raise GlobError(f"braces nested more than {MAX_BRACE_DEPTH} deep")
            alts: list[str] = []
            j = i + 1
            while True:
                part, j = _sequence(glob, j, i, depth + 1)
                alts.extend(part)
                if glob[j] == "}":
                    break
                j += 1  # past the ","
            add(list(dict.fromkeys(alts)))
            i = j + 1
        elif opened is not None and c in ",}":
            return results, i
        elif c == "}":
            raise GlobError(f"unbalanced '}}' at position {i + 1} (write '\\}}' for a "
                            "literal '}')")
        else:
            add([c])
            i += 1
    if opened is not None:
        raise GlobError(f"unbalanced '{{' at position {opened + 1}: alternatives need their "
                        "closing '}' (write '\\{' for a literal '{')")
    return results, i


def _tokens(glob: str) -> list[_Token]:
    out: list[_Token] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "\\":
            out.append((_LIT, glob[i + 1], None))  # _expand refused a lone trailing "\"
            i += 2
            continue
        if c == "[":
            cls, i = _parse_class(glob, i)
            out.append((_CLASS, "", cls))
            continue
        if glob.startswith("**/", i):
            kind, i = _DIRS, i + 3
        elif glob.startswith("**", i):
            kind, i = _GLOBSTAR, i + 2
        elif c == "*":
            kind, i = _STAR, i + 1
        elif c == "?":
            out.append((_ONE, "", None))
            i += 1
            continue
        else:
            out.append((_LIT, c, None))
            i += 1
            continue
        # Merge with a star-like token just before it where the pair means the same as one
        # of them: "***..." is "**", "**/**/" is "**/", "**" next to anything star-like is "**".
        prev = out[-1][0] if out else None
        if prev in _STARLIKE and not (prev == _STAR and kind == _DIRS):
            if prev == _DIRS and kind == _DIRS:
                continue
            out[-1] = (_GLOBSTAR, "", None)  # "**/*" ("(.*/)?[^/]*") is exactly ".*"
            continue
        out.append((kind, "", None))
    return out


@dataclass(frozen=True, slots=True)
class _Alternative:
    """One brace alternative, parsed."""

    tokens: tuple[_Token, ...]
    automaton: _Automaton
    anchored: bool  # written with a leading "/": never matched against the name alone
    has_slash: bool
    literal: str | None  # the unescaped text when it has no wildcard at all


def _build(tokens: list[_Token]) -> _Automaton:
    lit: dict[str, int] = {}
    one = star = globstar = dirs = eps1 = eps2 = 0
    classes: list[tuple[int, _Class]] = []
    pos = 0
    for kind, ch, cls in tokens:
        bit = 1 << pos
        if kind == _LIT:
            lit[ch] = lit.get(ch, 0) | bit
        elif kind == _ONE:
            one |= bit
        elif kind == _CLASS:
            assert cls is not None
            classes.append((bit, cls))
        elif kind == _STAR:
            star |= bit
            eps1 |= bit
        elif kind == _GLOBSTAR:
            globstar |= bit
            eps1 |= bit
        else:
            dirs |= bit
            eps2 |= bit
            pos += 1
        pos += 1
    return _Automaton(pos, lit, one, star, globstar, dirs, eps1, eps2, tuple(classes))


@lru_cache(maxsize=256)
def _compile(glob: str) -> tuple[_Alternative, ...]:
    alts: list[_Alternative] = []
    for alt in dict.fromkeys(_expand(_normalise(glob))):
        anchored = alt.startswith("/")
        body = alt.lstrip("/") if anchored else alt
        tokens = _tokens(body)
        has_slash = anchored or any(k == _DIRS or (k == _LIT and c == "/")
                                    for k, c, _ in tokens)
        literal = ("".join(c for _, c, _ in tokens) if all(k == _LIT for k, _, _ in tokens)
                   else None)
        alts.append(_Alternative(tuple(tokens), _build(tokens), anchored, has_slash, literal))
    return tuple(alts)


# -- the interface ---------------------------------------------------------------------------

def check_glob(glob: str) -> None:
    """Raise :class:`GlobError` (the reason in its message) unless ``glob`` is valid."""
    _compile(glob)


def match_path(glob: str, relpath: str) -> bool:
    """True when ``relpath`` (relative to its root, POSIX) matches ``glob``; a glob
    without ``/`` may also match the file name alone, and one without wildcards matches
    everything below the folder it names (``docs`` = ``docs/**``).

    Runs in time linear in ``len(relpath)`` (times the glob's length over 64, the cost of
    one integer operation on its state set, and the number of brace alternatives),
    never backtracking. Raises :class:`GlobError` for an invalid glob.
    """
    for alt in _compile(glob):
        if alt.automaton.matches(relpath):
            return True
        if not alt.has_slash and alt.automaton.matches(relpath.rsplit("/", 1)[-1]):
            return True
        if alt.literal is not None and alt.literal.strip("/") and relpath.startswith(
                alt.literal.rstrip("/") + "/"):
            return True
    return False


def literal_prefix(glob: str) -> str:
    """A plain string prefix of every path ``glob`` matches (for a store-side filter):
    the text before its first wildcard, "" when it may match a file name anywhere."""
    heads: list[str] = []
    for alt in _compile(glob):
        if not alt.has_slash:
            return ""
        head = []
        for kind, ch, _ in alt.tokens:
            if kind != _LIT:
                break
            head.append(ch)
        heads.append("".join(head))
    # A plain string prefix, not whole folders: what the store's prefix filter takes.
    return os.path.commonprefix(heads) if heads else ""  # noqa: RUF071


def glob_exts(glob: str) -> tuple[str, ...] | None:
    """The file extensions (lower-cased, with the dot, ``""`` for none, as the payload's
    ``ext``) every path ``glob`` matches has one of, or None when it may be any.

    ``**/*.py`` gives ``(".py", "")``: "" because ``*`` may match nothing, and a file
    named just ``.py`` has no extension; ``src/*_test.py`` gives ``(".py",)``;
    ``*.{md,rst}`` gives ``("", ".md", ".rst")``.
    """
    exts: set[str] = set()
    for alt in _compile(glob):
        if alt.literal is not None:
            return None  # also a folder: anything below it matches
        tokens = list(alt.tokens)
        cut = max((n for n, (k, c, _) in enumerate(tokens)
                   if k == _DIRS or (k == _LIT and c == "/")), default=-1)
        segment = tokens[cut + 1 :]
        tail: list[str] = []
        for kind, ch, _ in reversed(segment):
            if kind != _LIT:
                break
            tail.append(ch)
        tail.reverse()
        suffix = "".join(tail)
        dot = suffix.rfind(".")
        if dot < 0 or dot == len(suffix) - 1:
            return None
        # A name that is just ".x" has no extension ("", as for any dot file): so when
        # nothing must come before the dot in the name, "" is one of the extensions.
        before = segment[: len(segment) - len(suffix) + dot]
        if not before:  # the name is exactly ".x"
            exts.add("")
            continue
        exts.add(suffix[dot:].lower())
        needs_char = False
        for kind, _, _ in reversed(before):
            if kind == _STAR:
                continue
            needs_char = kind in (_LIT, _ONE, _CLASS)  # "/" was cut off above
            break
        if not needs_char:
            exts.add("")
    return tuple(sorted(exts))


def has_magic(glob: str) -> bool:
    """True when ``glob`` holds a wildcard, a class or braces (not escaped)."""
    i = 0
    while i < len(glob):
        if glob[i] == "\\":
            i += 2
            continue
        if glob[i] in _MAGIC:
            return True
        i += 1
    return False


def escape(text: str) -> str:
    """``text`` as a glob that matches exactly it."""
    return _ESCAPE_RE.sub(r"\\\1", text)


def unescape(text: str) -> str:
    """The literal text of a glob without wildcards (escapes removed)."""
    return _UNESCAPE_RE.sub(r"\1", text)


def split_literal_head(glob: str) -> tuple[str, str]:
    """(the leading folders free of wildcards, unescaped; the rest of the glob).

    ``/home/me/notes/**/*.md`` gives ``("/home/me/notes", "**/*.md")``; a glob without
    wildcards is all head: ``("/home/me/notes/a.md", "")``.
    """
    parts = glob.split("/")
    for n, part in enumerate(parts):
        if has_magic(part):
            return unescape("/".join(parts[:n])), "/".join(parts[n:])
    return unescape(glob), ""
