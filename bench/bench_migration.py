"""Model-upgrade benchmark: a real daemon migrates its index to another model while it
keeps answering, measured through its API, in one run:

* backfill throughput: the corpus is indexed with the default MiniLM, then the daemon is
  told to use a 3-layer MiniLM (``POST /v1/model/use``) and left alone; chunks embedded
  into the new generation / seconds from the call to the switch, against plain
  ``SentenceTransformer(model).encode(texts, batch_size=32)`` of the same chunk texts,
  in this process, with the same torch thread count (target ratio >= 0.90);
* retrieval quality of both generations on SciFact's train split through ``repd eval
  --generation N`` against the daemon (after the switch: generation 1 retired but kept,
  generation 2 active), with ``--mode dense`` (the two models compared) and in the
  daemon's default mode when that is another one (hybrid); generation 2's dense figures
  are cross-checked against plain dense retrieval with the baseline's own vectors;
* query latency (p50 / p95, ``client.query``) and save-to-searchable (a new file with a
  unique word, until a query finds it) while a backfill runs, against the same
  measurements on the idle daemon before any migration. To keep the throughput figure
  clean these are taken during a second backfill of the same migration: the daemon rolls
  back to generation 1, prunes generation 2 (its cached vectors go with it, so nothing is
  cached for the 3-layer model again) and migrates to it once more.

    python bench/bench_migration.py [--scifact DIR] [--docs 1000] [--out FILE]

SciFact (BEIR) comes from --scifact DIR or $REPD_SCIFACT (see bench_engine.py); without
it a generated corpus of --docs Markdown notes is used and the quality step is skipped.
The default --docs is 1000: the whole corpus (5,183) takes several minutes per model
pass on a small machine (--docs 0: all of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest_models import build_truncated_minilm  # noqa: E402
from tests.daemon_harness import DaemonProc, wait_for  # noqa: E402

from bench.bench_daemon import (  # noqa: E402
    pct,
    print_table,
    tree_cpu_seconds,
    wait_quiet,
    write_small_corpus,
)
from bench.bench_engine import (  # noqa: E402
    SCIFACT_FILES,
    add_scifact_argument,
    find_scifact,
    load_corpus,
    write_corpus,
)

#: Seconds of back-to-back queries per latency measurement.
LATENCY_S = 15.0
#: Files written per save-to-searchable measurement.
EDITS = 10
#: Corpus folder, and the two folders the save-to-searchable files go to (under the root).
CORPUS_DIR = "corpus"
IDLE_EDITS = "edits-idle"
BUSY_EDITS = "edits-backfill"
_SYNTHETIC_QUERIES = [
    f"observation about {w} and {v}" for w, v in zip(
        ("tides", "glaciers", "orchards", "harbors", "lanterns", "neurons", "turbines"),
        ("winds", "rivers", "meadows", "cobalt", "timber", "synapses", "gaskets"),
        strict=True)]


def load() -> float:
    """The one-minute load average: this machine is shared, so every phase records it."""
    return round(os.getloadavg()[0], 2)


def machine_cpu() -> tuple[int, int]:
    """(idle + iowait ticks, all ticks) of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def idle_share(since: tuple[int, int]) -> float:
    """Share of the machine's CPU time left idle since ``since`` (machine_cpu()): near 0
    means everything running, this benchmark and whatever else, had to share the cores."""
    now = machine_cpu()
    return round((now[0] - since[0]) / max(1, now[1] - since[1]), 3)


def ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"{pct(values, 0.5) * 1000:.0f} / {pct(values, 0.95) * 1000:.0f} ms"


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values),
            "p50_ms": round(pct(values, 0.5) * 1000, 2) if values else None,
            "p95_ms": round(pct(values, 0.95) * 1000, 2) if values else None,
            "max_ms": round(max(values) * 1000, 2) if values else None}


def migration(d: DaemonProc) -> dict[str, Any] | None:
    m: dict[str, Any] | None = d.client.model_status()["migration"]
    return m


def backfilling(d: DaemonProc) -> bool:
    m = migration(d)
    return m is not None and m["state"] == "backfilling"


# -- measurements ------------------------------------------------------------------------

