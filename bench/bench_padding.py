"""Padding and repeated tokens in the embed path: the old batch planner against the new one.

Usage: python bench/bench_padding.py [--scifact DIR] [--files N] [--embed-files N]
       [--budget 16384] [--overhead N] [--rounds 1] [--backend torch]

SciFact's documents are written as repd's bench_engine writes them (``# title`` then the
abstract) and chunked exactly as the indexer does (``extract_bytes`` then
``chunk_document`` with the real model's tokenizer and limit). The indexer's calls to
``Embedder.embed`` are then replayed: files in name order, grouped like
``Indexer._run_paths`` (``GROUP_FILES``, ``GROUP_CHUNKS``), each group's distinct texts
sorted and cut into slices of ``EMBED_SLICE_CHUNKS`` like ``Indexer._embed_missing``.

Reported, for the whole corpus (no model runs, just tokens):
* group and call sizes as the indexer makes them;
* repeated tokens: text that more than one chunk of a file holds. Chunk bodies are
  disjoint slices of the file (no overlap); the only repeat is the heading breadcrumb
  that Markdown chunks start with, counted for every chunk after a file's first;
* padding, (padded tokens - real tokens) / real tokens over all batches, and the
  number of forward passes, for four set-ups: the old planner (fill each batch to the
  budget) and the new one (least padded tokens plus ``--overhead`` per pass), each on
  the indexer's slices as they are (sorted by characters) and sorted by tokens.

Then, on the first ``--embed-files`` files, the texts are really embedded (real model,
torch) under each set-up, slice by slice, the set-ups' order rotating per slice so a
busy shared machine favours none: wall seconds, CPU seconds, real tokens/s and the
ratio to the old set-up. Results go to stdout and bench/out/bench_padding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import add_scifact_argument, find_scifact

Planner = Callable[..., list[list[int]]]


def greedy_plan(lengths: Sequence[int], token_budget: int, max_batch: int = 256) -> list[list[int]]:
    """The planner repd had before: longest first, each batch filled up to the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        last = batches[-1] if batches else None
        if (last is not None and len(last) < max_batch
                and (len(last) + 1) * lengths[last[0]] <= token_budget):
            last.append(index)
        else:
            batches.append([index])
    return batches


def chunk_corpus(corpus: Path, limit: int | None, emb: Any) -> list[tuple[str, list[str], int]]:
    """Per file (in name order): its name, its chunk texts, and its repeated tokens."""
    from repd.adapters.extract import extract_bytes
    from repd.core.chunking import chunk_document

    docs = [json.loads(line) for line in corpus.open()]
    docs.sort(key=lambda d: f"{d['_id']}.md")  # the scanner hands files over sorted
    files: list[tuple[str, list[str], int]] = []
    for d in docs[:limit] if limit else docs:
        title, body = d["title"].strip(), d["text"].strip()
        text = f"# {title}\n\n{body}\n" if title else f"{body}\n"
        doc = extract_bytes(text.encode(), f"{d['_id']}.md")
        chunks = [c.text for c in chunk_document(doc, emb.count_tokens, emb.max_tokens)]
        files.append((d["_id"], chunks, repeated_tokens(doc.text, chunks, emb)))
    return files


def repeated_tokens(text: str, chunks: list[str], emb: Any) -> int:
    """Tokens of ``text`` that more than one chunk carries: body overlap plus breadcrumbs."""
    repeated = 0
    covered = 0  # end of the furthest body so far, in characters of ``text``
    crumbs: list[str] = []
    for i, chunk in enumerate(chunks):
        body, crumb = chunk, ""
        if chunk not in text and "\n\n" in chunk:  # a breadcrumb, then the body
            crumb, body = chunk.split("\n\n", 1)
        start = text.find(body)
        if start < 0:
            raise SystemExit(f"a chunk body is not a slice of its file: {body[:60]!r}")
        if start < covered:  # bodies that overlap: the shared part is embedded twice
            repeated += emb.count_tokens([text[start:min(covered, start + len(body))]])[0]
        covered = max(covered, start + len(body))
        if crumb and i > 0:
            crumbs.append(crumb + "\n\n")
    if crumbs:
        repeated += sum(emb.count_tokens(crumbs))
    return repeated


