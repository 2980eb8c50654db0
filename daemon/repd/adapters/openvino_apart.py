"""A model's first OpenVINO export, made in a child process (``python -m`` this module).

Exporting needs torch, transformers, optimum and sentence-transformers in memory, and a
process that imported them keeps them: a daemon whose first start exported MiniLM held
~880 MiB for its whole life, against ~410 MiB for every later start, which runs the
export with no torch at all (:mod:`repd.adapters.openvino_runtime`). So a long-lived
process has the export made, verified and given its runtime spec by a child, which
exits, and then loads it the torch-free way; so does every caller of ``Embedder.load``
by default, one-shot commands and the test suite included: the torch-to-OpenVINO
conversion has crashed in native code (SIGSEGV, rarely, not again on the same input),
and a crash in a child costs another child, not the caller. A child that ran and failed
is final (its words are the caller's error); only a child that could not be started at
all leaves the export to the caller's own process. An
int8 variant (``NAME+int8``) is made there too, from chunk texts sent on its stdin: NNCF
imports torch, and a daemon that made one in-process held ~510 MiB against ~230.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from repd.log import get_logger
from repd.process import child_env, die_with_parent, fatal_errors_to_stderr

log = get_logger("openvino_apart")

#: The child's output kept for a failure's message (its last lines).
_TAIL_CHARS = 2000
#: Children started for one export when each dies of a signal (see :func:`export_apart`).
CHILD_ATTEMPTS = 2
#: How :func:`export_apart`'s answer begins when no child could be started at all.
_NOT_STARTED = "cannot start "


def not_started(problem: str) -> bool:
    """Whether :func:`export_apart`'s ``problem`` is that no child could be started (so
    the export is the caller's to make), not a child's failure (final)."""
    return problem.startswith(_NOT_STARTED)


def export_apart(model: str, cache_dir: Path | None, precision: str,
                 calibration: Sequence[str] | None = None) -> str | None:
    """Export ``model`` for the CPU in a child process, as ``Embedder.load`` would with
    ``backend="openvino"``; None when it succeeded, else what it said last. A child
    killed by a signal is followed by another, up to ``CHILD_ATTEMPTS`` in all.

    ``calibration``: for an int8 variant (``NAME+int8``), the chunk texts it is made
    from, sent on the child's standard input (no file holding the user's text is left
    behind by a kill); the child makes the base's export and the variant (NNCF imports
    torch too).
    """
    # The child dies with this process (a daemon killed mid-export leaves no export
    # running on; the next start removes its half-made folder): started by the thread
    # that waits for it, so the parent-death signal cannot fire early.
    argv = [sys.executable, "-m", "repd.adapters.openvino_apart", model,
            "--precision", precision, "--parent", str(os.getpid())]
    if calibration is not None:
        argv.append("--calibration-stdin")
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    stdin = "" if calibration is None else json.dumps(list(calibration))
    problem = ""
    for attempt in range(1, CHILD_ATTEMPTS + 1):
        try:
            done = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                                  errors="replace", check=False, input=stdin)
        except OSError as exc:
            return f"{_NOT_STARTED}{sys.executable}: {exc}"
        if done.returncode == 0:
            return None
        said = (done.stderr.strip() or done.stdout.strip())[-_TAIL_CHARS:]
        problem = f"exit status {done.returncode}: {said or 'no output'}"
        if done.returncode > 0:
            return problem  # the child's own verdict (no such model, a mismatch): final
        # Killed by a signal: a crash in native code (the torch-to-OpenVINO conversion
        # has died of SIGSEGV, rarely and not again on the same input), or a kill. Another
        # child is cheap against the alternative, the same conversion in the caller's
        # own process, where such a crash would take a daemon down.
        log.warning("openvino_export_child_killed", signal=-done.returncode,
                    attempt=attempt, of=CHILD_ATTEMPTS, said=said[-300:])
    return problem


def main(argv: list[str] | None = None) -> int:
    """Load (so export) the model named on the command line; 1 with the reason on failure."""
    ap = argparse.ArgumentParser(prog="python -m repd.adapters.openvino_apart")
    ap.add_argument("model")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--parent", type=int, default=None,
                    help="die with this process (the daemon that waits for the export)")
    ap.add_argument("--calibration-stdin", action="store_true",
                    help="read a JSON list of chunk texts on standard input: what an int8 "
                    "variant (NAME+int8) is made from")
    args = ap.parse_args(argv)
    # A crash in native code prints every thread's stack: the parent quotes its tail.
    fatal_errors_to_stderr()
    if args.parent is not None:
        die_with_parent(args.parent)
    from repd.adapters.embedder import Embedder, EmbedderError

    texts: list[str] | None = None
    if args.calibration_stdin:
        texts = json.loads(sys.stdin.read())
    try:
        Embedder.load(args.model, device="cpu", backend="openvino", export_apart=False,
                      openvino_precision=args.precision, cache_dir=args.cache_dir,
                      calibration=None if texts is None else (lambda: texts or []))
    except EmbedderError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from repd.process import end_process

    end_process(main())  # without tearing torch and OpenVINO down (see repd.process)
