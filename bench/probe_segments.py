"""Segment size against query latency and build work, on one Qdrant Edge shard.

    python bench/probe_segments.py [--points 163840] [--max-segment 12288 65536 ...]

For each ``max_segment_points`` (in turn, one fresh shard each): random unit vectors of
384 floats with repd's hybrid layout and payload are written 4,096 at a time, each
batch followed by ``maybe_build_index`` (threshold 8,192, as repd's default), then 100
random queries are timed, dense and hybrid. Prints the total and longest build time,
the segment count and query p50/p99. This decided ``REPLICA_SEGMENT_POINTS``: with the
replicated store a build never pauses the daemon, so segments may grow.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from repd.adapters.store_edge import EdgeStore
from repd.core.types import (
    PointRecord,
    SearchMode,
    SparseVec,
)

DIM = 384
BATCH = 4096
THRESHOLD = 8192


def probe(path: Path, points: int, max_segment: int) -> dict[str, float]:
    """Write, build and query one shard; returns its figures."""
    rng = np.random.default_rng(0)
    store = EdgeStore.open(path, DIM, hybrid=True, index_threshold=THRESHOLD,
                           max_segment_points=max_segment)
    builds: list[float] = []
    try:
        for start in range(0, points, BATCH):
            vecs = rng.standard_normal((BATCH, DIM)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store.upsert([PointRecord(
                str(uuid.UUID(int=start + j + 1)), vecs[j].tolist(),
                {"root": "r", "path": f"f{(start + j) // 10}.txt", "ext": ".txt",
                 "chunk_hash": f"h{start + j}"},
                SparseVec(sorted(rng.choice(30_000, 20, replace=False).tolist()), [1.0] * 20))
                for j in range(BATCH)])
            t = time.perf_counter()
            if store.maybe_build_index():
                builds.append(time.perf_counter() - t)
        out = {"builds_s": sum(builds), "build_max_s": max(builds, default=0.0),
               "segments": float(store.info()["segments"])}  # type: ignore[arg-type]
        modes: tuple[SearchMode, ...] = ("dense", "hybrid")
        for mode in modes:
            times = []
            for _ in range(100):
                q = rng.standard_normal(DIM).tolist()
                sparse = SparseVec(sorted(rng.choice(30_000, 3, replace=False).tolist()),
                                   [1.0] * 3)
                t = time.perf_counter()
                store.search(q, 10, sparse=sparse, mode=mode)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out[f"{mode}_p50_ms"], out[f"{mode}_p99_ms"] = times[50], times[98]
        return out
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--points", type=int, default=163_840)
    ap.add_argument("--max-segment", type=int, nargs="+", default=[12_288, 65_536])
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="repd-probe-segments-"))
    try:
        for m in args.max_segment:
            r = probe(work / f"s{m}", args.points, m)
            print(f"max_segment {m:>7}: builds {r['builds_s']:.1f} s (longest "
                  f"{r['build_max_s']:.1f} s), {r['segments']:.0f} segments; dense p50/p99 "
                  f"{r['dense_p50_ms']:.1f}/{r['dense_p99_ms']:.1f} ms, hybrid "
                  f"{r['hybrid_p50_ms']:.1f}/{r['hybrid_p99_ms']:.1f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