def indexer_calls(files: Sequence[tuple[str, list[str], int]], by_tokens: bool,
                  tokens: dict[str, int]) -> list[list[list[str]]]:
    """The embed() calls the indexer makes, per group: groups of files, distinct texts,
    sorted longest first (by characters as the indexer does, or by tokens), in slices."""
    from repd.pipeline import indexer

    groups: list[list[list[str]]] = []
    group: list[list[str]] = []
    count = 0

    def flush() -> None:
        texts = list(dict.fromkeys(t for chunks in group for t in chunks))
        texts.sort(key=(lambda t: tokens[t]) if by_tokens else len, reverse=True)
        step = indexer.EMBED_SLICE_CHUNKS
        groups.append([texts[i:i + step] for i in range(0, len(texts), step)])

    for _, chunks, _ in files:
        group.append(chunks)
        count += len(chunks)
        if count >= indexer.GROUP_CHUNKS or len(group) >= indexer.GROUP_FILES:
            flush()
            group, count = [], 0
    if group:
        flush()
    return groups


def plan_stats(groups: list[list[list[str]]], tokens: dict[str, int], planner: Planner,
               budget: int) -> dict[str, float]:
    """Padding share and forward passes of ``planner`` over every call of ``groups``."""
    real = padded = passes = 0
    for calls in groups:
        for texts in calls:
            lengths = [tokens[t] for t in texts]
            for batch in planner(lengths, budget, 256):
                passes += 1
                padded += len(batch) * max(lengths[i] for i in batch)
                real += sum(lengths[i] for i in batch)
    return {"padding": (padded - real) / real, "passes": passes, "real_tokens": real,
            "padded_tokens": padded}


def modeled_cost(row: dict[str, float], overhead: int) -> float:
    """Padded tokens plus ``overhead`` per pass: the time model the planner minimises,
    a load-independent estimate to set beside the measured times."""
    return row["padded_tokens"] + overhead * row["passes"]


@contextmanager
def planner_in_embedder(planner: Planner) -> Iterator[None]:
    """Make ``Embedder.embed`` plan with ``planner`` (the module-level name it calls)."""
    import repd.adapters.embedder as embedder_module

    saved = getattr(embedder_module, "plan_batches")  # noqa: B009 (not exported: say so)
    setattr(embedder_module, "plan_batches", planner)  # noqa: B010
    try:
        yield
    finally:
        setattr(embedder_module, "plan_batches", saved)  # noqa: B010


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=0, help="SciFact documents (0: all)")
    parser.add_argument("--embed-files", type=int, default=600,
                        help="documents whose chunks are really embedded (0: none)")
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--overhead", type=int, default=None,
                        help="batch_overhead of the new planner (default: repd's)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", help="torch, openvino or auto")
    add_scifact_argument(parser)
    args = parser.parse_args()
    corpus = find_scifact(args.scifact, ("corpus.jsonl",)) / "corpus.jsonl"

    import functools

    import torch

    from repd.adapters.embedder import BUNDLED_MODEL, Embedder
    from repd.core.batching import BATCH_OVERHEAD_TOKENS, plan_batches

    overhead = BATCH_OVERHEAD_TOKENS if args.overhead is None else args.overhead
    new_plan: Planner = functools.partial(plan_batches, batch_overhead=overhead)
    emb = Embedder.load(BUNDLED_MODEL, device=args.device, token_budget=args.budget,
                        backend=args.backend)
    t0 = time.perf_counter()
    files = chunk_corpus(corpus, args.files or None, emb)
    chunk_s = time.perf_counter() - t0
    texts = list(dict.fromkeys(t for _, chunks, _ in files for t in chunks))
    # Tokens as the model sees them: truncated to its limit, plus [CLS] and [SEP].
    tokens = {t: min(n, emb.max_tokens) + 2
              for t, n in zip(texts, emb.count_tokens(texts), strict=True)}
    total_tokens = sum(tokens[t] for _, chunks, _ in files for t in chunks)
    repeated = sum(r for _, _, r in files)
    results: dict[str, Any] = {
        "files": len(files), "chunks": sum(len(c) for _, c, _ in files),
        "distinct_chunks": len(texts), "chunk_seconds": chunk_s, "budget": args.budget,
        "overhead": overhead, "device": emb.device, "backend": args.backend,
        "torch_threads": torch.get_num_threads(),
        "model_tokens": total_tokens, "repeated_tokens": repeated,
        "repeated_share": repeated / total_tokens,
        "mean_tokens": statistics.mean(tokens.values()),
    }
    print(f"{results['files']} files, {results['chunks']} chunks "
          f"({results['distinct_chunks']} distinct), {total_tokens} model tokens, "
          f"mean {results['mean_tokens']:.1f}/chunk; repeated (breadcrumbs, overlap): "
          f"{repeated} tokens = {100 * results['repeated_share']:.2f} %", flush=True)

    setups: dict[str, tuple[bool, Planner]] = {
        "old: chars-sorted slices, fill to budget": (False, greedy_plan),
        "new planner, chars-sorted slices": (False, new_plan),
        "old planner, tokens-sorted slices": (True, greedy_plan),
        "new planner, tokens-sorted slices": (True, new_plan),
    }
    # What sorting by tokens would add to the indexer: one more tokenizer pass.
    t0 = time.perf_counter()
    emb.count_tokens(texts)
    results["count_tokens_seconds"] = count_s = time.perf_counter() - t0
    print(f"counting tokens of every chunk text: {count_s:.2f} s", flush=True)
    calls = {by: indexer_calls(files, by, tokens) for by in (False, True)}
    sizes = [len(c) for g in calls[False] for c in g]
    group_sizes = [sum(len(c) for c in g) for g in calls[False]]
    results["indexer_groups"] = {"groups": len(group_sizes), "texts_per_group_mean":
                                 statistics.mean(group_sizes), "calls": len(sizes),
                                 "texts_per_call_mean": statistics.mean(sizes),
                                 "texts_per_call_min": min(sizes)}
    print(f"indexer: {len(group_sizes)} groups of {statistics.mean(group_sizes):.0f} distinct "
          f"texts on average; {len(sizes)} embed() calls of {statistics.mean(sizes):.0f} "
          f"texts on average (smallest {min(sizes)})", flush=True)
    results["plans"] = {}
    base_cost = 0.0
    for name, (by_tokens, planner) in setups.items():
        row = plan_stats(calls[by_tokens], tokens, planner, args.budget)
        row["modeled_cost"] = cost = modeled_cost(row, overhead)
        base_cost = base_cost or cost
        results["plans"][name] = row
        print(f"  {name:<44} padding {100 * row['padding']:5.2f} %  "
              f"{row['passes']:>5} forward passes; padded + {overhead}/pass: "
              f"x{base_cost / cost:.3f} vs old", flush=True)

    if args.embed_files:
        results["embed"] = embed_timing(emb, files[:args.embed_files], tokens, setups,
                                        args.rounds)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_padding.json").write_text(json.dumps(results, indent=2))


