"""Retrieval metrics and BEIR loaders (checked against hand-computed values), and
``repd eval`` end to end: a real index built by ``repd index``, the real model, the local
path and a real daemon's API."""

from __future__ import annotations

import http.server
import json
import math
import os
import socketserver
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from repd.evaluation import (
    DocResolver,
    EvalInputError,
    dcg,
    dedupe,
    evaluate,
    load_mapping,
    load_qrels,
    load_queries,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    score_search,
    scored_queries,
)
from tests.daemon_harness import DaemonProc
from tests.helpers import cli_env, run_cli

L3 = math.log2(3)  # the discount at rank 2
# The real SciFact files, where the environment names them (.ci/run does when it has them).
SCIFACT = Path(os.environ.get("REPD_SCIFACT") or "/nonexistent-scifact")


# -- metrics, by hand ------------------------------------------------------------------------

def test_dcg_discounts_by_log2_of_rank_plus_one() -> None:
    assert dcg([3, 2, 1]) == pytest.approx(3 + 2 / L3 + 1 / 2)
    assert dcg([]) == 0


def test_ndcg_binary() -> None:
    # a at 1, b at 3; ideal: both on top.
    assert ndcg_at_k(["a", "x", "b"], {"a": 1, "b": 1}) == pytest.approx(
        (1 + 1 / 2) / (1 + 1 / L3))
    assert ndcg_at_k(["a", "x", "b"], {"a": 1, "b": 1}) == pytest.approx(0.919721, abs=1e-6)
    assert ndcg_at_k(["a", "b"], {"a": 1, "b": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a": 1}) == 0.0
    assert ndcg_at_k([], {"a": 1}) == 0.0


def test_ndcg_graded_gains_are_linear() -> None:
    judged = {"a": 2, "b": 1, "c": 0}
    # b (1) first, a (2) second; ideal a, b.
    assert ndcg_at_k(["b", "a", "c"], judged) == pytest.approx((1 + 2 / L3) / (2 + 1 / L3))
    assert ndcg_at_k(["b", "a", "c"], judged) == pytest.approx(0.859719, abs=1e-6)
    assert ndcg_at_k(["a", "b"], judged) == pytest.approx(1.0)
    # A judged-non-relevant document gains nothing, wherever it stands.
    assert ndcg_at_k(["c", "a", "b"], judged) == pytest.approx((2 / L3 + 1 / 2) / (2 + 1 / L3))


def test_ndcg_ties_in_grades_and_list_order() -> None:
    judged = {"a": 1, "b": 1, "c": 2}
    # Equal grades: either order of a and b is ideal below c.
    assert ndcg_at_k(["c", "a", "b"], judged) == pytest.approx(1.0)
    assert ndcg_at_k(["c", "b", "a"], judged) == pytest.approx(1.0)
    # The ranking is taken as given (no re-sorting): swapping unequal grades costs.
    assert ndcg_at_k(["a", "c", "b"], judged) < 1.0
    assert ndcg_at_k(["a", "c", "b"], judged) == pytest.approx(
        (1 + 2 / L3 + 1 / 2) / (2 + 1 / L3 + 1 / 2))


def test_ndcg_cutoff_and_ideal_truncated_at_k() -> None:
    many = {f"d{i}": 1 for i in range(12)}
    # All 12 relevant, 10 in the top 10: the ideal is also 10 deep, so 1.0.
    assert ndcg_at_k([f"d{i}" for i in range(12)], many) == pytest.approx(1.0)
    # The only relevant document at rank 11 is outside the cut.
    assert ndcg_at_k([f"x{i}" for i in range(10)] + ["a"], {"a": 1}) == 0.0
    assert ndcg_at_k([f"x{i}" for i in range(9)] + ["a"], {"a": 1}) == pytest.approx(
        1 / math.log2(11))
    assert ndcg_at_k(["x", "a"], {"a": 1}, k=1) == 0.0


def test_ndcg_negative_grades_gain_nothing() -> None:
    assert ndcg_at_k(["n", "a"], {"n": -1, "a": 1}) == pytest.approx(1 / L3)


def test_relevant_documents_absent_from_the_index_still_count() -> None:
    # z was judged relevant but is not in the index: it can only be missed.
    judged = {"a": 1, "z": 1}
    assert ndcg_at_k(["a", "x"], judged) == pytest.approx(1 / (1 + 1 / L3))
    assert ndcg_at_k(["a", "x"], judged) == pytest.approx(0.613147, abs=1e-6)
    assert recall_at_k(["a", "x"], judged) == 0.5
    assert mrr_at_k(["a", "x"], judged) == 1.0


def test_recall() -> None:
    judged = {"a": 1, "b": 2, "c": 1, "n": 0}
    assert recall_at_k(["a", "n", "x", "b"], judged) == pytest.approx(2 / 3)
    assert recall_at_k(["a", "n", "x", "b"], judged, k=3) == pytest.approx(1 / 3)
    assert recall_at_k([], judged) == 0.0
    assert recall_at_k([f"x{i}" for i in range(100)] + ["a"], {"a": 1}) == 0.0


def test_mrr() -> None:
    judged = {"a": 1, "b": 1}
    assert mrr_at_k(["a", "b"], judged) == 1.0
    assert mrr_at_k(["x", "y", "b", "a"], judged) == pytest.approx(1 / 3)
    assert mrr_at_k([f"x{i}" for i in range(9)] + ["a"], judged) == pytest.approx(0.1)
    assert mrr_at_k([f"x{i}" for i in range(10)] + ["a"], judged) == 0.0
    assert mrr_at_k(["n", "a"], {"n": 0, "a": 1}) == 0.5


def test_duplicates_count_once_at_their_first_rank() -> None:
    assert dedupe(["x", "a", "a", None, "b", None, "x"]) == ["x", "a", None, "b", None]
    judged = {"a": 1, "b": 1}
    # [x, a, a, b] is scored as [x, a, b]: the repeat neither gains nor takes a rank.
    assert ndcg_at_k(["x", "a", "a", "b"], judged) == pytest.approx(
        (1 / L3 + 1 / 2) / (1 + 1 / L3))
    assert ndcg_at_k(["x", "a", "a", "b"], judged) == pytest.approx(0.693426, abs=1e-6)
    # A repeat of a relevant document does not push nDCG above 1.
    assert ndcg_at_k(["a", "a", "a"], {"a": 1}) == pytest.approx(1.0)
    # Recall at 2 of [a, a, b] sees a and b.
    assert recall_at_k(["a", "a", "b"], judged, k=2) == 1.0
    assert mrr_at_k(["x", "x", "a"], judged) == 0.5


def test_non_documents_take_a_rank_and_gain_nothing() -> None:
    judged = {"a": 1}
    assert mrr_at_k([None, None, "a"], judged) == pytest.approx(1 / 3)
    assert ndcg_at_k([None, "a"], judged) == pytest.approx(1 / L3)
    assert recall_at_k([None, "a"], judged) == 1.0


def test_queries_with_no_relevant_judgment() -> None:
    judged = {"a": 0, "b": -1}
    assert ndcg_at_k(["a", "b"], judged) == 0.0
    assert recall_at_k(["a", "b"], judged) == 0.0
    assert mrr_at_k(["a", "b"], judged) == 0.0
    assert ndcg_at_k(["a"], {}) == 0.0


def test_evaluate_means_over_scored_queries_only() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"n": 0}}
    runs = [("q1", ["a"]), ("q2", ["c", "x", "b"]), ("q3", ["n"]), ("q9", ["a"])]
    r = evaluate(runs, qrels)
    assert r.metric_names == ("ndcg@10", "recall@100", "mrr@10")
    assert r.queries == 2
    assert r.unjudged == ["q9"]
    assert r.no_relevant == ["q3"]
    q2 = (1 + 2 / 2) / (2 + 1 / L3)
    assert r.per_query["q1"] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    assert r.per_query["q2"]["ndcg@10"] == pytest.approx(q2)
    assert r.per_query["q2"]["mrr@10"] == 1.0
    assert r.means["ndcg@10"] == pytest.approx((1 + q2) / 2)
    assert r.means["recall@100"] == 1.0
    assert r.means["mrr@10"] == 1.0
    as_json = json.loads(json.dumps(r.as_dict()))
    assert as_json["queries"] == 2 and as_json["no_relevant"] == ["q3"]


