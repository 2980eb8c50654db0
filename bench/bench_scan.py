"""Scan benchmark: the no-op reconcile scan against `git status` on the same tree, and
daemon start-to-idle against the model load alone.

    python bench/bench_scan.py [--files 100000] [--repeats 7] [--out bench/out-scan]
    python bench/bench_scan.py --only scan      # the scan and git, no model
    python bench/bench_scan.py --only start [--start-files 5000]

*scan*: a synthetic tree of ``--files`` small files (nested folders, two .gitignore files,
ignored folders: node_modules, build, __pycache__, a .gitignored one) in a temp folder.
The manifest is filled through ``Manifest.upsert_file`` (the write the indexer makes) with
each file's real stat, as an index of that tree would hold it, so no model is involved;
a first scan checks that every file then counts as unchanged (else the figure would not
be a no-op pass). Then the real ``Indexer.reconcile`` is timed ``--repeats`` times, with
the ignore rules kept from the previous pass (the daemon's periodic rescan) and with
fresh ones (``repd index`` or a daemon start). Breakdown: the manifest read
(``Manifest.scan_view``), the walk with its ignore rules, the stat calls alone (one
``os.stat`` per file, the same count), and the rest (the compare). Baseline in the same
run: ``git status --porcelain`` on the same tree, committed once (``--no-git`` skips it).

*start*: ``--start-files`` short notes indexed once with the real model (``repd index``),
then ``repd run`` is started and timed to the API answering, to ready (model loaded),
and to idle (queue empty, a full scan done), against a process that only imports repd
and loads the same model (``Embedder.load``), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from repd.adapters.manifest import Manifest  # noqa: E402
from repd.core.identity import StatSig  # noqa: E402
from repd.core.ignore import IgnoreRules  # noqa: E402
from repd.engine import Engine  # noqa: E402
from repd.pipeline.scanner import walk, walk_folders  # noqa: E402
from repd.settings import Settings  # noqa: E402

# The tree: TOP x MID folders, each with LEAF sub-folders of files; the count per leaf
# folder follows from --files. Ignored extras are not counted in --files.
TOP, MID, LEAF = 10, 10, 10
IGNORED_PER_DIR = 200  # files in each ignored folder (never walked)


class CheapEmbedder:
    """Stands in for the model where the scan needs one: a generation's identity and size.

    The no-op scan never embeds; ``embed`` exists only so the object is complete.
    """

    model_name = "bench-scan-fake"
    model_id = "bench-scan-fake@0000000000000000"
    dim = 8
    max_tokens = 256

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Words, roughly."""
        return [len(t.split()) for t in texts]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors that depend on the text only."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, hash(t) % self.dim] = 1.0
        return out


def build_tree(root: Path, n_files: int) -> dict[str, int]:
    """Write the synthetic tree; returns what it holds."""
    leaves = TOP * MID * LEAF
    per_leaf, extra = divmod(n_files, leaves)
    written = ignored = 0
    root.mkdir(parents=True)
    # Root rules: a pattern, a folder anywhere, and an anchored path. The soft defaults
    # (node_modules, build, __pycache__) are listed too, so git ignores what repd does.
    (root / ".gitignore").write_text("*.log\ngenerated/\n/scratch/\nnode_modules/\n"
                                     "build/\n__pycache__/\n")
    leaf_no = 0
    for a in range(TOP):
        for b in range(MID):
            mid = root / f"pkg{a:02d}" / f"mod{b:02d}"
            for c in range(LEAF):
                leaf = mid / f"part{c:02d}"
                leaf.mkdir(parents=True)
                count = per_leaf + (1 if leaf_no < extra else 0)
                leaf_no += 1
                for i in range(count):
                    (leaf / f"note{i:04d}.md").write_text(
                        f"# {a}.{b}.{c}.{i}\n\nline about item {i} of part {c}\n")
                written += count
                if c == 0:  # ignored by the root .gitignore: a pattern on file names
                    (leaf / "run.log").write_text("ignored\n")
                    ignored += 1
            if b == 0:  # folders that must not be walked at all
                for name in ("node_modules", "build", "__pycache__", "generated"):
                    d = mid / name / "x"
                    d.mkdir(parents=True)
                    for i in range(IGNORED_PER_DIR):
                        (d / f"f{i}.txt").write_text("ignored\n")
                    ignored += IGNORED_PER_DIR
    # A nested .gitignore, and the anchored folder of the root's rules.
    (root / "pkg01" / ".gitignore").write_text("*.tmpdata\n")
    (root / "pkg01" / "mod00" / "part00" / "x.tmpdata").write_text("ignored\n")
    scratch = root / "scratch"
    scratch.mkdir()
    for i in range(IGNORED_PER_DIR):
        (scratch / f"s{i}.md").write_text("ignored\n")
    ignored += IGNORED_PER_DIR + 1
    return {"files": written, "ignored_files": ignored, "folders": leaves + TOP * MID + TOP}


