"""`repd query` as a person feels it, through a real daemon: the whole command and the API call.

    python bench/bench_cli_query.py [--files 200] [--runs 30] [--out bench/out-cli-query]
                                    [--before DIR]

Starts a daemon on ``--files`` generated notes (its own XDG folders), waits until it is
idle, then measures, interleaved in one run so that a busy machine weighs on each alike:

* ``python -c pass``: the interpreter's own start, the floor of any command;
* ``repd query TEXT``: the console script of this virtual environment, through the daemon;
* the API call alone (``ApiClient.query`` in this process, one client whose calls share a
  kept connection) and the daemon's own ``took_ms`` (embedding and store search), whose
  difference is the snippets, HTTP and JSON around them; and the same call from a new
  client each time (a new connection, as each ``repd query`` makes);
* with ``--before DIR`` (the ``daemon/`` folder of another checkout, e.g. ``git archive
  HEAD daemon | tar -x -C /tmp/before``): a second daemon, started from DIR on the same
  notes, and the same command and API calls against it with ``PYTHONPATH=DIR``, so a
  change is judged against its baseline in the same run.

Each command is reported as wall time p50/p95 and CPU time p50 (user + system of the child,
from ``wait4``): on a shared machine the CPU time is what the command costs, and wall time
adds the wait for a core. Commands run with compiled bytecode, as an installed package has
it (``PYTHONPYCACHEPREFIX`` in the out folder, written by warm-up runs), even where
``PYTHONDONTWRITEBYTECODE`` is set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemon_harness import DaemonProc  # noqa: E402

from bench.bench_daemon import pct, wait_quiet, write_small_corpus  # noqa: E402
from repd.api.client import ApiClient  # noqa: E402

QUERIES = ["spring tides and the glaciers", "compiler parser kernel", "protein enzyme membrane",
           "ballad sonnet rhyme", "harbor reef salinity"]
WARM_UP = 3


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command, its output discarded; raises on failure."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: no Python code between fork and exec but the dup2s
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.execve(argv[0], argv, env)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t
    finally:
        os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def measure_commands(runs: int, cmds: dict[str, tuple[list[str], dict[str, str]]]
                     ) -> list[tuple[str, str]]:
    """Interleaved runs of each command (name -> argv, environment); one row per command."""
    wall: dict[str, list[float]] = {name: [] for name in cmds}
    cpu: dict[str, list[float]] = {name: [] for name in cmds}
    for i in range(WARM_UP + runs):
        for name, (argv, cmd_env) in cmds.items():
            w, c = run_once(argv, cmd_env)
            if i >= WARM_UP:
                wall[name].append(w)
                cpu[name].append(c)
    rows = []
    floor = pct(cpu["python -c pass"], 0.5)
    for name in cmds:
        extra = ""
        if name != "python -c pass":
            above = (pct(cpu[name], 0.5) - floor) * 1000
            extra = f"  (CPU above the interpreter's start: {above:.1f} ms)"
        rows.append((f"{name}: wall p50 / p95, CPU p50",
                     f"{pct(wall[name], 0.5) * 1000:.1f} / {pct(wall[name], 0.95) * 1000:.1f} ms, "
                     f"{pct(cpu[name], 0.5) * 1000:.1f} ms{extra}"))
    after, before = "repd query", "repd query (before)"
    if before in cmds:
        rows.append(("`repd query` before / after, wall p50 and CPU p50",
                     f"{pct(wall[before], 0.5) / pct(wall[after], 0.5):.2f}x, "
                     f"{pct(cpu[before], 0.5) / pct(cpu[after], 0.5):.2f}x"))
    return rows


def measure_api(daemons: dict[str, DaemonProc], n: int) -> list[tuple[str, str]]:
    """The API call from this process, and each daemon's own took_ms, interleaved; and
    the same call on a new connection each time (a client per call, as `repd query`)."""
    clients = {name: d.client for name, d in daemons.items()}
    for client in clients.values():
        for q in QUERIES:
            client.query(q)
    api: dict[str, list[float]] = {name: [] for name in daemons}
    took: dict[str, list[float]] = {name: [] for name in daemons}
    fresh: list[float] = []
    first = next(iter(daemons.values()))
    for i in range(n):
        for name, client in clients.items():
            t = time.perf_counter()
            res = client.query(QUERIES[i % len(QUERIES)], k=10)
            api[name].append(time.perf_counter() - t)
            took[name].append(float(res["took_ms"]) / 1000)
        t = time.perf_counter()
        with ApiClient(first.socket, timeout=30) as once:
            once.query(QUERIES[i % len(QUERIES)], k=10)
        fresh.append(time.perf_counter() - t)
    rows = []
    for name in daemons:
        around = [a - b for a, b in zip(api[name], took[name], strict=True)]
        rows += [(f"API query{name} p50 / p95",
                  f"{pct(api[name], 0.5) * 1000:.2f} / {pct(api[name], 0.95) * 1000:.2f} ms"
                  " (target p50 <= 10)"),
                 ("  of which took_ms (embed + store search) p50",
                  f"{pct(took[name], 0.5) * 1000:.2f} ms"),
                 ("  around it (snippets, HTTP, validation, JSON) p50",
                  f"{pct(around, 0.5) * 1000:.2f} ms")]
    name = next(iter(daemons))
    rows.append((f"API query{name} on a new connection each p50 / p95",
                 f"{pct(fresh, 0.5) * 1000:.2f} / {pct(fresh, 0.95) * 1000:.2f} ms (kept / new "
                 f"{pct(api[name], 0.5) / pct(fresh, 0.5):.2f})"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200, help="generated notes (default 200)")
    ap.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    ap.add_argument("--api-runs", type=int, default=200, help="API calls (default 200)")
    ap.add_argument("--out", type=Path, default=HERE / "out-cli-query")
    ap.add_argument("--before", type=Path, default=None,
                    help="a daemon/ folder of another checkout: its `repd query` is measured "
                    "beside this tree's, in the same run")
    args = ap.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    root = out / "root"
    write_small_corpus(root / "notes", args.files)
    python = sys.executable
    query = [str(Path(python).parent / "repd"), "query", QUERIES[0]]
    daemons = {"": DaemonProc(out / "home", [root])}
    if args.before is not None:
        daemons[" (before)"] = DaemonProc(out / "home-before", [root], extra_env={
            "PYTHONPATH": str(args.before.resolve())})
    rows: list[tuple[str, str]] = []
    cmds: dict[str, tuple[list[str], dict[str, str]]] = {}
    try:
        for name, d in daemons.items():
            t0 = time.monotonic()
            d.start(wait_idle=True, timeout=3600)
            rows.append((f"daemon{name} start to idle on {args.files} notes",
                         f"{time.monotonic() - t0:.1f} s"))
            env = {k: v for k, v in d.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = str(out / f"pycache{name.strip(' ()')}")
            if not cmds:
                cmds["python -c pass"] = ([python, "-c", "pass"], env)
            cmds[f"repd query{name}"] = (query, env)
        for d in daemons.values():
            wait_quiet(d.pid)
        rows += measure_api(daemons, args.api_runs)
        rows += measure_commands(args.runs, cmds)
    finally:
        for d in daemons.values():
            if d.proc is not None:
                d.stop()
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