def test_evaluate_cutoffs_name_the_metrics() -> None:
    r = evaluate([("q", ["x", "a"])], {"q": {"a": 1}}, ndcg_k=1, recall_k=1, mrr_k=1)
    assert r.means == {"ndcg@1": 0.0, "recall@1": 0.0, "mrr@1": 0.0}
    r = evaluate([("q", ["x", "a"])], {"q": {"a": 1}}, recall_k=2)
    assert r.means["recall@2"] == 1.0


def test_evaluate_edge_cases() -> None:
    assert evaluate([], {"q": {"a": 1}}).means == {"ndcg@10": 0.0, "recall@100": 0.0,
                                                   "mrr@10": 0.0}
    with pytest.raises(ValueError, match="twice"):
        evaluate([("q", ["a"]), ("q", ["a"])], {"q": {"a": 1}})


# -- score_search: a search function scored -------------------------------------------------


def test_scored_queries_keeps_order_and_needs_a_relevant_judgment() -> None:
    qrels = {"a": {"d": 1}, "b": {"d": 0}, "c": {"d": 2, "e": -1}}
    assert scored_queries(["c", "x", "b", "a"], qrels) == ["c", "a"]
    assert scored_queries([], qrels) == []


def test_score_search_with_a_fake_search() -> None:
    queries = {"q1": "tides", "q2": "tls certificates", "q3": "judged not relevant",
               "q4": "never judged", "q5": "nothing found"}
    qrels = {"q1": {"tides": 1}, "q2": {"tls": 2, "retry": 1, "ghost": 1},
             "q3": {"chess": 0}, "q5": {"bees": 1}, "q-no-text": {"tides": 1}}
    results = {
        "tides": [("/r", "tides.md"), ("/r", "sub/bees.md")],
        # Two files of one document count once; a file outside the mapping is no document.
        "tls certificates": [("/r", "x.md"), ("/r", "tls.md"), ("/r", "tls-copy.md"),
                             ("/elsewhere", "retry.md"), ("/r", "unmapped.md")],
        "nothing found": [],
    }
    calls: list[tuple[str, int]] = []

    def search(text: str, k: int) -> Sequence[tuple[str, str]]:
        calls.append((text, k))
        return results[text]

    resolver = DocResolver({"tides": "tides.md", "bees": "sub/bees.md", "tls": "tls.md",
                            "tls-b": "tls-copy.md", "retry": "/elsewhere/retry.md",
                            "x": "x.md"})
    r = score_search(search, queries, qrels, resolver, k=20)
    # Only the queries with something relevant are searched, in the queries' order.
    assert calls == [("tides", 20), ("tls certificates", 20), ("nothing found", 20)]
    assert r.metric_names == ("ndcg@10", "recall@20", "mrr@10")
    assert list(r.per_query) == ["q1", "q2", "q5"]
    assert r.no_relevant == ["q3"] and r.unjudged == ["q4"]
    expected = evaluate([("q1", ["tides", "bees"]),
                         ("q2", ["x", "tls", "tls-b", "retry", None]),
                         ("q5", [])], qrels, recall_k=20)
    assert r.per_query == expected.per_query
    assert r.means == expected.means
    assert r.per_query["q2"]["recall@20"] == pytest.approx(2 / 3)
    assert r.per_query["q2"]["mrr@10"] == 0.5
    assert r.per_query["q5"] == {"ndcg@10": 0.0, "recall@20": 0.0, "mrr@10": 0.0}


