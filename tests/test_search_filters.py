"""Filters that never lose hits: ``--files``, ``--path`` and ``--root`` return k results
when k exist, even when the best chunks all come from one file or from files outside the
filter (a real Qdrant Edge store, hand-made vectors); paths as the CLI prints them;
invalid globs; snippets around the best-matching sentence."""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from repd.adapters.store_edge import EdgeStore
from repd.core.types import Hit, PointRecord
from repd.pipeline import search as search_mod
from repd.pipeline.search import (
    OVERFETCH,
    QueryError,
    Scope,
    make_snippet,
    resolve_scope,
    search,
)
from repd.pipeline.writer import file_ext

DIM = 8
ROOT = "/data/notes"
OTHER = "/data/src"
QUERY = [1.0] + [0.0] * (DIM - 1)


def vec(score: float, axis: int = 1) -> list[float]:
    """A unit vector whose cosine with QUERY is ``score``."""
    v = [0.0] * DIM
    v[0] = score
    v[axis] = math.sqrt(max(0.0, 1.0 - score * score))
    return v


def point(root: str, path: str, ordinal: int, score: float, *, ext: bool = True,
          text: str = "") -> PointRecord:
    payload: dict[str, Any] = {
        "root": root, "path": path, "ordinal": ordinal, "start_line": 1 + 10 * ordinal,
        "end_line": 9 + 10 * ordinal, "text": text or f"{path} chunk {ordinal}"}
    if ext:
        payload["ext"] = file_ext(path)
    return PointRecord(str(uuid.uuid4()), vec(score), payload)


def corpus(*, ext: bool = True) -> list[PointRecord]:
    """60 chunks of one PDF closest to the query, then a few chunks of many other files
    (Python files in folders, Markdown, extensionless), and a second root."""
    pts = [point(ROOT, "papers/big.pdf", i, 0.99 - i * 0.0005, ext=ext) for i in range(60)]
    others = [("a.py", 0.90), ("code/b.py", 0.88), ("code/sub/c.py", 0.86), ("notes.md", 0.85),
              ("docs/guide.md", 0.84), ("docs/api.md", 0.83), ("tools/d.py", 0.82),
              ("Makefile", 0.81), ("deep/x/y/e.py", 0.80), ("docs/old/f.md", 0.79),
              ("g.pyi", 0.78), ("code/h.py", 0.77)]
    for n, (path, score) in enumerate(others):
        pts += [point(ROOT, path, i, score - i * 0.05, ext=ext) for i in range(2)]
        del n
    pts += [point(OTHER, f"lib/m{i}.py", 0, 0.95 - i * 0.01, ext=ext) for i in range(6)]
    return pts