def query_latency(d: DaemonProc, queries: list[str], seconds: float,
                  while_: Callable[[], bool] | None = None) -> tuple[list[float], Counter[str]]:
    """Latencies of ``client.query(q, k=10)`` (the daemon's default mode) back to back
    for ``seconds``, and how many answers each generation (and mode) gave. With
    ``while_``, checked every 5 queries, stop as soon as it is false and drop the 5 taken
    since it was last true."""
    lat: list[float] = []
    gens: Counter[str] = Counter()
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end:
        batch, batch_gens = [], []
        for _ in range(5):
            t = time.perf_counter()
            res = d.client.query(queries[i % len(queries)], k=10)
            batch.append(time.perf_counter() - t)
            batch_gens.append(f"{res['generation']} {res.get('mode', 'dense')}")
            i += 1
        if while_ is not None and not while_():
            break
        lat += batch
        gens.update(batch_gens)
    return lat, gens


def wait_queue_empty(d: DaemonProc, timeout: float = 120) -> None:
    """No change waiting (a backfill keeps the worker busy, so "idle" never comes)."""
    def empty() -> bool:
        q = d.status()["queue"]
        return not (q["pending"] or q["scans"] or q["settling"])
    wait_for(empty, timeout, "the change queue to empty", every=0.05)


def save_to_searchable(d: DaemonProc, root: Path, folder: str, n: int, nonce: str,
                       while_: Callable[[], bool] | None = None
                       ) -> tuple[list[float], Counter[str]]:
    """Write ``n`` new files, one at a time, each with a unique word, and time each from
    the write until a query for it lists that file (seconds), and which generation
    answered the query that found it. The query is filtered to ``folder`` with k above
    the number of files there, so a hit depends on the file being indexed, not on how it
    ranks against the corpus. With ``while_``, stop when it turns false, and drop an edit
    that finished after it did."""
    (root / folder).mkdir()
    lat: list[float] = []
    gens: Counter[str] = Counter()
    for i in range(n):
        if while_ is not None and not while_():
            break
        word = f"zorbex{nonce}q{i}vantel"
        rel = f"{folder}/note{i:02d}.md"
        text = f"# Field note {i}\n\nThe {word} reading of tidal salinity, entry {i}.\n"
        answered: list[str] = []

        def found(w: str = word, r: str = rel, out: list[str] = answered) -> bool:
            res = d.client.query(f"{w} reading of tidal salinity", k=n + 5, path=f"{folder}/*")
            hit = any(h["path"] == r for h in res["hits"])
            if hit:
                out.append(str(res["generation"]))
            return hit

        t = time.monotonic()
        (root / rel).write_text(text)
        wait_for(found, 120, f"{rel} to be searchable", every=0.01)
        took = time.monotonic() - t
        if while_ is not None and not while_():
            break
        lat.append(took)
        gens.update(answered)
        if while_ is None:
            d.wait_idle(60)
        else:
            wait_queue_empty(d)
        time.sleep(0.3)
    return lat, gens


def migrate(d: DaemonProc, model: Path, during: Callable[[], dict[str, Any]] | None = None,
            timeout: float = 3600) -> dict[str, Any]:
    """Start migrating to ``model`` and wait for the switch; ``during`` runs once the
    backfill has begun (its result is kept under "during"). Timings in seconds from the
    ``use`` call."""
    before = d.client.model_status()["active"]
    cpu0, machine0 = tree_cpu_seconds(d.pid), machine_cpu()
    t0 = time.monotonic()
    answer = d.client.model_use(str(model))
    use_s = time.monotonic() - t0
    target = answer.get("generation")
    states: dict[str, float] = {}
    last: dict[str, Any] = {}
    out: dict[str, Any] = {"from_generation": before, "to_generation": target,
                           "use_call_s": round(use_s, 3), "load_start": load()}
    if during is not None:
        out["during"] = during()
    deadline = t0 + timeout
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no switch within {timeout:.0f} s; last: {last}")
        snap = d.client.model_status()
        now = time.monotonic() - t0
        m = snap["migration"]
        if m is None:
            if snap["active"] != before:
                break
            raise AssertionError(f"the migration ended with no switch: {snap}")
        states.setdefault(m["state"], now)
        last = m
        if m["state"] in ("failed", "ready"):
            raise AssertionError(f"migration {m['state']}: {json.dumps(m, indent=1)}")
        time.sleep(0.1)
    switch_s = time.monotonic() - t0
    cpu_s = tree_cpu_seconds(d.pid) - cpu0
    status = d.status()
    out.update({
        "switch_s": round(switch_s, 3),
        "daemon_cpu_s": round(cpu_s, 2),
        "daemon_cores": round(cpu_s / switch_s, 2),
        "machine_idle_share": idle_share(machine0),
        "state_first_seen_s": {k: round(v, 3) for k, v in states.items()},
        "backfill_end_s": round(states.get("gating", switch_s), 3),
        "chunks_embedded_last_seen": last.get("chunks_embedded"),
        "files_total": last.get("files_total"),
        "files_done_last_seen": last.get("files_done"),
        "last_state_seen": last.get("state"),
        "gate": last.get("gate"),
        "active_after": snap["active"],
        "status_generation_after": status["generation"]["id"] if status["generation"] else None,
        "load_end": load(),
    })
    return out


