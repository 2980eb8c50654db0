"""Path globs for ``--path``: ``*`` within a folder, ``**`` across folders, ``?`` one char."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=256)
def _compile(glob: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def match_path(glob: str, relpath: str) -> bool:
    """True when ``relpath`` matches; a glob without ``/`` may also match the file name
    alone, and a plain folder name matches everything below it (``docs`` = ``docs/**``)."""
    glob = glob.strip().lstrip("./") if glob.startswith("./") else glob.strip()
    pat = _compile(glob)
    if pat.match(relpath):
        return True
    if "/" not in glob and pat.match(relpath.rsplit("/", 1)[-1]):
        return True
    return not any(c in glob for c in "*?") and relpath.startswith(glob.rstrip("/") + "/")


def literal_prefix(glob: str) -> str:
    """The folder part of a glob before its first wildcard (for a store-side filter)."""
    head = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] + "/" if "/" in head else ""