def test_score_search_default_k_stem_resolver_and_errors() -> None:
    seen: list[int] = []

    def search(text: str, k: int) -> Sequence[tuple[str, str]]:
        seen.append(k)
        return [("/r", f"docs/{n}.txt") for n in ("7", "3", "9")]

    r = score_search(search, {"q": "anything"}, {"q": {"3": 1}}, DocResolver())
    assert seen == [100]
    assert r.means == {"ndcg@10": pytest.approx(1 / L3), "recall@100": 1.0, "mrr@10": 0.5}
    # Nothing judged: nothing searched, nothing scored.
    assert score_search(search, {"q": "x"}, {}, DocResolver()).queries == 0
    assert seen == [100]
    with pytest.raises(ValueError, match="k must be"):
        score_search(search, {"q": "x"}, {"q": {"3": 1}}, DocResolver(), k=0)

    def broken(text: str, k: int) -> Sequence[tuple[str, str]]:
        raise RuntimeError("store closed")

    with pytest.raises(RuntimeError, match="store closed"):
        score_search(broken, {"q": "x"}, {"q": {"3": 1}}, DocResolver())


# -- loaders -----------------------------------------------------------------------------------

def test_load_qrels_with_and_without_header(tmp_path: Path) -> None:
    with_header = tmp_path / "a.tsv"
    with_header.write_text("query-id\tcorpus-id\tscore\n1\t10\t1\n1\t11\t2\n2\t10\t0\n")
    without = tmp_path / "b.tsv"
    without.write_text("1\t10\t1\n1\t11\t2\n\n2\t10\t0\n")
    expected = {"1": {"10": 1, "11": 2}, "2": {"10": 0}}
    assert load_qrels(with_header) == expected
    assert load_qrels(without) == expected


