"""Retrieval quality: nDCG@10, recall@100 and MRR@10 over labeled queries, and BEIR loaders.

Pure and import-light (the standard library and ``repd.errors``): ``repd eval`` uses it,
and so can anything that holds rankings, such as the gate of a model switch::

    qrels = load_qrels(Path("qrels/train.tsv"))
    result = evaluate([(qid, ranked_doc_ids), ...], qrels)
    result.means["ndcg@10"]

or, from a search function that ranks files (``score_search``)::

    result = score_search(lambda text, k: [(root, path), ...], queries, qrels, DocResolver())

Each query's figures are ``trec_eval``'s (``ndcg_cut.10``, ``recall.100``, and
``recip_rank`` over the top 10), on which the published BEIR figures rest; checked equal
with ``pytrec_eval`` on random graded rankings. Conventions:

* A judgment's grade is its gain; a grade of 0 or less is "judged not relevant".
  nDCG uses linear gains and the ``1 / log2(rank + 1)`` discount; the ideal ranking is
  built from the judgments themselves, so a relevant document that is not in the index
  still counts in the ideal (and in recall's denominator): it can only be missed.
* A ranking is a sequence of document ids, best first. ``None`` stands for a hit that is
  no document of the benchmark (a file outside a mapping): it takes a rank and gains
  nothing. A document id that comes again further down counts once, at its first rank;
  the repeats are dropped and the ranks below move up (two files that map to the same
  document are one document found once).
* A query is scored only if it has at least one relevant judgment; the others say
  nothing about a ranking and are reported apart, not averaged in as zeros (BEIR's
  evaluation would average them in as zeros; its own data sets have none).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from repd.errors import EXIT_CONFIG, RepdError

#: Graded judgments: query id -> document id -> grade.
Qrels = Mapping[str, Mapping[str, int]]
#: One query's ranked document ids, best first (``None``: a hit that is no document).
Ranking = Sequence[str | None]

NDCG_K = 10
RECALL_K = 100
MRR_K = 10


class EvalInputError(RepdError, ValueError):
    """A queries, qrels, mapping or run file that cannot be read as one; one clear line."""

    exit_code = EXIT_CONFIG


# -- metrics on one query ------------------------------------------------------------------

def dedupe(ranking: Ranking) -> list[str | None]:
    """``ranking`` with each document id kept at its first rank only (``None`` kept)."""
    seen: set[str] = set()
    out: list[str | None] = []
    for doc in ranking:
        if doc is None:
            out.append(None)
        elif doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def _gain(judgments: Mapping[str, int], doc: str | None) -> int:
    return max(judgments.get(doc, 0), 0) if doc is not None else 0


def _relevant(judgments: Mapping[str, int]) -> set[str]:
    return {d for d, g in judgments.items() if g > 0}


def dcg(gains: Iterable[float]) -> float:
    """Discounted cumulative gain of gains listed best rank first: sum of g / log2(i + 1)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranking: Ranking, judgments: Mapping[str, int], k: int = NDCG_K) -> float:
    """nDCG@k of one ranking; 0.0 when nothing is relevant."""
    ideal = dcg(sorted((g for g in judgments.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg(_gain(judgments, d) for d in dedupe(ranking)[:k]) / ideal


def recall_at_k(ranking: Ranking, judgments: Mapping[str, int], k: int = RECALL_K) -> float:
    """Share of the relevant documents found in the top ``k``; 0.0 when nothing is relevant."""
    relevant = _relevant(judgments)
    if not relevant:
        return 0.0
    found = relevant.intersection(d for d in dedupe(ranking)[:k] if d is not None)
    return len(found) / len(relevant)


def mrr_at_k(ranking: Ranking, judgments: Mapping[str, int], k: int = MRR_K) -> float:
    """Reciprocal rank of the first relevant document in the top ``k``, else 0.0."""
    for i, doc in enumerate(dedupe(ranking)[:k]):
        if _gain(judgments, doc) > 0:
            return 1.0 / (i + 1)
    return 0.0


# -- over a query set ----------------------------------------------------------------------

@dataclass(frozen=True)
class EvalResult:
    """Metrics of a set of rankings: means over the scored queries, and each query's own.

    ``metric_names`` are ``ndcg@10``, ``recall@100`` and ``mrr@10`` (the cut-offs as
    passed to ``evaluate``). ``unjudged`` lists the queries ranked but with no judgment
    at all; ``no_relevant`` those judged but with nothing relevant. Neither is averaged.
    """

    metric_names: tuple[str, str, str]
    means: dict[str, float]
    per_query: dict[str, dict[str, float]]
    unjudged: list[str] = field(default_factory=list)
    no_relevant: list[str] = field(default_factory=list)

    @property
    def queries(self) -> int:
        """How many queries were scored (the means are over these)."""
        return len(self.per_query)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"queries": self.queries, "metrics": dict(self.means),
                "per_query": {q: dict(m) for q, m in self.per_query.items()},
                "unjudged": list(self.unjudged), "no_relevant": list(self.no_relevant)}


def evaluate(runs: Iterable[tuple[str, Ranking]], qrels: Qrels, *, ndcg_k: int = NDCG_K,
             recall_k: int = RECALL_K, mrr_k: int = MRR_K) -> EvalResult:
    """Score ``(query id, ranked document ids)`` pairs against ``qrels``.

    Only the queries given are scored (a judged query left out of ``runs`` is not counted
    as a miss: the caller chose the set); a query id given twice is an error. The means
    are 0.0 when no query could be scored.
    """
    names = (f"ndcg@{ndcg_k}", f"recall@{recall_k}", f"mrr@{mrr_k}")
    per_query: dict[str, dict[str, float]] = {}
    unjudged: list[str] = []
    no_relevant: list[str] = []
    seen: set[str] = set()
    for qid, ranking in runs:
        if qid in seen:
            raise ValueError(f"query {qid!r} is ranked twice")
        seen.add(qid)
        judgments = qrels.get(qid)
        if judgments is None:
            unjudged.append(qid)
            continue
        if not _relevant(judgments):
            no_relevant.append(qid)
            continue
        per_query[qid] = {names[0]: ndcg_at_k(ranking, judgments, ndcg_k),
                          names[1]: recall_at_k(ranking, judgments, recall_k),
                          names[2]: mrr_at_k(ranking, judgments, mrr_k)}
    n = len(per_query)
    means = {m: (math.fsum(s[m] for s in per_query.values()) / n if n else 0.0) for m in names}
    return EvalResult(names, means, per_query, unjudged, no_relevant)


#: Ranks files for a query text: ``(text, k)`` -> up to ``k`` ``(root, path)``, best first.
SearchFiles = Callable[[str, int], Sequence[tuple[str, str]]]


def scored_queries(queries: Iterable[str], qrels: Qrels) -> list[str]:
    """The query ids ``evaluate`` would score: those with a relevant judgment, in order."""
    return [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]


def score_search(search_files: SearchFiles, queries: Mapping[str, str], qrels: Qrels,
                 resolver: DocResolver, k: int = RECALL_K) -> EvalResult:
    """Rank files for each query with ``search_files`` and score them against ``qrels``.

    ``queries`` maps query id -> text (``load_queries``). Only the queries with at least
    one relevant judgment are searched, in ``queries``' order, each once with
    ``search_files(text, k)``; its ``(root, path)`` hits become document ids through
    ``resolver`` and are scored by ``evaluate`` with recall at ``k``. The queries judged
    with nothing relevant, and those with no judgment, are not searched and come back
    in ``no_relevant`` and ``unjudged``. Whatever ``search_files`` raises goes through.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    searched = set(scored_queries(queries, qrels))
    runs: list[tuple[str, Ranking]] = []
    for qid, text in queries.items():
        if qid not in searched:
            runs.append((qid, []))  # reported apart by evaluate, never averaged in
            continue
        hits = search_files(text, k)
        runs.append((qid, [resolver(root, path) for root, path in hits]))
    return evaluate(runs, qrels, recall_k=k)


# -- BEIR files ----------------------------------------------------------------------------

def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise EvalInputError(f"{path}: cannot read ({why})") from None


def load_queries(path: Path) -> dict[str, str]:
    """BEIR ``queries.jsonl``: one ``{"_id": ..., "text": ...}`` object a line, in file order.

    Other keys (``metadata``) are ignored; blank lines are skipped; numeric ids are read
    as their decimal text. A repeated id or an empty text is an error.
    """
    out: dict[str, str] = {}
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
        if not isinstance(obj, dict) or "_id" not in obj or "text" not in obj:
            raise EvalInputError(f'{path}:{n}: expected an object with "_id" and "text"')
        qid, text = obj["_id"], obj["text"]
        if not isinstance(qid, str | int) or isinstance(qid, bool) or not isinstance(text, str):
            raise EvalInputError(f'{path}:{n}: "_id" must be a string and "text" a string')
        qid = str(qid)
        if not text.strip():
            raise EvalInputError(f"{path}:{n}: query {qid!r} has an empty text")
        if qid in out:
            raise EvalInputError(f"{path}:{n}: query id {qid!r} appears twice")
        out[qid] = text
    return out


def _split(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def _grade(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV: ``query-id  corpus-id  score`` a line, with or without a header line.

    Also reads the TREC form ``query-id  0  corpus-id  score``. Fields are split on tabs
    (on runs of spaces when a line has no tab). A first line whose score is not a number
    is a header; anywhere else it is an error. A pair judged twice keeps its last grade,
    as BEIR's own loader does.
    """
    out: dict[str, dict[str, int]] = {}
    first = True
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in _split(line.strip())]
        header, first = first, False
        if len(parts) == 4:
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3 or not parts[0] or not parts[1]:
            if header:
                continue
            raise EvalInputError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
        grade = _grade(parts[2])
        if grade is None:
            if header:
                continue
            raise EvalInputError(f"{path}:{n}: the score {parts[2]!r} is not an integer")
        out.setdefault(parts[0], {})[parts[1]] = grade
    return out


def _norm_rel(text: str) -> str:
    return PurePosixPath(text.replace("\\", "/")).as_posix().removeprefix("./")


def load_mapping(path: Path) -> dict[str, str]:
    """Document id -> file path, from a JSON object or a TSV ``doc-id<TAB>path`` a line.

    Paths are relative to the indexed root (``notes/a.md``) or absolute. In the TSV,
    blank lines and lines starting with ``#`` are skipped. Two documents on one path is
    an error (a hit must name one document).
    """
    lines = _read_lines(path)
    pairs: list[tuple[str, str, str]] = []  # (doc id, path, where)
    if "\n".join(lines).lstrip().startswith("{"):
        try:
            obj = json.loads("\n".join(lines))
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}: not a JSON object ({exc.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise EvalInputError(f"{path}: expected a JSON object of doc id -> path strings")
        pairs = [(str(k), v, f"{path}: {k!r}") for k, v in obj.items()]
    else:
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rstrip("\r").split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise EvalInputError(f"{path}:{n}: expected 'doc-id<TAB>path'")
            pairs.append((parts[0].strip(), parts[1].strip(), f"{path}:{n}"))
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for doc, file, where in pairs:
        if not file:
            raise EvalInputError(f"{where}: empty path")
        key = _norm_rel(file)
        if key in owner and owner[key] != doc:
            raise EvalInputError(f"{where}: {file} is already document {owner[key]!r}")
        owner[key] = doc
        out[doc] = file
    return out


class DocResolver:
    """Names the document a hit (root, path relative to the root) stands for.

    Without a mapping a file is the document named by its stem (``docs/1234.txt`` is
    ``1234``); with one, a hit is the document mapped to its relative or its absolute
    path, and ``None`` (no document) otherwise.
    """

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self._by_path: dict[str, str] | None = None
        if mapping is not None:
            self._by_path = {_norm_rel(p): d for d, p in mapping.items()}

    def __call__(self, root: str, path: str) -> str | None:
        """The document id of the file ``path`` under ``root``."""
        if self._by_path is None:
            return PurePosixPath(path).stem
        rel = self._by_path.get(_norm_rel(path))
        if rel is not None:
            return rel
        return self._by_path.get(_norm_rel(str(Path(root) / path)))