def fill_manifest(manifest: Manifest, root: Path, rules: IgnoreRules) -> int:
    """Record every file the walk yields as indexed, with its real stat: what an index of
    the tree holds. Written through the indexer's own row write (``upsert_file``)."""
    now = time.time_ns()
    n = 0
    with manifest.transaction() as db:
        for e in walk(root, rules):
            if e.st is None:
                continue
            Manifest.upsert_file(db, str(root), e.relpath, StatSig.of(e.st),
                                 f"{n:040x}", "indexed", None, None, now)
            n += 1
    return n


def median(values: list[float]) -> float:
    return statistics.median(values)


def time_it(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_it(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call: on a shared machine the
    CPU time says what the code costs, the wall time what the load made of it."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def scan_part(work: Path, n_files: int, repeats: int, git: bool) -> dict[str, Any]:
    root = work / "tree"
    t_build, facts = time_it(lambda: build_tree(root, n_files))
    print(f"tree: {facts} in {t_build:.1f}s", flush=True)
    # Files written within the last 2 s count as racy (git's same-tick rule) and are
    # re-read on every pass; an index made later than that trusts their stat.
    time.sleep(2.2)
    settings = Settings(store={"path": work / "data"}, device="cpu", model=CheapEmbedder.model_name)
    engine = Engine(settings, writer=True, embedder=CheapEmbedder())
    try:
        indexer = engine.indexer()
        rules = engine.rules(root)
        t_fill, filled = time_it(lambda: fill_manifest(engine.manifest, root, rules))
        print(f"manifest: {filled} rows in {t_fill:.1f}s", flush=True)
        first = indexer.reconcile(root, rules)
        if first.unchanged != filled or first.indexed or first.deleted:
            raise SystemExit(f"not a no-op pass: {first.as_dict()}")

        warm: list[float] = []
        cold: list[float] = []
        warm_cpu: list[float] = []
        cold_cpu: list[float] = []
        for _ in range(repeats):
            wall, cpu = cpu_it(lambda: indexer.reconcile(root, rules))
            warm.append(wall)
            warm_cpu.append(cpu)
            fresh = IgnoreRules(root, exclude=list(rules_exclude(engine, root)))
            wall, cpu = cpu_it(partial(indexer.reconcile, root, fresh))
            cold.append(wall)
            cold_cpu.append(cpu)
        # Breakdown in CPU seconds (the load of a shared machine blurs wall time), each
        # part on its own, best of the repeats: the manifest read, the walk with its
        # ignore rules and stat calls (fresh rules), and the stat calls alone.
        reads, walks, stats_ = [], [], []
        for _ in range(repeats):
            reads.append(cpu_it(lambda: engine.manifest.scan_view(str(root)))[1])
            walks.append(cpu_it(lambda: walk_only(engine, root))[1])
            paths = [str(root / rel) for rel in walk_only(engine, root)]
            stats_.append(cpu_it(partial(stat_all, paths))[1])
    finally:
        engine.close()

    out: dict[str, Any] = {
        "tree": facts, "manifest_rows": filled,
        "reconcile_warm_rules_s": {"best": min(warm), "median": median(warm)},
        "reconcile_fresh_rules_s": {"best": min(cold), "median": median(cold)},
        "files_per_s_warm": {"best": filled / min(warm), "median": filled / median(warm)},
        "files_per_s_fresh": {"best": filled / min(cold), "median": filled / median(cold)},
        "files_per_cpu_s_warm": {"best": filled / min(warm_cpu),
                                 "median": filled / median(warm_cpu)},
        "files_per_cpu_s_fresh": {"best": filled / min(cold_cpu),
                                  "median": filled / median(cold_cpu)},
        "breakdown_best_cpu_s": {
            "reconcile_fresh_rules": min(cold_cpu),
            "manifest_read": min(reads),
            "walk_with_rules_and_stat": min(walks),
            "stat_alone": min(stats_),
            "walk_and_rules_without_stat": max(0.0, min(walks) - min(stats_)),
            "compare_and_rest": max(0.0, min(cold_cpu) - min(walks) - min(reads)),
        },
    }
    if git and shutil.which("git"):
        out["git"] = git_part(root, repeats, min(warm), min(cold))
    return out


def walk_only(engine: Engine, root: Path) -> list[str]:
    """The scan's walk alone, with fresh rules: the paths of the files it keeps."""
    rules = IgnoreRules(root, exclude=rules_exclude(engine, root))
    return [rel for folder in walk_folders(root, rules) for rel, _ in folder.files]


def stat_all(paths: list[str]) -> None:
    """One stat per path, as the walk makes one per file."""
    for p in paths:
        os.stat(p)


def rules_exclude(engine: Engine, root: Path) -> list[str]:
    """The exclude globs the engine gives a root's rules (its own data folder)."""
    return [*engine.settings.exclude, *engine._own_data_globs(root)]


def git_part(root: Path, repeats: int, warm: float, cold: float) -> dict[str, Any]:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}

    def git(*args: str) -> str:
        # No automatic gc in the background: it would outlive the run and its folder.
        return subprocess.run(["git", "-C", str(root), "-c", "gc.auto=0",
                               "-c", "maintenance.auto=false", *args], env=env, check=True,
                              capture_output=True, text=True).stdout

    t0 = time.perf_counter()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "tree")
    setup = time.perf_counter() - t0
    tracked = len(git("ls-files").splitlines())
    times = []
    cpu = []
    dirty = ""
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        dirty = git("status", "--porcelain")
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    if dirty.strip():
        raise SystemExit(f"git status not clean: {dirty[:300]}")
    # git's .git folder is now inside the tree: repd ignores it (hard rule), so the
    # repd figures above (measured before it existed) stay comparable.
    best = min(times)
    return {"version": git("--version").strip(), "tracked_files": tracked,
            "setup_s": setup, "status_s": {"best": best, "median": median(times)},
            "files_per_s": {"best": tracked / best, "median": tracked / median(times)},
            "cpu_s": {"best": min(cpu), "median": median(cpu)},
            "repd_over_git_time_warm_rules": warm / best,
            "repd_over_git_time_fresh_rules": cold / best}


MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# The model load alone, as the daemon does it (Engine.load_model): interpreter start,
# imports, weights, identity check; timed from the process's own start.
_LOAD_ALONE = """
import time
t0 = time.perf_counter()
from repd import paths
from repd.adapters.embedder import Embedder
t_import = time.perf_counter() - t0
emb = Embedder.load({model!r}, device="cpu", cache_dir=paths.cache_dir())
print(t_import, time.perf_counter() - t0)
"""


def write_notes(folder: Path, n: int) -> None:
    """``n`` short distinct notes, 100 to a folder."""
    for i in range(n):
        d = folder / f"set{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"note{i:05d}.md").write_text(
            f"# Note {i}\n\nItem {i} of set {i // 100}: a short line about topic {i % 37}.\n")


def _events(log: Path, since: int) -> dict[str, float]:
    """First time (Unix seconds) of each daemon log event after byte ``since``."""
    out: dict[str, float] = {}
    with log.open() as fh:
        fh.seek(since)
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            name, ts = rec.get("event"), rec.get("timestamp") or rec.get("ts")
            if isinstance(name, str) and name not in out and ts is not None:
                out[name] = _epoch(ts)
    return out


def _epoch(ts: Any) -> float:
    if isinstance(ts, int | float):
        return float(ts)
    from datetime import datetime

    return datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()


