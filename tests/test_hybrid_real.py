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
