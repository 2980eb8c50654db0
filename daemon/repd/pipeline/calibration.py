"""Chunk texts from the folders themselves, to calibrate an int8 variant before any index.

An int8 variant (``repd model use NAME+int8``) is calibrated on the user's own chunks.
Usually they come from the active index; on a fresh data folder whose configuration names
the variant from the start there is no index yet, so they are read here from the files
the first index will hold: the same ignore rules, size limit, secret rules and chunker
as the indexer. Nothing is written anywhere.

The chunker's token counts are estimated (about four characters a token) because the
model whose tokenizer would count them is the one being made; calibration needs text
shaped like the index's chunks, not the exact boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path

from repd.core.identity import stored_path
from repd.core.ignore import IgnoreRules
from repd.pipeline.plan import Planner
from repd.pipeline.scanner import walk

#: Files looked at, at most, per call: enough to spread the sample over a large tree
#: without walking all of it (a walk of 5,000 files takes ~0.1 s).
MAX_FILES = 5000
#: Tokens a chunk may hold: the common limit of small sentence models (MiniLM's 256).
CHUNK_TOKENS = 256
_CHARS_PER_TOKEN = 4


def _estimate_tokens(texts: list[str]) -> list[int]:
    return [max(1, len(t) // _CHARS_PER_TOKEN) for t in texts]


def _spread_key(item: tuple[Path, str]) -> str:
    # Ordered by a hash of the path, not by name: the sample reaches every folder of a
    # tree instead of the alphabetically first ones, and a tree always gives one sample.
    root, rel = item
    return hashlib.sha1(f"{root}\0{rel}".encode("utf-8", "surrogatepass")).hexdigest()


def _files(roots: Sequence[Path], rules: Callable[[Path], IgnoreRules],
           planner: Planner) -> Iterator[tuple[Path, str]]:
    """(root, stored path) of each file the indexer would read, root after root."""
    for root in roots:
        if root.is_file():  # a file named on its own: only it is read
            yield root.parent, stored_path(root.name)
        elif root.is_dir():
            for entry in walk(root, rules(root), follow_symlinks=planner.follow_symlinks,
                              allowed_roots=planner.allowed_roots):
                if entry.st is not None and entry.skip_reason is None and not entry.folder:
                    yield root, stored_path(entry.relpath)


def sample_chunk_texts(roots: Sequence[Path], rules: Callable[[Path], IgnoreRules],
                       planner: Planner, limit: int) -> list[str]:
    """Up to ``limit`` chunk texts from files below ``roots``, a few from each of many files.

    ``roots``: folders, or files named on their own (only those are read then).
    ``rules`` gives a root's ignore rules; ``planner`` reads and chunks (its size limit,
    secret rules and symlink policy apply, and a file it skips or fails gives nothing).
    Each of the first :data:`MAX_FILES` files (in walk order) may give ``limit / files``
    chunks, at least one; files are taken in an order spread over the tree.
    """
    files = list(islice(_files(roots, rules, planner), MAX_FILES))
    if not files or limit <= 0:
        return []
    per_file = max(1, -(-limit // len(files)))
    texts: list[str] = []
    for root, rel in sorted(files, key=_spread_key):
        try:
            plan = planner.plan(root, rel, None, None)
        except Exception:  # a file that cannot be read now simply gives no sample
            continue
        texts += [c.text for c in plan.chunks[:per_file] if c.text.strip()]
        if len(texts) >= limit:
            break
    return texts[:limit]


def chunk_planner(max_file_bytes: int, *, follow_symlinks: bool,
                  allowed_roots: Sequence[Path], allow_secrets: Sequence[str]) -> Planner:
    """A planner set up as the indexer's, chunking by estimated token counts."""
    def tokenizer() -> tuple[Callable[[list[str]], list[int]], int]:
        return _estimate_tokens, CHUNK_TOKENS

    return Planner(max_file_bytes, tokenizer, follow_symlinks=follow_symlinks,
                   allowed_roots=allowed_roots, allow_secrets=allow_secrets)
