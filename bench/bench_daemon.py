"""Daemon benchmark, measured as a user sees it, through the real API of a real daemon:

* save-to-searchable: single-file edits on an idle daemon, from the write to the new
  text showing up in a query (p50, p95), for a writer that closes the file (the watcher's
  close fast path) against one that keeps it open (the settle path), interleaved in the
  same run; ``--only save`` runs this alone on a small generated corpus (no SciFact);
* query latency on the SciFact corpus: the API call, and the whole `repd query` command;
* status and query latency through the socket while the daemon indexes at full speed,
  against the same calls on the idle daemon in the same run;
* storm: 5,000 changed files: time to converge and peak RSS;
* idle: CPU use of the idle daemon (with its store processes) watching ~10,000 files.

    python bench/bench_daemon.py [--scifact DIR] [--docs N] [--out bench/out-daemon]

    python bench/bench_daemon.py --only save [--files 300] [--edits 50]
    python bench/bench_daemon.py --only load [--files 300]

SciFact (BEIR) comes from --scifact DIR or $REPD_SCIFACT: see bench_engine.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemon_harness import DaemonProc, wait_for  # noqa: E402

from bench.bench_engine import (  # noqa: E402
    add_scifact_argument,
    find_scifact,
    load_corpus,
    plain_model,
    write_corpus,
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` and of its descendants alive now: the daemon with
    its store processes (``store.replicas``), where its HNSW builds run."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # it ended meanwhile
    return total


def wait_quiet(pid: int, min_s: float = 0.0, limit_s: float = 600.0) -> float:
    """Wait at least ``min_s``, then until the CPU use of the daemon and its store
    processes drops below 5 % of a core over 2 s windows (post-write maintenance such as
    an HNSW build or a vacuum has finished); seconds waited. The daemon looks for due
    maintenance once a minute when idle (repd.app.INDEX_CHECK_EVERY_S), so a ``min_s``
    past that lets it start first."""
    t0 = time.monotonic()
    time.sleep(min_s)
    while time.monotonic() - t0 < limit_s:
        c0 = tree_cpu_seconds(pid)
        time.sleep(2.0)
        if tree_cpu_seconds(pid) - c0 < 0.1:
            break
    return time.monotonic() - t0


def plain_query_encode_ms(queries: list[str]) -> list[float]:
    """Baseline: ``SentenceTransformer.encode([q])`` in this process, one query at a time,
    with the same model; what any in-process search must pay before touching the index."""
    model = plain_model()
    model.encode(["warm up"], show_progress_bar=False)
    out = []
    for q in queries:
        t = time.perf_counter()
        model.encode([q], show_progress_bar=False, normalize_embeddings=True)
        out.append(time.perf_counter() - t)
    del model
    return out


def api_latency(d: DaemonProc, queries: list[str], seconds: float) -> tuple[list[float], ...]:
    """(status latencies, query latencies) in seconds, alternating calls for ``seconds``."""
    status, query = [], []
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end:
        t = time.perf_counter()
        d.client.status()
        status.append(time.perf_counter() - t)
        t = time.perf_counter()
        d.client.query(queries[i % len(queries)], k=10)
        query.append(time.perf_counter() - t)
        i += 1
    return status, query


def latency_under_load(d: DaemonProc, root: Path, queries: list[str],
                       nonce: str) -> list[tuple[str, str]]:
    """Status and query p50/p99 while 1,500 new files are indexed, against idle."""
    idle_status, idle_query = api_latency(d, queries, 15)
    load = root / "load"
    load.mkdir()
    for i in range(1500):
        (load / f"doc{i}.md").write_text(
            f"# Load {i} {nonce}\n\n" + " ".join(queries[i % len(queries)].split() * 6))
    wait_for(lambda: d.status()["state"] in ("indexing", "scanning"), 60, "indexing to start")
    busy_status, busy_query = [], []
    while True:
        st, qu = api_latency(d, queries, 2)
        busy_status += st
        busy_query += qu
        s = d.status()
        if s["state"] == "idle" and not s["queue"]["pending"] and not s["queue"]["scans"]:
            break

    def fmt(values: list[float]) -> str:
        return f"{pct(values, 0.5) * 1000:.1f} / {pct(values, 0.99) * 1000:.1f} ms"

    return [("status p50 / p99, idle", fmt(idle_status)),
            ("status p50 / p99, while indexing 1,500 files",
             f"{fmt(busy_status)} ({len(busy_status)} calls)"),
            ("query p50 / p99, idle", fmt(idle_query)),
            ("query p50 / p99, while indexing", fmt(busy_query))]


_WORDS = ("tide current harbor reef salinity plankton estuary lagoon dune kelp coral "
          "sediment basin delta glacier moraine fjord aquifer spring marsh meadow orchard "
          "lantern ledger engine piston turbine gasket valve bearing axle gear rotor "
          "compiler parser kernel socket buffer thread mutex cache index shard vector "
          "sonnet ballad chorus verse rhyme meter stanza fable legend saga chronicle "
          "protein enzyme membrane neuron synapse cortex retina antibody genome allele").split()


def write_small_corpus(folder: Path, n: int) -> None:
    """``n`` generated Markdown notes (a few paragraphs each): an index of realistic size
    for the save-to-searchable measurement, without SciFact."""
    import random

    rnd = random.Random(7)
    folder.mkdir(parents=True)
    for i in range(n):
        paras = [f"# Note {i} about {' '.join(rnd.sample(_WORDS, 3))}\n"]
        for _ in range(rnd.randint(2, 6)):
            words = [rnd.choice(_WORDS) for _ in range(rnd.randint(40, 120))]
            paras.append(" ".join(words).capitalize() + ".")
        (folder / f"note{i:04d}.md").write_text("\n\n".join(paras) + "\n")


def save_to_searchable(d: DaemonProc, folder: Path, edits: int) -> list[tuple[str, str]]:
    """Save-to-searchable on the idle daemon, two ways, interleaved in the same run.

    ``closed``: each edit is written and closed (open, write, close, as editors and most
    tools save): the watcher sees the ``close()`` and the change skips the settle wait.
    ``held open``: the same kind of edit, written and flushed, but the file stays open until
    the text is searchable: no ``close()`` is seen, so the change waits for debounce and
    settle, the path every save took before the close fast path.
    """
    folder.mkdir()
    lat: dict[str, list[float]] = {"closed": [], "held": []}
    wait_quiet(d.pid)
    for i in range(2 * edits):
        mode = "closed" if i % 2 == 0 else "held"
        marker = f"zebracorn{i}quill"
        path = folder / f"{mode}{(i // 2) % 5}.md"
        text = f"# Edit {i}\n\nThe {marker} observation number {i} about tides.\n"

        def found(m: str = marker) -> bool:
            # The ten edit files hold near-identical text: k covers them all.
            hits = d.client.query(f"{m} observation about tides", k=12)["hits"]
            return any(m in h["snippet"] for h in hits)

        t = time.monotonic()
        if mode == "closed":
            path.write_text(text)
            wait_for(found, 30, f"edit {i}", every=0.01)
            lat[mode].append(time.monotonic() - t)
        else:
            with path.open("w") as fh:
                fh.write(text)
                fh.flush()
                wait_for(found, 30, f"edit {i}", every=0.01)
                lat[mode].append(time.monotonic() - t)
        d.wait_idle(60)  # the close of a held file is a change too: let it pass
        time.sleep(0.3)
    closed, held = lat["closed"], lat["held"]

    def ms(values: list[float]) -> str:
        return f"{pct(values, 0.5) * 1000:.0f} / {pct(values, 0.95) * 1000:.0f} ms"

    return [(f"save-to-searchable p50 / p95, closed ({edits} edits)",
             f"{ms(closed)} (target p95 <= 250)"),
            (f"save-to-searchable p50 / p95, held open: settle path ({edits} edits)",
             ms(held)),
            ("  closed / held open, p50 / p95",
             f"{pct(closed, 0.5) / pct(held, 0.5):.2f} / "
             f"{pct(closed, 0.95) / pct(held, 0.95):.2f}")]


def on_small_corpus(args: argparse.Namespace,
                    measure: Callable[[DaemonProc, Path], list[tuple[str, str]]]) -> None:
    """Index ``--files`` generated notes with a fresh daemon, run ``measure``, print it."""
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    root, home = out / "root", out / "home"
    write_small_corpus(root / "notes", args.files)
    d = DaemonProc(home, [root])
    t0 = time.monotonic()
    d.start(wait_idle=True, timeout=3600)
    rows = [(f"initial index of {args.files} notes", f"{time.monotonic() - t0:.1f} s")]
    try:
        rows += measure(d, root)
    finally:
        d.stop()
    print_table(rows)


def save_only(args: argparse.Namespace) -> None:
    """``--only save``: save-to-searchable alone, on ``--files`` generated notes."""
    on_small_corpus(args, lambda d, root: save_to_searchable(d, root / "edits", args.edits))


def load_only(args: argparse.Namespace) -> None:
    """``--only load``: status and query latency while indexing, on generated notes."""
    queries = [f"observation about {w} and {v}" for w, v in
               zip(("tides", "glaciers", "orchards", "harbors", "lanterns"),
                   ("winds", "rivers", "meadows", "cobalt", "timber"), strict=True)]

    def measure(d: DaemonProc, root: Path) -> list[tuple[str, str]]:
        wait_quiet(d.pid)
        return latency_under_load(d, root, queries, f"{time.time_ns():x}")

    on_small_corpus(args, measure)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "out-daemon")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an out folder of bench_engine.py: start on its SciFact index "
                    "(corpus/ and home/) instead of indexing the corpus again")
    ap.add_argument("--only", choices=["save", "load"], default=None,
                    help="save: only save-to-searchable; load: only status and query "
                    "latency while 1,500 new files are indexed; both on --files generated "
                    "notes, no SciFact needed")
    ap.add_argument("--files", type=int, default=300,
                    help="notes generated for --only save (default 300)")
    ap.add_argument("--edits", type=int, default=50,
                    help="save-to-searchable edits per way (default 50)")
    add_scifact_argument(ap)
    args = ap.parse_args()
    if args.only == "save":
        save_only(args)
        return
    if args.only == "load":
        load_only(args)
        return
    # --reuse starts from an indexed corpus: only the queries are read then.
    data = find_scifact(args.scifact, ("queries.jsonl",) if args.reuse else
                        ("corpus.jsonl", "queries.jsonl"))
    if args.reuse:
        reuse = args.reuse.resolve()
        root, home = reuse / "corpus", reuse / "home"
        for extra in ("edits", "storm"):
            shutil.rmtree(root / extra, ignore_errors=True)
    else:
        out = args.out.resolve()
        shutil.rmtree(out, ignore_errors=True)
        root, home = out / "root", out / "home"
        write_corpus(load_corpus(args.docs), root / "scifact")
    d = DaemonProc(home, [root])
    t0 = time.monotonic()
    d.start(wait_idle=True, timeout=3600)
    initial_s = time.monotonic() - t0
    rows: list[tuple[str, str]] = [("initial index (daemon start to idle)", f"{initial_s:.1f} s")]
    # Run-unique text, so that no vector cached by an earlier run of this benchmark on the
    # same home is reused: every storm file must really be embedded.
    nonce = f"{time.time_ns():x}"
    try:
        rows += save_to_searchable(d, root / "edits", args.edits)
        # query latency
        queries = [json.loads(x)["text"] for x in
                   (data / "queries.jsonl").open()][:200]
        wait_quiet(d.pid, min_s=65)
        api, server = [], []
        for q in queries:
            t = time.perf_counter()
            server.append(d.client.query(q, k=10)["took_ms"])
            api.append(time.perf_counter() - t)
        # With compiled bytecode, as an installed package has it, even where
        # PYTHONDONTWRITEBYTECODE is set (then every run compiled each module again);
        # the first runs write it.
        cmd_env = {k: v for k, v in d.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cmd_env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
        cmd = []
        for i, q in enumerate(queries[:22]):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "repd.cli", "query", q], env=cmd_env,
                           capture_output=True, check=True)
            if i >= 2:
                cmd.append(time.perf_counter() - t)
        base = plain_query_encode_ms(queries)
        api_ms = f"{pct(api, 0.5) * 1000:.1f} / {pct(api, 0.95) * 1000:.1f} ms"
        rows += [("query via API p50 / p95", f"{api_ms} (target p50 <= 10)"),
                 ("  of which embed + search in the daemon, p50",
                  f"{pct(server, 0.5):.1f} ms"),
                 ("  baseline: plain encode([query]) in-process, p50",
                  f"{pct(base, 0.5) * 1000:.1f} ms (API p50 / baseline "
                  f"{pct(api, 0.5) / pct(base, 0.5):.2f})"),
                 ("`repd query` whole command p50 / max",
                  f"{pct(cmd, 0.5) * 1000:.0f} / {max(cmd) * 1000:.0f} ms (target p50 <= 100)")]
        rows += latency_under_load(d, root, queries, nonce)
        wait_quiet(d.pid)
        # storm: 5,000 new files (a branch switch), then every one rewritten (a formatter)
        storm = root / "storm"
        storm.mkdir()
        base_rss, _ = d.rss_kb()
        for phase in ("new", "rewritten"):
            t = time.monotonic()
            totals = d.status()["totals"]
            files_before, embedded_before = totals["files"], totals["embedded"]
            for i in range(5000):
                sub = storm / f"pkg{i % 50}"
                sub.mkdir(exist_ok=True)
                body = f"    return {i}\n" if phase == "new" else f"    return {i} + 0  # fmt\n"
                (sub / f"mod{i}.py").write_text(
                    f'def f{i}():\n    """Storm file {i} of run {nonce}."""\n{body}')
            want_files = files_before + (4990 if phase == "new" else 0)
            peak = {"pending": 0, "scans": 0}

            def converged(want: int = want_files, seen: dict[str, int] = peak,
                          emb0: int = embedded_before, ph: str = phase) -> bool:
                st = d.status()
                for key in seen:
                    seen[key] = max(seen[key], st["queue"][key])
                q = st["queue"]
                busy = q["pending"] or q["scans"] or q["settling"]
                done = st["totals"]["files"] >= want and (
                    ph == "new" or st["totals"]["embedded"] - emb0 >= 4990)
                return st["state"] == "idle" and not busy and done
            wait_for(converged, 3600, f"storm ({phase})", every=0.25)
            storm_s = time.monotonic() - t
            rows += [(f"storm: 5,000 files {phase}, converged", f"{storm_s:.1f} s"),
                     (f"storm ({phase}): peak pending paths / scans",
                      f"{peak['pending']} / {peak['scans']}")]
        rss, peak_rss = d.rss_kb()
        rows.append(("storm: RSS before / peak / after",
                     f"{base_rss // 1024} / {peak_rss // 1024} / {rss // 1024} MiB"))
        # idle
        nfiles = d.status()["totals"]["files"]
        settle_s = wait_quiet(d.pid, min_s=65)
        rows.append(("storm: until quiet again (incl. maintenance)", f"{settle_s:.0f} s"))
        c0, w0 = tree_cpu_seconds(d.pid), time.monotonic()
        time.sleep(30)
        c1, w1 = tree_cpu_seconds(d.pid), time.monotonic()
        rows.append((f"idle CPU watching {nfiles} files",
                     f"{100 * (c1 - c0) / (w1 - w0):.2f} % of one core over 30 s"))
    finally:
        d.stop()
    print_table(rows)


if __name__ == "__main__":
    main()
