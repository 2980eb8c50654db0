"""``repd eval``: retrieval quality of the index on labeled queries (BEIR files).

Each query goes through the same path as ``repd query --files -k K``: a running daemon's
API when one answers, otherwise the index opened in this process (the model loaded once
for all the queries). The hits are mapped to document ids and scored by
``repd.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repd.evaluation import (
    MRR_K,
    NDCG_K,
    RECALL_K,
    DocResolver,
    EvalInputError,
    EvalResult,
    evaluate,
    load_mapping,
    load_qrels,
    load_queries,
)

#: Retrieval modes a person may name; only ``dense`` exists yet (hybrid and lexical
#: arrive with sparse vectors).
MODES = ("dense", "hybrid", "lexical")
AVAILABLE_MODES = ("dense",)

#: One query's hits, as the API returns them (dicts with ``root`` and ``path``), and the
#: generation that answered.
Answer = tuple[list[dict[str, Any]], str]


def add_eval_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``repd eval``."""
    ev = sub.add_parser(
        "eval", parents=[common], help="measure retrieval quality on labeled queries",
        description="Rank files for each labeled query exactly as `repd query --files` does "
        "(through a running daemon when one answers, else by opening the index here) and "
        f"report nDCG@{NDCG_K}, recall@{RECALL_K} and MRR@{MRR_K}. Only queries with at "
        "least one relevant judgment are scored.")
    ev.add_argument("--queries", type=Path, required=True, metavar="FILE",
                    help='BEIR queries.jsonl: one {"_id": ..., "text": ...} object a line')
    ev.add_argument("--qrels", type=Path, required=True, metavar="FILE",
                    help="BEIR qrels TSV: query-id, corpus-id, score a line (a header line "
                    "is allowed)")
    ev.add_argument("--mapping", type=Path, metavar="FILE",
                    help="document id -> file path, as a TSV (doc-id<TAB>path) or a JSON "
                    "object; paths relative to their root or absolute (default: a file is "
                    "the document named by its stem, docs/1234.txt is 1234)")
    ev.add_argument("-k", "--k", type=int, default=RECALL_K, dest="k",
                    help=f"files ranked per query ({NDCG_K}-100, default {RECALL_K}); "
                    "recall is measured at this depth")
    ev.add_argument("--limit", type=int, metavar="N",
                    help="score only the first N judged queries (a quick check)")
    ev.add_argument("--generation", metavar="N",
                    help="the index generation to measure; only the active generation is "
                    "available yet (others come with model upgrades)")
    ev.add_argument("--mode", choices=MODES, default="dense",
                    help="retrieval mode; only dense exists yet (hybrid and lexical come with "
                    "sparse vectors)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON (with each "
                    "query's figures)")
    ev.add_argument("--save-run", type=Path, metavar="FILE",
                    help="also write the rankings as JSON: query id -> document ids, best "
                    "first (null: a file outside the mapping)")
    ev.add_argument("--local", action="store_true",
                    help="do not ask a daemon: load the model and open the index here "
                    "(refused while a daemon or `repd index` writes the index)")
    ev.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the daemon's answer to each query (default 30)")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the labeled queries through the query path and print their metrics."""
    from repd.errors import EngineError

    if not NDCG_K <= args.k <= 100:
        print(f"repd: -k must be between {NDCG_K} and 100", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("repd: --limit must be at least 1", file=sys.stderr)
        return 2
    if args.mode not in AVAILABLE_MODES:
        raise EngineError(f"--mode {args.mode} is not available yet: only dense retrieval "
                          "exists (hybrid and lexical come with sparse vectors)")
    queries = load_queries(args.queries)
    qrels = load_qrels(args.qrels)
    resolve = DocResolver(load_mapping(args.mapping) if args.mapping else None)

    judged = [q for q in queries if q in qrels]
    scored = [q for q in judged if any(g > 0 for g in qrels[q].values())]
    no_relevant = sorted(set(judged) - set(scored))
    if args.limit is not None:
        scored = scored[:args.limit]
    if not scored:
        raise EvalInputError(f"no query in {args.queries} has a relevant judgment in "
                             f"{args.qrels} (are the query ids the same in both?)")

    t0 = time.perf_counter()
    texts = [queries[q] for q in scored]
    answers, source = _run(texts, args)
    seconds = time.perf_counter() - t0
    generation = answers[0][1]
    if any(gen != generation for _, gen in answers):
        raise EngineError("the active generation changed during the evaluation; run it again")

    runs = [(qid, [resolve(h["root"], h["path"]) for h in hits])
            for qid, (hits, _) in zip(scored, answers, strict=True)]
    result = evaluate(runs, qrels, recall_k=args.k)
    if args.save_run is not None:
        _save_run(args.save_run, runs)
    skipped = {"no_relevant": len(no_relevant),
               "judged_without_text": sum(1 for q in qrels if q not in queries),
               "limited": len(judged) - len(no_relevant) - len(scored)}
    if args.json:
        out = {"generation": generation, "mode": args.mode, "source": source, "k": args.k,
               **result.as_dict(), "skipped": skipped, "seconds": round(seconds, 3)}
        out.pop("unjudged")
        out.pop("no_relevant")
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    _print_table(result, generation, args.mode, source, seconds, skipped)
    return 0


def _run(texts: list[str], args: argparse.Namespace) -> tuple[list[Answer], str]:
    """Each text's hits and generation, best first, and where they came from."""
    from repd.adapters.datalock import IndexBusy
    from repd.cli import _load, _query_daemon, _query_without_api, api_socket

    # What `repd query --files -k K` would be given, with no filters.
    qargs = argparse.Namespace(k=args.k, path=None, root=None, files=True, local=args.local,
                               timeout=args.timeout)
    if not args.local:
        socket = api_socket(args)
        first = _query_daemon(texts[0], qargs, socket)
        if first is not None:
            _check_generation(args.generation, str(first["generation"]))
            return _through_daemon(texts, qargs, socket, first), "daemon"
    settings = _load(args).settings
    try:
        return _local(settings, texts, args), "local"
    except IndexBusy as busy:
        # As `repd query` does: ask the daemon that writes the index on the socket it
        # recorded, or say why not (a one-shot writer, a daemon still starting, --local).
        first = _query_without_api(settings, texts[0], qargs)
        if args.local or busy.daemon is None or not busy.holder.is_daemon:
            return _local(settings, texts, args), "local"  # the writer finished meanwhile
        _check_generation(args.generation, str(first["generation"]))
        return _through_daemon(texts, qargs, Path(busy.daemon.socket), first), "daemon"


def _through_daemon(texts: list[str], qargs: argparse.Namespace, socket: Path,
                    first: dict[str, Any]) -> list[Answer]:
    from repd.cli import _query_daemon
    from repd.errors import DaemonUnavailable

    answers: list[Answer] = [(first["hits"], str(first["generation"]))]
    progress = _progress(len(texts))
    for i, text in enumerate(texts[1:], 2):
        res = _query_daemon(text, qargs, socket)
        if res is None:
            raise DaemonUnavailable(f"the daemon on {socket} went away after {i - 1} queries")
        answers.append((res["hits"], str(res["generation"])))
        progress(i)
    progress(0)
    return answers


def _local(settings: Any, texts: list[str], args: argparse.Namespace) -> list[Answer]:
    """``repd query --local``'s path, with the model loaded and the index opened once.

    As there, every query is embedded first and the store (whose lock a starting daemon
    waits for) is opened only for the searches.
    """
    from repd.cli import local_index, search_local

    with local_index(settings) as engine:
        gen = str(engine.generation.id)
        _check_generation(args.generation, gen)
        progress = _progress(2 * len(texts))
        vectors: list[list[float]] = []
        for i, text in enumerate(texts, 1):
            vectors.append(engine.embed_query(text))
            progress(i)
        answers: list[Answer] = []
        for i, (text, vector) in enumerate(zip(texts, vectors, strict=True), len(texts) + 1):
            hits, _ = search_local(engine, vector, text, args.k, None, None, files=True)
            answers.append(([h.as_dict() for h in hits], gen))
            progress(i)
        progress(0)
        return answers


def _check_generation(wanted: str | None, active: str) -> None:
    from repd.errors import EngineError

    if wanted is not None and wanted != active:
        raise EngineError(f"generation {wanted} is not available: only the active generation "
                          f"({active}) can be measured yet")


def _progress(total: int) -> Callable[[int], None]:
    """A ``done/total`` line on stderr when it is a terminal; call with 0 to end it."""
    enabled = sys.stderr.isatty()

    def show(done: int) -> None:
        if not enabled:
            return
        sys.stderr.write(f"\rrepd eval: {done}/{total} " if done else "\r\033[K")
        sys.stderr.flush()

    return show


def _save_run(path: Path, runs: list[tuple[str, list[str | None]]]) -> None:
    from repd.errors import EngineError

    try:
        path.write_text(json.dumps(dict(runs), indent=1, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    except OSError as exc:
        raise EngineError(f"{path}: cannot write the run ({exc.strerror or exc})") from None


def _print_table(result: EvalResult, generation: str, mode: str, source: str, seconds: float,
                 skipped: dict[str, int]) -> None:
    via = "the daemon" if source == "daemon" else "the index opened here"
    print(f"repd eval: {result.queries} queries, generation {generation}, {mode}, through {via} "
          f"({seconds:.1f} s, {1000 * seconds / max(result.queries, 1):.1f} ms a query)")
    labels = {"ndcg": "nDCG", "recall": "recall", "mrr": "MRR"}
    for name in result.metric_names:
        base, _, cut = name.partition("@")
        print(f"  {labels[base] + '@' + cut:<11} {result.means[name]:.4f}")
    notes = [f"{skipped['no_relevant']} judged with nothing relevant",
             f"{skipped['judged_without_text']} judged but not in the queries file",
             f"{skipped['limited']} left out by --limit"]
    notes = [n for n, v in zip(notes, skipped.values(), strict=True) if v]
    if notes:
        print("  not scored: " + "; ".join(notes))