class Counting:
    """A store that records each search call's limit and options, then delegates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hybrid = inner.hybrid
        self.calls: list[tuple[int, dict[str, Any]]] = []

    def search(self, vector: Sequence[float], limit: int, **opts: Any) -> list[Hit]:
        self.calls.append((limit, opts))
        return self.inner.search(vector, limit, **opts)  # type: ignore[no-any-return]

    def count(self) -> int:
        return self.inner.count()  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "hybrid"])
def edge(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeStore]:
    store = EdgeStore.open(tmp_path_factory.mktemp("shard") / "shard", DIM,
                           hybrid=request.param)
    store.upsert(corpus())
    yield store
    store.close()


@pytest.fixture
def store(edge: EdgeStore) -> Counting:
    return Counting(edge)


def run(store: Any, k: int, glob: str | None = None, root: str | None = None,
        per_file: bool = False, **kw: Any) -> list[tuple[str, str]]:
    hits, _ = search(store, lambda _t: QUERY, "query", k, glob, root, per_file, **kw)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    return [(h.root, h.path) for h in hits]


def test_unfiltered_query_is_one_store_call_of_k(store: Counting) -> None:
    assert len(run(store, 5)) == 5
    assert [limit for limit, _ in store.calls] == [5]


def test_files_returns_k_files_when_the_top_chunks_are_all_one_file(store: Counting) -> None:
    got = run(store, 5, per_file=True)
    # The PDF's 60 chunks outrank everything: 8 x k = 40 candidates held only it.
    assert got == [(ROOT, "papers/big.pdf"), (OTHER, "lib/m0.py"), (OTHER, "lib/m1.py"),
                   (OTHER, "lib/m2.py"), (OTHER, "lib/m3.py")]
    assert [limit for limit, _ in store.calls] == [5 * OVERFETCH, 10 * OVERFETCH]
    files = run(store, 20, per_file=True)
    assert len(files) == len(set(files)) == 19  # every file there is, no more
    assert store.calls[-1][0] < 4 * 20 * OVERFETCH  # stopped when the store ran out


def test_files_with_root(store: Counting) -> None:
    got = run(store, 4, root=ROOT, per_file=True)
    assert got == [(ROOT, p) for p in ("papers/big.pdf", "a.py", "code/b.py", "code/sub/c.py")]


@pytest.mark.parametrize(("glob", "expected"), [
    ("**/*.py", ["a.py", "code/b.py", "code/sub/c.py", "tools/d.py", "deep/x/y/e.py"]),
    ("*.py", ["a.py", "code/b.py", "code/sub/c.py", "tools/d.py", "deep/x/y/e.py"]),
    ("code/*.py", ["code/b.py", "code/h.py"]),
    ("code/**/*.py", ["code/b.py", "code/sub/c.py", "code/h.py"]),
    ("**/*.{py,pyi}", ["a.py", "code/b.py", "code/sub/c.py", "tools/d.py", "deep/x/y/e.py"]),
    ("docs", ["docs/guide.md", "docs/api.md", "docs/old/f.md"]),
    ("docs/*.md", ["docs/guide.md", "docs/api.md"]),
    ("/*.md", ["notes.md"]),
    ("Makefile", ["Makefile"]),
    ("*.pyi", ["g.pyi"]),
])
def test_path_glob_returns_k_files_behind_a_wall_of_other_chunks(
        store: Counting, glob: str, expected: list[str]) -> None:
    got = run(store, 5, glob, ROOT, per_file=True)
    assert got == [(ROOT, p) for p in expected]


def test_path_glob_returns_k_chunks(store: Any) -> None:
    hits, _ = search(store, lambda _t: QUERY, "q", 7, "**/*.py", ROOT)
    assert len(hits) == 7
    assert all(h.path.endswith(".py") for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hybrid_generations_filter_extensions_inside_the_store(store: Counting) -> None:
    run(store, 5, "**/*.py", ROOT, per_file=True)
    _, opts = store.calls[0]
    if store.hybrid:
        # Every point of a hybrid generation carries "ext": one call is enough.
        assert opts["exts"] == ("", ".py") and len(store.calls) == 1
    else:
        # A dense generation may hold points written before "ext" existed.
        assert "exts" not in opts
    assert opts["root"] == ROOT


def test_points_without_ext_are_still_found(tmp_path: Path) -> None:
    edge = EdgeStore.open(tmp_path / "shard", DIM)
    try:
        edge.upsert(corpus(ext=False))
        got = run(edge, 3, "**/*.py", ROOT, per_file=True)
        assert got == [(ROOT, "a.py"), (ROOT, "code/b.py"), (ROOT, "code/sub/c.py")]
        # Forcing the store-side filter on such points finds nothing: why it is not forced.
        assert run(edge, 3, "**/*.py", ROOT, per_file=True, push_exts=True) == []
    finally:
        edge.close()


def test_path_prefix_and_glob_prefix_are_pushed_together(store: Counting) -> None:
    got = run(store, 5, "**/*.md", ROOT, per_file=True, path_prefix="docs/")
    assert got == [(ROOT, "docs/guide.md"), (ROOT, "docs/api.md"), (ROOT, "docs/old/f.md")]
    assert store.calls[-1][1]["path_prefix"] == "docs/"
    got = run(store, 5, "docs/old/*", ROOT, path_prefix="docs/")
    assert got == [(ROOT, "docs/old/f.md")] * 2
    assert store.calls[-1][1]["path_prefix"] == "docs/old/"
    store.calls.clear()
    assert run(store, 5, "code/*.py", ROOT, path_prefix="docs/") == []
    assert store.calls == []  # cannot both hold: the store is not even asked


def test_a_glob_that_matches_nothing_stops_when_the_store_runs_out(store: Counting) -> None:
    assert run(store, 5, "**/*.rs", per_file=True) == []
    limits = [limit for limit, _ in store.calls]
    assert limits[0] == 40 and all(b == 2 * a or b == store.count()
                                   for a, b in itertools.pairwise(limits))
    assert len(limits) <= 3


def test_deepening_is_bounded(store: Counting, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_mod, "MAX_CANDIDATES", 50)
    got = run(store, 5, per_file=True)
    assert got == [(ROOT, "papers/big.pdf")]  # the 50 best chunks are all the PDF's
    assert [limit for limit, _ in store.calls] == [40, 50]


def test_invalid_glob_is_an_error_not_an_empty_result(store: Counting) -> None:
    with pytest.raises(QueryError) as info:
        run(store, 5, "docs/[abc.md")
    assert info.value.status == 400 and info.value.code == "invalid_glob"
    assert "unbalanced '['" in info.value.message and info.value.exit_code == 2
    assert store.calls == []


# -- --path and --root as the CLI gives them ---------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    notes = tmp_path / "notes"
    src = tmp_path / "src"
    for f in ("docs/guide.md", "docs/old/f.md", "a.py", "odd[1].md", "sub/deeper/x.md"):
        (notes / f).parent.mkdir(parents=True, exist_ok=True)
        (notes / f).write_text("x")
    (src / "lib").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return {"notes": notes, "src": src, "base": tmp_path}


def test_root_filter_takes_a_root_or_a_folder_inside_one(tree: dict[str, Path]) -> None:
    notes, src = str(tree["notes"]), str(tree["src"])
    roots = [notes, src]
    assert resolve_scope(None, notes, roots) == Scope(root=notes)
    assert resolve_scope(None, notes + "/", roots) == Scope(root=notes)
    assert resolve_scope(None, f"{notes}/docs", roots) == Scope(root=notes, prefix="docs/")
    assert resolve_scope(None, "docs/old", roots, cwd=notes) == Scope(root=notes,
                                                                      prefix="docs/old/")
    with pytest.raises(QueryError) as info:
        resolve_scope(None, str(tree["base"] / "elsewhere"), roots)
    assert (info.value.status, info.value.code) == (404, "unknown_root")


def test_path_as_the_cli_prints_it(tree: dict[str, Path]) -> None:
    notes, src = str(tree["notes"]), str(tree["src"])
    roots = [Path(notes), Path(src)]
    # Absolute: a file, a folder, a glob past the folders; the root comes with it.
    assert resolve_scope(f"{notes}/docs/guide.md", None, roots) == Scope(notes,
                                                                        "/docs/guide.md")
    assert resolve_scope(f"{notes}/docs", None, roots) == Scope(notes, "/docs")
    assert resolve_scope(f"{notes}/docs/**/*.md", None, roots) == Scope(notes,
                                                                       "/docs/**/*.md")
    assert resolve_scope(notes, None, roots) == Scope(notes, None)
    assert resolve_scope(f"{notes}/*.md", None, roots) == Scope(notes, "/*.md")
    # A name with glob characters that exists is itself.
    assert resolve_scope(f"{notes}/odd[1].md", None, roots) == Scope(notes, "/odd\\[1\\].md")
    # Relative to the current folder, as printed from above the root or inside it.
    base = str(tree["base"])
    assert resolve_scope("notes/a.py", None, roots, cwd=base) == Scope(notes, "/a.py")
    assert resolve_scope("notes/docs/*.md", None, roots, cwd=base) == Scope(notes,
                                                                          "/docs/*.md")
    assert resolve_scope("./deeper/x.md", None, roots, cwd=f"{notes}/sub") == Scope(
        notes, "/sub/deeper/x.md")
    assert resolve_scope(".", None, roots, cwd=f"{notes}/sub") == Scope(notes, "/sub")
    assert resolve_scope("../docs/*.md", None, roots, cwd=f"{notes}/sub") == Scope(
        notes, "/docs/*.md")
    # Not a path here: a glob relative to each root, as always.
    assert resolve_scope("docs/*.md", None, roots, cwd=base) == Scope(None, "docs/*.md")
    assert resolve_scope("**/*.py", None, roots, cwd=notes) == Scope(None, "**/*.py")
    assert resolve_scope("a.py", None, roots, cwd=notes) == Scope(None, "a.py")
    assert resolve_scope("docs/*.md", None, roots) == Scope(None, "docs/*.md")
    # With --root: the same root, narrowed; another root is an error.
    assert resolve_scope(f"{notes}/docs/*.md", f"{notes}/docs", roots) == Scope(
        notes, "/docs/*.md", "docs/")
    with pytest.raises(QueryError) as info:
        resolve_scope(f"{notes}/a.py", src, roots)
    assert (info.value.status, info.value.code) == (400, "path_outside_root")


def test_paths_outside_every_root_and_invalid_globs_are_errors(tree: dict[str, Path]) -> None:
    roots = [str(tree["notes"])]
    for path, cwd in ((str(tree["base"] / "elsewhere/x.md"), None),
                      (str(tree["base"] / "elsewhere/*.md"), None),
                      ("..", str(tree["notes"])), (".", str(tree["base"]))):
        with pytest.raises(QueryError) as info:
            resolve_scope(path, None, roots, cwd=cwd)
        assert (info.value.status, info.value.code) == (404, "not_in_root"), path
        assert "is not inside any indexed root" in info.value.message
    for path in ("docs/[abc", f"{tree['notes']}/docs/{{a,b"):
        with pytest.raises(QueryError) as info:
            resolve_scope(path, None, roots)
        assert (info.value.status, info.value.code) == (400, "invalid_glob"), path


def test_resolved_paths_find_their_files(tmp_path: Path) -> None:
    edge = EdgeStore.open(tmp_path / "shard", DIM)
    try:
        edge.upsert(corpus())
        scope = resolve_scope(f"{ROOT}/code", None, [ROOT, OTHER])
        got = run(edge, 5, scope.glob, scope.root, per_file=True)
        assert got == [(ROOT, "code/b.py"), (ROOT, "code/sub/c.py"), (ROOT, "code/h.py")]
        scope = resolve_scope(None, f"{ROOT}/docs", [ROOT, OTHER])
        got = run(edge, 5, scope.glob, scope.root, per_file=True, path_prefix=scope.prefix)
        assert got == [(ROOT, "docs/guide.md"), (ROOT, "docs/api.md"), (ROOT, "docs/old/f.md")]
        scope = resolve_scope(f"{ROOT}/Makefile", None, [ROOT, OTHER])
        assert run(edge, 5, scope.glob, scope.root, per_file=True) == [(ROOT, "Makefile")]
    finally:
        edge.close()


# -- snippets --------------------------------------------------------------------------------

NOTE = ("# Backups\n\nWe keep three copies of everything. The nightly job runs at two. "
        "Restores are tested monthly.\n\nTo rotate the backup keys, run `keyctl rotate` on "
        "the vault host and update the recipients file. Old keys stay valid for a week.\n")


def test_snippet_starts_at_the_best_matching_sentence() -> None:
    snip = make_snippet(NOTE, "how do I rotate the backup keys")
    assert snip.startswith("... To rotate the backup keys, run `keyctl rotate`")
    assert "\n" not in snip and len(snip) <= 160
    # A question the start answers best (or nothing matches): the chunk's start.
    assert make_snippet(NOTE, "backups").startswith("# Backups We keep three copies")
    assert make_snippet(NOTE, "zebra").startswith("# Backups We keep")
    assert make_snippet(NOTE).startswith("# Backups We keep")
    assert make_snippet(NOTE, "nightly job").startswith("... The nightly job runs at two.")


def test_snippet_of_code_and_long_sentences() -> None:
    code = "import os\n\n\ndef load_config(path):\n    return parse(path)\n\n\ndef rotateKeys():\n"
    assert make_snippet(code, "rotate keys").startswith("... def rotateKeys():")
    assert make_snippet(code, "load config").startswith("... def load_config(path):")
    long = "Intro. " + "filler words " * 30 + "the needle is here and more " + "tail " * 40
    snip = make_snippet(long, "needle")
    assert "needle" in snip and len(snip) <= 160 and snip.endswith("...")
    assert snip.startswith("... ")
    flat = make_snippet("x " * 200)
    assert len(flat) == 160 and flat.endswith("...")


def test_hits_carry_the_snippet_of_their_query(tmp_path: Path) -> None:
    edge = EdgeStore.open(tmp_path / "shard", DIM)
    try:
        edge.upsert([point(ROOT, "backups.md", 0, 0.9, text=NOTE)])
        hits, _ = search(edge, lambda _t: QUERY, "rotate the backup keys", 1)
        assert hits[0].snippet.startswith("... To rotate the backup keys")
        assert hits[0].as_dict()["snippet"] == hits[0].snippet
    finally:
        edge.close()


# -- end to end: `repd index`, then `repd query --local` with the real model ---------------------

def _query(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "repd.cli", "query", *args, "--local",
                           "--json"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


@pytest.mark.slow
def test_cli_filters_end_to_end(tmp_path: Path) -> None:
    from tests.helpers import cli_env, run_cli

    corpus = tmp_path / "corpus"
    (corpus / "code" / "sub").mkdir(parents=True)
    (corpus / "docs").mkdir()
    # One long document whose many chunks all outrank the code files.
    (corpus / "docs" / "volcanoes.md").write_text("# Volcanoes\n\n" + "\n".join(
        f"## Section {i}\n\nVolcanic eruptions release lava, ash and gases; section {i} "
        "describes magma chambers, pyroclastic flows and seismic tremors near the crater.\n"
        for i in range(60)))
    (corpus / "code" / "lava.py").write_text(
        'def lava_flow_rate(viscosity):\n    """How fast lava flows down a volcano."""\n')
    (corpus / "code" / "sub" / "ash.py").write_text(
        'def ash_cloud_height(eruption):\n    """The ash column of a volcano eruption."""\n')
    (corpus / "code" / "magma.py").write_text(
        'class MagmaChamber:\n    """A volcano magma chamber before an eruption."""\n')
    (corpus / "notes.md").write_text("Shopping list: bread, milk, eggs.\n")
    env = cli_env(tmp_path / "home")
    run_cli(["index", str(corpus)], env)

    # The generation's default mode, with the model: 4 files behind 60 chunks of one.
    files = _query(["volcano eruption", "-k", "4", "--files"], env, tmp_path)
    assert files["mode"] == "hybrid"  # a new index has sparse vectors
    assert len({h["path"] for h in files["hits"]}) == 4
    # The rest needs no model: lexical searches leave it unloaded.
    py = {"code/lava.py", "code/sub/ash.py", "code/magma.py"}

    def lexical(*args: str, cwd: Path = tmp_path) -> set[str]:
        out = _query(["volcano", "--mode", "lexical", *args], env, cwd)
        assert out["mode"] == "lexical"
        return {h["path"] for h in out["hits"]}

    assert lexical("--files", "-k", "5") >= py
    assert lexical("-k", "5", "--path", "**/*.py") == py
    # The path as `repd query` printed it from tmp_path, and from inside the folder.
    assert lexical("--files", "--path", "corpus/code") == py
    assert lexical("--files", "--path", str(corpus / "code" / "*.py")) == py - {
        "code/sub/ash.py"}
    assert lexical("--files", "--path", "./sub", cwd=corpus / "code") == {"code/sub/ash.py"}
    assert lexical("--root", str(corpus / "code" / "sub")) == {"code/sub/ash.py"}
    out = _query(["viscosity", "--mode", "lexical"], env, tmp_path)
    assert out["hits"][0]["snippet"] == ('def lava_flow_rate(viscosity): """How fast lava '
                                         'flows down a volcano."""')
    outside = subprocess_query(["x", "--path", str(tmp_path / "home")], env, tmp_path)
    assert outside.returncode == 2 and "is not inside any indexed root" in outside.stderr
    bad = subprocess_query(["x", "--path", "code/[x"], env, tmp_path)
    assert bad.returncode == 2 and "unbalanced '['" in bad.stderr