def embed_timing(emb: Any, files: Sequence[tuple[str, list[str], int]],
                 tokens: dict[str, int], setups: dict[str, tuple[bool, Planner]],
                 rounds: int) -> dict[str, dict[str, float]]:
    """Embed the same files under each set-up, slice by slice, order rotating."""
    calls = {by: indexer_calls(files, by, tokens) for by in (False, True)}
    names = list(setups)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    emb.embed(calls[False][0][0][:64])  # warm-up
    # Both sortings cut each group into the same number of equal-sized slices, so the
    # set-ups can take turns slice by slice: a burst of load on the shared machine then
    # lands on all of them alike.
    slices = [(g, k) for g, group in enumerate(calls[False]) for k in range(len(group))]
    turn = 0
    for _ in range(rounds):
        for g, k in slices:
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                by_tokens, planner = setups[name]
                with planner_in_embedder(planner):
                    c0, w0 = time.process_time(), time.perf_counter()
                    emb.embed(calls[by_tokens][g][k])
                    wall[name] += time.perf_counter() - w0
                    cpu[name] += time.process_time() - c0
            turn += 1
    real = sum(tokens[t] for g in calls[False] for c in g for t in c) * rounds
    base = names[0]
    out: dict[str, dict[str, float]] = {}
    print(f"embedded {len(files)} files, {real // rounds} real tokens, x {rounds} round(s) "
          "per set-up:", flush=True)
    for name in names:
        by_tokens, planner = setups[name]
        plan = plan_stats(calls[by_tokens], tokens, planner, emb.token_budget)
        out[name] = {"wall_s": wall[name], "cpu_s": cpu[name],
                     "tokens_per_s": real / wall[name], "padding": plan["padding"],
                     "passes": plan["passes"],
                     "speedup_wall": wall[base] / wall[name], "speedup_cpu": cpu[base] / cpu[name]}
        print(f"  {name:<44} padding {100 * plan['padding']:5.2f} %, {plan['passes']:>4} "
              f"passes: {wall[name]:7.1f} s wall ({cpu[name]:7.1f} s CPU), "
              f"{real / wall[name]:6.0f} tokens/s, x{wall[base] / wall[name]:.3f} wall, "
              f"x{cpu[base] / cpu[name]:.3f} CPU vs old", flush=True)
    return out


if __name__ == "__main__":
    main()
