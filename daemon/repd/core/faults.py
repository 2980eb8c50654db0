"""Crash points for the crash-safety tests: ``REPD_CRASH_AT=NAME:N`` kills the process
with SIGKILL the Nth time execution passes point NAME. Unset, it costs one dict lookup."""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("REPD_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_remaining = int(_count) if _count.isdigit() else 1


def crashpoint(name: str) -> None:
    """Die here, as ``kill -9`` would, when the environment asks for it."""
    global _remaining
    if not _spec or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
