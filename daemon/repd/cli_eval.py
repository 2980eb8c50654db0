"""``repd eval``: retrieval quality of the index on labeled queries (BEIR files).

Each query goes through the same path as ``repd query --files -k K``: a running daemon's
API when one answers, otherwise the index opened in this process (the model loaded once
for all the queries). The hits are mapped to document ids and scored by
``repd.evaluation``. ``--generation N`` asks the daemon to answer from generation N (one
being built by a model upgrade, or one retired but kept); without a daemon only the
active generation can be opened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    scored_queries,
)

if TYPE_CHECKING:  # the client is imported only when a daemon is asked
    from repd.api.client import ApiClient

#: Retrieval modes a person may name.
MODES = ("dense", "hybrid", "lexical")
#: All of them, on a generation with sparse vectors; a dense-only generation answers
#: dense only, and the query path refuses the others with the way to get sparse vectors.
AVAILABLE_MODES = MODES

#: One query's hits, as the API returns them (dicts with ``root`` and ``path``), the
#: generation that answered and the mode it answered in.
Answer = tuple[list[dict[str, Any]], str, str]


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
    ev.add_argument("--generation", type=_generation_id, metavar="N",
                    help="the index generation to measure (default: the active one): one "
                    "being built by a model upgrade or one retired but kept can be measured "
                    "through a running daemon; without a daemon only the active generation "
                    "can be opened")
    ev.add_argument("--mode", choices=MODES,
                    help="retrieval mode: dense (embeddings), lexical (BM25) or hybrid (both, "
                    "fused); default: the generation's, hybrid when it has sparse vectors; "
                    "lexical and hybrid need a generation with sparse vectors")
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
    if args.mode is not None and args.mode not in AVAILABLE_MODES:
        raise EngineError(f"--mode {args.mode} is not available (one of "
                          f"{', '.join(AVAILABLE_MODES)})")
    queries = load_queries(args.queries)
    qrels = load_qrels(args.qrels)
    resolve = DocResolver(load_mapping(args.mapping) if args.mapping else None)

    judged = [q for q in queries if q in qrels]
    scored = scored_queries(judged, qrels)
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
    generation, mode = answers[0][1], answers[0][2]
    if any(gen != generation for _, gen, _ in answers):
        # Only possible without --generation: with it, every answer was checked to be N.
        raise EngineError("the active generation changed during the evaluation; run it again")
    if any(m != mode for _, _, m in answers):
        raise EngineError("the retrieval mode changed during the evaluation; run it again")

    runs = [(qid, [resolve(h["root"], h["path"]) for h in hits])
            for qid, (hits, _, _) in zip(scored, answers, strict=True)]
    result = evaluate(runs, qrels, recall_k=args.k)
    if args.save_run is not None:
        _save_run(args.save_run, runs)
    skipped = {"no_relevant": len(no_relevant),
               "judged_without_text": sum(1 for q in qrels if q not in queries),
               "limited": len(judged) - len(no_relevant) - len(scored)}
    if args.json:
        out = {"generation": generation, "mode": mode, "source": source, "k": args.k,
               **result.as_dict(), "skipped": skipped, "seconds": round(seconds, 3)}
        out.pop("unjudged")
        out.pop("no_relevant")
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    _print_table(result, generation, mode, source, seconds, skipped)
    return 0


def _generation_id(text: str) -> int:
    """``--generation``'s value: a generation id, a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a generation id (a positive integer)")
    return value


def _run(texts: list[str], args: argparse.Namespace) -> tuple[list[Answer], str]:
    """Each text's hits and generation, best first, and where they came from."""
    from repd.adapters.datalock import IndexBusy
    from repd.cli import _load, _query_without_api, api_socket
    from repd.errors import DaemonUnavailable

    generation: int | None = args.generation
    # What `repd query --files -k K` would be given, with no filters.
    qargs = argparse.Namespace(k=args.k, path=None, root=None, files=True, local=args.local,
                               timeout=args.timeout, mode=args.mode)
    if not args.local:
        socket = api_socket(args)
        first = _ask_daemon(texts[0], qargs, socket, generation)
        if first is not None:
            return _through_daemon(texts, qargs, socket, first, generation), "daemon"
    settings = _load(args).settings
    try:
        return _local(settings, texts, args), "local"
    except IndexBusy as busy:
        if generation is not None and not args.local and busy.daemon is not None:
            # The daemon writing the index recorded its socket: it can serve generation N
            # (`_query_without_api` below would ask it for the active generation).
            socket = Path(busy.daemon.socket)
            first = _ask_daemon(texts[0], qargs, socket, generation)
            if first is None:
                raise DaemonUnavailable(
                    f"the index in {busy.data_dir} belongs to {busy.holder.daemon_name()}, "
                    f"but nothing answers on the socket it recorded ({socket})") from None
            return _through_daemon(texts, qargs, socket, first, generation), "daemon"
        # As `repd query` does: ask the daemon that writes the index on the socket it
        # recorded, or say why not (a one-shot writer, a daemon still starting, --local).
        first = _query_without_api(settings, texts[0], qargs)
        if args.local or busy.daemon is None or not busy.holder.is_daemon:
            return _local(settings, texts, args), "local"  # the writer finished meanwhile
        return _through_daemon(texts, qargs, Path(busy.daemon.socket), first, None), "daemon"


