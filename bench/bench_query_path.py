"""The query path's own parts, each against its baseline in the same run: embedding one
question on OpenVINO's width copies against the dynamic network, and snippets.

    python bench/bench_query_path.py [--scifact DIR] [--queries 200] [--rounds 5]
                                     [--before DIR]

* **Embedding**: ``Embedder.embed([question])`` for SciFact's train questions, rounds
  alternating between the width copies the daemon turns on (``use_query_widths``) and
  none (every question through the dynamic bulk copy, as a one-shot command), in one
  process, so that a busy machine weighs on both alike. Also: how many questions fit a
  width, the least cosine between the two ways' vectors, and the resident memory the
  width copies added.
* **Snippets**: ``make_snippet`` for the question's ten hits (a hybrid search over all
  of SciFact's chunks, in a real Edge store), in a child process per tree;
  with ``--before DIR`` (the ``daemon/`` folder of another checkout) the same in DIR's
  code, rounds alternating, and whether the two made the same snippets.

Needs the ``openvino`` extra (``pip install -e '.[openvino]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench_daemon import pct  # noqa: E402
from bench.bench_engine import add_scifact_argument, find_scifact  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def embedding(emb: Any, questions: list[str], rounds: int) -> list[tuple[str, str]]:
    import numpy as np

    from bench.bench_scale import rss_kb
    from repd.adapters import openvino_backend

    shipped = openvino_backend.QUERY_WIDTHS
    copies = emb._backend.copies  # type: ignore[attr-defined]
    dynamic_vectors = np.concatenate([emb.embed([q]) for q in questions])
    before = rss_kb()[0]
    emb.use_query_widths()  # as the daemon does
    width_vectors = np.concatenate([emb.embed([q]) for q in questions])  # compiles them
    added = (rss_kb()[0] - before) / 1024
    times: dict[tuple[int, ...], list[float]] = {shipped: [], (): []}
    for _ in range(rounds):
        for widths, out in times.items():
            copies.query_widths = widths
            for q in questions:
                t = time.perf_counter()
                emb.embed([q])
                out.append((time.perf_counter() - t) * 1000)
    copies.query_widths = shipped
    tokens = [n + 2 for n in emb.count_tokens(questions)]
    fit = sum(n <= shipped[-1] for n in tokens)
    worst = float((width_vectors * dynamic_vectors).sum(axis=1).min())
    new, old = times[shipped], times[()]
    return [
        (f"questions of at most {shipped[-1]} tokens", f"{fit} of {len(questions)}"),
        ("embed one question, width copies p50 / p95",
         f"{pct(new, 0.5):.2f} / {pct(new, 0.95):.2f} ms"),
        ("embed one question, dynamic network p50 / p95",
         f"{pct(old, 0.5):.2f} / {pct(old, 0.95):.2f} ms"),
        ("dynamic / width copies, p50", f"{pct(old, 0.5) / pct(new, 0.5):.2f}x"),
        ("least cosine between the two ways' vectors", f"{worst:.6f}"),
        ("resident memory the width copies added", f"{added:.0f} MiB"),
    ]


def snippet_pages(data: Path, questions: list[dict[str, str]],
                  emb: Any) -> list[tuple[str, list[str]]]:
    """(question, ten chunks) per question: its top ten hybrid hits, the chunks a query's
    snippets are cut from. All of SciFact cut as the indexer cuts it, embedded by ``emb``
    and by repd's BM25 encoder, searched in a real Edge store. Hits hold the question's
    words far more densely than other chunks: pages of the documents the qrels judge
    relevant (this bench's pages before) favoured a change that ran 1.3x faster on them
    and 2.5x slower on real hits."""
    import tempfile
    import uuid

    from repd.adapters.extract import extract_bytes
    from repd.adapters.lexical import default_encoder
    from repd.adapters.store_edge import EdgeStore
    from repd.core.chunking import chunk_document
    from repd.core.types import PointRecord

    texts: list[str] = []
    for line in (data / "corpus.jsonl").open():
        d = json.loads(line)
        text = f"# {d['title'].strip()}\n\n{d['text'].strip()}\n"
        doc = extract_bytes(text.encode(), f"{d['_id']}.md")
        texts += [c.text for c in chunk_document(doc, emb.count_tokens, emb.max_tokens)]
    encoder = default_encoder()
    vectors = emb.embed(texts)
    sparse = encoder.embed_documents(texts)
    pages = []
    with tempfile.TemporaryDirectory() as tmp:
        store = EdgeStore.open(Path(tmp) / "store", emb.dim, hybrid=True)
        for start in range(0, len(texts), 512):
            store.upsert([PointRecord(str(uuid.UUID(int=n + 1)), vectors[n].tolist(),
                                      {"text": texts[n]}, sparse[n])
                          for n in range(start, min(start + 512, len(texts)))])
        for q in questions:
            hits = store.search(emb.embed([q["text"]])[0].tolist(), 10, mode="hybrid",
                                sparse=encoder.embed_query(q["text"]))
            pages.append((q["text"], [str(h.payload["text"]) for h in hits]))
        store.close()
    return pages


def time_snippets(pages_file: Path) -> None:
    """Child process: make every page's snippets four times (the first with cold caches,
    as a daemon's first queries); print microseconds per hit of the first and of the
    best later pass, and a digest of the snippets (JSON)."""
    import hashlib

    from repd.pipeline.search import make_snippet

    pages = json.loads(pages_file.read_text())
    passes = []
    for _ in range(4):
        t = time.perf_counter()
        made = [make_snippet(hit, text) for text, hits in pages for hit in hits]
        passes.append((time.perf_counter() - t) / len(made) * 1e6)
    print(json.dumps({"cold": passes[0], "us": min(passes[1:]),
                      "digest": hashlib.sha256("\n".join(made).encode()).hexdigest()}))


def snippets(pages: list[tuple[str, list[str]]], rounds: int,
             before: Path | None) -> list[tuple[str, str]]:
    import os
    import subprocess
    import tempfile

    trees = {"this tree": HERE.parent / "daemon"}
    if before is not None:
        trees["--before"] = before.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        pages_file = Path(tmp) / "pages.json"
        pages_file.write_text(json.dumps(pages))
        results: dict[str, list[dict[str, object]]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE.parent}"}
                out = subprocess.run([sys.executable, __file__, "--time-snippets",
                                      str(pages_file)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                results[name].append(json.loads(out.splitlines()[-1]))
    rows = []
    for name, runs in results.items():
        us = sorted(float(str(r["us"])) for r in runs)
        cold = sorted(float(str(r["cold"])) for r in runs)
        rows.append((f"make_snippet per hit ({name}), warm best / median; cold median",
                     f"{us[0]:.1f} / {us[len(us) // 2]:.1f}; {cold[len(cold) // 2]:.1f} us"))
    if before is not None:
        new, old = (min(float(str(r["us"])) for r in results[k]) for k in results)
        same = {str(r["digest"]) for runs in results.values() for r in runs}
        rows += [("snippets --before / this tree, best rounds", f"{old / new:.2f}x"),
                 ("the same snippets in both", "yes" if len(same) == 1 else "NO")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scifact_argument(ap)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None,
                    help="the daemon/ folder of another checkout: its snippets beside these")
    ap.add_argument("--time-snippets", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_snippets is not None:
        time_snippets(args.time_snippets)
        return
    data = find_scifact(args.scifact)
    questions = [json.loads(x) for x in (data / "queries.jsonl").open()][:args.queries]
    from repd.adapters.embedder import Embedder

    emb = Embedder.load(MODEL, device="cpu", backend="openvino")
    rows = snippets(snippet_pages(data, questions, emb), args.rounds, args.before)
    rows += embedding(emb, [q["text"] for q in questions], args.rounds)
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
