"""Storms against a real daemon: 5,000 changes with bounded memory, and kill -9 in the
middle of one, after which a restart leaves the store equal to a fresh index."""

from __future__ import annotations

import random
import time
from pathlib import Path

from repd.engine import Engine
from repd.settings import Settings
from tests.daemon_harness import DaemonProc, wait_for
from tests.helpers import assert_same_index, cli_env, run_cli, snapshot

WORDS = ("amber basalt cedar delta ember fjord garnet harbor indigo jasper kelp lumen marble "
         "nectar onyx prism quartz raven sierra tundra").split()


def storm(root: Path, n: int, seed: int, round_: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(n):
        d = root / f"pkg{i % 50}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_text(
            f'"""Module {i} round {round_}."""\n\ndef f{i}():\n    return "'
            + " ".join(rng.choices(WORDS, k=8)) + '"\n')


def store_of(home: Path) -> dict[str, object]:
    eng = Engine(Settings(store={"path": home / "data" / "repd"}, device="cpu"), writer=False)
    try:
        return snapshot(eng)
    finally:
        eng.close()


def test_storm_of_5000_changes_memory_bounded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "seed.md").write_text("A seed file so the first scan has something.")
    d = DaemonProc(tmp_path / "home", [root], {"REPD_WATCH__MAX_PENDING": "1000"}).start()
    try:
        # Live changes through inotify, not the polling fallback (an unknown watchdog
        # release is polled, and a storm would converge that way too).
        assert [r["watch"] for r in d.status()["roots"]] == ["inotify"]
        base_rss, _ = d.rss_kb()
        t0 = time.monotonic()
        storm(root, 5000, seed=1)
        peak_depth = 0
        samples = []

        def converged() -> bool:
            nonlocal peak_depth
            st = d.status()
            peak_depth = max(peak_depth, st["queue"]["pending"])
            samples.append(d.rss_kb()[0])
            return st["totals"]["files"] == 5001 and st["state"] == "idle"

        wait_for(converged, 600, "the storm to converge", every=0.5)
        took = time.monotonic() - t0
        rss, peak = d.rss_kb()
        # The change queue is bounded: past max_pending it collapses into a root scan.
        assert peak_depth <= 1000 + 100, peak_depth
        # Memory: the storm must not grow the daemon by more than a bounded amount
        # (model, batches, SQLite cache); 5,000 pending entries are tiny but unbounded
        # growth would show here.
        assert peak - base_rss < 1_500_000, (base_rss, peak)
        print(f"\nstorm: 5000 files converged in {took:.1f}s; RSS base {base_rss / 1024:.0f} "
              f"MiB, peak {peak / 1024:.0f} MiB, final {rss / 1024:.0f} MiB; "
              f"peak queue depth {peak_depth}")
        # A second storm rewriting every file: repeated changes collapse.
        storm(root, 5000, seed=1, round_=1)
        wait_for(lambda: d.status()["state"] == "idle" and d.status()["queue"]["pending"] == 0
                 and d.status()["totals"]["files"] == 5001, 600, "the rewrite storm")
    finally:
        d.stop()


def test_kill9_during_storm_then_restart_equals_fresh_index(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    storm(root, 300, seed=2)
    home = tmp_path / "home"
    d = DaemonProc(home, [root]).start()
    storm(root, 1500, seed=3, round_=1)  # rewrites 300, adds 1,200
    wait_for(lambda: d.status()["totals"]["embedded"] > 50, 120, "indexing under way")
    d.kill9()
    # Change more while it is down: the start-up scan must catch these too.
    for p in sorted(root.rglob("mod1*.py"))[:40]:
        p.unlink()
    d2 = DaemonProc(home, [root]).start(timeout=600)
    try:
        st = d2.wait_idle(600)
        # A kill is no crash: logged (the writes were recovered), not shown as one.
        assert st["previous_crash"] is None
        assert '"previous_run_killed"' in d2.log.read_text()
    finally:
        assert d2.stop() == 0
    fresh_home = tmp_path / "fresh"
    run_cli(["index", str(root)], cli_env(fresh_home))
    assert_same_index(store_of(home), store_of(fresh_home))
