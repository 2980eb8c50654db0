"""Model upgrades end to end: a real daemon, real files, two real sentence-transformers models.

The second model is built offline from the packaged MiniLM (its first three layers, or a
randomly initialised tiny BERT for a model the gate must refuse), saved as a
sentence-transformers folder and loaded by repd's own loading code.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from repd.api.client import ApiClient, ApiRequestError
from tests.conftest_models import build_tiny_model, build_truncated_minilm
from tests.daemon_harness import DaemonProc, wait_for

TOPICS = ["volcano eruption lava magma", "stock market shares trading", "protein folding enzyme",
          "football goal referee match", "violin concerto orchestra", "glacier ice climate",
          "compiler parser bytecode", "bread yeast oven dough"]


def write_corpus(root: Path, n: int) -> None:
    """``n`` files, each about one topic with a unique marker word."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        body = "\n\n".join(f"Paragraph {p} of note {i} on {topic}. The marker is zq{i}x. "
                           + " ".join(topic.split() * 3) for p in range(3))
        (root / f"note{i:03d}.txt").write_text(body, encoding="utf-8")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {"three": build_truncated_minilm(base / "minilm-3l", layers=3),
            "random": build_tiny_model(base / "random-bert", dim=32, seed=3)}


def data_dir(home: Path) -> Path:
    return home / "data" / "repd"


def manifest_counts(home: Path) -> dict[int, int]:
    """Chunk rows per generation, read from the manifest (read-only, WAL-safe)."""
    db = sqlite3.connect(f"file:{data_dir(home) / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        return {int(g): int(n) for g, n in db.execute(
            "SELECT gen_id, COUNT(*) FROM chunks GROUP BY gen_id")}
    finally:
        db.close()


def model_status(client: ApiClient) -> dict[str, Any]:
    return client.model_status()


def migration_state(client: ApiClient) -> str | None:
    mig = client.model_status().get("migration")
    return mig["state"] if mig else None