def _ready(d: Any) -> bool:
    return bool(d.status()["state"] != "starting")


def start_part(work: Path, n_files: int, runs: int) -> dict[str, Any]:
    """Daemon start to idle on an index of ``n_files`` notes, against the model load."""
    from tests.daemon_harness import DaemonProc, wait_for
    from tests.helpers import cli_env

    home = work / "home"
    root = work / "notes"
    env = cli_env(home)
    t_index: float | None = None
    if not root.exists():  # else an index of it from an earlier run (--work) is reused
        write_notes(root, n_files)
        t_index, proc = time_it(lambda: subprocess.run(
            [sys.executable, "-m", "repd.cli", "index", str(root), "--json"], env=env,
            capture_output=True, text=True))
        if proc.returncode != 0:
            raise SystemExit(f"repd index failed: {proc.stderr[-2000:]}")
        print(f"indexed {n_files} notes in {t_index:.1f}s", flush=True)
    loads: list[dict[str, float]] = []
    starts: list[dict[str, Any]] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _LOAD_ALONE.format(model=MODEL)],
                             env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        t_import, t_in = (float(x) for x in out.stdout.split()[-2:])
        loads.append({"process_wall_s": wall, "imports_s": t_import, "import_and_load_s": t_in})

        d = DaemonProc(home, [root])
        log_from = d.log.stat().st_size if d.log.exists() else 0
        t0 = time.perf_counter()
        t0_epoch = time.time()
        d.start(wait_idle=False)
        try:
            marks: dict[str, Any] = {}
            wait_for(d.status, 120, "the API", every=0.02)
            marks["api_up_s"] = time.perf_counter() - t0
            wait_for(partial(_ready, d), 300, "ready", every=0.02)
            marks["ready_s"] = time.perf_counter() - t0
            st = d.wait_idle(300)
            marks["idle_s"] = time.perf_counter() - t0
            marks["files"] = sum(int(r.get("files", 0)) for r in st.get("roots", [])
                                 if isinstance(r, dict)) or None
        finally:
            d.stop()
        ev = _events(d.log, log_from)
        marks["log_events_s"] = {k: round(v - t0_epoch, 3) for k, v in sorted(
            ev.items(), key=lambda kv: kv[1]) if v >= t0_epoch - 1}
        starts.append(marks)
        print(f"start: {marks}", flush=True)
    best_load = min(x["process_wall_s"] for x in loads)
    best_idle = min(x["idle_s"] for x in starts)
    return {"files": n_files, "index_s": t_index, "model_load_alone": loads,
            "daemon_starts": starts, "best_idle_s": best_idle,
            "best_load_alone_s": best_load,
            "idle_minus_load_alone_s": best_idle - best_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", choices=("scan", "start"), default=None)
    ap.add_argument("--start-files", type=int, default=5000)
    ap.add_argument("--start-runs", type=int, default=2)
    ap.add_argument("--no-git", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "out-scan")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder, kept (a second --only start reuses its index)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.keep = True
        args.work.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="repd-bench-scan-"))
    report: dict[str, Any] = {"cpus": os.cpu_count(),
                              "load_avg_at_start": os.getloadavg()}
    try:
        if args.only in (None, "scan"):
            shutil.rmtree(work / "scan", ignore_errors=True)
            report["scan"] = scan_part(work / "scan", args.files, args.repeats,
                                       not args.no_git)
            (args.out / "scan.json").write_text(json.dumps(report, indent=2))
        if args.only in (None, "start"):
            report["start"] = start_part(work / "start", args.start_files, args.start_runs)
        report["load_avg_at_end"] = os.getloadavg()
        (args.out / "scan.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
