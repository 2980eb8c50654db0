"""Fault points for the reliability tests.

``REPD_CRASH_AT=NAME:N`` kills the process with SIGKILL the Nth time execution passes
point NAME; ``REPD_FAULT=NAME:N`` raises :class:`InjectedFault` the first N times it
passes fault point NAME (N=0: every time). Unset, each costs one comparison."""

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


class InjectedFault(RuntimeError):  # noqa: N818 (named for the tests that read it)
    """The error a fault point raises when the environment asks for it."""


_fault_spec = os.environ.get("REPD_FAULT", "")
_fault_name, _, _fault_count = _fault_spec.partition(":")
_fault_left = int(_fault_count) if _fault_count.isdigit() else 1
_fault_always = _fault_count == "0"


def fault(name: str) -> None:
    """Raise here, as a bug would, when the environment asks for it."""
    global _fault_left
    if not _fault_spec or name != _fault_name:
        return
    if _fault_always:
        raise InjectedFault(f"injected fault at {name}")
    if _fault_left > 0:
        _fault_left -= 1
        raise InjectedFault(f"injected fault at {name}")
