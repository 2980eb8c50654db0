"""Where one API query's time goes inside a real daemon: timers around its own functions.

    python bench/probe_query_parts.py --out DIR [--passes ABAB] [--quiet 20]

DIR: an out folder of ``bench_daemon.py`` (its ``root/`` and ``home/``: all of SciFact
indexed). A daemon starts on it with a ``sitecustomize`` (written to a temporary folder
and put first on its ``PYTHONPATH``) that wraps the query path's functions and writes
``time.perf_counter`` stamps per query; the store processes stamp Edge's own search.
``perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in every process, so the
pipe's two legs can be told apart. Then sets of 200 SciFact questions (A: 1-200, B:
201-400, C, D) go through the API, each letter a pass in the order given (a letter seen
before is a repeat), after ``--quiet`` seconds of rest; prints each pass's API and
``took_ms`` p50, then every part's p50 over all passes. Nothing of this is in the daemon
itself: the timers cost a few microseconds a call and exist only in this run.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemon_harness import DaemonProc  # noqa: E402

from bench.bench_engine import add_scifact_argument, find_scifact  # noqa: E402

# Patches the modules as they are imported (a meta path finder), in the daemon and in the
# store processes alike. Stamps go to $PROBE_OUT (the daemon's, one JSON line a query)
# and $PROBE_OUT.edge<pid> (each store process's Edge searches: start and end).
SITECUSTOMIZE = r'''
import importlib.abc, importlib.util, json, os, sys, time

if os.environ.get("PROBE_OUT"):
    pc = time.perf_counter
    cur = {}
    out = open(os.environ["PROBE_OUT"], "a", buffering=1)

    def timed(owner, name, key):
        orig = getattr(owner, name)
        def wrapper(*a, **k):
            start = pc()
            try:
                return orig(*a, **k)
            finally:
                cur[key + "_s"], cur[key + "_e"] = start, pc()
        setattr(owner, name, wrapper)

    def server(m):
        guard, to_pool = m._guard, m.run_in_threadpool
        def _guard(op, call):
            if op == "query":
                cur["worker_s"] = pc()
            return guard(op, call)
        async def run_in_threadpool(fn, *a, **k):
            if not (a and a[0] == "query"):
                return await to_pool(fn, *a, **k)
            cur.clear()
            cur["loop_s"] = pc()
            result = await to_pool(fn, *a, **k)
            cur["loop_e"] = pc()
            return result
        m._guard, m.run_in_threadpool = _guard, run_in_threadpool

    def fastapi_app(m):
        call = m.FastAPI.__call__
        async def __call__(self, scope, receive, send):
            if scope.get("path") != "/v1/query":
                return await call(self, scope, receive, send)
            entry = pc()
            async def timed_send(msg):
                if msg.get("type") == "http.response.body" and not msg.get("more_body"):
                    out.write(json.dumps({**cur, "asgi_s": entry, "asgi_e": pc()}) + "\n")
                await send(msg)
            return await call(self, scope, receive, timed_send)
        m.FastAPI.__call__ = __call__

    def search(m):
        timed(m, "search", "search")
        snippet = m.make_snippet
        def make_snippet(*a, **k):
            start = pc()
            try:
                return snippet(*a, **k)
            finally:
                cur["snippets"] = cur.get("snippets", 0.0) + pc() - start
        m.make_snippet = make_snippet

    def edge(m):
        stamps = open(os.environ["PROBE_OUT"] + f".edge{os.getpid()}", "a", buffering=1)
        orig = m.EdgeStore.search
        def edge_search(*a, **k):
            start = pc()
            try:
                return orig(*a, **k)
            finally:
                stamps.write(f"{start:.6f} {pc():.6f}\n")
        m.EdgeStore.search = edge_search

    PATCHES = {
        "repd.api.server": server,
        "fastapi.applications": fastapi_app,
        "repd.pipeline.search": search,
        "repd.service": lambda m: timed(m.DaemonService, "query", "service"),
        "repd.adapters.embedder": lambda m: timed(m.Embedder, "embed", "embed"),
        "repd.adapters.openvino_runtime": lambda m: (
            timed(m.DirectBackend, "prepare", "tokenize"), timed(m.DirectBackend, "run", "infer")),
        "repd.adapters.store_replicas": lambda m: timed(m.ReplicatedStore, "search", "store"),
        "repd.adapters.store_edge": edge,
    }

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                PATCHES[name](module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
'''

#: (label, start stamp, end stamp) of each part, in the order a query meets them.
PARTS = [
    ("FastAPI: middleware, routing, request validation", "asgi_s", "loop_s"),
    ("event loop -> worker thread (anyio pool)", "loop_s", "worker_s"),
    ("scope, generation handle, BM25 query vector", "service_s", "embed_s"),
    ("tokenizing the question", "tokenize_s", "tokenize_e"),
    ("model: infer + pooling", "infer_s", "infer_e"),
    ("embed as a whole", "embed_s", "embed_e"),
    ("store search as the daemon sees it", "store_s", "store_e"),
    ("  daemon -> store process (pickle, pipe, wake-up)", "store_s", "edge_s"),
    ("  Edge's search in the store process", "edge_s", "edge_e"),
    ("  store process -> caller (pickle, pipe, two wake-ups)", "edge_e", "store_e"),
    ("shaping the hits", "store_e", "search_e"),
    ("the answer: snippets and the response model", "search_e", "service_e"),
    ("worker thread -> event loop", "service_e", "loop_e"),
    ("FastAPI: serializing and sending", "loop_e", "asgi_e"),
    ("FastAPI entry to the last byte sent", "asgi_s", "asgi_e"),
]


def edge_stamps(out: Path) -> list[tuple[float, float]]:
    """The serving store process's Edge searches (the file with the most of them)."""
    files = [[tuple(map(float, line.split())) for line in f.read_text().splitlines()]
             for f in out.parent.glob(out.name + ".edge*")]
    return [(s, e) for s, e in max(files, key=len, default=[])]