def repd_eval(d: DaemonProc, queries: Path, qrels: Path, generation: int,
              mode: str | None) -> dict[str, Any]:
    """``repd eval --generation N [--mode M] --json`` through the running daemon."""
    t = time.monotonic()
    extra = ["--mode", mode] if mode is not None else []
    proc = subprocess.run(
        [sys.executable, "-m", "repd.cli", "eval", "--queries", str(queries), "--qrels",
         str(qrels), "--generation", str(generation), "--json", *extra],
        env=d.env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"repd eval --generation {generation} exited "
                             f"{proc.returncode}:\n{proc.stderr}")
    res: dict[str, Any] = json.loads(proc.stdout)
    res["wall_s"] = round(time.monotonic() - t, 2)
    res.pop("per_query", None)
    return res


def judged_qrels(src: Path, doc_ids: set[str], dest: Path) -> int:
    """Write the judgments of ``src`` about the documents indexed (all of them unless
    --docs) to ``dest``; the number of queries left with a relevant document."""
    from repd.evaluation import load_qrels

    kept = {q: {doc: g for doc, g in judged.items() if doc in doc_ids}
            for q, judged in load_qrels(src).items()}
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{doc}\t{g}" for q, judged in kept.items() for doc, g in judged.items()]
    dest.write_text("\n".join(lines) + "\n")
    return sum(1 for judged in kept.values() if any(g > 0 for g in judged.values()))


def plain_encode(model: Path, texts: list[str]) -> tuple[dict[str, Any], Any, Any]:
    """The baseline: sentence-transformers itself on the CPU, batch 32, with the torch
    thread count the daemon's embedder gives itself (repd.adapters.device.cpu_threads);
    the figures, the vectors (for the quality cross-check) and the model."""
    import torch
    from sentence_transformers import SentenceTransformer

    from repd.adapters.device import cpu_threads

    threads = cpu_threads()
    torch.set_num_threads(threads)
    st = SentenceTransformer(str(model), device="cpu")
    st.encode(texts[:64], batch_size=32, show_progress_bar=False)  # warm-up (load not timed)
    load0, machine0 = load(), machine_cpu()
    c0, t0 = time.process_time(), time.perf_counter()
    vectors = st.encode(texts, batch_size=32, normalize_embeddings=True,
                        show_progress_bar=False)
    seconds = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    return ({"seconds": round(seconds, 3), "cpu_s": round(cpu_s, 2),
             "cores": round(cpu_s / seconds, 2), "machine_idle_share": idle_share(machine0),
             "chunks": len(texts),
             "chunks_per_s": round(len(texts) / seconds, 2), "torch_threads": threads,
             "load_start": load0, "load_end": load()}, vectors, st)


