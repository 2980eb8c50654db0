"""Supervision of the daemon's threads: a crash is logged once, counted, shown, and repaired.

Each component (the indexer, the watcher, the API) registers how to tell it is alive and
how to restart it. :meth:`Supervisor.check`, called from the main thread twice a second,
restarts a dead component (the restart also queues a rescan of what it covered) up to
``max_restarts`` times in ``window_s``; past that the component stays dead, the daemon
reports ``degraded``, and the systemd watchdog gate stops pinging so that systemd restarts
the whole service. An uncaught exception in any thread reaches :meth:`excepthook`, which
records its traceback for the component that owns the thread.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from repd.log import get_logger

log = get_logger("supervisor")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class ComponentHealth:
    """One component as status shows it."""

    name: str
    state: str  # "ok", "restarting" or "dead"
    restarts: int
    last_error: str | None


@dataclass
class _Component:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]
    thread_prefixes: tuple[str, ...]
    restarts: deque[float] = field(default_factory=deque)
    total_restarts: int = 0
    dead: bool = False
    last_error: str | None = None
    pending_trace: str | None = None


class Supervisor:
    """Watches registered components; see the module docstring."""

    def __init__(self, on_dead: Callable[[str, str], None] = lambda name, why: None, *,
                 max_restarts: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_dead = on_dead
        self._max = max_restarts
        self._window = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}
        self.unowned_errors = 0

    def add(self, name: str, alive: Callable[[], bool], restart: Callable[[], None],
            thread_prefixes: tuple[str, ...] = ()) -> None:
        """Supervise ``name``; threads whose name starts with a prefix belong to it."""
        with self._lock:
            self._components[name] = _Component(name, alive, restart, thread_prefixes)

    def excepthook(self, args: threading.ExceptHookArgs) -> None:
        """``threading.excepthook``: log the traceback once and pin it on its component."""
        thread_name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(
            args.exc_type, args.exc_value, _tb(args.exc_traceback)))
        reason = f"{args.exc_type.__name__}: {args.exc_value}"[:400]
        owner = self._owner(thread_name)
        log.error("thread_crashed", thread=thread_name, component=owner, error=reason,
                  traceback=text)
        with self._lock:
            comp = self._components.get(owner or "")
            if comp is None:
                self.unowned_errors += 1
                return
            comp.last_error = reason
            comp.pending_trace = text

    def _owner(self, thread_name: str) -> str | None:
        with self._lock:
            for comp in self._components.values():
                if any(thread_name.startswith(p) for p in comp.thread_prefixes):
                    return comp.name
        return None

    def check(self) -> None:
        """Restart what died (within the budget); mark dead what cannot be restarted."""
        with self._lock:
            comps = list(self._components.values())
        for comp in comps:
            if comp.dead:
                continue
            try:
                alive = comp.alive()
            except Exception as exc:  # a broken probe counts as a dead component
                alive = False
                comp.last_error = f"health check failed: {type(exc).__name__}: {exc}"
            if alive:
                continue
            now = self._clock()
            while comp.restarts and comp.restarts[0] < now - self._window:
                comp.restarts.popleft()
            why = comp.last_error or "its thread stopped"
            comp.last_error = why
            if len(comp.restarts) >= self._max:
                comp.dead = True
                log.error("component_dead", component=comp.name, error=why,
                          restarts=comp.total_restarts)
                self._on_dead(comp.name, why)
                continue
            comp.restarts.append(now)
            comp.total_restarts += 1
            log.warning("component_restarting", component=comp.name, error=why,
                        restart=comp.total_restarts)
            try:
                comp.restart()
            except Exception as exc:
                comp.last_error = f"restart failed: {type(exc).__name__}: {exc}"[:400]
                log.exception("component_restart_failed", component=comp.name)

    def health(self) -> list[ComponentHealth]:
        """Every component, for status."""
        out = []
        with self._lock:
            comps = list(self._components.values())
        for comp in comps:
            if comp.dead:
                state = "dead"
            else:
                try:
                    state = "ok" if comp.alive() else "restarting"
                except Exception:
                    state = "restarting"
            out.append(ComponentHealth(comp.name, state, comp.total_restarts, comp.last_error))
        return out

    def dead(self) -> list[ComponentHealth]:
        """Components that could not be restarted."""
        return [c for c in self.health() if c.state == "dead"]


def _tb(tb: TracebackType | None) -> TracebackType | None:
    return tb
