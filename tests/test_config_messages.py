"""Config messages a person can act on: the variable or key named, the fix suggested."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from repd.errors import ConfigError
from repd.settings import NON_SETTING_ENV, load_settings
from tests.helpers import cli_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("REPD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def _problems(config: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    return info.value.problems


def test_an_environment_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPD_BATCH_TOKENS", "lots")
    monkeypatch.setenv("REPD_WATCH__SETTLE_MS", "-1")
    problems = _problems()
    assert len(problems) == 2, problems
    assert any(p.startswith("REPD_BATCH_TOKENS: ") and "integer" in p for p in problems)
    assert any(p.startswith("REPD_WATCH__SETTLE_MS: ") for p in problems)
    assert all("(from environment)" in p for p in problems)


def test_a_json_section_names_the_variable_and_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPD_STORE", '{"kind": "s3"}')
    (problem,) = _problems()
    assert problem.startswith("REPD_STORE: ") and "store.kind, from environment" in problem
    monkeypatch.setenv("REPD_STORE", "kind=server")
    (problem,) = _problems()
    assert problem.startswith("REPD_STORE: not valid JSON") and "REPD_STORE__KEY" in problem


@pytest.mark.parametrize(("raw", "fix"), [
    ("/x", """REPD_ROOTS='["/x"]'"""),
    ("/home/me/notes,/srv/docs", """REPD_ROOTS='["/home/me/notes", "/srv/docs"]'"""),
])
def test_a_list_that_is_not_json_shows_the_json_form(
        monkeypatch: pytest.MonkeyPatch, raw: str, fix: str) -> None:
    monkeypatch.setenv("REPD_ROOTS", raw)
    (problem,) = _problems()
    assert problem.startswith("REPD_ROOTS: lists are JSON") and fix in problem, problem
    monkeypatch.setenv("REPD_ROOTS", json.dumps(raw.split(",")))
    assert [str(p) for p in load_settings().settings.roots] == raw.split(",")


def test_a_misspelled_variable_is_a_warning_with_the_closest_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPD_BATCH_TOKEN", "4096")
    monkeypatch.setenv("REPD_WATCH__DEBOUNCE", "10")
    monkeypatch.setenv("repd_modle", "x")  # case does not matter, as for real settings
    monkeypatch.setenv("REPD_ZZZZ", "1")
    loaded = load_settings()
    assert loaded.settings.batch_tokens is None  # ignored, not applied
    text = "\n".join(loaded.warnings)
    assert len(loaded.warnings) == 4, text
    assert "REPD_BATCH_TOKEN is not a repd setting (did you mean REPD_BATCH_TOKENS?)" in text
    assert "REPD_WATCH__DEBOUNCE is not a repd setting (did you mean " \
           "REPD_WATCH__DEBOUNCE_MS?)" in text
    assert "REPD_MODLE is not a repd setting (did you mean REPD_MODEL?)" in text
    assert "REPD_ZZZZ is not a repd setting; ignored" in text


def test_variables_that_are_not_settings_are_not_warned_about(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    for name in NON_SETTING_ENV:
        monkeypatch.setenv(name, str(cfg) if name == "REPD_CONFIG" else "x")
    monkeypatch.setenv("REPD_TEST_ANYTHING", "1")
    monkeypatch.setenv("REPD_API__SOCKET", "/run/x.sock")
    monkeypatch.setenv("REPD_API", '{"max_request_bytes": 2048}')
    loaded = load_settings()
    assert loaded.warnings == []
    assert str(loaded.settings.api.socket) == "/run/x.sock"
    assert loaded.settings.api.max_request_bytes == 2048
    assert loaded.sources["api.socket"] == "environment"


def test_an_unknown_config_key_names_the_closest(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('batch_token = 1000\nexcludes = []\n[watch]\nsettle = 5\n[stor]\nkind = "x"\n')
    problems = _problems(cfg)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "batch_token: unknown setting (did you mean 'batch_tokens'?)" in text
    assert "excludes: unknown setting (did you mean 'exclude'?)" in text
    assert "watch.settle: unknown setting (did you mean 'watch.settle_ms'?)" in text
    assert "stor: unknown setting (did you mean 'store'?)" in text
    assert all(f"(from file {cfg})" in p for p in problems)


def test_the_cli_prints_the_warning_and_goes_on(tmp_path: Path) -> None:
    env = cli_env(tmp_path, REPD_BATCH_TOKEN="4096")
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "config", "show"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ("repd: warning: REPD_BATCH_TOKEN is not a repd setting "
                                   "(did you mean REPD_BATCH_TOKENS?); ignored")
    env = cli_env(tmp_path, REPD_ROOTS="/x")
    proc = subprocess.run([sys.executable, "-m", "repd.cli", "config", "show"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("repd: config error: REPD_ROOTS: lists are JSON in the "
                                   """environment: REPD_ROOTS='["/x"]' (got '/x')""")


def test_library_logs_and_warnings_are_json_lines() -> None:
    """Records from libraries (stdlib logging) and warnings.warn render as JSON too."""
    from repd.log import configure_logging, get_logger

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "info", stream=stream)
        get_logger("test").info("ours", n=1)
        logging.getLogger("transformers.modeling_utils").warning("theirs %s", "x")
        logging.getLogger("transformers.modeling_utils").info("too chatty")
        # transformers' weights reports: a stale position_ids buffer alone is dropped,
        # anything else kept without its colour codes.
        for rows in ("embeddings.position_ids | UNEXPECTED |  | ",
                     "embeddings.position_ids | UNEXPECTED |  | \n"
                     "pooler.dense.weight     | MISSING    |  | "):
            logging.getLogger("transformers.modeling_utils").warning(
                "\x1b[1mBertModel LOAD REPORT\x1b[0m from: /m\nKey | Status |  | \n"
                "----+--------+--+-\n%s\n\nNotes:\n- UNEXPECTED:\tcan be ignored", rows)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    finally:  # leave logging as the rest of the session had it
        import structlog

        structlog.reset_defaults()
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    records = [json.loads(ln) for ln in stream.getvalue().splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "ours" and events[1] == "theirs x", records
    assert records[1]["level"] == "warning"
    assert records[1]["logger"] == "transformers.modeling_utils"
    assert "too chatty" not in events  # libraries: warnings and up, unless debugging
    reports = [e for e in events if "LOAD REPORT" in e]
    assert len(reports) == 1 and "pooler.dense.weight" in reports[0], reports
    assert reports[0].startswith("BertModel LOAD REPORT from: /m")  # no colour codes
    assert any("deprecated thing" in e for e in events), records
