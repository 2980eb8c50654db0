"""Bad input through the real CLI: every odd file gets a recorded reason, the rest indexes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from repd.core.ignore import IgnoreRules
from repd.engine import Engine
from tests.helpers import cli_env, index_json, make_settings, run_cli

GOOD = "Glaciers carve valleys as they move, grinding rock beneath tons of ice."


def build_bad_tree(root: Path) -> None:
    root.mkdir()
    (root / "good.md").write_text("# Good\n\n" + GOOD + "\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    (root / "blob.dat").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (root / "latin1.txt").write_bytes("Café crème brûlée à la française.".encode("cp1252"))
    (root / "broken-utf8.txt").write_bytes(b"valid start \xff\xfe\xfa then more text here")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("   \n\n\t\n")
    (root / "huge.txt").write_text("word " * 300_000)  # 1.5 MB, over the 1 MB limit below
    (root / "utf16.txt").write_bytes("\ufeffUTF-16 text about volcanoes".encode("utf-16-le"))
    (root / "name with spaces.md").write_text("Spaces in the file name, indexed fine.")
    (root / "new\nline.md").write_text("A newline inside the file name.")
    (root / "ñandú ü 日本.md").write_text("Non-ASCII file name, indexed fine.")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    os.mkfifo(root / "a-fifo")
    (root / ".env").write_text("SECRET=hunter2")
    (root / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_bad_files_are_recorded_and_good_ones_indexed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    build_bad_tree(root)
    home = tmp_path / "home"
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_file_bytes = 1000000\n")
    env = cli_env(home, REPD_CONFIG=str(cfg))
    out = index_json(root, env)
    assert out["indexed"] == 7, out  # good, latin1, broken-utf8, utf16, 3 odd names
    skipped = out["skipped"]
    assert skipped.get("binary") == 1  # blob.dat; image.png is ignored by name, never read
    assert skipped.get("empty") == 2
    assert skipped.get("too_large") == 1
    assert skipped.get("symlink") == 2
    assert skipped.get("not_a_file") == 1
    listing = json.loads(run_cli(["files", "--json"], env).stdout)
    reasons = {it["path"]: it["reason"] for it in listing["items"]}
    assert reasons["huge.txt"] == "too_large" and reasons["blob.dat"] == "binary"
    assert "image.png" not in reasons
    assert all(it["detail"] for it in listing["items"])
    # Secrets are never read: skipped by name, listed with reason "secret".
    assert reasons[".env"] == "secret" and reasons["id_rsa"] == "secret"
    text = run_cli(["files"], env).stdout
    assert "huge.txt" in text and "too_large" in text
    hits = json.loads(run_cli(["query", "glaciers grinding rock", "-k", "3", "--json"],
                              env).stdout)["hits"]
    assert hits[0]["path"] == "good.md" and hits[0]["start_line"] >= 1
    odd = json.loads(run_cli(["query", "newline inside the file name", "-k", "1", "--json"],
                             env).stdout)["hits"]
    assert odd[0]["path"] == "new\nline.md"
    # A re-run changes nothing and records nothing new.
    again = index_json(root, env)
    assert again["indexed"] == 0 and again["chunks_embedded"] == 0


def test_unreadable_file_is_recorded(tmp_path: Path, embedder: Any,
                                     monkeypatch: Any) -> None:
    # Tests run as root, for whom chmod 000 changes nothing: make open() fail instead.
    root = tmp_path / "root"
    root.mkdir()
    (root / "secret.txt").write_text("cannot be read")
    (root / "fine.txt").write_text(GOOD)
    real_open = os.open

    def guarded(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", guarded)
    import builtins
    real_builtin_open = builtins.open

    def guarded_builtin(file: Any, *a: Any, **kw: Any) -> Any:
        if str(file).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_builtin_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_builtin)
    eng = Engine(make_settings(tmp_path / "data"), writer=True, embedder=embedder)
    try:
        stats = eng.indexer().reconcile(root, eng.rules(root))
        assert stats.indexed == 1 and stats.skipped["unreadable"] == 1
        row = eng.manifest.file(str(root), "secret.txt")
        assert row is not None and row.reason == "unreadable" and "denied" in (row.detail or "")
    finally:
        eng.close()


def test_file_vanishing_between_scan_and_read(tmp_path: Path, embedder: Any) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(30):
        (root / f"f{i}.txt").write_text(f"{GOOD} number {i}")
    eng = Engine(make_settings(tmp_path / "data"), writer=True, embedder=embedder)
    indexer = eng.indexer()
    # Each time the planner starts on a file, delete one the scan listed but the planner
    # has not reached yet: it vanishes between scan and read.
    real_plan = indexer.planner.plan
    planned: set[str] = set()

    def plan_then_vanish(root_: Path, rel: str, *a: Any) -> Any:
        planned.add(rel)
        for victim in sorted(root_.iterdir()):
            if victim.name not in planned:
                victim.unlink()
                break
        return real_plan(root_, rel, *a)

    indexer.planner.plan = plan_then_vanish  # type: ignore[method-assign]
    try:
        stats = indexer.reconcile(root, eng.rules(root))
        on_disk = {p.name for p in root.iterdir()}
        indexed = set(eng.manifest.files_under(str(root)))
        assert indexed == on_disk and 10 <= len(on_disk) <= 20
        assert stats.failed == 0 and not stats.skipped
        assert eng.store.count() == eng.manifest.chunk_count(indexer.generation.id)
    finally:
        eng.close()


def test_malformed_config_is_refused_clearly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[store\nkind = 'x'\n")
    proc = run_cli(["index", str(root)], cli_env(tmp_path / "home", REPD_CONFIG=str(cfg)),
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("repd: config error: ") and "Traceback" not in proc.stderr
    assert "not valid TOML" in proc.stderr


def test_second_writer_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    eng = Engine(make_settings(data), writer=True)
    try:
        env = cli_env(tmp_path / "home", REPD_STORE__PATH=str(data))
        root = tmp_path / "r"
        root.mkdir()
        proc = run_cli(["index", str(root)], env, check=False)
        assert proc.returncode == 1
        assert "is being written by pid" in proc.stderr
    finally:
        eng.close()


def test_ignore_rules_used_by_scan(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "node_modules" / "x").mkdir(parents=True)
    rules = IgnoreRules(root)
    assert rules.is_ignored("node_modules", True)
    assert rules.is_ignored(".ssh", True)
    assert not rules.is_ignored("notes.md", False)
