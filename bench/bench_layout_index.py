"""`repd index` of SciFact as files in each embedded layout: two copies against one.

    python bench/bench_layout_index.py [--scifact DIR] [--docs N] [--pairs 2]
                                       [--out bench/out/layouts]

The quick start's main job, a whole `repd index` command (a subprocess, the real model
and store) over the first ``--docs`` SciFact documents written as files (all by
default), once with ``store.replicas = false`` (one copy in the command's process) and
once with the default (two copies, each in a store process), each into a fresh data
folder. ``--pairs`` pairs, the order alternating per pair so that a machine's drift
weighs on both alike. Prints each run's wall time and store size, then the median of
each layout and their ratio. The OpenVINO export (when that backend is in use) comes
from ``REPD_OPENVINO_CACHE`` when set, so it is made once, not per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench_engine import (  # noqa: E402
    add_scifact_argument,
    env_for,
    find_scifact,
    load_corpus,
    repd,
    write_corpus,
)
from repd.adapters.store_edge import disk_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scifact_argument(ap)
    ap.add_argument("--docs", type=int, default=None, help="SciFact documents (default all)")
    ap.add_argument("--pairs", type=int, default=2, help="runs of each layout (default 2)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "layouts")
    args = ap.parse_args()
    find_scifact(args.scifact, ("corpus.jsonl",))
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    write_corpus(load_corpus(args.docs), out / "corpus")
    walls: dict[str, list[float]] = {"false": [], "true": []}
    for pair in range(args.pairs):
        order = ["false", "true"] if pair % 2 == 0 else ["true", "false"]
        for replicas in order:
            home = out / f"home-{pair}-{replicas}"
            env = env_for(home)
            env["REPD_STORE__REPLICAS"] = replicas
            if "REPD_OPENVINO_CACHE" in os.environ:
                env["REPD_OPENVINO_CACHE"] = os.environ["REPD_OPENVINO_CACHE"]
            wall, result = repd(["index", str(out / "corpus"), "--json"], env)
            walls[replicas].append(wall)
            print(json.dumps({"pair": pair, "replicas": replicas == "true",
                              "wall_s": round(wall, 1),
                              "chunks": result.get("chunks_embedded"),
                              "store_mib": round(
                                  disk_bytes(home / "data" / "repd" / "shards") / 2**20, 1)}),
                  flush=True)
    one, two = statistics.median(walls["false"]), statistics.median(walls["true"])
    print(f"repd index, median wall: one copy {one:.1f} s, two copies (default) {two:.1f} s, "
          f"two / one {two / one:.2f}")


if __name__ == "__main__":
    main()