def _ask_daemon(text: str, qargs: argparse.Namespace, socket: Path,
                generation: int | None) -> dict[str, Any] | None:
    """One query to the daemon on ``socket``, answered from ``generation`` when given
    (else the active one); None when nothing listens there (other errors raise).

    A generation the daemon does not know is its 404 ``unknown_generation``, one it
    cannot serve (not built far enough, its store gone) its 409: both are raised as the
    daemon words them.
    """
    from repd.api.client import ApiClient, DaemonNotRunning
    from repd.cli import _query_daemon

    if generation is None:
        return _query_daemon(text, qargs, socket)
    try:
        return _query_generation(ApiClient(socket, timeout=qargs.timeout), text, qargs.k,
                                 generation, qargs.timeout, qargs.mode)
    except DaemonNotRunning:
        return None


def _query_generation(client: ApiClient, text: str, k: int, generation: int,
                      wait_starting: float, mode: str | None = None) -> dict[str, Any]:
    """``POST /v1/query`` with ``"generation": generation`` (and ``mode``), one hit per
    file, waiting for a daemon that is still starting as ``repd query`` does."""

    def told() -> None:
        if sys.stderr.isatty():
            print("repd: the daemon is starting (loading model and index); waiting…",
                  file=sys.stderr, flush=True)

    return client.query(text, k=k, files=True, generation=generation,
                        wait_starting=wait_starting, on_wait=told, mode=mode)


def _through_daemon(texts: list[str], qargs: argparse.Namespace, socket: Path,
                    first: dict[str, Any], generation: int | None) -> list[Answer]:
    """Every text's answer from the daemon on ``socket`` (``first`` is the first text's);
    with ``generation``, each answer must come from it."""
    from repd.errors import DaemonUnavailable

    answers: list[Answer] = [_answer(first, generation)]
    progress = _progress(len(texts))
    for i, text in enumerate(texts[1:], 2):
        res = _ask_daemon(text, qargs, socket, generation)
        if res is None:
            raise DaemonUnavailable(f"the daemon on {socket} went away after {i - 1} queries")
        answers.append(_answer(res, generation))
        progress(i)
    progress(0)
    return answers


def _answer(res: dict[str, Any], generation: int | None) -> Answer:
    """A daemon's answer as an :data:`Answer`, refused if it is not from ``generation``."""
    from repd.errors import EngineError

    got = str(res["generation"])
    if generation is not None and got != str(generation):
        # A daemon that ignored the field would measure the active generation instead.
        raise EngineError(f"asked for generation {generation}, the daemon answered from "
                          f"generation {got}")
    return res["hits"], got, str(res.get("mode", "dense"))


def _local(settings: Any, texts: list[str], args: argparse.Namespace) -> list[Answer]:
    """``repd query --local``'s path, with the model loaded and the index opened once.

    As there, every query is embedded first and the store (whose lock a starting daemon
    waits for) is opened only for the searches.
    """
    from repd.cli import local_index, search_local
    from repd.pipeline.search import check_mode

    with local_index(settings) as engine:
        gen = str(engine.generation.id)
        _check_generation(args.generation, gen)
        # Refused before the model loads.
        mode = check_mode(args.mode, engine.generation.hybrid)
        progress = _progress(2 * len(texts))
        vectors: list[list[float]] = []
        for i, text in enumerate(texts, 1):
            vectors.append(engine.embed_query(text) if mode != "lexical" else [])
            progress(i)
        answers: list[Answer] = []
        for i, (text, vector) in enumerate(zip(texts, vectors, strict=True), len(texts) + 1):
            hits, _ = search_local(engine, vector, text, args.k, None, None, files=True,
                                   mode=mode)
            answers.append(([h.as_dict() for h in hits], gen, mode))
            progress(i)
        progress(0)
        return answers


def _check_generation(wanted: int | None, active: str) -> None:
    """Refuse ``--generation`` other than the active one on the local path."""
    from repd.errors import EngineError

    if wanted is not None and str(wanted) != active:
        raise EngineError(f"generation {wanted} is not the active generation ({active}): only "
                          "the active generation can be opened without a daemon; start "
                          f"`repd run` to measure generation {wanted}")


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
