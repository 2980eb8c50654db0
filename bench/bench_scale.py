"""Scale benchmark: ~1M chunks (100k files x 10) through the real write path.

    python bench/bench_scale.py [--files 100000] [--chunks-per-file 10]
        [--workdir /tmp/repd-scale] [--queries 300] [--daemon] [--index-threshold N]
        [--policy inline|idle|backlog] [--replicas] [--daemon-layouts single,replicas]
        [--builds-s 900] [--keep] [--out report.json]

``--policy`` says when HNSW is built while writing (``write_all``): ``inline`` as
``repd index`` does, ``idle`` as the daemon did before the build backlog (one build at
the end, over everything), ``backlog`` as the daemon does now. Comparing them on the
same size shows what bounds the longest stall: the points one build covers.

What is real and what is not: the files are real files on disk, and every chunk goes
through ``pipeline/writer.write_group`` into a real manifest (SQLite, the vector cache
filled as the indexer fills it) and a real Qdrant Edge shard of the hybrid layout (the
BM25 vectors come from the real encoder, over synthetic Zipf-distributed words). Only the
model is fake: each chunk's dense vector is a random unit vector of 384 floats, so
nothing here measures embedding. The store and the manifest are what is measured.

Phases and what each reports:

* write: groups of about 2,048 chunks (the one-shot indexer's group), each followed by
  ``EdgeStore.maybe_build_index`` as ``repd index`` does. A thread ticking every 5 ms
  records every gap in its ticks: the longest is the longest stall any Python thread
  saw, attributed to the HNSW builds (``optimize()`` holds the GIL) or to the rest of
  the write path (the store's flush holds it too).
* sizes: manifest (+ WAL) and store on disk; this process's RSS (now and peak).
* search (in-process): the engine's search path (``pipeline/search.search``), hybrid and
  dense, a random query vector and a real BM25 query vector: p50/p99.
* reconcile: a no-op ``Indexer.reconcile`` over the whole tree (nothing changed).
* ``--daemon``: then a real ``repd run`` on the same data folder, with the real MiniLM
  (the generation is recorded under its identity, so the daemon accepts the index and
  embeds nothing: every file's stat matches): time from start to idle, RSS, API query
  and status p50/p99 through the socket. ``--daemon-layouts single,replicas`` runs one
  daemon per layout in turn on the same folder (the second converts it, as a user
  switching ``store.replicas`` would).
* ``--builds-s``: then, in each daemon, the API while the store builds HNSW: a folder of
  1,000 files is deleted and the daemon's next idle check vacuums (rebuilds) the
  segments that lost points, and a store just converted to replicas merges its
  segments too; a probe queries through the API every 50 ms meanwhile (see
  ``builds_phase``).

Figures are absolute for this machine (2 shared cores); the ratios worth quoting are
within one run (build stall vs. the rest of the write path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.store_edge_bench import GilWatch  # noqa: E402
from repd.adapters import store_edge  # noqa: E402
from repd.adapters.lexical import default_encoder  # noqa: E402
from repd.adapters.manifest import Manifest  # noqa: E402
from repd.adapters.store_replicas import ReplicatedStore  # noqa: E402
from repd.core.identity import StatSig, content_hash, point_id  # noqa: E402
from repd.core.types import Chunk, SearchMode  # noqa: E402
from repd.engine import Engine  # noqa: E402
from repd.pipeline.plan import FilePlan  # noqa: E402
from repd.pipeline.search import search  # noqa: E402
from repd.pipeline.writer import GenWrite, write_group  # noqa: E402
from repd.settings import DEFAULT_MODEL, Settings, StoreSettings  # noqa: E402

DIM = 384
GROUP_CHUNKS = 2048  # the one-shot indexer's group size (pipeline/indexer.GROUP_CHUNKS)
EMBED_SLICE = 256  # vectors are cached one slice per transaction, as the indexer does
VOCAB = 30_000
WORDS_PER_CHUNK = 60
FILES_PER_DIR = 1000


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_kb(pid: int | str = "self") -> tuple[int, int]:
    """(current RSS, peak RSS) in KiB."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class FakeEmbedder:
    """Random unit vectors under a given model identity (nothing here is embedded)."""

    def __init__(self, model_name: str, model_id: str, seed: int = 7) -> None:
        self.model_name = model_name
        self.model_id = model_id
        self.dim = DIM
        self.max_tokens = 256
        self._rng = np.random.default_rng(seed)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """About four characters a token (only for the protocol; nothing is chunked)."""
        return [len(t) // 4 + 1 for t in texts]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One random unit vector per text."""
        v = self._rng.standard_normal((len(texts), DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v


class Words:
    """Synthetic words with a Zipf-like frequency, so BM25 vectors look like real text's."""

    def __init__(self, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        self.vocab = ["".join(rng.choice(letters, size=int(n)))
                      for n in rng.integers(3, 10, size=VOCAB)]
        weights = 1.0 / np.arange(1, VOCAB + 1) ** 1.07
        self.cdf = np.cumsum(weights / weights.sum())
        self.rng = np.random.default_rng(seed + 1)

    def chunks(self, n: int) -> list[str]:
        """``n`` chunk texts of ``WORDS_PER_CHUNK`` words, a sentence of ~12 words a line."""
        draws = self.rng.random((n, WORDS_PER_CHUNK))
        ids = np.minimum(np.searchsorted(self.cdf, draws), VOCAB - 1)
        out = []
        for row in ids:
            words = [self.vocab[i] for i in row]
            out.append("\n".join(" ".join(words[j:j + 12]) for j in range(0, len(words), 12)))
        return out

    def query(self) -> str:
        """A query of 3-6 words of middling frequency."""
        k = int(self.rng.integers(3, 7))
        return " ".join(self.vocab[int(i)] for i in self.rng.integers(50, 5000, size=k))


def relpath(i: int) -> str:
    """The i-th file's path under the root."""
    return f"d{i // FILES_PER_DIR:04d}/f{i:06d}.txt"


def make_tree(root: Path, files: int, per_file: int, words: Words) -> float:
    """Write the files (chunks separated by blank lines); seconds taken."""
    t0 = time.perf_counter()
    for i in range(files):
        p = root / relpath(i)
        if i % FILES_PER_DIR == 0:
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n\n".join(words.chunks(per_file)) + "\n", encoding="utf-8")
    return time.perf_counter() - t0


def plan_file(root: Path, rel: str, started_ns: int) -> FilePlan:
    """The plan the planner would make for one synthetic file (its chunks are its
    blank-line separated blocks; lines counted as in the file)."""
    path = root / rel
    data = path.read_bytes()
    st = os.stat(path)
    chunks: list[Chunk] = []
    line = 1
    for ordinal, block in enumerate(data.decode("utf-8").rstrip("\n").split("\n\n")):
        n_lines = block.count("\n") + 1
        chunks.append(Chunk(ordinal, block, line, line + n_lines - 1,
                            hashlib.sha256(block.encode("utf-8")).hexdigest()))
        line += n_lines + 1
    root_s = str(root)
    return FilePlan(root_s, rel, StatSig.of(st), started_ns, "index", content_hash(data),
                    chunks, [point_id(root_s, rel, c.ordinal, c.hash) for c in chunks])


@dataclass
class WriteReport:
    """What the write phase measured."""

    seconds: float
    groups: int
    chunks: int
    builds: int
    build_seconds: list[float]
    group_seconds: list[float]
    stall_build_s: float
    stall_other_s: float
    ticks: int
    probe: dict[str, Any]


class QueryProbe:
    """A thread running one hybrid search through the store every 20 ms while the write
    goes on: the latency a query to the API would see (a build holding the GIL of the
    process that serves it shows up as one long query)."""

    def __init__(self, store: Any, emb: FakeEmbedder, words: Words) -> None:
        self.store = store
        self.enc = default_encoder()
        self.vector = emb.embed([words.query()])[0].tolist()
        self.sparse = self.enc.embed_query(words.query())
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        #: Seconds of the queries that started while a replica was building.
        self.while_replica_builds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="query-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            building = getattr(self.store, "building", None) is not None
            t = time.perf_counter()
            self.store.search(self.vector, 10, sparse=self.sparse, mode="hybrid")
            self.samples.append((t, time.perf_counter() - t))
            if building:
                self.while_replica_builds.append(self.samples[-1][1])
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()
        self._thread.join()

    def report(self, builds: Sequence[tuple[float, float]]) -> dict[str, Any]:
        """p50/p99/max (ms) of every probe, and the longest one that overlapped a build
        measured in this process (``builds``; a replica's build runs elsewhere)."""
        ms = [d * 1000 for _, d in self.samples]
        during = [d * 1000 for t, d in self.samples
                  if any(t < b1 and t + d > b0 for b0, b1 in builds)]
        replica = [d * 1000 for d in self.while_replica_builds]
        return {"queries": len(ms), "p50_ms": round(pct(ms, 0.5), 1),
                "p99_ms": round(pct(ms, 0.99), 1), "max_ms": round(max(ms, default=0), 1),
                "max_during_builds_ms": round(max(during, default=0), 1),
                "while_a_replica_builds": {
                    "queries": len(replica),
                    "p99_ms": round(pct(replica, 0.99), 1) if replica else None,
                    "max_ms": round(max(replica, default=0), 1)}}


def groups_of(files: int, per_file: int) -> Iterator[range]:
    """File index ranges of about ``GROUP_CHUNKS`` chunks."""
    step = max(1, GROUP_CHUNKS // max(1, per_file))
    for i in range(0, files, step):
        yield range(i, min(files, i + step))


def write_all(engine: Engine, root: Path, files: int, per_file: int,
              emb: FakeEmbedder, policy: str = "inline") -> WriteReport:
    """Every file through the write path, one group at a time, then HNSW by ``policy``:

    ``inline``: ``maybe_build_index()`` after each group (``repd index``: each build
    covers about the threshold); ``idle``: one call after the last group (the daemon
    before the backstop: it built only when idle, so a long write ends in one build
    over all of it); ``backlog``: ``maybe_build_index(backlog=DEFAULT_BUILD_BACKLOG)``
    after each group and one idle call at the end (the daemon now).
    """
    manifest = engine.manifest
    handle = engine.generations.active
    assert handle is not None
    enc = default_encoder()
    watch = GilWatch()
    probe = QueryProbe(handle.store, emb, Words(seed=5))
    builds: list[tuple[float, float]] = []
    group_s: list[float] = []
    chunks = 0
    t_start = time.perf_counter()
    n_groups = 0
    for n_groups, idx in enumerate(groups_of(files, per_file), start=1):
        tg = time.perf_counter()
        started_ns = time.time_ns()
        plans = [plan_file(root, relpath(i), started_ns) for i in idx]
        rows = {(p.root, p.relpath): manifest.file(p.root, p.relpath) for p in plans}
        texts = {c.hash: c.text for p in plans for c in p.chunks}
        hashes = list(texts)
        vectors: dict[str, np.ndarray] = {}
        for s in range(0, len(hashes), EMBED_SLICE):
            part = hashes[s:s + EMBED_SLICE]
            fresh = list(zip(part, emb.embed([texts[h] for h in part]), strict=True))
            with manifest.transaction() as db:
                Manifest.put_vectors(db, emb.model_id, fresh)
            vectors.update(fresh)
        sparse = dict(zip(hashes, enc.embed_documents([texts[h] for h in hashes]), strict=True))
        with manifest.transaction() as db:
            Manifest.put_sparse_vectors(db, enc.identity, list(sparse.items()))
        write_group(manifest, [GenWrite(handle, plans, vectors, sparse)], primary=True,
                    rows=rows)
        chunks += len(hashes)
        b0 = time.perf_counter()
        built = False
        if policy == "inline":
            built = handle.store.maybe_build_index()
        elif policy == "backlog":
            built = handle.store.maybe_build_index(backlog=store_edge.DEFAULT_BUILD_BACKLOG)
        b1 = time.perf_counter()
        if built:
            builds.append((b0, b1))
        group_s.append(b0 - tg)
        if n_groups % 50 == 0:
            print(f"  {chunks:,} chunks, {time.perf_counter() - t_start:.0f} s, "
                  f"{len(builds)} builds, longest stall {watch.longest():.2f} s", flush=True)
    if policy != "inline":  # the idle build once the writes are done
        b0 = time.perf_counter()
        if handle.store.maybe_build_index():
            builds.append((b0, time.perf_counter()))
    seconds = time.perf_counter() - t_start
    settle = handle.store
    if isinstance(settle, ReplicatedStore):
        # The replicas' last builds (and the swaps) run on after the last write.
        t = time.perf_counter()
        settle.wait_idle()
        print(f"  replicas settled in {time.perf_counter() - t:.1f} s", flush=True)
    probe.stop()
    watch.stop()
    return WriteReport(seconds, n_groups, chunks, len(builds), [b - a for a, b in builds],
                       group_s, watch.longest(builds, inside=True),
                       watch.longest(builds, inside=False), watch.ticks,
                       probe.report(builds))


def query_latency(engine: Engine, words: Words, n: int, emb: FakeEmbedder) -> dict[str, Any]:
    """In-process search p50/p99 (ms), hybrid and dense, through pipeline/search."""
    handle = engine.generations.active
    assert handle is not None
    enc = default_encoder()
    out: dict[str, Any] = {}
    queries = [words.query() for _ in range(n)]
    modes: tuple[SearchMode, ...] = ("hybrid", "dense")
    for mode in modes:
        times = []
        for q in queries:
            t = time.perf_counter()
            search(handle.store, lambda text: emb.embed([text])[0].tolist(), q, 10,
                   mode=mode, embed_sparse=enc.embed_query)
            times.append((time.perf_counter() - t) * 1000)
        out[mode] = {"p50_ms": round(pct(times, 0.5), 2), "p99_ms": round(pct(times, 0.99), 2)}
    return out


def real_model_identity(env: dict[str, str]) -> str:
    """The identity the daemon will compute for the default model (in a subprocess, so
    the model's memory stays out of this process's RSS)."""
    code = ("from repd.adapters.embedder import Embedder; from repd import paths; "
            f"print(Embedder.load({DEFAULT_MODEL!r}, device='cpu', "
            "cache_dir=paths.cache_dir()).model_id)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    return out.stdout.strip().splitlines()[-1]


def copy_building(status: dict[str, Any]) -> str | None:
    """The replica building HNSW per a daemon's status (None: none, or one copy)."""
    replicas = status.get("store", {}).get("replicas") or {}
    building: str | None = replicas.get("building")
    return building


class ApiProbe:
    """A thread asking the daemon's API one query every 50 ms (the real model embeds
    each), each after a status call that says whether a store copy is building, so every
    query is tagged with the build it may have raced."""

    def __init__(self, daemon: Any, words: Words) -> None:
        self.daemon = daemon
        self.queries = [words.query() for _ in range(200)]
        #: (start, query ms, status ms, replica building or None)
        self.samples: list[tuple[float, float, float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = self.daemon.client
        i = 0
        while not self._stop.is_set():
            t = time.perf_counter()
            st = client.status()
            s_ms = (time.perf_counter() - t) * 1000
            building = copy_building(st)
            t = time.perf_counter()
            client.query(self.queries[i % len(self.queries)], k=10)
            self.samples.append((t, (time.perf_counter() - t) * 1000, s_ms, building))
            i += 1
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()
        self._thread.join()


def latency(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p99 and max (ms) of ``values``."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(pct(values, 0.5), 1),
            "p99_ms": round(pct(values, 0.99), 1), "max_ms": round(max(values), 1),
            "over_100_ms": sum(v > 100 for v in values)}


def builds_phase(d: Any, root: Path, folder: int, words: Words, replicas: bool,
                 limit_s: float) -> dict[str, Any]:
    """The API while the daemon's store builds HNSW: one folder of ``FILES_PER_DIR``
    files is deleted (a user removing a directory), so the daemon deletes its points and,
    at its next idle check (``app.INDEX_CHECK_EVERY_S``), ``maybe_build_index`` vacuums
    the segments that lost them (a rebuild of each, HNSW included). A store just
    converted to replicas also merges its segments then (the replicated layout allows
    larger ones). A probe queries through the API every 50 ms until one idle check has
    passed, no copy has built for 10 s and the vacuum is done (or ``limit_s``)."""
    from repd.app import INDEX_CHECK_EVERY_S

    probe = ApiProbe(d, words)
    time.sleep(3)
    t_del = time.perf_counter()
    shutil.rmtree(root / f"d{folder:04d}")
    quiet_at: float | None = None
    last_build = t_del
    episodes, was_building = 0, False
    st: dict[str, Any] = {}
    while (now := time.perf_counter()) - t_del < limit_s:
        st = d.status()
        q = st["queue"]
        building = copy_building(st)
        if building:
            episodes += not was_building
            last_build = now
        was_building = bool(building)
        busy = q["pending"] or q["scans"] or q["settling"] or st["state"] != "idle"
        quiet_at = None if busy else (quiet_at or now)
        vacuumed = st["store"]["indexed_vectors"] <= st["store"]["points"]
        if (quiet_at is not None and now - quiet_at > INDEX_CHECK_EVERY_S + 10
                and now - last_build > 10 and vacuumed):
            break
        time.sleep(1)
    seconds = time.perf_counter() - t_del
    probe.stop()
    after = [s for s in probe.samples if s[0] >= t_del]
    return {"deleted_files": FILES_PER_DIR, "seconds": round(seconds, 1),
            "ended_by_limit": seconds >= limit_s,
            "delete_to_quiet_s": round(quiet_at - t_del, 1) if quiet_at else None,
            "points_after": st.get("store", {}).get("points"),
            "build_episodes_seen": episodes if replicas else None,
            # A build in the daemon's process stalls whichever call comes first.
            "longest_api_call_ms": round(max((max(s[1], s[2]) for s in after), default=0), 1),
            "query_all": latency([s[1] for s in after]),
            "query_while_building": latency([s[1] for s in after if s[3]]) if replicas else None,
            "status_all": latency([s[2] for s in after]),
            "status_while_building": latency([s[2] for s in after if s[3]]) if replicas else None}


def daemon_phase(home: Path, root: Path, words: Words, n: int, replicas: bool = False,
                 builds_folder: int | None = None, builds_limit_s: float = 900) -> dict[str, Any]:
    """A real daemon on the data folder: start to idle, RSS, API latencies (and, with
    ``builds_folder``, the API while its store builds: ``builds_phase``)."""
    from tests.daemon_harness import DaemonProc

    d = DaemonProc(home, [root],
                   extra_env={"REPD_STORE__REPLICAS": "true" if replicas else "false"})
    t0 = time.perf_counter()
    d.start(wait_idle=False)
    try:
        st = d.wait_idle(timeout=1800)
        to_idle = time.perf_counter() - t0
        queries = [words.query() for _ in range(n)]
        d.client.query(queries[0], k=10)  # first query loads nothing more, but warms up
        q_ms, s_ms, building = [], [], 0
        for q in queries:
            t = time.perf_counter()
            d.client.query(q, k=10)
            q_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            now = d.client.status()
            s_ms.append((time.perf_counter() - t) * 1000)
            building += bool(copy_building(now))
        rss, peak = rss_kb(d.pid)
        children = [c for t in Path(f"/proc/{d.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        store_rss = sum(rss_kb(c)[0] for c in children)
        out: dict[str, Any] = {
            "replicas": replicas, "start_to_idle_s": round(to_idle, 1), "rss_mib": rss // 1024,
            "store_processes_rss_mib": store_rss // 1024,
            "peak_rss_mib": peak // 1024,
            "query_p50_ms": round(pct(q_ms, 0.5), 1), "query_p99_ms": round(pct(q_ms, 0.99), 1),
            "status_p50_ms": round(pct(s_ms, 0.5), 2),
            "status_p99_ms": round(pct(s_ms, 0.99), 2),
            "queries_while_a_copy_built": building,
            "points": st.get("store", {}).get("points")}
        if builds_folder is not None:
            print(f"daemon (replicas={replicas}): deleting folder {builds_folder} ...",
                  flush=True)
            out["builds"] = builds_phase(d, root, builds_folder, words, replicas,
                                         builds_limit_s)
        return out
    finally:
        d.stop(timeout=120)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--chunks-per-file", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/repd-scale"))
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--daemon", action="store_true", help="also serve it through `repd run`")
    ap.add_argument("--daemon-layouts", default=None,
                    help="comma-separated daemons to run in turn, each `single` or "
                         "`replicas` (default: the layout written); the folder is "
                         "converted between them as a user changing store.replicas would")
    ap.add_argument("--builds-s", type=float, default=0,
                    help="with --daemon: then delete one folder per daemon and probe the "
                         "API while the store builds, for at most this many seconds")
    ap.add_argument("--index-threshold", type=int, default=None,
                    help="override store_edge.DEFAULT_INDEX_THRESHOLD for this run")
    ap.add_argument("--policy", choices=("inline", "idle", "backlog"), default="inline",
                    help="when HNSW is built during the write (see write_all)")
    ap.add_argument("--replicas", action="store_true",
                    help="store.replicas: two shards in store processes (builds apart)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)

    if args.index_threshold:
        store_edge.DEFAULT_INDEX_THRESHOLD = args.index_threshold
        # EdgeStore.open's default was bound at definition time.
        defaults = list(store_edge.EdgeStore.open.__kwdefaults__ or {})
        assert "index_threshold" in defaults
        store_edge.EdgeStore.open.__kwdefaults__["index_threshold"] = args.index_threshold  # type: ignore[index]
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    home, root = work / "home", work / "tree"
    root.mkdir(parents=True)
    from tests.helpers import cli_env

    env = cli_env(home)
    for k in ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR"):
        os.environ[k] = env[k]
    data = home / "data" / "repd"
    report: dict[str, Any] = {"files": args.files, "chunks_per_file": args.chunks_per_file,
                              "policy": args.policy, "replicas": args.replicas,
                              "index_threshold": store_edge.EdgeStore.open.__kwdefaults__[
                                  "index_threshold"]}  # type: ignore[index]

    model_id = real_model_identity(env) if args.daemon else "fake-minilm@0000000000000000"
    emb = FakeEmbedder(DEFAULT_MODEL, model_id)
    words = Words()
    print(f"writing {args.files:,} files ...", flush=True)
    report["tree_write_s"] = round(make_tree(root, args.files, args.chunks_per_file, words), 1)
    time.sleep(2.2)  # past the racy window: the daemon must trust every file's stat

    settings = Settings(roots=[root], store=StoreSettings(path=data, replicas=args.replicas))
    engine = Engine(settings, writer=True, embedder=emb)
    try:
        engine.indexer()  # creates the hybrid generation under the model's identity
        print("writing chunks ...", flush=True)
        w = write_all(engine, root, args.files, args.chunks_per_file, emb, args.policy)
        report["write"] = {
            "seconds": round(w.seconds, 1), "chunks": w.chunks,
            "chunks_per_s": round(w.chunks / w.seconds),
            "groups": w.groups, "builds": w.builds,
            "build_p50_s": round(pct(w.build_seconds, 0.5), 2) if w.build_seconds else None,
            "build_max_s": round(max(w.build_seconds), 2) if w.build_seconds else None,
            "group_p50_s": round(pct(w.group_seconds, 0.5), 2),
            "longest_stall_during_builds_s": round(w.stall_build_s, 3),
            "longest_stall_otherwise_s": round(w.stall_other_s, 3),
            "query_probe": w.probe,
        }
        handle = engine.generations.active
        assert handle is not None
        report["store_info"] = handle.store.info()
        rss, peak = rss_kb()
        report["bench_rss_mib"], report["bench_peak_rss_mib"] = rss // 1024, peak // 1024
        report["search_in_process"] = query_latency(engine, words, args.queries, emb)
        indexer = engine.indexer()
        t = time.perf_counter()
        stats = indexer.reconcile(root, engine.rules(root))
        scan_s = time.perf_counter() - t
        report["reconcile"] = {"seconds": round(scan_s, 2),
                               "files_per_s": round(args.files / scan_s),
                               "seen": stats.seen, "unchanged": stats.unchanged,
                               "indexed": stats.indexed, "deleted": stats.deleted}
    finally:
        engine.close()
    report["manifest_mib"] = round((data / "manifest.sqlite").stat().st_size / 2**20, 1)
    report["manifest_wal_mib"] = round(sum(
        p.stat().st_size for p in data.glob("manifest.sqlite-*")) / 2**20, 1)
    report["vector_cache_mib"] = None
    m = Manifest(data / "manifest.sqlite")
    try:
        rows = m._query("SELECT COUNT(*), COALESCE(SUM(length(vector)), 0) FROM vectors")
        report["vector_cache_rows"] = int(rows[0][0])
        report["vector_cache_mib"] = round(int(rows[0][1]) / 2**20, 1)
    finally:
        m.close()
    report["store_mib"] = round(store_edge.disk_bytes(data / "shards") / 2**20, 1)
    print(json.dumps(report, indent=1, default=str), flush=True)
    if args.daemon:
        layouts = (args.daemon_layouts or ("replicas" if args.replicas else "single")).split(",")
        runs = []
        for i, layout in enumerate(layouts):
            if layout not in ("single", "replicas"):
                ap.error(f"--daemon-layouts: {layout!r} is neither single nor replicas")
            runs.append(daemon_phase(home, root, words, args.queries, layout == "replicas",
                                     builds_folder=i if args.builds_s else None,
                                     builds_limit_s=args.builds_s))
            print(json.dumps(runs[-1], indent=1), flush=True)
            report["daemon"] = runs[0] if len(runs) == 1 else runs
            if args.out:  # after each daemon: a long run keeps what it measured
                args.out.write_text(json.dumps(report, indent=1, default=str))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