def test_load_qrels_trec_form_spaces_and_repeats(tmp_path: Path) -> None:
    trec = tmp_path / "trec.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 0\nq1 0 d1 3\r\nq2 Q0 d3 1.0\n")
    assert load_qrels(trec) == {"q1": {"d1": 3, "d2": 0}, "q2": {"d3": 1}}


def test_load_qrels_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\n1\t10\t1\n1\t11\thigh\n")
    with pytest.raises(EvalInputError, match=r"bad.tsv:3: the score 'high'"):
        load_qrels(bad)
    bad.write_text("1\t10\n")
    load_qrels(bad)  # a lone malformed first line reads as a header
    bad.write_text("1\t10\t1\n2\t10\n")
    with pytest.raises(EvalInputError, match=r"bad.tsv:2: expected"):
        load_qrels(bad)
    with pytest.raises(EvalInputError, match="cannot read"):
        load_qrels(tmp_path / "missing.tsv")


def test_load_queries(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text('{"_id": "b", "text": "second", "metadata": {}}\n\n{"_id": 7, "text": "x"}\n')
    assert list(load_queries(f).items()) == [("b", "second"), ("7", "x")]
    f.write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    with pytest.raises(EvalInputError, match=r"q.jsonl:2: query id 'a' appears twice"):
        load_queries(f)
    f.write_text('{"_id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(EvalInputError, match=r"q.jsonl:2: not a JSON object"):
        load_queries(f)
    f.write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(EvalInputError, match='"_id" and "text"'):
        load_queries(f)
    f.write_text('{"_id": "a", "text": "  "}\n')
    with pytest.raises(EvalInputError, match="empty text"):
        load_queries(f)


def test_mapping_tsv_json_and_resolver(tmp_path: Path) -> None:
    tsv = tmp_path / "m.tsv"
    tsv.write_text("# doc-id\tpath\nA\tnotes/a.md\nB\t./b.txt\nC\t/abs/root/c.md\n")
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"A": "notes/a.md", "B": "./b.txt", "C": "/abs/root/c.md"}))
    assert load_mapping(tsv) == load_mapping(js)
    resolve = DocResolver(load_mapping(tsv))
    assert resolve("/r", "notes/a.md") == "A"
    assert resolve("/r", "b.txt") == "B"
    assert resolve("/abs/root", "c.md") == "C"  # an absolute path in the mapping
    assert resolve("/elsewhere", "c.md") is None
    assert resolve("/r", "notes/unmapped.md") is None
    stem = DocResolver()
    assert stem("/r", "docs/1234.txt") == "1234"
    assert stem("/r", "x/y/abc.md") == "abc"


def test_mapping_errors(tmp_path: Path) -> None:
    m = tmp_path / "m.tsv"
    m.write_text("A\ta.md\nB\t./a.md\n")
    with pytest.raises(EvalInputError, match=r"m.tsv:2: ./a.md is already document 'A'"):
        load_mapping(m)
    m.write_text("A a.md\n")
    with pytest.raises(EvalInputError, match=r"m.tsv:1: expected"):
        load_mapping(m)
    m.write_text('{"A": 3}')
    with pytest.raises(EvalInputError, match="JSON object"):
        load_mapping(m)