def subprocess_query(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "repd.cli", "query", *args, "--local"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_snippet_of_a_long_first_sentence_shows_the_match() -> None:
    text = "Intro " + "filler words " * 30 + "the needle is here and more " + "tail " * 40
    snip = make_snippet(text, "needle")
    assert snip.startswith("... ") and "needle" in snip and len(snip) <= 160
    assert make_snippet(text, "intro").startswith("Intro filler words")


def test_the_ascii_fast_paths_read_the_same_words_and_sentences_as_the_regexes() -> None:
    # ASCII text is split with str.translate/str.split and sentences are found with
    # str.find (several times faster); other text goes through the regexes. Both must
    # find the same words, sentence ends, best sentence and first match, or a snippet
    # would change with one accented letter elsewhere in the chunk.
    import random
    import re

    pool = ["rotate", "Rotate", "rotateKeys", "HTTPServer", "ABc", "x2", "2x", "load_config",
            "keys", "the", "Backups", "cells", "running", "a", "I", "e.g", "3.5", "v2Beta",
            # a query's term inside another word: a sentence's bound (see
            # _best_start_bounded) above its score, so the pruned order is tried too
            "monkeys", "excellent", "unloaded", "Terrotate"]
    seps = [" ", " ", ". ", "! ", "? ", ".\t", "?\n", "\n", "\n\n", ", ", "_", "-", ".",
            "\x1c", "!", "(", ")"]
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(pool) + rng.choice(seps) for _ in range(rng.randint(0, 40)))
        query = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
        regex_terms: set[str] = set()
        for word in search_mod._WORD_RE.findall(text):
            regex_terms |= search_mod._word_terms(word)
        assert search_mod._terms(text) == regex_terms
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s)|\n", text)]
        ends += [] if ends and ends[-1] == len(text) else [len(text)]
        assert search_mod._unit_ends(text, 0) == ends
        weights = search_mod._query_weights(query)
        lowered = text.lower()
        live = frozenset(t for t in weights if t in lowered)
        assert (search_mod._best_start(text, weights, lowered, live)
                == search_mod._best_start(text, weights, None, frozenset(weights)))
        first = next((m.start() for m in search_mod._WORD_RE.finditer(text)
                      if search_mod._word_terms(m.group()) & live), 0)
        assert search_mod._first_match(text, live) == first
    # And a snippet does not change when a letter far from it is not ASCII.
    text = "Intro here. " + "filler words " * 20 + "To rotate the keys, run it. Tail."
    snip = make_snippet(text, "rotate keys")
    assert snip == make_snippet(text.replace("here", "héré"), "rotate keys")
    assert snip.startswith("... ") and snip.endswith("To rotate the keys, run it. Tail.")