def plain_quality(st: Any, texts: list[str], vectors: Any, by_path: list[tuple[str, str]],
                  queries_file: Path, qrels_file: Path) -> dict[str, Any]:
    """nDCG@10 etc. of plain dense retrieval with the baseline's own vectors of the same
    chunks (a file ranked by its best chunk, as `repd query --files` ranks it): what the
    new generation's `repd eval` should come close to."""
    import numpy as np

    from repd.evaluation import evaluate, load_qrels, load_queries, scored_queries

    row = {t: i for i, t in enumerate(texts)}
    files: dict[str, list[int]] = {}
    for path, text in by_path:
        files.setdefault(path, []).append(row[text])
    names = list(files)
    queries = load_queries(queries_file)
    qrels = load_qrels(qrels_file)
    qids = scored_queries([q for q in queries if q in qrels], qrels)
    qvec = st.encode([queries[q] for q in qids], batch_size=32, normalize_embeddings=True,
                     show_progress_bar=False)
    chunk_scores = np.asarray(qvec) @ np.asarray(vectors).T
    file_scores = np.stack([chunk_scores[:, files[n]].max(axis=1) for n in names], axis=1)
    runs = []
    for i, q in enumerate(qids):
        best = np.argsort(-file_scores[i], kind="stable")[:100]
        runs.append((q, [Path(names[j]).stem for j in best]))
    res = evaluate(runs, qrels, recall_k=100)
    return {"queries": res.queries, "metrics": {k: round(v, 4) for k, v in res.means.items()}}


def cached_vectors(home: Path, model_id: str) -> int:
    """Vectors the manifest holds for ``model_id`` (read-only, daemon stopped)."""
    db = home / "data" / "repd" / "manifest.sqlite"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n: int = con.execute("SELECT COUNT(*) FROM vectors WHERE model_id=?",
                             (model_id,)).fetchone()[0]
        return n
    finally:
        con.close()