def report(out: Path, passes: str, per_pass: int) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    edges = edge_stamps(out)
    # A query's Edge search is the one that started while the daemon waited for it (the
    # daemon's own warm-up searched before any query was counted).
    starts = [s for s, _ in edges]
    for row in rows:
        i = bisect.bisect_left(starts, row.get("store_s", float("inf")))
        if i < len(edges) and edges[i][0] <= row["store_e"]:
            row["edge_s"], row["edge_e"] = edges[i]
    # One row a query, in the order asked: pass i is rows[i*per_pass:(i+1)*per_pass]. A
    # question set seen before is a repeat ("A2"): what a first-time question costs more
    # shows as the difference between the two columns of one set.
    groups: list[tuple[str, list[dict[str, float]]]] = [("all", rows)]
    if len(rows) == len(passes) * per_pass:
        seen: dict[str, int] = {}
        for i, name in enumerate(passes):
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}{seen[name]}"
            groups.append((label, rows[i * per_pass:(i + 1) * per_pass]))
    print(f"\n{len(rows)} queries; p50 of each part in ms, over all and per pass")
    width = max(len(label) for label, _, _ in PARTS)
    print(f"  {'':<{width}}" + "".join(f"  {g:>7}" for g, _ in groups))

    def line(label: str, value: Any) -> None:
        cells = []
        for _, group in groups:
            spans = [v for v in map(value, group) if v is not None]
            cells.append(f"  {statistics.median(spans):7.3f}" if spans else f"  {'-':>7}")
        print(f"  {label:<{width}}" + "".join(cells))

    for label, a, b in PARTS:
        line(label, lambda r, a=a, b=b: (r[b] - r[a]) * 1000 if a in r and b in r else None)
    line("  of which ten snippets", lambda r: r["snippets"] * 1000 if "snippets" in r else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="an out folder of bench_daemon.py (root/ and home/)")
    ap.add_argument("--passes", default="ABAB", help="question sets in order (A-D)")
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds of rest first")
    add_scifact_argument(ap)
    args = ap.parse_args()
    data = find_scifact(args.scifact, ("queries.jsonl",))
    questions = [json.loads(x)["text"] for x in (data / "queries.jsonl").open()]
    sets = {c: questions[i * 200:(i + 1) * 200] for i, c in enumerate("ABCD")}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        out = Path(tmp) / "stamps.jsonl"
        path = [tmp, str(HERE.parent / "daemon"), str(HERE.parent)]
        d = DaemonProc(args.out / "home", [args.out / "root"],
                       extra_env={"PYTHONPATH": ":".join(path), "PROBE_OUT": str(out)})
        d.start(wait_idle=True, timeout=900)
        try:
            time.sleep(args.quiet)
            out.write_text("")  # the start's own warm-up queries are not counted
            for name in args.passes:
                api, took = [], []
                for q in sets[name]:
                    t = time.perf_counter()
                    took.append(d.client.query(q, k=10)["took_ms"])
                    api.append((time.perf_counter() - t) * 1000)
                print(f"pass {name}: API p50 {statistics.median(api):.2f} ms, "
                      f"took_ms p50 {statistics.median(took):.2f}", flush=True)
        finally:
            d.stop()
        report(out, args.passes, len(sets["A"]))


if __name__ == "__main__":
    main()