@pytest.mark.skipif(not (SCIFACT / "qrels" / "train.tsv").exists(),
                    reason="REPD_SCIFACT names no SciFact copy")
def test_scifact_files_load() -> None:
    qrels = load_qrels(SCIFACT / "qrels" / "train.tsv")
    queries = load_queries(SCIFACT / "queries.jsonl")
    assert sum(len(v) for v in qrels.values()) == 919
    assert len(queries) == 809
    assert set(qrels) <= set(queries)


# -- repd eval, end to end ---------------------------------------------------------------------

CORPUS = {
    "sourdough": "# Sourdough\n\nFeed the sourdough starter with flour and water the night "
                 "before baking. The wild yeast ferments the dough slowly, which gives the "
                 "bread its sour taste and open crumb.",
    "volcano": "# Volcanoes\n\nBasaltic lava is low in silica, so it flows easily and builds "
               "broad shield volcanoes like those of Hawaii.",
    "tides": "# Tides\n\nOcean tides rise and fall twice a day because the Moon's gravity pulls "
             "the water on the near and the far side of the Earth.",
    "tls": "# TLS certificates\n\nRenew the server's TLS certificate before it expires: "
           "generate a new key, request a certificate from the authority, and reload nginx.",
    "backup": "# Backups\n\nRotate the backup encryption keys every ninety days and keep the "
              "old keys until every archive encrypted with them has expired.",
    "chess": "# Chess openings\n\nThe Sicilian Defence answers 1.e4 with c5 and leads to sharp, "
             "unbalanced positions.",
    "photosynthesis": "# Photosynthesis\n\nPlants turn sunlight, water and carbon dioxide into "
                      "glucose and oxygen in their chloroplasts.",
    "marathon": "# Marathon training\n\nBuild weekly mileage slowly, add one long run each "
                "week, and taper for two weeks before the race.",
    "espresso": "# Espresso\n\nGrind the coffee fine and push hot water through it at nine bars "
                "of pressure for about twenty-five seconds.",
    "git": "# Git rebase\n\nAn interactive rebase rewrites the commits of a branch: squash, "
           "reorder or edit them before merging.",
    "bees": "# Honey bees\n\nWorker bees perform a waggle dance to tell the hive the direction "
            "and distance of flowers.",
    "retry": "# Retries\n\nRetry failed network requests with exponential backoff and jitter so "
             "that clients do not all retry at the same moment.",
}

QUERIES = {
    # An exact paraphrase of one document: it must come first.
    "paraphrase": "Why do sea levels go up and down two times daily? The pull of the moon "
                  "on the oceans.",
    "graded": "how should I renew an expiring TLS certificate for nginx",
    "absent": "rotating encryption keys for backups",
    "nothing-relevant": "a query judged only non-relevant",
    "unjudged": "a query with no judgments at all",
    "sunlight": "how do plants make sugar from sunlight",
}

