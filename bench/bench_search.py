"""Search quality and cost of hybrid retrieval on SciFact, through repd's own query path.

One run, one machine:

* ``repd index`` of the corpus (new indexes carry BM25 sparse vectors beside the dense
  ones); nDCG@10 and recall@100 on the train split for ``dense``, ``lexical`` and
  ``hybrid`` through ``repd.pipeline.search.search`` (what ``repd query --files`` and
  ``repd eval`` run), against plain dense MiniLM (sentence-transformers ``encode`` of whole
  documents, cosine) and plain BM25 from ``bm25s`` when it is installed;
* query latency p50/p95 through a running daemon's API for each mode;
* index size and indexing throughput with sparse vectors against a dense-only index of
  the same documents (``--size-docs``, indexed in this process both ways).

    python bench/bench_search.py --scifact ~/data/scifact [--docs N] [--size-docs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import bench_engine as be  # noqa: E402

MODES = ("dense", "lexical", "hybrid")


def quality(home: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """nDCG@10 / recall@100 per mode through repd's search, and the two plain baselines."""
    from repd.engine import Engine
    from repd.evaluation import ndcg_at_k, recall_at_k
    from repd.pipeline.search import search
    from repd.settings import Settings

    data = be.DATA
    assert data is not None
    queries, qrels, qids = be.judged_queries(data, docs)

    def mean(f: Any, runs: dict[str, list[str]]) -> float:
        return float(np.mean([f(runs[q], qrels[q]) for q in qids]))

    out: dict[str, Any] = {"queries": len(qids)}
    eng = Engine(Settings(store={"path": home / "data" / "repd"}), writer=False)  # type: ignore[arg-type]
    try:
        handle = eng._active_handle()
        for mode in MODES:
            runs: dict[str, list[str]] = {}
            for q in qids:
                hits, _ = search(handle.store, handle.embed_query, queries[q], 100,
                                 per_file=True, mode=mode,  # type: ignore[arg-type]
                                 embed_sparse=handle.embed_sparse_query)
                runs[q] = [Path(h.path).stem for h in hits]
            out[mode] = {"ndcg@10": mean(ndcg_at_k, runs), "recall@100": mean(recall_at_k, runs)}
    finally:
        eng.close()

    model = be.plain_model()
    doc_ids = [d["_id"] for d in docs]
    doc_texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    dvec = model.encode(doc_texts, batch_size=32, normalize_embeddings=True)
    qvec = model.encode([queries[q] for q in qids], batch_size=32, normalize_embeddings=True)
    scores = qvec @ dvec.T
    plain = {q: [doc_ids[i] for i in np.argsort(-scores[n])[:100]] for n, q in enumerate(qids)}
    out["plain dense MiniLM"] = {"ndcg@10": mean(ndcg_at_k, plain),
                                 "recall@100": mean(recall_at_k, plain)}
    try:
        import bm25s
    except ImportError:
        out["plain BM25 (bm25s)"] = "not installed (pip install bm25s)"
    else:
        try:
            import Stemmer  # PyStemmer, optional

            stemmer: Any = Stemmer.Stemmer("english")
        except ImportError:
            stemmer = None
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(doc_texts, stopwords="en", stemmer=stemmer))
        res, _ = retriever.retrieve(
            bm25s.tokenize([queries[q] for q in qids], stopwords="en", stemmer=stemmer), k=100)
        bm = {q: [doc_ids[i] for i in res[n]] for n, q in enumerate(qids)}
        out["plain BM25 (bm25s)"] = {"ndcg@10": mean(ndcg_at_k, bm),
                                     "recall@100": mean(recall_at_k, bm)}
    return out


