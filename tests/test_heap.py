"""The heap a burst of work freed goes back to the system (repd.heap), in a real daemon too."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repd.heap import HeapTrimmer, resident_bytes
from tests.daemon_harness import DaemonProc, wait_for

glibc = pytest.mark.skipif(not HeapTrimmer().available, reason="malloc_trim is glibc's")

# Scattered leftovers of freed work, as indexing leaves them: 4 KiB objects (past Python's
# own allocator, so from glibc's heap), one in fifty kept so that the heap's top cannot
# shrink by itself. Prints the resident MiB once they were freed, and what maybe_trim did.
FRAGMENTED = textwrap.dedent("""
    import json
    from repd.heap import HeapTrimmer, resident_bytes
    trimmer = HeapTrimmer(growth_bytes=16 * 2**20)
    blocks = [bytes(4096) + str(i).encode() for i in range(60_000)]
    kept = blocks[::50]
    peak = resident_bytes()
    del blocks
    freed = resident_bytes()
    again = trimmer.maybe_trim()
    print(json.dumps({"peak": peak, "freed": freed, "trim": again,
                      "second": trimmer.maybe_trim(), "kept": len(kept)}))
""")


def test_resident_bytes_reads_this_process() -> None:
    rss = resident_bytes()
    assert rss is not None and 10 * 2**20 < rss < 64 * 2**30


@glibc
def test_freed_scattered_memory_goes_back_and_an_unchanged_heap_is_left_alone() -> None:
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True,
                         check=True, timeout=120)
    got = json.loads(out.stdout)
    mib = 2**20
    # ~240 MiB were allocated; freeing them left most resident (glibc keeps them) ...
    assert got["peak"] - got["freed"] < 100 * mib, got
    before, after = got["trim"]
    # ... and the trim gave them back: well over half of the 240 MiB.
    assert before - after > 150 * mib, got
    # Nothing grew since: the next call does not walk the heap again.
    assert got["second"] is None


def test_without_glibc_nothing_is_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    import repd.heap as heap

    monkeypatch.setattr(sys, "platform", "darwin")
    trimmer = heap.HeapTrimmer(growth_bytes=0)
    assert not trimmer.available and trimmer.maybe_trim() is None


@glibc
@pytest.mark.slow
def test_a_daemon_gives_back_what_loading_and_indexing_freed(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    for i in range(40):
        (root / f"note{i}.md").write_text(f"# Note {i}\n\n" + f"Paragraph {i} on heaps. " * 80)
    d = DaemonProc(tmp_path / "home", [root]).start()
    try:
        # Its first idle check (a second after the queue drained) trims: the model's load
        # and the index grew the process far past the threshold.
        def trimmed() -> dict[str, int] | None:
            for line in d.log.read_text().splitlines():
                if '"heap_trimmed"' in line:
                    event: dict[str, int] = json.loads(line)
                    return event
            return None

        event = wait_for(trimmed, 120, "heap_trimmed in the daemon's log")
        # How much comes back depends on the work (a small one here; ~100 MiB after all
        # of SciFact): the test above measures the effect, this one the wiring.
        assert event["before_mib"] > 100 and event["after_mib"] > 0
        assert d.status()["state"] == "idle"
        assert d.paths_for("paragraph on heaps")  # and it still answers
    finally:
        d.stop()
