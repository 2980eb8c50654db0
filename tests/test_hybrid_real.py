"""Fusion with the real model and the real BM25 encoder: hybrid finds what each side alone
misses (an exact identifier for dense, a paraphrase with no shared word for BM25)."""

from __future__ import annotations

from pathlib import Path

from repd.engine import Engine
from repd.pipeline.search import search
from tests.helpers import make_settings

NOTES = {
    "shipping.md": "Crate QX-88172 leaves the Leeds warehouse on Tuesday with the spare parts.",
    "faults.md": "When the pump faults, the controller logs the code and stops the motor.",
    "alarms.md": "Alarm codes are listed in the appendix; each fault code names a subsystem.",
    "errors.md": "Error numbers explain why a machine halted and what to check first.",
    "car.md": "Changing a flat tyre: loosen the wheel nuts, raise the car with the jack.",
    "bread.md": "Knead the dough for ten minutes, then let it rise in a warm place.",
    "garden.md": "Water the tomatoes in the morning and mulch them against drought.",
    "cat.md": "The cat sleeps on the windowsill most afternoons.",
}
IDENTIFIER = "QX-88172 fault code"             # only BM25 knows this token
PARAPHRASE = "swapping a punctured automobile tire"  # no word shared with car.md


def top(engine: Engine, text: str, mode: str, k: int) -> list[str]:
    handle = engine._active_handle()
    hits, _ = search(handle.store, handle.embed_query, text, k, per_file=True,
                     mode=mode,  # type: ignore[arg-type]
                     embed_sparse=handle.embed_sparse_query)
    return [h.path for h in hits]


def test_hybrid_finds_both_an_identifier_and_a_paraphrase(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    for name, text in NOTES.items():
        (root / name).write_text(text + "\n", encoding="utf-8")
    engine = Engine(make_settings(tmp_path / "data"), writer=True)
    try:
        engine.indexer().reconcile(root, engine.rules(root))
        assert engine.generation is not None and engine.generation.hybrid
        dense_id = top(engine, IDENTIFIER, "dense", 1)
        lexical_id = top(engine, IDENTIFIER, "lexical", 1)
        dense_para = top(engine, PARAPHRASE, "dense", 1)
        lexical_para = top(engine, PARAPHRASE, "lexical", 1)
        # Each side alone fails one of the two questions...
        assert lexical_id == ["shipping.md"]
        assert dense_id != ["shipping.md"], dense_id
        assert dense_para == ["car.md"]
        assert lexical_para != ["car.md"], lexical_para
        # ...fused, both are answered in the top two.
        assert "shipping.md" in top(engine, IDENTIFIER, "hybrid", 2)
        assert "car.md" in top(engine, PARAPHRASE, "hybrid", 2)
    finally:
        engine.close()


# A long note about many things, with no headings: each paragraph is its own topic.
JOURNAL_TOPICS = [
    "The quarterly budget review moved to Thursday; finance wants the travel costs split "
    "by team and the software licences listed with their renewal dates.",
    "Cycling to work is faster since the new bridge opened, although the tyres wear out "
    "quickly on the gravel path along the canal and need more pressure in winter.",
    "My sourdough starter needs feeding twice a day at room temperature: equal weights of "
    "flour and water, discarding half before each feed, until it doubles in four hours.",
    "The kids' school play is about pirates; the costumes need eye patches, striped shirts "
    "and a cardboard treasure chest painted gold for the final scene.",
    "Our router drops the connection every evening; the firmware update did not help, so "
    "the next step is moving the access point away from the microwave oven.",
    "Grandmother's recipe for plum jam uses less sugar than most and a long slow simmer; "
    "the jars must be sterilised in the oven before filling.",
]


def test_a_topic_in_the_middle_of_a_long_note_is_found(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    root.mkdir()
    filler = " ".join(f"Unrelated remark number {i} about the weather and the office." for i
                      in range(6))
    paragraphs = [f"{t} {filler}" for t in JOURNAL_TOPICS]
    (root / "journal.md").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    for name, text in NOTES.items():
        (root / name).write_text(text + "\n", encoding="utf-8")
    engine = Engine(make_settings(tmp_path / "data"), writer=True)
    try:
        engine.indexer().reconcile(root, engine.rules(root))
        handle = engine._active_handle()
        for mode in ("hybrid", "dense", "lexical"):
            hits, _ = search(handle.store, handle.embed_query,
                             "how often should I feed a sourdough starter", 3, per_file=True,
                             mode=mode,  # type: ignore[arg-type]
                             embed_sparse=handle.embed_sparse_query)
            assert hits and hits[0].path == "journal.md", (mode, [h.path for h in hits])
            # The hit is the chunk about the starter, not the note's first lines.
            starter_line = 5  # paragraphs are separated by one blank line
            assert hits[0].start_line <= starter_line <= hits[0].end_line, (
                mode, hits[0].start_line, hits[0].end_line)
            assert "sourdough" in hits[0].snippet.lower(), (mode, hits[0].snippet)
    finally:
        engine.close()
