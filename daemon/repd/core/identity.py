"""Deterministic identities: point ids, content hashes, stat signatures."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

# A fixed namespace so the same (root, path, ordinal, chunk) always maps to the same id,
# in every process and on every machine: a retried upsert overwrites, never duplicates.
POINT_NAMESPACE = uuid.UUID("6f1c2b5e-6a43-4c35-9a57-0d3b8f7f2a11")


def point_id(root: str, relpath: str, ordinal: int, chunk_hash: str) -> str:
    """The UUID of a chunk's point."""
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
