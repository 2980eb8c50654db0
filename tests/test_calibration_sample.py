"""Chunk texts read from the folders to calibrate an int8 variant before any index
(repd.pipeline.calibration): real files, the indexer's own rules and chunker."""

from __future__ import annotations

from pathlib import Path

from repd.core.ignore import IgnoreRules
from repd.pipeline.calibration import chunk_planner, sample_chunk_texts


def _tree(root: Path) -> None:
    for d in range(6):
        folder = root / f"topic{d}"
        folder.mkdir(parents=True)
        for f in range(5):
            paras = "\n\n".join(f"Paragraph {p} of note {d}.{f}: " + "words about the topic " * 30
                                for p in range(6))
            (folder / f"note{f}.md").write_text(f"# Note {d}.{f}\n\n{paras}\n", encoding="utf-8")
    (root / "image.bin").write_bytes(bytes(range(256)) * 64)
    (root / ".env").write_text("API_KEY=sk-live-0123456789abcdef0123456789abcdef\n")
    (root / "skipped").mkdir()
    (root / "skipped" / "private.md").write_text("SECRETWORD in an excluded folder\n")
    (root / "big.txt").write_text("big file line\n" * 20000)


def _sample(roots: list[Path], limit: int, exclude: list[str]) -> list[str]:
    planner = chunk_planner(64 * 1024, follow_symlinks=False, allowed_roots=[],
                            allow_secrets=[])
    return sample_chunk_texts(roots, lambda r: IgnoreRules(r, exclude=exclude), planner, limit)


def test_it_samples_chunks_of_the_text_files_the_index_would_hold(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    _tree(root)
    texts = _sample([root], 40, ["skipped/"])
    assert len(texts) == 40
    assert all("Paragraph" in t or t.startswith("# Note") for t in texts), texts[:3]
    # Spread over the tree: 30 notes for 40 texts gives each at most two, and the
    # order by path hash reaches every folder.
    notes = {t.split("Note ", 1)[1][:3] if t.startswith("# Note") else
             t.split("of note ", 1)[1][:3] for t in texts}
    assert {n[0] for n in notes} == set("012345")
    assert len(notes) >= 20
    # Chunks, not whole files: each is cut at about 256 estimated tokens.
    assert max(len(t) for t in texts) < 256 * 4 * 1.5
    # Excluded folders, binary files, secrets and files over the size limit give nothing.
    joined = "\n".join(texts)
    for absent in ("SECRETWORD", "sk-live", "big file line"):
        assert absent not in joined
    # The same tree gives the same sample.
    assert _sample([root], 40, ["skipped/"]) == texts


def test_a_file_named_alone_is_the_only_one_read(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    _tree(root)
    texts = _sample([root / "topic3" / "note1.md"], 300, [])
    assert texts and all("3.1" in t for t in texts)
    assert _sample([tmp_path / "missing"], 10, []) == []
    assert _sample([root], 0, []) == []