QRELS = [
    ("paraphrase", "tides", 1),
    ("graded", "tls", 2), ("graded", "retry", 1),
    ("absent", "backup", 1), ("absent", "ghost-not-indexed", 1),
    ("nothing-relevant", "chess", 0),
    ("not-in-queries-file", "bees", 1),
    ("sunlight", "photosynthesis", 1),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A corpus indexed by ``repd index`` into its own home, and BEIR files describing it."""
    base = tmp_path_factory.mktemp("eval")
    root = base / "corpus"
    (root / "sub").mkdir(parents=True)
    for name, text in CORPUS.items():
        folder = root / "sub" if name in ("bees", "git") else root
        (folder / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    queries = base / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                               for q, t in QUERIES.items()))
    qrels = base / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n"
                     + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    env = cli_env(base / "home")
    run_cli(["index", str(root), "--json"], env)
    return {"base": base, "root": root, "queries": queries, "qrels": qrels, "env": env}


def _eval(bench: dict[str, Any], *extra: str, check: bool = True) -> Any:
    proc = run_cli(["eval", "--queries", str(bench["queries"]), "--qrels", str(bench["qrels"]),
                    *extra], bench["env"], check=check)
    return proc if not check else proc.stdout


@pytest.mark.slow
def test_eval_end_to_end_local(bench: dict[str, Any]) -> None:
    run = bench["base"] / "run.json"
    out = json.loads(_eval(bench, "--json", "--save-run", str(run)))
    assert out["source"] == "local"
    assert out["mode"] == "hybrid" and out["k"] == 100  # a new index has sparse vectors
    # Scored: the judged queries with something relevant, in the queries file's order.
    assert list(out["per_query"]) == ["paraphrase", "graded", "absent", "sunlight"]
    assert out["queries"] == 4
    assert out["skipped"] == {"no_relevant": 1, "judged_without_text": 1, "limited": 0}
    for figures in [out["metrics"], *out["per_query"].values()]:
        assert set(figures) == {"ndcg@10", "recall@100", "mrr@10"}
        assert all(0.0 <= v <= 1.0 for v in figures.values())
    assert out["per_query"]["paraphrase"]["mrr@10"] == 1.0
    assert out["per_query"]["paraphrase"]["ndcg@10"] == pytest.approx(1.0)
    # The judged document that is not in the index can only be missed.
    assert out["per_query"]["absent"]["recall@100"] == 0.5
    assert out["per_query"]["absent"]["ndcg@10"] <= 1 / (1 + 1 / L3) + 1e-9

    # The saved rankings: one hit per file, every file of the corpus (12 < k), by stem.
    rankings = json.loads(run.read_text())
    assert list(rankings) == list(out["per_query"])
    for ranked in rankings.values():
        assert sorted(ranked) == sorted(CORPUS)
    assert rankings["paraphrase"][0] == "tides"
    # What the command printed is what evaluation.py computes from those rankings.
    again = evaluate(list(rankings.items()), load_qrels(bench["qrels"]))
    assert again.per_query == out["per_query"]
    assert again.means == pytest.approx(out["metrics"], abs=0)

    # The ranking is `repd query --files`'s own.
    q = json.loads(run_cli(["query", QUERIES["graded"], "--files", "-k", "100", "--json",
                            "--local"], bench["env"]).stdout)
    assert [Path(h["path"]).stem for h in q["hits"]] == rankings["graded"]
    assert str(q["generation"]) == out["generation"]

    # The plain table says the same.
    table = _eval(bench)
    assert "4 queries" in table
    assert f"nDCG@10     {out['metrics']['ndcg@10']:.4f}" in table
    assert f"MRR@10      {out['metrics']['mrr@10']:.4f}" in table
    assert "1 judged with nothing relevant" in table


@pytest.mark.slow
def test_eval_mapping_limit_and_generation(bench: dict[str, Any]) -> None:
    # Documents named by a mapping instead of stems; a file outside it is no document.
    mapping = bench["base"] / "mapping.json"
    names = {name: f"doc-{name}" for name in CORPUS if name != "sourdough"}
    mapping.write_text(json.dumps({f"doc-{n}": (f"sub/{n}.md" if n in ("bees", "git") else
                                                str(bench["root"] / f"{n}.md"))
                                   for n in names}))
    qrels = bench["base"] / "qrels-mapped.tsv"
    qrels.write_text("".join(f"{q}\t{names.get(d, d)}\t{s}\n" for q, d, s in QRELS))
    run = bench["base"] / "run-mapped.json"
    out = json.loads(run_cli(["eval", "--queries", str(bench["queries"]), "--qrels", str(qrels),
                              "--mapping", str(mapping), "--json", "--save-run", str(run),
                              "--limit", "2", "-k", "10"], bench["env"]).stdout)
    assert list(out["per_query"]) == ["paraphrase", "graded"]
    assert out["skipped"]["limited"] == 2
    assert set(out["metrics"]) == {"ndcg@10", "recall@10", "mrr@10"}
    assert out["per_query"]["paraphrase"]["mrr@10"] == 1.0
    rankings = json.loads(run.read_text())
    assert rankings["paraphrase"][0] == "doc-tides"
    assert all(len(r) == 10 for r in rankings.values())
    assert all(d is None or d in names.values() for r in rankings.values() for d in r)
    assert evaluate(list(rankings.items()), load_qrels(qrels),
                    recall_k=10).per_query == out["per_query"]

    # Without a daemon only the active generation can be opened: another is refused.
    proc = _eval(bench, "--generation", "99", check=False)
    assert proc.returncode != 0
    assert (f"generation 99 is not the active generation ({out['generation']}): only the "
            "active generation can be opened without a daemon; start `repd run` to measure "
            "generation 99") in proc.stderr
    same = json.loads(_eval(bench, "--generation", out["generation"], "--json", "--limit", "2",
                            "-k", "10", "--local"))
    assert same["generation"] == out["generation"] and same["source"] == "local"
    dense = json.loads(_eval(bench, "--mode", "dense", "--json", "--limit", "2", "--local"))
    assert dense["mode"] == "dense" and dense["queries"] == 2
    proc = _eval(bench, "-k", "5", check=False)
    assert proc.returncode == 2


def test_eval_refuses_bad_input_before_loading_anything(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"_id": "1", "text": "hello"}\n')
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("1\td\tbad\n2\td\t1\n")
    proc = run_cli(["eval", "--queries", str(queries), "--qrels", str(qrels)], env, check=False)
    assert proc.returncode == 2
    assert "qrels.tsv:1" not in proc.stderr and "not an integer" not in proc.stderr
    # The first line read as a header; query 2 has no text: nothing to score.
    assert "no query in" in proc.stderr
    qrels.write_text("1\td\t1\n1\te\tbad\n")
    proc = run_cli(["eval", "--queries", str(queries), "--qrels", str(qrels)], env, check=False)
    assert proc.returncode == 2
    assert "qrels.tsv:2: the score 'bad' is not an integer" in proc.stderr
    qrels.write_text("1\td\t1\n")
    proc = run_cli(["eval", "--queries", str(queries), "--qrels", str(qrels)], env, check=False)
    assert proc.returncode != 0 and "nothing is indexed yet" in proc.stderr


@pytest.fixture
def daemon(bench: dict[str, Any]) -> Iterator[DaemonProc]:
    d = DaemonProc(bench["base"] / "home", [bench["root"]]).start()
    yield d
    d.stop()


@pytest.mark.slow
def test_eval_through_a_running_daemon_matches_local(bench: dict[str, Any],
                                                     daemon: DaemonProc) -> None:
    local_run = bench["base"] / "run-local.json"
    daemon_run = bench["base"] / "run-daemon.json"
    # While the daemon writes the index, --local is refused (as for `repd query`).
    proc = _eval(bench, "--local", check=False)
    assert proc.returncode != 0 and "without --local" in proc.stderr
    out = json.loads(_eval(bench, "--json", "--save-run", str(daemon_run)))
    assert out["source"] == "daemon"
    assert out["per_query"]["paraphrase"]["mrr@10"] == 1.0
    daemon.stop()
    local = json.loads(_eval(bench, "--json", "--save-run", str(local_run)))
    assert local["source"] == "local"
    assert json.loads(daemon_run.read_text()) == json.loads(local_run.read_text())
    assert local["per_query"] == out["per_query"]


# -- repd eval --generation, against a fake daemon -------------------------------------------


class _FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Answers ``POST /v1/query`` on a Unix socket as told, and keeps the bodies it got."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        self.bodies: list[dict[str, Any]] = []
        #: The generation it says answered; None: the one asked for (else "1").
        self.answer_generation: str | None = None
        #: (status, code, message) to refuse every query with, instead of answering.
        self.refuse: tuple[int, str, str] | None = None
        super().__init__(str(path), _FakeDaemonHandler)


class _FakeDaemonHandler(http.server.BaseHTTPRequestHandler):
    server: _FakeDaemon

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if self.server.refuse is not None:
            status, code, message = self.server.refuse
            self._send(status, {"error": {"code": code, "message": message}})
            return
        generation = self.server.answer_generation or str(body.get("generation", 1))
        # Every corpus file, the paraphrase's document first.
        order = sorted(CORPUS, key=lambda n: n != "tides")
        hits = [{"rank": i, "score": 1.0 / i, "root": "/corpus", "path": f"{n}.md",
                 "start_line": 1, "end_line": 1, "snippet": ""}
                for i, n in enumerate(order[:body["k"]], 1)]
        self._send(200, {"hits": hits, "took_ms": 1.0, "generation": generation})

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a Unix socket has no client address to log, and the test output stays clean


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[tuple[_FakeDaemon, list[str], dict[str, str]]]:
    """A fake daemon, the eval arguments that reach it, and the environment to run them in."""
    sock = tmp_path / "fake.sock"
    server = _FakeDaemon(sock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                               for q, t in QUERIES.items()))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("".join(f"{q}\t{d}\t{s}\n" for q, d, s in QRELS))
    args = ["eval", "--socket", str(sock), "--queries", str(queries), "--qrels", str(qrels),
            "--json"]
    try:
        yield server, args, cli_env(tmp_path / "home")
    finally:
        server.shutdown()
        server.server_close()


def test_eval_generation_is_asked_of_the_daemon(
    fake_daemon: tuple[_FakeDaemon, list[str], dict[str, str]]
) -> None:
    server, args, env = fake_daemon
    out = json.loads(run_cli([*args, "--generation", "7"], env).stdout)
    assert out["source"] == "daemon" and out["generation"] == "7"
    assert out["per_query"]["paraphrase"]["mrr@10"] == 1.0
    # One request per scored query, each naming the generation as a JSON integer.
    assert len(server.bodies) == 4
    for body in server.bodies:
        assert body["generation"] == 7 and type(body["generation"]) is int
        assert body["files"] is True and body["k"] == 100
    assert [b["text"] for b in server.bodies] == [QUERIES[q] for q in
                                                  ("paraphrase", "graded", "absent", "sunlight")]
    # Without --generation the field is not sent: the daemon answers from the active one.
    server.bodies.clear()
    out = json.loads(run_cli(args, env).stdout)
    assert out["generation"] == "1"
    assert server.bodies and all("generation" not in b for b in server.bodies)


def test_eval_generation_answered_from_another_is_refused(
    fake_daemon: tuple[_FakeDaemon, list[str], dict[str, str]]
) -> None:
    server, args, env = fake_daemon
    server.answer_generation = "5"  # as a daemon that ignored the field would
    proc = run_cli([*args, "--generation", "7"], env, check=False)
    assert proc.returncode == 1
    assert "asked for generation 7, the daemon answered from generation 5" in proc.stderr
    assert len(server.bodies) == 1  # refused at the first answer


@pytest.mark.parametrize(("status", "code", "exit_code"), [
    (404, "unknown_generation", 2),
    (409, "generation_not_servable", 1),
])
def test_eval_generation_the_daemon_refuses(
    fake_daemon: tuple[_FakeDaemon, list[str], dict[str, str]], status: int, code: str,
    exit_code: int
) -> None:
    server, args, env = fake_daemon
    server.refuse = (status, code, "generation 7: no such generation here")
    proc = run_cli([*args, "--generation", "7"], env, check=False)
    assert proc.returncode == exit_code
    assert "generation 7: no such generation here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_generation_must_be_a_generation_id(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    for bad in ("0", "-3", "latest"):
        proc = run_cli(["eval", "--queries", "q", "--qrels", "r", "--generation", bad], env,
                       check=False)
        assert proc.returncode == 2
        assert "is not a generation id (a positive integer)" in proc.stderr


def _daemon_serves_generations() -> bool:
    from repd.api.schema import QueryRequest

    return "generation" in QueryRequest.model_fields


@pytest.mark.slow
@pytest.mark.skipif(not _daemon_serves_generations(),
                    reason="the API's QueryRequest has no generation field yet")
def test_eval_generation_through_a_real_daemon(bench: dict[str, Any],
                                               daemon: DaemonProc) -> None:
    active = json.loads(_eval(bench, "--json"))
    assert active["source"] == "daemon"
    named = json.loads(_eval(bench, "--json", "--generation", active["generation"]))
    assert named["source"] == "daemon" and named["generation"] == active["generation"]
    assert named["per_query"] == active["per_query"]
    proc = _eval(bench, "--generation", str(int(active["generation"]) + 50), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