def wait_ready_to_switch(d: DaemonProc, timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = d.client.model_status()
        mig = st.get("migration")
        assert mig is None or mig["state"] != "failed", mig
        return st if mig is not None and mig["state"] == "ready" else None
    result: dict[str, Any] = wait_for(ready, timeout, "the backfill to finish", every=0.2)
    return result


def hit_paths(client: ApiClient, text: str, k: int = 5) -> list[str]:
    return [h["path"] for h in client.query(text, k=k)["hits"]]


class QueryLoop:
    """Queries the daemon in a loop on a thread; records each answer's generation."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.generations: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                res = self.client.query(TOPICS[i % len(TOPICS)], k=5)
                self.generations.append(str(res["generation"]))
                if not res["hits"]:
                    self.errors.append(f"no hits from generation {res['generation']}")
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            i += 1
            time.sleep(0.02)

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_upgrade_while_serving_with_edits_then_rollback_and_prune(
        tmp_path: Path, models: dict[str, Path]) -> None:
    root = tmp_path / "notes"
    write_corpus(root, 48)
    home = tmp_path / "home"
    d = DaemonProc(home, [root], extra_env={"REPD_MIGRATION__AUTO_SWITCH": "false"}).start()
    try:
        client = d.client
        before = client.status()
        assert before["generation"]["id"] == "1"
        with QueryLoop(ApiClient(d.socket, timeout=60)) as loop:
            res = client.model_use(str(models["three"]))
            assert res["generation"] == "2", res
            # A second migration at the same time is refused, clearly.
            with pytest.raises(ApiRequestError) as refused:
                client.model_use(str(models["random"]))
            assert refused.value.status == 409
            assert "in progress" in refused.value.message
            # Edits, a delete and a rename while the backfill runs.
            (root / "note001.txt").write_text("A fresh note about quasar telescopes, marker "
                                              "zqfreshx.", encoding="utf-8")
            (root / "note002.txt").unlink()
            (root / "note003.txt").rename(root / "renamed003.txt")
            (root / "brandnew.txt").write_text("Submarine sonar pings in the trench, marker "
                                               "zqnewx.", encoding="utf-8")
            st = wait_ready_to_switch(d)
            assert st["migration"]["files_done"] == st["migration"]["files_total"]
            d.wait_idle()
            switched = client.model_switch()
            assert switched["generation"] == "2", switched
            time.sleep(1.0)  # the loop sees the new generation
        assert not loop.errors, loop.errors[:5]
        gens = loop.generations
        assert set(gens) == {"1", "2"}, set(gens)
        # The switch is atomic: once generation 2 answered, generation 1 never did again.
        first_two = gens.index("2")
        assert all(g == "2" for g in gens[first_two:])

        status = client.status()
        assert status["generation"]["id"] == "2"
        assert status["model"]["id"].startswith("minilm-3l@")
        assert hit_paths(client, "quasar telescopes zqfreshx")[0] == "note001.txt"
        assert hit_paths(client, "submarine sonar trench zqnewx")[0] == "brandnew.txt"
        paths = {h["path"] for h in client.query("marker", k=100, files=True)["hits"]}
        assert "note002.txt" not in paths and "note003.txt" not in paths
        assert "renamed003.txt" in paths
        listing = client.model_status()
        states = {g["id"]: g["state"] for g in listing["generations"]}
        assert states == {"1": "retired", "2": "active"}
        points = {g["id"]: g["points"] for g in listing["generations"]}
        assert points["1"] == points["2"] == status["generation"]["points"]

        # Rollback: instant, no embedding (nothing changed since the switch).
        embedded = client.status()["totals"]["embedded"]
        t0 = time.monotonic()
        rolled = client.model_rollback()
        took = time.monotonic() - t0
        assert rolled["generation"] == "1", rolled
        assert client.query("volcano lava", k=3)["generation"] == "1"
        d.wait_idle()
        assert client.status()["totals"]["embedded"] == embedded
        assert took < 30, took
        assert hit_paths(client, "quasar telescopes zqfreshx")[0] == "note001.txt"

        # Prune frees the retired generation's shard.
        shard = data_dir(home) / "shards" / "gen-2"
        assert shard.is_dir()
        pruned = client.model_prune()
        assert "2" in pruned["message"]
        assert not shard.exists()
        assert [g["id"] for g in client.model_status()["generations"]] == ["1"]
        assert set(manifest_counts(home)) == {1}
        with pytest.raises(ApiRequestError) as nothing:
            client.model_rollback()
        assert nothing.value.status == 409
    finally:
        d.stop()


def test_same_identity_is_not_a_migration(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    write_corpus(root, 6)
    d = DaemonProc(tmp_path / "home", [root]).start()
    try:
        res = d.client.model_use("all-MiniLM-L6-v2")  # another name for the same model
        assert "nothing to do" in res["message"]
        assert d.client.model_status()["migration"] is None
        assert [g["id"] for g in d.client.model_status()["generations"]] == ["1"]
    finally:
        d.stop()


def _labels(tmp_path: Path, n: int) -> tuple[Path, Path]:
    queries = tmp_path / "queries.jsonl"
    qrels = tmp_path / "qrels.tsv"
    with queries.open("w") as q, qrels.open("w") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            q.write(json.dumps({"_id": f"q{i}", "text": f"note {i} on {topic}"}) + "\n")
            r.write(f"q{i}\tnote{i:03d}\t1\n")
    return queries, qrels


def test_gate_refuses_a_worse_model_and_force_overrides(
        tmp_path: Path, models: dict[str, Path]) -> None:
    root = tmp_path / "notes"
    write_corpus(root, 24)
    queries, qrels = _labels(tmp_path, 24)
    env = {"REPD_MIGRATION__GATE_QUERIES": str(queries), "REPD_MIGRATION__GATE_QRELS": str(qrels)}
    d = DaemonProc(tmp_path / "home", [root], extra_env=env).start()
    try:
        client = d.client
        client.model_use(str(models["random"]))
        st = wait_ready_to_switch(d)  # auto switch is on: the gate ran and refused
        gate = st["migration"]["gate"]
        assert gate is not None and not gate["ok"], gate
        assert gate["ndcg_new"] < gate["ndcg_active"]
        assert client.status()["generation"]["id"] == "1"
        with pytest.raises(ApiRequestError) as refused:
            client.model_switch()
        assert refused.value.status == 409
        assert "nDCG@10" in refused.value.message and "--force" in refused.value.message
        forced = client.model_switch(force=True)
        assert forced["generation"] == "2"
        assert client.query("volcano", k=2)["generation"] == "2"
        listing = client.model_status()
        assert {g["id"]: g["state"] for g in listing["generations"]} == {
            "1": "retired", "2": "active"}
    finally:
        d.stop()


def test_kill9_during_backfill_resumes_from_the_cursor(
        tmp_path: Path, models: dict[str, Path]) -> None:
    root = tmp_path / "notes"
    write_corpus(root, 200)
    home = tmp_path / "home"
    first = DaemonProc(home, [root]).start(timeout=600)
    first.stop()
    total = manifest_counts(home)[1]
    # The migration starts from the config; the third backfill step's commit is the last.
    crashing = DaemonProc(home, [root], extra_env={
        "REPD_MODEL": str(models["three"]), "REPD_CRASH_AT": "backfill:3"})
    crashing.start(wait_idle=False)
    assert crashing.proc is not None
    crashing.proc.wait(600)
    assert crashing.proc.returncode == -9
    kept = manifest_counts(home).get(2, 0)
    assert 0 < kept < total, (kept, total)

    resumed = DaemonProc(home, [root], extra_env={"REPD_MODEL": str(models["three"])})
    offset = resumed.log.stat().st_size  # the runs share one log file: read only this one's
    resumed.start(wait_idle=False)
    try:
        def switched() -> bool:
            st = resumed.client.status()
            return st["generation"] is not None and st["generation"]["id"] == "2"
        wait_for(switched, 600, "the resumed migration to switch", every=0.3)
        log = resumed.log.read_text()[offset:]
        found = re.search(r'"cursor": (\d+)[^\n]*"event": "migration_resumed"', log)
        assert found is not None, log[-2000:]
        assert int(found.group(1)) > 0  # not from zero
        # Only what the first run had not committed was embedded after the restart
        # (nothing was ever embedded twice: the rest came from the vector cache).
        embedded_after = _embedded_by_migration(log)
        assert embedded_after < total, (embedded_after, total)
        counts = manifest_counts(home)
        assert counts[2] == total
        assert resumed.client.status()["generation"]["points"] == total
        assert "migration_started" not in log  # resumed, not started again
    finally:
        resumed.stop()


def _embedded_by_migration(log: str) -> int:
    """Chunks the backfill embedded in this run, as the switch logged them."""
    found = re.search(r'"embedded": (\d+)[^\n]*"event": "generation_switched"', log)
    assert found is not None
    return int(found.group(1))


def test_changed_weights_under_the_same_path_are_told_apart(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "my-model", dim=32, seed=1)
    root = tmp_path / "notes"
    write_corpus(root, 10)
    home = tmp_path / "home"
    env = {"REPD_MODEL": str(model)}
    d = DaemonProc(home, [root], extra_env=env).start()
    first_id = d.client.status()["model"]["id"]
    d.stop()
    shutil.rmtree(model)
    build_tiny_model(model, dim=32, seed=2)  # same path, same name, same size: new weights
    d = DaemonProc(home, [root], extra_env=env).start(wait_idle=False)
    try:
        def switched() -> bool:
            st = d.client.status()
            return st["generation"] is not None and st["generation"]["id"] == "2"
        wait_for(switched, 300, "the migration to the new weights", every=0.3)
        new_id = d.client.status()["model"]["id"]
        assert new_id != first_id and new_id.split("@")[0] == first_id.split("@")[0]
        assert "model_weights_changed" in d.log.read_text()
        assert d.client.query("volcano", k=1)["generation"] == "2"
    finally:
        d.stop()


def test_an_index_without_sparse_vectors_moves_to_them_without_embedding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index made before hybrid search (dense points only) is rebuilt with sparse
    vectors by a migration to the same model: queries keep answering, and every dense
    vector comes from the cache."""
    import repd.engine
    from repd.engine import Engine
    from tests.helpers import make_settings

    root = tmp_path / "notes"
    write_corpus(root, 30)
    home = tmp_path / "home"
    monkeypatch.setattr(repd.engine, "current_vectors", lambda: "dense")
    engine = Engine(make_settings(data_dir(home)), writer=True)
    try:
        engine.indexer().reconcile(root, engine.rules(root))
        assert engine.generation is not None and engine.generation.vectors == "dense"
    finally:
        engine.close()
    monkeypatch.undo()

    d = DaemonProc(home, [root]).start(wait_idle=False)
    try:
        def switched() -> dict[str, Any] | None:
            st = d.client.model_status()
            return st if st["active"] == "2" and st["migration"] is None else None
        st = wait_for(switched, 300, "the move to sparse vectors", every=0.3)
        assert {g["id"]: g["state"] for g in st["generations"]} == {"1": "retired", "2": "active"}
        log = d.log.read_text()
        assert "index_layout_outdated" in log
        assert _embedded_by_migration(log) == 0  # dense vectors all came from the cache
        hits = d.client.query("marker zq7x", k=3, mode="lexical")
        assert hits["hits"][0]["path"] == "note007.txt"
        assert d.client.query("volcano", k=3)["mode"] == "hybrid"
    finally:
        d.stop()


def test_an_index_cut_by_an_older_chunker_is_re_cut_by_a_migration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index whose generation records no chunker version (cut before tiny chunks were
    merged) moves to today's chunker with the same model: the lone reST labels that were
    chunks of their own join their sections, only the merged chunks are embedded, and a
    label is no longer a hit of its own."""
    import repd.core.chunking
    import repd.engine
    from repd.engine import Engine
    from repd.pipeline.generations import current_vectors
    from tests.helpers import make_settings

    root = tmp_path / "docs"
    write_corpus(root, 6)
    long = ("The backup keys rotate every ninety days; the old key stays readable for a "
            "week so that restores of older snapshots keep working. ") * 3
    for name in ("keys", "restore", "vault"):
        (root / f"{name}.rst").write_text(
            f".. _{name}-guide:\n\n=====\nGuide {name}\n=====\n\n{long}\n", encoding="utf-8")
    home = tmp_path / "home"
    old_layout = current_vectors().rpartition(";chunker=")[0]
    monkeypatch.setattr(repd.engine, "current_vectors", lambda: old_layout)
    monkeypatch.setattr(repd.core.chunking, "TINY_FILL", 0.0)  # chunker 1: nothing merges
    engine = Engine(make_settings(data_dir(home)), writer=True)
    try:
        engine.indexer().reconcile(root, engine.rules(root))
        assert engine.generation is not None and engine.generation.vectors == old_layout
    finally:
        engine.close()
    monkeypatch.undo()
    before = manifest_counts(home)[1]

    d = DaemonProc(home, [root]).start(wait_idle=False)
    try:
        def switched() -> dict[str, Any] | None:
            st = d.client.model_status()
            return st if st["active"] == "2" and st["migration"] is None else None
        wait_for(switched, 300, "the move to today's chunker", every=0.3)
        log = d.log.read_text()
        assert "index_layout_outdated" in log
        after = manifest_counts(home)[2]
        assert after == before - 3  # each label joined its section
        # Only the three merged chunks were new; every other vector came from the cache.
        assert 0 < _embedded_by_migration(log) <= 3
        hits = d.client.query("keys-guide", k=10, mode="lexical")["hits"]
        labelled = [h for h in hits if h["path"] == "keys.rst"]
        # One chunk from the label (line 1) through the section's prose (line 7).
        assert [(h["start_line"], h["end_line"]) for h in labelled] == [(1, 7)]
    finally:
        d.stop()
