"""Retrieval modes (dense, lexical, hybrid) through the query path: the search layer on a
real hybrid Qdrant Edge store with BM25 vectors, the daemon's answer (``mode`` in and
out, a clear refusal on a generation without sparse vectors), and ``repd eval``'s modes."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from repd.adapters.lexical import default_encoder
from repd.adapters.store_edge import EdgeStore
from repd.api.backend import ApiError
from repd.api.schema import QueryRequest, QueryResponse
from repd.core.types import Hit, PointRecord, SparseVec
from repd.pipeline.search import NO_SPARSE_HINT, QueryError, check_mode, search
from repd.pipeline.writer import file_ext
from repd.service import DaemonService

DIM = 4
ROOT = "/data/notes"
QUERY = [1.0, 0.0, 0.0, 0.0]


def vec(score: float) -> list[float]:
    return [score, math.sqrt(1 - score * score), 0.0, 0.0]


DOCS = [
    # path, text, cosine with QUERY
    ("paraphrase.md", "Repairing a damaged index after the service refused to start.", 0.95),
    ("errors.md", "The daemon stopped with error code E4711 while it opened the shard.", 0.30),
    ("weather.md", "Rain is expected over the hills on Sunday afternoon.", 0.50),
    *[("big.md", f"Part {i}: the kestrel hovers; a kestrel hunts voles; kestrel kestrel.",
       0.60) for i in range(30)],
    ("a.py", "def kestrel_count():  # counts each kestrel seen", 0.20),
    ("b.py", "KESTREL = 'a small falcon, the kestrel'", 0.10),
]


@pytest.fixture(scope="module")
def hybrid_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeStore]:
    store = EdgeStore.open(tmp_path_factory.mktemp("modes") / "shard", DIM, hybrid=True)
    sparse = default_encoder().embed_documents([t for _, t, _ in DOCS])
    store.upsert([
        PointRecord(str(uuid.uuid4()), vec(score),
                    {"root": ROOT, "path": path, "ext": file_ext(path), "ordinal": n,
                     "start_line": n + 1, "end_line": n + 1, "text": text}, sp)
        for n, ((path, text, score), sp) in enumerate(zip(DOCS, sparse, strict=True))])
    yield store
    store.close()


def no_dense(_text: str) -> list[float]:
    raise AssertionError("a lexical search must not embed the query with the model")


def paths(store: Any, text: str, k: int, mode: Any, glob: str | None = None,
          per_file: bool = False) -> list[str]:
    embed = no_dense if mode == "lexical" else (lambda _t: QUERY)
    hits, _ = search(store, embed, text, k, glob, ROOT, per_file, mode=mode,
                     embed_sparse=default_encoder().embed_query)
    return [h.path for h in hits]


def test_each_mode_ranks_its_own_way(hybrid_store: EdgeStore) -> None:
    assert paths(hybrid_store, "E4711", 1, "dense") == ["paraphrase.md"]
    assert paths(hybrid_store, "E4711", 1, "lexical") == ["errors.md"]
    fused = paths(hybrid_store, "E4711", 2, "hybrid")
    assert set(fused) == {"paraphrase.md", "errors.md"}


def test_lexical_and_hybrid_deepen_for_files_and_globs(hybrid_store: EdgeStore) -> None:
    # 30 chunks of big.md say "kestrel" most: the other files come after all of them.
    got = paths(hybrid_store, "kestrel", 3, "lexical", per_file=True)
    assert got[0] == "big.md" and set(got[1:]) == {"a.py", "b.py"}
    assert set(paths(hybrid_store, "kestrel", 5, "lexical", "**/*.py", per_file=True)) == {
        "a.py", "b.py"}
    got = paths(hybrid_store, "kestrel", 4, "hybrid", per_file=True)
    assert len(got) == 4 and {"big.md", "a.py", "b.py"} <= set(got)
    assert set(paths(hybrid_store, "kestrel", 5, "hybrid", "*.py", per_file=True)) == {
        "a.py", "b.py"}
    # Nothing matches the words: a lexical search has no candidates at all.
    assert paths(hybrid_store, "zeppelin", 3, "lexical", per_file=True) == []


def test_snippets_follow_the_query_in_every_mode(hybrid_store: EdgeStore) -> None:
    hits, _ = search(hybrid_store, no_dense, "error code E4711", 1, mode="lexical",
                     embed_sparse=default_encoder().embed_query)
    assert hits[0].snippet.startswith("The daemon stopped with error code E4711")


def test_check_mode_defaults_and_refusals() -> None:
    assert check_mode(None, hybrid=True) == "hybrid"
    assert check_mode(None, hybrid=False) == "dense"
    assert check_mode("dense", hybrid=True) == "dense"
    assert check_mode("lexical", hybrid=True) == "lexical"
    for mode in ("lexical", "hybrid"):
        with pytest.raises(QueryError) as info:
            check_mode(mode, hybrid=False)
        err = info.value
        assert (err.status, err.code, err.exit_code) == (400, "no_sparse_vectors", 2)
        assert "this index has none" in err.message and NO_SPARSE_HINT in err.message
        assert "`repd model use <same model>` rebuilds the index with sparse vectors while " \
               "it keeps answering" in err.message
        assert "only dense retrieval exists" in err.message  # what `repd eval` said before
    with pytest.raises(QueryError):
        check_mode("fuzzy", hybrid=True)


# -- through the daemon's service -------------------------------------------------------------

class RecordingStore:
    """Answers with one hit per call and records what it was asked."""

    def __init__(self, hybrid: bool) -> None:
        self.hybrid = hybrid
        self.calls: list[dict[str, Any]] = []

    def search(self, vector: Sequence[float], limit: int, **opts: Any) -> list[Hit]:
        self.calls.append({"vector": list(vector), "limit": limit, **opts})
        return [Hit("1", 0.5, {"root": ROOT, "path": "docs/a.md", "start_line": 1,
                               "end_line": 2, "text": "One. Two about kestrels."})]


class Handle:
    """A generation handle for one query, dense-only or hybrid."""

    def __init__(self, gen_id: int, hybrid: bool) -> None:
        self.id = gen_id
        self.hybrid = hybrid
        self.store = RecordingStore(hybrid)

    def embed_query(self, text: str) -> list[float]:
        return [1.0, 0.0]

    def embed_sparse_query(self, text: str) -> SparseVec:
        return SparseVec([7], [1.0])

    def default_mode(self) -> str:
        return "hybrid" if self.hybrid else "dense"


def service(hybrid: bool, roots: Sequence[str] = (ROOT,)) -> tuple[DaemonService, Handle]:
    handle = Handle(3, hybrid)
    daemon = SimpleNamespace(
        ready=True, stopping=False, phase="ready", roots=[Path(r) for r in roots],
        worker=SimpleNamespace(snapshot=None, paused=threading.Event()),
        engine=SimpleNamespace(loaded_embedder=None), started_at=time.monotonic(),
        generations=SimpleNamespace(for_query=lambda generation: handle))
    return DaemonService(daemon), handle  # type: ignore[arg-type]


def test_service_answers_in_the_generations_default_mode() -> None:
    svc, handle = service(hybrid=True)
    out = svc.query(QueryRequest(text="kestrels"))
    assert out.mode == "hybrid" and out.generation == "3"
    call = handle.store.calls[-1]
    assert call["mode"] == "hybrid" and call["sparse"] == SparseVec([7], [1.0])
    assert out.hits[0].snippet == "... Two about kestrels."
    svc, handle = service(hybrid=False)
    out = svc.query(QueryRequest(text="kestrels"))
    assert out.mode == "dense" and "mode" not in handle.store.calls[-1]


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_service_passes_the_mode_asked(mode: str) -> None:
    svc, handle = service(hybrid=True)
    out = svc.query(QueryRequest(text="kestrels", mode=mode))  # type: ignore[arg-type]
    assert out.mode == mode
    call = handle.store.calls[-1]
    assert call.get("mode", "dense") == mode
    assert call["vector"] == ([] if mode == "lexical" else [1.0, 0.0])
    assert ("sparse" in call) is (mode != "dense")
    assert QueryResponse.model_validate(out.model_dump(mode="json")).mode == mode


@pytest.mark.parametrize("mode", ["lexical", "hybrid"])
def test_service_refuses_sparse_modes_on_a_dense_generation(mode: str) -> None:
    svc, handle = service(hybrid=False)
    with pytest.raises(ApiError) as info:
        svc.query(QueryRequest(text="x", mode=mode))  # type: ignore[arg-type]
    assert (info.value.status, info.value.code) == (400, "no_sparse_vectors")
    assert NO_SPARSE_HINT in info.value.message
    assert handle.store.calls == []


def test_service_resolves_paths_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    (root / "docs" / "old").mkdir(parents=True)
    svc, handle = service(hybrid=True, roots=[str(root)])
    svc.query(QueryRequest(text="x", root=str(root / "docs")))
    call = handle.store.calls[-1]
    assert call["root"] == str(root) and call["path_prefix"] == "docs/"
    svc.query(QueryRequest(text="x", path="notes/docs/*.md", cwd=str(tmp_path)))
    call = handle.store.calls[-1]
    assert call["root"] == str(root) and call["path_prefix"] == "docs/"
    assert call["exts"] == ("", ".md")  # a hybrid generation: every point has "ext"
    svc.query(QueryRequest(text="x", path=f"{root}/docs/old", files=True))
    assert handle.store.calls[-1]["path_prefix"] == "docs/old"
    for req, status, code in [
        (QueryRequest(text="x", path="docs/[x"), 400, "invalid_glob"),
        (QueryRequest(text="x", path=str(tmp_path / "other/*.md")), 404, "not_in_root"),
        (QueryRequest(text="x", root=str(tmp_path / "other")), 404, "unknown_root"),
        (QueryRequest(text="x", root=str(root), path="/elsewhere/a.md"), 404, "not_in_root"),
    ]:
        with pytest.raises(ApiError) as info:
            svc.query(req)
        assert (info.value.status, info.value.code) == (status, code), req


# -- repd eval ---------------------------------------------------------------------------------

def test_eval_accepts_every_mode_and_reports_the_one_used() -> None:
    from repd.cli import build_parser
    from repd.cli_eval import AVAILABLE_MODES, MODES, _answer

    assert set(AVAILABLE_MODES) == set(MODES) == {"dense", "lexical", "hybrid"}
    base = ["eval", "--queries", "q.jsonl", "--qrels", "r.tsv"]
    assert build_parser().parse_args(base).mode is None  # the generation's default
    assert build_parser().parse_args([*base, "--mode", "lexical"]).mode == "lexical"
    hits = [{"root": ROOT, "path": "a.md"}]
    assert _answer({"hits": hits, "generation": "2", "mode": "hybrid"}, 2) == (
        hits, "2", "hybrid")
    # A daemon from before modes answered dense.
    assert _answer({"hits": hits, "generation": "2"}, None) == (hits, "2", "dense")


def test_query_parser_takes_a_mode() -> None:
    from repd.cli import build_parser

    assert build_parser().parse_args(["query", "x"]).mode is None
    for mode in ("hybrid", "dense", "lexical"):
        assert build_parser().parse_args(["query", "x", "--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["query", "x", "--mode", "fuzzy"])
