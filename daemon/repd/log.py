"""The one place logging is configured: structlog, readable on a terminal, JSON otherwise.

Everything the process logs goes through one renderer: repd's own structlog events, and
the standard ``logging`` records of the libraries (transformers, huggingface_hub,
uvicorn, ``warnings.warn``), so that a JSON log is JSON lines only. Progress bars
(tqdm, as transformers draws "Loading weights") are turned off: they are for people
at a terminal, and they would put carriage returns and block characters into the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

#: Libraries that log through the stdlib: warnings and errors only, unless debugging.
_NOISY = ("httpx", "httpcore", "urllib3", "filelock", "sentence_transformers",
          "transformers", "huggingface_hub", "watchdog", "uvicorn", "asyncio", "optimum",
          "nncf")

#: Read by huggingface_hub (and through it transformers) when they are first imported.
PROGRESS_BAR_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}

_state: dict[str, Any] = {"json": False, "level": logging.INFO}


def quiet_progress_bars() -> None:
    """Turn off the libraries' progress bars, before or after they are imported.

    Before: the environment variables they read at import. After (the model adapter
    calls this again once they are loaded): their own switches, and their private log
    handlers removed so that their records reach the one renderer.
    """
    os.environ.update(PROGRESS_BAR_ENV)
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub import utils as hub_utils

            hub_utils.disable_progress_bars()  # type: ignore[attr-defined]
        except Exception:  # an older or newer hub without it: the variable still counts
            pass
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        except Exception:
            pass
    _route_library_logs("transformers.utils.logging")
    _route_library_logs("optimum.utils.logging")
    _set_library_levels(_state["level"])


def route_optimum_logs() -> None:
    """Send optimum's records (the OpenVINO backend) to the root handler, as transformers'
    are; the export calls it before loading a model through optimum (see
    :func:`_route_library_logs` for why)."""
    _route_library_logs("optimum.utils.logging")
    _set_library_levels(_state["level"])


def _route_library_logs(module: str) -> None:
    """Route a Hugging Face style library logger (transformers', optimum's) to the root
    handler (JSON or console), if ``module``, its logging module, is imported.

    Such a library gives its root logger a stderr handler of its own, with propagation
    off, the first time one of its modules asks for a logger: its lines ("[transformers]
    ...", optimum's export advice) would reach the daemon's log as plain text among the
    JSON. Configuring it now means a later call inside a model load cannot redo that.
    """
    lib = sys.modules.get(module)
    if lib is None:
        return
    try:
        configure = getattr(lib, "_configure_library_root_logger", None)
        if callable(configure):
            configure()
        lib.disable_default_handler()
        lib.enable_propagation()
    except Exception:  # another version without these: its lines stay plain, nothing breaks
        pass


def _set_library_levels(lvl: int) -> None:
    lib = lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(lib)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: A weights table row of transformers' "LOAD REPORT": key | status | ...
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(\w+)\s*\|", re.MULTILINE)


class LoadReportFilter(logging.Filter):
    """Tidies transformers' "LOAD REPORT" warnings (the weights a checkpoint has and the
    model lacks, or the other way round) before they reach the log.

    A report whose only rows are ``position_ids`` buffers marked UNEXPECTED is dropped:
    checkpoints saved by older transformers carry that buffer, every load of the default
    MiniLM on torch printed it as a warning, and a warning at each start teaches people
    to skip warnings. Any other report (MISSING weights mean random ones) is kept, its
    terminal colour codes removed so the JSON line holds plain text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("transformers"):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format: leave it to the formatter
            return True
        if "LOAD REPORT" not in message:
            return True
        rows = [(key, status) for key, status in _REPORT_ROW.findall(_ANSI.sub("", message))
                if key != "Key" and not set(key) <= {"-", "+"}]
        if rows and all(status == "UNEXPECTED" and key.endswith("position_ids")
                        for key, status in rows):
            return False
        record.msg, record.args = _ANSI.sub("", message), None
        return True


def json_logs() -> bool:
    """Whether the last ``configure_logging`` chose JSON lines."""
    return bool(_state["json"])


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger once, for the whole process.

    ``fmt`` is ``auto`` (console on a TTY, JSON lines otherwise), ``console`` or ``json``.
    Logs go to stderr so that stdout stays clean for command output (``--json``).
    """
    out = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    use_console = fmt == "console" or (fmt == "auto" and tty)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    lvl = _LEVELS.get(level.lower(), logging.INFO)
    _state.update(json=not use_console, level=lvl)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # One write per event (PrintLogger writes the newline separately, and a library
        # record written in between would split a JSON line in two).
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib: their records are rendered like ours.
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    handler.addFilter(LoadReportFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record, not a raw line
    quiet_progress_bars()


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
