"""Deterministic identities: point ids, content hashes, stat signatures, stored path names."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass

# A fixed namespace so the same (root, path, ordinal, chunk) always maps to the same id,
# in every process and on every machine: a retried upsert overwrites, never duplicates.
POINT_NAMESPACE = uuid.UUID("6f1c2b5e-6a43-4c35-9a57-0d3b8f7f2a11")


def point_id(root: str, relpath: str, ordinal: int, chunk_hash: str) -> str:
    """The UUID of a chunk's point (``relpath`` in its stored form, see :func:`stored_path`)."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{root}\x00{relpath}\x00{ordinal}\x00{chunk_hash}"))


def content_hash(data: bytes) -> str:
    """Hash of a file's raw bytes."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


@dataclass(frozen=True, slots=True)
class StatSig:
    """The stat fields that tell whether a file may have changed (as git's index does)."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatSig:
        """Take the signature of a stat result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


# Timestamps on common filesystems tick coarsely (ext4 ~ 4 ms via jiffies, FAT 2 s); a
# file written again within the same tick as our read keeps its mtime. Such "racy"
# entries are re-hashed on the next pass even when their stat matches.
RACY_WINDOW_NS = 2_000_000_000


def is_racy(sig: StatSig, indexed_at_ns: int) -> bool:
    """True when the file's mtime is too close to the moment it was read to be trusted."""
    return max(sig.mtime_ns, sig.ctime_ns) >= indexed_at_ns - RACY_WINDOW_NS


# --- file names that are not valid UTF-8 ---------------------------------------------
# Linux file names are bytes; Python hands the ones that are not valid UTF-8 over with
# each bad byte as a lone surrogate (U+DC80..U+DCFF, "surrogateescape"). SQLite, JSON
# payloads and uuid5 all refuse lone surrogates, so such a name would abort the write
# of its whole group. Names are therefore stored in a form that is always valid UTF-8:
#
# * a name with no lone surrogate and no backslash is stored as it is (nearly all);
# * otherwise every backslash becomes ``\\``, every escaped byte ``\xHH`` and any
#   other lone surrogate ``\uHHHH``.
#
# The form is injective (a stored name containing a backslash is always an escaped one,
# since names without one are stored unchanged), so two different files never share a
# row or a point id, and :func:`fs_path` gives the exact bytes back for reading.
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def stored_path(relpath: str) -> str:
    """The form of a path (as ``os`` returns it) kept in the manifest, point ids and payloads."""
    if "\\" not in relpath:
        try:
            relpath.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return relpath
    out: list[str] = []
    for ch in relpath:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # one undecodable byte, as surrogateescape keeps it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def fs_path(stored: str) -> str:
    """The inverse of :func:`stored_path`: the name to hand to ``os`` to reach the file."""
    if "\\" not in stored:
        return stored

    def one(m: re.Match[str]) -> str:
        tok = m.group(1)
        if tok == "\\":
            return tok
        code = int(tok[1:], 16)
        return chr(code + 0xDC00) if tok[0] == "x" else chr(code)

    return _ESCAPED.sub(one, stored)
