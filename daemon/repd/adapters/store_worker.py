"""A store process: one Qdrant Edge shard served over a pipe (``python -m`` this module).

Qdrant Edge holds the GIL for the whole of a call, so an HNSW build in the daemon's own
process freezes every thread of it (the API included) for seconds. A shard in a process
of its own holds that process's GIL instead. ``store_replicas`` runs two of these and
sends queries to the one that is not building.

Protocol (both directions): frames of an 8-byte big-endian length and a pickle. A
request is ``(method, args, kwargs)``; the reply ``("ok", result)`` or ``("err",
message)`` for a ``StoreError`` (``("fatal", traceback)`` for anything else). Requests
are served one at a time, in order, so replies come back in the order asked. The first
request must be ``open``. The process ends, closing its shard, at end of input.

The pipes are trusted: they connect the daemon to a child it started itself (pickle).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from repd.process import die_with_parent

_HEADER = struct.Struct(">Q")
#: How much lower than the process's the priority of a build is (a nice increment):
#: on a machine with few cores the standby's build would otherwise take CPU time from
#: the serving replica's queries and the daemon's own work; under no contention it
#: changes nothing.
BUILD_NICE = 10


def write_frame(out: IO[bytes], obj: object) -> None:
    """Write one frame (length + pickle) and flush it."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def read_frame(inp: IO[bytes]) -> Any:
    """Read one frame; raises ``EOFError`` at a clean end of input."""
    head = inp.read(_HEADER.size)
    if not head:
        raise EOFError
    if len(head) < _HEADER.size:
        raise EOFError("truncated frame header")
    (size,) = _HEADER.unpack(head)
    data = inp.read(size)
    if len(data) < size:
        raise EOFError("truncated frame")
    return pickle.loads(data)  # our own child, over its own pipes


def pack_points(points: Sequence[Any]) -> tuple[list[str], np.ndarray, list[dict[str, Any]],
                                                 list[tuple[list[int], list[float]] | None]]:
    """``PointRecord``s as plain columns: dense vectors as one float32 array (pickled as
    bytes, ~10x faster than lists of floats)."""
    ids = [p.id for p in points]
    vectors = np.asarray([p.vector for p in points], dtype=np.float32)
    payloads = [dict(p.payload) for p in points]
    sparse = [(list(p.sparse.indices), list(p.sparse.values)) if p.sparse is not None else None
              for p in points]
    return ids, vectors, payloads, sparse


def _unpack_points(ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]],
                   sparse: list[tuple[list[int], list[float]] | None]) -> list[Any]:
    from repd.core.types import PointRecord, SparseVec

    rows = vectors.tolist()
    return [PointRecord(pid, row, payload, SparseVec(*sv) if sv is not None else None)
            for pid, row, payload, sv in zip(ids, rows, payloads, sparse, strict=True)]


def serve(inp: IO[bytes], out: IO[bytes]) -> int:
    """Serve requests until end of input; returns the process's exit status."""
    from repd.adapters.store import StoreError
    from repd.adapters.store_edge import EdgeStore

    store: EdgeStore | None = None

    def call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        nonlocal store
        if method == "open":
            path, dim = args
            store = EdgeStore.open(path, dim, **kwargs)
            return None
        if store is None:
            raise StoreError("the store process has no shard open")
        if method == "upsert_packed":
            store.upsert(_unpack_points(*args))
            return None
        if method == "ids":
            return list(store.iter_ids())
        if method == "written_since_build":
            return store.written_since_build
        if method == "maybe_build_index":
            return in_low_priority_thread(store.maybe_build_index, **kwargs)
        handlers: dict[str, Callable[..., object]] = {
            "delete": store.delete, "flush": store.flush, "search": store.search,
            "retrieve": store.retrieve, "count": store.count, "info": store.info,
            "close": store.close,
            "drop": store.drop,
        }
        if method not in handlers:
            raise StoreError(f"unknown store request {method!r}")
        return handlers[method](*args, **kwargs)

    while True:
        try:
            method, args, kwargs = read_frame(inp)
        except EOFError:
            break
        try:
            reply: tuple[str, object] = ("ok", call(method, args, kwargs))
        except StoreError as exc:
            reply = ("err", str(exc))
        except Exception:
            reply = ("fatal", traceback.format_exc())
        write_frame(out, reply)
    if store is not None:
        try:
            store.close()  # the parent went away: flush and release the WAL lock
        except StoreError as exc:
            print(f"repd store process: {exc}", file=sys.stderr)
    return 0


def in_low_priority_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new thread of ``BUILD_NICE`` lower priority, waited for.

    Qdrant Edge builds HNSW in threads it starts for each build, and a thread inherits
    its creator's nice value, so the whole build runs at the lower priority. Linux
    alone has per-thread priorities; elsewhere ``fn`` runs as it is.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="repd-build",
                            initializer=_lower_thread_priority) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _lower_thread_priority() -> None:
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid,
                           min(19, os.getpriority(os.PRIO_PROCESS, tid) + BUILD_NICE))


def main() -> int:
    """Entry point: frames on stdin/stdout; stray prints of libraries go to stderr.

    ``argv[1]``: the parent's pid (see :func:`repd.process.die_with_parent`)."""
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    # The daemon alone decides when this process ends (end of input, or its death):
    # Ctrl-C or a closed terminal signals the whole process group, and systemd's stop
    # sends SIGTERM to the whole unit; dying then would lose writes the daemon is still
    # sending while it stops in order (and SIGHUP means "reload" to the daemon).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else written to stdout must not corrupt the frames
    sys.stdout = sys.stderr
    return serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main())