def latency(home: Path, corpus: Path, n: int) -> dict[str, Any]:
    """p50/p95 of /v1/query for each mode through a running daemon."""
    from repd.api.client import ApiClient

    env = be.env_for(home)
    proc = subprocess.Popen([sys.executable, "-m", "repd.cli", "run", str(corpus)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = ApiClient(home / "run" / "repd" / "repd.sock", timeout=30)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                st = client.status()
                if st["state"] == "idle" and st["last_scan_at"]:
                    break
            except Exception:
                pass
            time.sleep(0.5)
        texts = [json.loads(line)["text"] for line in
                 (be.DATA / "queries.jsonl").open()][:n]  # type: ignore[operator]
        out: dict[str, Any] = {}
        for mode in MODES:
            for t in texts[:5]:
                client.query(t, k=10, mode=mode)  # warm-up
            took: list[float] = []
            for t in texts:
                t0 = time.perf_counter()
                client.query(t, k=10, mode=mode)
                took.append((time.perf_counter() - t0) * 1000)
            took.sort()
            out[mode] = {"p50_ms": statistics.median(took),
                         "p95_ms": took[int(0.95 * (len(took) - 1))]}
        out["hybrid/dense p50"] = out["hybrid"]["p50_ms"] / out["dense"]["p50_ms"]
        out["hybrid/dense p95"] = out["hybrid"]["p95_ms"] / out["dense"]["p95_ms"]
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def size_and_throughput(out: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Index the same documents with and without sparse vectors, in this process."""
    import repd.engine
    from repd.engine import Engine
    from repd.settings import Settings

    corpus = out / "size-corpus"
    be.write_corpus(docs, corpus)
    result: dict[str, Any] = {"documents": len(docs)}
    for layout in ("dense", "hybrid"):
        data = out / f"size-{layout}"
        saved = repd.engine.current_vectors
        if layout == "dense":
            repd.engine.current_vectors = lambda: "dense"
        try:
            eng = Engine(Settings(store={"path": data}, device="cpu"), writer=True)  # type: ignore[arg-type]
            try:
                ix = eng.indexer()
                ix.embedder  # noqa: B018 - the model load is not what is compared
                t0 = time.perf_counter()
                stats = ix.reconcile(corpus, eng.rules(corpus))
                seconds = time.perf_counter() - t0
                chunks = stats.chunks_embedded + stats.chunks_reused
            finally:
                eng.close()
        finally:
            repd.engine.current_vectors = saved
        shards = sum((p.stat().st_blocks * 512) for p in (data / "shards").rglob("*")
                     if p.is_file())
        result[layout] = {"seconds": seconds, "chunks": chunks, "chunks_per_s": chunks / seconds,
                          "shards_mib": shards / 2**20}
    result["throughput hybrid/dense"] = (result["hybrid"]["chunks_per_s"]
                                         / result["dense"]["chunks_per_s"])
    result["size hybrid/dense"] = result["hybrid"]["shards_mib"] / result["dense"]["shards_mib"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=None, help="only the first N documents")
    ap.add_argument("--size-docs", type=int, default=1000,
                    help="documents indexed both ways for size and throughput (default 1000)")
    ap.add_argument("--queries", type=int, default=200, help="queries per mode for latency")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "search")
    be.add_scifact_argument(ap)
    args = ap.parse_args()
    be.find_scifact(args.scifact)
    os.environ["HF_HUB_OFFLINE"] = "1"
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    docs = be.load_corpus(args.docs)
    be.write_corpus(docs, out / "corpus")
    home = out / "home"
    wall, first = be.repd(["index", str(out / "corpus"), "--json"], be.env_for(home))
    report: dict[str, Any] = {
        "corpus": f"SciFact, {len(docs)} documents", "index_s": wall,
        "chunks": first["chunks_embedded"] + first["chunks_reused"]}
    # Written after every part: a long run that fails late keeps what it measured.
    for name, part in (("quality", lambda: quality(home, docs)),
                       ("latency", lambda: latency(home, out / "corpus", args.queries)),
                       ("size", lambda: size_and_throughput(out, docs[:args.size_docs]))):
        report[name] = part()
        (out / "bench_search.json").write_text(json.dumps(report, indent=1))
    q = report["quality"]
    print(f"{report['corpus']}, {report['chunks']} chunks, {q['queries']} train queries")
    for name in (*MODES, "plain dense MiniLM", "plain BM25 (bm25s)"):
        v = q[name]
        line = v if isinstance(v, str) else (f"nDCG@10 {v['ndcg@10']:.4f}  "
                                             f"recall@100 {v['recall@100']:.4f}")
        print(f"  {name:22s} {line}")
    lat = report["latency"]
    for mode in MODES:
        print(f"  API query {mode:8s} p50 {lat[mode]['p50_ms']:.1f} ms  "
              f"p95 {lat[mode]['p95_ms']:.1f} ms")
    print(f"  hybrid / dense latency p50 {lat['hybrid/dense p50']:.2f}  "
          f"p95 {lat['hybrid/dense p95']:.2f} (target <= 1.3)")
    s = report["size"]
    print(f"  {s['documents']} docs indexed both ways: {s['dense']['chunks_per_s']:.1f} vs "
          f"{s['hybrid']['chunks_per_s']:.1f} chunks/s (hybrid/dense "
          f"{s['throughput hybrid/dense']:.3f}); shards {s['dense']['shards_mib']:.1f} vs "
          f"{s['hybrid']['shards_mib']:.1f} MiB (hybrid/dense {s['size hybrid/dense']:.3f})")


if __name__ == "__main__":
    main()
