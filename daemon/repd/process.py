"""How a repd process ends (at once once its work is done, loudly when native code
crashes), the environment of the repd processes it starts, and whether a process lives."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
from pathlib import Path
from typing import NoReturn


def child_env() -> dict[str, str]:
    """This process's environment for a child running ``python -m repd...``: the folder
    this very repd was imported from comes first on ``PYTHONPATH``, however this process
    found it (an install, a checkout on ``PYTHONPATH``, a test's path)."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists, of any user (EPERM means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent: int) -> None:
    """Be killed (SIGKILL) when the process ``parent``, which started this one, dies.

    For the daemon's helpers (a store process, a model's first OpenVINO export): one
    left running after a ``kill -9`` of the daemon would hold a shard's lock that the
    restarted daemon needs at once, or spend minutes of CPU on an export nobody waits
    for beside the one the restarted daemon starts. Linux only (``PR_SET_PDEATHSIG``;
    it fires when the *thread* that started this process ends, so start it from a
    thread that outlives it); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def end_process(code: int) -> NoReturn:
    """End the process at once, skipping the interpreter's finalization.

    Called when everything that must be closed is closed (store, socket, watcher) or was
    abandoned on purpose. Finalization would then only free memory the kernel frees
    anyway, and it is dear and fragile: the final garbage collections over torch's,
    transformers' and OpenVINO's objects and torch's operator deregistration cost about 2
    CPU-seconds, ten times a daemon's stop (on a busy machine tens of seconds of wall time,
    enough to outlast systemd's TimeoutStopSec=30 and be killed), and tearing those
    libraries down while their native threads live can crash a process whose work
    succeeded (a one-shot ``repd index`` died of SIGSEGV once in CI, with no trace of
    where). Of the exit hooks skipped, only logging's and the standard streams' flushes
    matter: they are done here.
    """
    # Only where logging is in use: importing it costs `repd query` ~7 ms.
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed or broken stream has nothing left to save.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def fatal_errors_to_stderr() -> None:
    """A fatal error (a crash in native code) prints every thread's Python stack on stderr.

    Without it a segmentation fault in the model runtime ends a command with nothing but
    its exit status. Falls back to no handler when there is no usable stderr.
    """
    stream = sys.__stderr__
    try:
        if stream is not None:
            faulthandler.enable(file=stream, all_threads=True)
            return
    except (OSError, ValueError, AttributeError):  # a detached process: no stderr to write to
        pass
    faulthandler.disable()