def log_problems(log: Path) -> list[str]:
    """The daemon log's warning, error and critical lines (JSON lines)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            if "Traceback" in line or "Error" in line:
                out.append(line[:500])
            continue
        if isinstance(rec, dict) and str(rec.get("level", "")).lower() in (
                "warning", "error", "critical", "exception"):
            out.append(line[:500])
    return out


# -- the run -------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1000,
                    help="SciFact documents (or generated notes) to index (default 1000; "
                    "0: the whole corpus, 5,183 documents, several minutes per model pass)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "bench_migration.json",
                    help="the JSON result (default bench/out/bench_migration.json)")
    ap.add_argument("--work", type=Path, default=HERE / "out" / "migration",
                    help="scratch folder: corpus, models, the daemon's home (emptied first)")
    ap.add_argument("--latency-s", type=float, default=LATENCY_S,
                    help=f"seconds of queries per latency measurement (default {LATENCY_S:g})")
    ap.add_argument("--edits", type=int, default=EDITS,
                    help=f"save-to-searchable files per measurement (default {EDITS})")
    add_scifact_argument(ap)
    args = ap.parse_args()
    t_run = time.monotonic()

    data: Path | None = None
    if args.scifact is not None or os.environ.get("REPD_SCIFACT"):
        data = find_scifact(args.scifact, SCIFACT_FILES)
    else:
        print("SciFact not named (--scifact DIR or REPD_SCIFACT): using a generated corpus, "
              "and skipping the quality step (repd eval)", flush=True)

    work = args.work.resolve()  # the XDG variables must be absolute
    shutil.rmtree(work, ignore_errors=True)
    root, home = work / "root", work / "home"
    root.mkdir(parents=True)
    doc_ids: set[str] = set()
    if data is not None:
        docs = load_corpus(args.docs or None)
        write_corpus(docs, root / CORPUS_DIR)
        doc_ids = {str(doc["_id"]) for doc in docs}
        queries = [json.loads(x)["text"] for x in (data / "queries.jsonl").open()][:200]
        corpus_desc = f"SciFact, first {len(docs)} documents"
    else:
        write_small_corpus(root / CORPUS_DIR, args.docs or 1000)
        queries = _SYNTHETIC_QUERIES
        corpus_desc = f"{args.docs or 1000} generated notes"
    model3 = build_truncated_minilm(work / "models" / "minilm-l3", layers=3)
    nonce = f"{time.time_ns():x}"

    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "corpus": corpus_desc, "model_from": "packaged all-MiniLM-L6-v2 (6 layers)",
        "model_to": "the same, cut to its first 3 layers (tests/conftest_models.py)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_at_start": load()},
    }
    rows: list[tuple[str, str]] = [("corpus", corpus_desc)]
    d = DaemonProc(home, [root])
    t0 = time.monotonic()
    d.start(wait_idle=True, timeout=3600)
    try:
        st = d.status()
        initial_s = time.monotonic() - t0
        result["initial_index"] = {"seconds": round(initial_s, 2), "files": st["totals"]["files"],
                                   "chunks": st["totals"]["chunks"],
                                   "generation": st["generation"]["id"]}
        rows.append(("initial index with MiniLM (daemon start to idle)",
                     f"{initial_s:.1f} s, {st['totals']['files']} files, "
                     f"{st['totals']['chunks']} chunks, generation {st['generation']['id']}"))
        gen1 = int(st["generation"]["id"])

        # 1. idle: query latency and save-to-searchable, generation 1 active
        wait_quiet(d.pid)
        idle_q, idle_q_gens = query_latency(d, queries, args.latency_s)
        idle_save, idle_save_gens = save_to_searchable(d, root, IDLE_EDITS, args.edits,
                                                       nonce + "i")
        result["idle"] = {"query": summary(idle_q), "query_generations": dict(idle_q_gens),
                          "save_to_searchable": summary(idle_save),
                          "save_generations": dict(idle_save_gens), "load": load()}

        # 2. the clean migration: MiniLM -> 3 layers, nothing else asked of the daemon
        wait_quiet(d.pid)
        print(f"migrating to {model3} (clean run) ...", flush=True)
        mig_a = migrate(d, model3)
        result["migration_clean"] = mig_a
        gen2 = int(mig_a["active_after"])
        gens = {g["id"]: g for g in d.client.model_status()["generations"]}
        model3_id = gens[str(gen2)]["model_id"]
        result["generations_after_switch"] = {
            k: {"state": g["state"], "model_id": g["model_id"], "points": g["points"]}
            for k, g in gens.items()}

        # 3. quality of both generations, through the daemon (1 retired, 2 active)
        if data is not None:
            qrels = work / "qrels-indexed.tsv"
            judged = judged_qrels(data / "qrels" / "train.tsv", doc_ids, qrels)
            print(f"repd eval of generations {gen1} and {gen2} ({judged} judged queries) ...",
                  flush=True)
            qfile = data / "queries.jsonl"
            # --mode dense compares the two models; the daemon's default mode (hybrid once
            # lexical retrieval exists) is measured too when it is another one.
            ev: dict[str, Any] = {
                "qrels": "train.tsv, judgments on the indexed documents only",
                "queries_judged": judged,
                "dense": {str(g): repd_eval(d, qfile, qrels, g, "dense") for g in (gen1, gen2)}}
            default1 = repd_eval(d, qfile, qrels, gen1, None)
            if default1.get("mode", "dense") != "dense":
                ev["default"] = {str(gen1): default1,
                                 str(gen2): repd_eval(d, qfile, qrels, gen2, None)}
            result["eval"] = ev
        else:
            result["eval"] = "skipped: no SciFact (--scifact DIR or REPD_SCIFACT)"

        # 4. back to generation 1, generation 2 and its vectors deleted, then the same
        # migration again, measured from outside while it runs
        result["rollback"] = d.client.model_rollback()["message"]
        result["prune"] = d.client.model_prune()["message"]
        wait_quiet(d.pid)

        def measure_during() -> dict[str, Any]:
            def still() -> bool:
                return backfilling(d)
            wait_for(still, 120, "the backfill to start", every=0.05)
            busy_q, busy_q_gens = query_latency(d, queries, args.latency_s, still)
            busy_save, busy_save_gens = save_to_searchable(d, root, BUSY_EDITS, args.edits,
                                                           nonce + "b", still)
            m = migration(d)
            return {"query": summary(busy_q), "query_generations": dict(busy_q_gens),
                    "save_to_searchable": summary(busy_save),
                    "save_generations": dict(busy_save_gens),
                    "still_backfilling_after": bool(m and m["state"] == "backfilling"),
                    "progress_after": m["progress"] if m else None, "load": load(),
                    "_q": busy_q, "_s": busy_save}

        print(f"migrating to {model3} again, measuring queries and saves meanwhile ...",
              flush=True)
        mig_b = migrate(d, model3, measure_during)
        busy = mig_b["during"]
        busy_q, busy_save = busy.pop("_q"), busy.pop("_s")
        result["migration_loaded"] = mig_b
        gen3 = int(mig_b["active_after"])
        result["generations_at_end"] = {
            g["id"]: g["state"] for g in d.client.model_status()["generations"]}
    finally:
        code = d.stop()
    result["daemon_exit"] = code

    # 5. the baseline: the chunk texts the clean backfill embedded, read back from the
    # active generation's store with the daemon stopped (its payloads hold each chunk's
    # text), less the files written during the second backfill; each distinct text once,
    # as the backfill embeds each distinct text once.
    all_texts = chunk_texts_by_path(home)
    clean = [(p, t) for p, t in all_texts if not p.startswith(BUSY_EDITS + "/")]
    texts = sorted({t for _, t in clean})
    vectors_kept = cached_vectors(home, model3_id)
    print(f"plain encode of {len(texts)} chunk texts ...", flush=True)
    base, base_vectors, st = plain_encode(model3, texts)
    result["baseline"] = {**base, "texts": "distinct chunk texts of the active generation's "
                          f"store, files under {BUSY_EDITS}/ left out",
                          "store_points": len(all_texts)}
    result["vectors_cached_for_model3_at_end"] = vectors_kept
    if isinstance(result["eval"], dict) and data is not None:
        # The chunks of generation 2 at its evaluation: the same files less BUSY_EDITS.
        result["eval"]["plain_dense_model3"] = plain_quality(
            st, texts, base_vectors, clean, data / "queries.jsonl", work / "qrels-indexed.tsv")

    chunks_a = mig_a["chunks_embedded_last_seen"] or 0
    rate_a = chunks_a / mig_a["switch_s"]
    rate_a_backfill = chunks_a / mig_a["backfill_end_s"]
    ratio = rate_a / base["chunks_per_s"]
    # The second backfill had the same texts to embed (the first one's vectors were
    # pruned), plus the files written meanwhile, which the live path embedded.
    chunks_b = len(texts)
    result["figures"] = {
        "backfill_chunks": chunks_a, "baseline_chunks": len(texts),
        "backfill_chunks_per_s_use_to_switch": round(rate_a, 2),
        "backfill_chunks_per_s_backfill_only": round(rate_a_backfill, 2),
        "baseline_chunks_per_s": base["chunks_per_s"],
        "ratio_use_to_switch": round(ratio, 3),
        "ratio_backfill_only": round(rate_a_backfill / base["chunks_per_s"], 3),
        "loaded_backfill_chunks_per_s": round(chunks_b / mig_b["switch_s"], 2),
        # CPU seconds per chunk, baseline / daemon (use -> switch, every daemon thread and
        # its store processes):
        # less sensitive than wall time to what else this shared machine runs.
        "cpu_ratio": round((base["cpu_s"] / len(texts)) / (mig_a["daemon_cpu_s"] / chunks_a), 3)
        if chunks_a and mig_a["daemon_cpu_s"] else None,
    }
    problems = log_problems(d.log)
    result["log_problems"] = problems
    result["run_s"] = round(time.monotonic() - t_run, 1)

    rows += [
        ("idle (generation 1): query p50 / p95",
         f"{ms(idle_q)} ({len(idle_q)} queries; generation and mode: {dict(idle_q_gens)})"),
        ("idle: save-to-searchable p50 / p95",
         f"{ms(idle_save)} ({len(idle_save)} files)"),
        ("clean migration: use call (loads the model)", f"{mig_a['use_call_s']:.2f} s"),
        ("clean migration: use -> backfill done / -> switch",
         f"{mig_a['backfill_end_s']:.1f} s / {mig_a['switch_s']:.1f} s "
         f"(generation {mig_a['from_generation']} -> {mig_a['active_after']})"),
        ("clean migration: chunks embedded (last status seen)",
         f"{chunks_a} ({mig_a['files_total']} files; {len(texts)} distinct chunk texts "
         "in its store)"),
        ("backfill chunks/s, use -> switch / backfill only",
         f"{rate_a:.1f} / {rate_a_backfill:.1f}"),
        ("plain encode(batch_size=32), same texts",
         f"{base['chunks_per_s']:.1f} chunks/s ({len(texts)} texts, {base['seconds']:.1f} s, "
         f"{base['torch_threads']} torch threads)"),
        ("throughput ratio, use -> switch / backfill only",
         f"{ratio:.3f} / {rate_a_backfill / base['chunks_per_s']:.3f} (target >= 0.90)"),
        ("  CPU s per chunk, daemon (all threads, store processes) / plain",
         f"{mig_a['daemon_cpu_s'] / max(chunks_a, 1):.3f} / {base['cpu_s'] / len(texts):.3f} "
         f"(ratio plain / daemon {result['figures']['cpu_ratio']})"),
        ("  cores obtained, daemon / plain; machine idle share",
         f"{mig_a['daemon_cores']:.2f} / {base['cores']:.2f}; "
         f"{mig_a['machine_idle_share']:.3f} / {base['machine_idle_share']:.3f} "
         f"({os.cpu_count()} cores shared with other work)"),
    ]
    if isinstance(result["eval"], dict):
        for kind in ("dense", "default"):
            for g in (gen1, gen2):
                if kind not in result["eval"]:
                    continue
                e = result["eval"][kind][str(g)]
                mt = e["metrics"]
                state = result["generations_after_switch"][str(g)]["state"]
                rows.append((f"repd eval --mode {e.get('mode', 'dense')} generation {g} "
                             f"({state}), {e['queries']} queries",
                             f"nDCG@10 {mt['ndcg@10']:.4f}, recall@100 "
                             f"{mt['recall@100']:.4f}, MRR@10 {mt['mrr@10']:.4f} (answered "
                             f"by {e['generation']}, {e['wall_s']:.1f} s)"))
        pq = result["eval"]["plain_dense_model3"]
        rows.append((f"  cross-check of generation {gen2} dense: plain encode, same chunks",
                     f"nDCG@10 {pq['metrics']['ndcg@10']:.4f}, recall@100 "
                     f"{pq['metrics']['recall@100']:.4f}, MRR@10 {pq['metrics']['mrr@10']:.4f}"))
    else:
        rows.append(("repd eval", str(result["eval"])))
    rows += [
        ("during backfill (generation 1 answers): query p50 / p95",
         f"{ms(busy_q)} ({len(busy_q)} queries; generation and mode: "
         f"{dict(busy['query_generations'])})"),
        ("during backfill: save-to-searchable p50 / p95",
         f"{ms(busy_save)} ({len(busy_save)} files)"),
        ("  query p50 / p95, during / idle",
         _ratio(busy_q, idle_q)),
        ("  save-to-searchable p50 / p95, during / idle", _ratio(busy_save, idle_save)),
        ("loaded migration: use -> switch",
         f"{mig_b['switch_s']:.1f} s for {chunks_b} chunks, {chunks_b / mig_b['switch_s']:.1f} "
         f"chunks/s (generation {mig_b['from_generation']} -> {gen3}; its status said "
         f"{mig_b['chunks_embedded_last_seen']} embedded)"),
        ("load average at start / clean switch / end",
         f"{result['machine']['load_at_start']} / {mig_a['load_end']} / {base['load_end']}"),
        ("daemon log warnings/errors", str(len(problems))),
    ]
    print_table(rows)
    for line in problems[:20]:
        print("  log:", line)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def _ratio(during: list[float], idle: list[float]) -> str:
    if not during or not idle:
        return "n/a"
    return (f"{pct(during, 0.5) / pct(idle, 0.5):.2f} / "
            f"{pct(during, 0.95) / pct(idle, 0.95):.2f}")


def chunk_texts_by_path(home: Path) -> list[tuple[str, str]]:
    """(path, text) of every point in the active generation's store (daemon stopped);
    bench_engine.chunk_texts without the paths."""
    from repd.engine import Engine
    from repd.settings import Settings, StoreSettings

    eng = Engine(Settings(store=StoreSettings(path=home / "data" / "repd")), writer=False)
    try:
        ids = list(eng.store.iter_ids())
        return [(str(r.payload["path"]), str(r.payload["text"]))
                for r in eng.store.retrieve(ids, with_vectors=False)]
    finally:
        eng.close()


if __name__ == "__main__":
    main()
