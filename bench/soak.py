"""Soak: a seeded random mix of file operations on a live ``repd run``, ``kill -9`` at random
moments, restarts, and at the end the daemon's store compared with a fresh ``repd index``.

    python bench/soak.py --seed 1 --kills 200 [--root DIR] [--keep]

Each round does some operations while the daemon is down (the next start must catch up by
its scan), starts the daemon, and ends it in one of these ways:

* ``early``: ``kill -9`` at a random moment of the start (model load, recovery, watch setup);
* ``scan``: ``kill -9`` just after READY, while the start-up reconcile scan runs;
* ``write``: a burst of operations, then ``kill -9`` after a random delay (settling,
  embedding or inside a write group), or the moment status shows it embedding or writing;
* ``step``: the daemon runs with ``REPD_CRASH_AT=STEP:N`` and kills itself with SIGKILL at
  the Nth pass of a write step (intent, upsert, delete, commit), in its start-up scan or
  in the live changes of a burst (``kill -9`` from outside if it never gets there);
* ``between``: a burst, wait until idle, check that live indexing still works (a probe file
  must become searchable), then ``kill -9`` between operations;
* ``term``: a burst, then a clean SIGTERM at a random moment (must exit 0 within 30 s).

Only ``kill -9`` rounds count towards ``--kills``. At the end the daemon is started once
more and must become idle (state idle, queue empty, a full scan done) and index a probe
file; it is stopped with SIGTERM; then the same folder is indexed from nothing into a new
data folder by ``repd index`` and the two stores are compared point by point (ids, vectors
to repd's cosine bar for the same vector, payload without ``mtime_ns``), and the two
manifests file by file (path, state, reason). Exit status: 0 when equal, 1 on any difference
(or any error the daemon logged, unless ``--allow-log-errors``), 3 when the daemon crashed
by itself, got stuck, answered status with an error or a ``degraded`` state, or did not stop
cleanly, 2 when the fresh index could not be built. ``--no-bad-names`` / ``--no-bad-
gitignore`` leave out a family of operations (to look past a known bug).

Everything lives under ``--root`` (a temp folder by default): ``tree/`` (the watched folder),
``home/`` (the soak daemon's XDG folders and ``daemon.log``), ``fresh/`` (the fresh index).
It is removed on success unless ``--keep``, and kept on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repd.adapters.openvino_backend import SAME_VECTORS_MIN_COSINE
from repd.api.client import ApiClient, ApiClientError

MODES = ("early", "scan", "write", "step", "between", "term")
MODE_WEIGHTS = (15, 15, 30, 15, 15, 10)  # term rounds do not count as kills
STOP_LIMIT_S = 30.0  # systemd's TimeoutStopSec in deploy/: a SIGTERM must end sooner
WRITE_STEPS = ("intent", "upsert", "delete", "commit")  # repd.core.faults crash points

WORDS = tuple("""
river stone light paper engine garden signal winter market forest copper violin harbor
planet lantern meadow circuit glacier orchard canyon rocket thunder marble falcon velvet
compass anchor bridge castle desert ember feather glacier horizon island jungle kettle
ladder mirror needle ocean pepper quartz ribbon saddle timber umbrella valley wagon yarn
zephyr backup rotate keys deploy cluster shard vector query index token budget retry
backoff latency socket kernel thread mutex schedule cache buffer stream parser compiler
syntax lambda closure monad tensor gradient matrix sparse dense cosine search ranking
recall precision harvest autumn spring summer solstice tide moon comet nebula quasar
""".split())
NAME_WORDS = ("notes", "draft", "todo", "ideas", "plan", "log", "report", "readme", "memo",
              "spec", "recipe", "journal", "paper", "list", "summary")
DIR_WORDS = ("docs", "src", "archive", "misc", "projects", "old", "inbox", "ref", "deep")
GOOD_IGNORE_LINES = ("*.log", "ignored/", "tmp-*", "!keep.log", "# a comment", "*.bak",
                     "scratch", "/top-only.md", "**/cache-*/", "")
BAD_IGNORE_LINES = ("[z-a]", "!", "trailing\\", "[", "***/x", "a[b-a]c/")


def gen_text(rng: random.Random, kind: str) -> str:
    """A small text drawn from WORDS, shaped as Markdown, Python or plain text."""
    def line() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(5, 13)))
    paras = ["\n".join(line() for _ in range(rng.randint(1, 3)))
             for _ in range(rng.randint(1, 4))]
    if kind == ".py":
        funcs = [f"def {rng.choice(WORDS)}_{i}():\n    \"\"\"{p}\"\"\"\n    return {i}\n"
                 for i, p in enumerate(paras)]
        return "\n\n".join(funcs)
    if kind == ".md":
        out = [f"# {line()}"]
        for p in paras:
            if rng.random() < 0.4:
                out.append(f"## {rng.choice(WORDS)} {rng.choice(WORDS)}")
            out.append(p)
        return "\n\n".join(out) + "\n"
    return "\n\n".join(paras) + "\n"


@dataclass
class Options:
    seed: int
    kills: int
    root: Path
    keep: bool
    ops_per_round: int
    max_round_s: float
    final_wait_s: float
    max_file_bytes: int
    max_files: int
    min_cosine: float
    allow_log_errors: bool
    bad_names: bool
    bad_gitignore: bool
    verbose: bool


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    op_errors: int = 0
    kills: int = 0
    stops: int = 0
    modes: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per mode


class Tree:
    """The watched folder and the random operations on it (bytes paths throughout, so names
    that are not valid UTF-8 are ordinary citizens)."""

    def __init__(self, root: Path, rng: random.Random, opts: Options, tally: Tally) -> None:
        self.root = root
        self.broot = os.fsencode(root)
        self.rng = rng
        self.opts = opts
        self.tally = tally
        self.counter = 0
        self.ops: dict[str, tuple[int, Callable[[], None]]] = {
            "create": (14, self.create), "create_dup": (3, self.create_dup),
            "rewrite": (6, self.rewrite), "append": (6, self.append),
            "insert": (5, self.insert), "atomic_save": (3, self.atomic_save),
            "truncate": (1, self.truncate), "touch": (2, self.touch),
            "rename": (5, self.rename), "move_file": (3, self.move_file),
            "move_dir": (2, self.move_dir), "delete": (6, self.delete),
            "delete_dir": (1, self.delete_dir), "copy": (3, self.copy),
            "mkdir": (2, self.mkdir), "binary": (2, self.binary), "huge": (2, self.huge),
            "empty": (1, self.empty), "ignored": (2, self.ignored),
            "gitignore": (2, self.gitignore), "gitignore_rm": (1, self.gitignore_rm),
            "swap_type": (1, self.swap_type),
        }

    # -- listing -------------------------------------------------------------------------

    def listing(self) -> tuple[list[bytes], list[bytes]]:
        """(files, folders below the root), sorted so that a seed replays the same way."""
        files: list[bytes] = []
        dirs: list[bytes] = []
        for top, dnames, fnames in os.walk(self.broot):
            dnames.sort()
            dirs.extend(os.path.join(top, d) for d in dnames)
            files.extend(os.path.join(top, f) for f in sorted(fnames))
        return files, dirs

    def texts(self) -> list[bytes]:
        return [f for f in self.listing()[0]
                if not f.endswith((b".bin", b".gitignore")) and self._size(f) <= 2048]

    @staticmethod
    def _size(path: bytes) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    def depth(self, d: bytes) -> int:
        return os.path.relpath(d, self.broot).count(b"/") + 1

    # -- names ---------------------------------------------------------------------------

    def new_name(self, ext: str) -> bytes:
        self.counter += 1
        rng = self.rng
        base = f"{rng.choice(NAME_WORDS)}-{self.counter}"
        r = rng.random()
        if self.opts.bad_names and r < 0.08:
            raw = rng.choice((b"caf\xe9 ", b"\xff", b"bad\x80\x81-", b"latin\xe0\xe8-"))
            return raw + base.encode() + ext.encode()
        if r < 0.18:
            base = f"{rng.choice(NAME_WORDS)} with spaces {self.counter}"
        elif r < 0.22:
            base = f"line\nbreak {self.counter}"
        elif r < 0.32:
            base = rng.choice(("café", "日本語", "naïve ünïcode", "emoji-🚀", "Ωmega")) + base
        return os.fsencode(base + ext)

    def pick_dir(self) -> bytes:
        dirs = [d for d in self.listing()[1] if self.depth(d) < 5]
        if not dirs or self.rng.random() < 0.25:
            return self.broot
        return self.rng.choice(dirs)

    def fresh_path(self, ext: str, folder: bytes | None = None) -> bytes:
        folder = self.pick_dir() if folder is None else folder
        while True:
            path = os.path.join(folder, self.new_name(ext))
            if not os.path.lexists(path):
                return path

    def pick_file(self, texts_only: bool = False) -> bytes | None:
        files = self.texts() if texts_only else self.listing()[0]
        return self.rng.choice(files) if files else None

    @staticmethod
    def write(path: bytes, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def text(self) -> tuple[str, bytes]:
        ext = self.rng.choice((".md", ".md", ".txt", ".py"))
        return ext, gen_text(self.rng, ext).encode()

    # -- operations ----------------------------------------------------------------------

    def create(self) -> None:
        ext, data = self.text()
        self.write(self.fresh_path(ext), data)

    def create_dup(self) -> None:
        src = self.pick_file(texts_only=True)
        if src is None:
            return self.create()
        with open(src, "rb") as fh:
            data = fh.read()
        self.write(self.fresh_path(os.path.splitext(src)[1].decode(errors="replace")), data)
        return None

    def rewrite(self) -> None:
        path = self.pick_file(texts_only=True)
        if path is None:
            return self.create()
        self.write(path, gen_text(self.rng, ".md").encode())
        return None

    def append(self) -> None:
        path = self.pick_file(texts_only=True)
        if path is None:
            return self.create()
        with open(path, "ab") as fh:
            fh.write(("\n" + gen_text(self.rng, ".txt")).encode())
        return None

    def insert(self) -> None:
        path = self.pick_file(texts_only=True)
        if path is None:
            return self.create()
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
        at = self.rng.randint(0, len(lines))
        lines[at:at] = [b"", gen_text(self.rng, ".txt").encode()]
        self.write(path, b"\n".join(lines))
        return None

    def atomic_save(self) -> None:
        # An editor's save: write a temp file beside it, then rename over the original.
        path = self.pick_file(texts_only=True)
        if path is None:
            return self.create()
        tmp = path + b".tmp~"
        self.write(tmp, gen_text(self.rng, ".md").encode())
        os.rename(tmp, path)
        return None

    def truncate(self) -> None:
        path = self.pick_file(texts_only=True)
        if path is not None:
            self.write(path, b"")

    def touch(self) -> None:
        path = self.pick_file()
        if path is not None:
            os.utime(path)

    def rename(self) -> None:
        path = self.pick_file()
        if path is not None:
            ext = os.path.splitext(path)[1].decode(errors="replace") or ".md"
            os.rename(path, self.fresh_path(ext, os.path.dirname(path)))

    def move_file(self) -> None:
        path = self.pick_file()
        if path is not None:
            ext = os.path.splitext(path)[1].decode(errors="replace") or ".md"
            os.rename(path, self.fresh_path(ext))

    def move_dir(self) -> None:
        dirs = self.listing()[1]
        if not dirs:
            return self.mkdir()
        src = self.rng.choice(dirs)
        targets = [d for d in [self.broot, *dirs]
                   if d != src and not d.startswith(src + b"/") and self.depth(d) < 4]
        dest = self.rng.choice(targets) if targets else self.broot
        name = os.fsencode(f"{self.rng.choice(DIR_WORDS)}-{self.counter + 1}")
        self.counter += 1
        if not os.path.lexists(os.path.join(dest, name)):
            os.rename(src, os.path.join(dest, name))
        return None

    def delete(self) -> None:
        path = self.pick_file()
        if path is not None:
            os.unlink(path)

    def delete_dir(self) -> None:
        dirs = self.listing()[1]
        if dirs:
            shutil.rmtree(self.rng.choice(dirs))

    def copy(self) -> None:
        path = self.pick_file()
        if path is not None:
            ext = os.path.splitext(path)[1].decode(errors="replace") or ".md"
            shutil.copyfile(path, self.fresh_path(ext))

    def mkdir(self) -> None:
        parent = self.pick_dir()
        self.counter += 1
        name = os.fsencode(f"{self.rng.choice(DIR_WORDS)}-{self.counter}")
        if self.rng.random() < 0.15:
            name = os.fsencode(f"{self.rng.choice(DIR_WORDS)} dir ü {self.counter}")
        os.mkdir(os.path.join(parent, name))
        for _ in range(self.rng.randint(0, 3)):
            ext, data = self.text()
            self.write(self.fresh_path(ext, os.path.join(parent, name)), data)

    def binary(self) -> None:
        data = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(16, 600)))
        ext = self.rng.choice((".bin", ".md", ".txt"))  # binary content under a text name too
        self.write(self.fresh_path(ext), b"\x00" + data)

    def huge(self) -> None:
        # Just over max_file_bytes: text, so it would index if the size check did not stop it.
        limit = self.opts.max_file_bytes
        words = []
        size = 0
        while size <= limit + 400:
            w = self.rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        data = " ".join(words).encode()[: limit + self.rng.randint(1, 400)]
        path = self.pick_file(texts_only=True) if self.rng.random() < 0.3 else None
        self.write(path or self.fresh_path(".md"), data)

    def empty(self) -> None:
        self.write(self.fresh_path(self.rng.choice((".md", ".txt"))), b"")

    def ignored(self) -> None:
        # Names that default rules or GOOD_IGNORE_LINES leave out (or put back in: keep.log).
        folder = self.pick_dir()
        name = self.rng.choice((b".env", b"x.swp", b"notes.log", b"keep.log", b"tmp-1.md",
                                b"a.bak", b"top-only.md", b"id_rsa", b"server.pem"))
        if self.rng.random() < 0.3:
            sub = os.path.join(folder, self.rng.choice(
                (b"node_modules", b"ignored", b"scratch", b"cache-x", b"__pycache__")))
            os.makedirs(sub, exist_ok=True)
            folder = sub
        self.write(os.path.join(folder, name), gen_text(self.rng, ".txt").encode())

    def gitignore(self) -> None:
        lines = self.rng.sample(GOOD_IGNORE_LINES, self.rng.randint(1, 4))
        if self.opts.bad_gitignore and self.rng.random() < 0.6:
            lines.insert(self.rng.randint(0, len(lines)), self.rng.choice(BAD_IGNORE_LINES))
        self.write(os.path.join(self.pick_dir(), b".gitignore"), "\n".join(lines).encode()
                   + (b"\n" if self.rng.random() < 0.7 else b""))

    def gitignore_rm(self) -> None:
        found = [f for f in self.listing()[0] if os.path.basename(f) == b".gitignore"]
        if found:
            os.unlink(self.rng.choice(found))

    def swap_type(self) -> None:
        # A file becomes a folder of the same name, or a folder a file.
        files, dirs = self.listing()
        if dirs and self.rng.random() < 0.5:
            d = self.rng.choice(dirs)
            shutil.rmtree(d)
            self.write(d, gen_text(self.rng, ".txt").encode())
        elif files:
            f = self.rng.choice(files)
            os.unlink(f)
            os.mkdir(f)
            ext, data = self.text()
            self.write(self.fresh_path(ext, f), data)

    # -- driving -------------------------------------------------------------------------

    def one(self) -> str:
        names = list(self.ops)
        weights = [self.ops[n][0] for n in names]
        n_files = len(self.listing()[0])
        if n_files > self.opts.max_files:  # keep the tree small: shrink until under the cap
            names, weights = ["delete", "delete_dir", "rewrite"], [8, 1, 2]
        name = self.rng.choices(names, weights)[0]
        try:
            self.ops[name][1]()
        except OSError as exc:
            self.tally.op_errors += 1
            if self.opts.verbose:
                print(f"    op {name} failed: {exc}", flush=True)
        self.tally.ops[name] += 1
        return name

    def burst(self, n: int, gap: float = 0.0) -> None:
        for _ in range(n):
            self.one()
            if gap:
                time.sleep(self.rng.uniform(0, gap))


class Daemon:
    """``repd run TREE`` with its own XDG folders, logging JSON lines to ``home/daemon.log``."""

    def __init__(self, home: Path, tree: Path, env: dict[str, str]) -> None:
        self.home = home
        self.tree = tree
        self.env = env
        self.log = home / "daemon.log"
        self.socket = home / "run" / "repd" / "repd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.crash_at: str | None = None
        self.log_offset = 0
        self.started = 0.0

    def start(self, crash_at: str | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.crash_at = crash_at
        env = {**self.env, "REPD_CRASH_AT": crash_at} if crash_at else self.env
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "repd.cli", "run", str(self.tree)],
                                         env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def log_since_start(self) -> str:
        with self.log.open("rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")

    def phase(self) -> str:
        text = self.log_since_start()
        if '"event": "ready"' in text:
            return "ready"
        if '"event": "model_loaded"' in text:
            return "loaded"
        return "loading"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died(self) -> str | None:
        """None while running (or killed at its crash point); else what it exited with."""
        if self.proc is None or self.proc.poll() is None:
            return None
        if self.crash_at and self.proc.returncode == -signal.SIGKILL:
            return None
        return f"daemon exited by itself with {self.proc.returncode}"

    def crashed_at_step(self) -> bool:
        return bool(self.crash_at and self.proc is not None
                    and self.proc.poll() == -signal.SIGKILL)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.died():
                raise Anomaly(self.died() or "", self)
            if self.phase() == "ready":
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise Anomaly(f"not ready within {timeout:.0f} s", self)

    @property
    def client(self) -> ApiClient:
        return ApiClient(self.socket, timeout=20)

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def check_status(self) -> dict[str, Any]:
        """One status call: the daemon answers and says nothing is broken."""
        try:
            st = self.status()
        except ApiClientError as exc:
            raise Anomaly(f"status failed: {exc}", self) from None
        if st["state"] not in ("starting", "scanning", "indexing", "idle"):
            raise Anomaly(f"state {st['state']!r}", self, st)
        return st

    def wait_stage(self, stages: tuple[str, ...], timeout: float) -> str:
        """Poll status until one of the queue's ``stages`` is busy; which one, or 'idle'."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.died():
                raise Anomaly(self.died() or "", self)
            try:
                q = self.status()["queue"]
            except ApiClientError:
                continue
            for stage in stages:
                if q.get(stage):
                    return stage
            time.sleep(0.01)
        return "idle (never busy)"

    def idle(self) -> bool:
        """One status call: idle with nothing queued (False when it does not answer)."""
        try:
            st = self.status()
        except ApiClientError:
            return False
        q = st["queue"]
        quiet = not (q["pending"] or q["scans"] or q["settling"] or q["planning"]
                     or q["embedding"] or q["writing"])
        return bool(st["state"] == "idle" and quiet and st["last_scan_at"])

    def wait_idle(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.died():
                raise Anomaly(self.died() or "", self)
            try:
                st = self.status()
            except ApiClientError:
                time.sleep(0.2)
                continue
            q = st["queue"]
            quiet = not (q["pending"] or q["scans"] or q["settling"] or q["planning"]
                         or q["embedding"] or q["writing"])
            if st["state"] == "idle" and quiet and st["last_scan_at"]:
                return st
            if st["state"] not in ("starting", "scanning", "indexing", "idle"):
                raise Anomaly(f"state {st['state']!r}", self, st)
            time.sleep(0.2)
        raise Anomaly(f"not idle within {timeout:.0f} s (silently stopped?)", self, st)

    def probe(self, tree: Tree, tag: str, timeout: float) -> float:
        """Write a new file and wait until a query finds it: live indexing still works."""
        folder = tree.broot + b"/probe"
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            os.remove(folder)  # a random operation may have turned it into a file
        os.makedirs(folder, exist_ok=True)
        text = f"probe {tag} " + " ".join(tree.rng.choices(WORDS, k=10))
        rel = f"probe/probe-{tag}.md"
        tree.write(folder + f"/probe-{tag}.md".encode(), text.encode() + b"\n")
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.died():
                raise Anomaly(self.died() or "", self)
            try:
                if self.client.query(text, k=1, path=rel)["hits"]:
                    return time.monotonic() - t0
            except ApiClientError:
                pass
            time.sleep(0.2)
        st = self.status() if self.alive() else None
        raise Anomaly(f"probe file {rel} not searchable after {timeout:.0f} s "
                      "(live indexing stopped?)", self, st)

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def term(self, timeout: float) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Anomaly(f"did not stop within {timeout:.0f} s of SIGTERM", self) from None


class Anomaly(Exception):  # noqa: N818 - a finding, not a bug in the soak
    """The daemon crashed by itself, got stuck, or did not stop cleanly."""

    def __init__(self, what: str, daemon: Daemon, status: dict[str, Any] | None = None) -> None:
        super().__init__(what)
        self.what = what
        tail = daemon.log_since_start()
        self.log_tail = tail[-6000:].partition("\n")[2] if len(tail) > 6000 else tail
        self.status = status


def daemon_env(home: Path, max_file_bytes: int) -> dict[str, str]:
    """An environment whose XDG folders all live under ``home`` (as tests.helpers.cli_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPD_")}
    env.update({
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(home / "run"), "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "REPD_DEVICE": "cpu", "REPD_LOG_FORMAT": "json",
        "REPD_MAX_FILE_BYTES": str(max_file_bytes), "TQDM_DISABLE": "1",
    })
    return env


# -- comparison ---------------------------------------------------------------------------

Snapshot = dict[str, tuple[np.ndarray, dict[str, Any]]]


def snapshot(data_dir: Path) -> Snapshot:
    """Every point of the active generation, opened read-only with repd's own Engine
    (as tests.helpers.snapshot): id -> (vector, payload without mtime_ns)."""
    from repd.engine import Engine
    from repd.settings import Settings

    eng = Engine(Settings(store={"path": data_dir}, device="cpu"), writer=False)  # type: ignore[arg-type]
    try:
        if eng.generation is None:
            return {}
        store = eng.store
        out: Snapshot = {}
        for rec in store.retrieve(list(store.iter_ids()), with_vectors=True):
            payload = {k: v for k, v in rec.payload.items() if k != "mtime_ns"}
            out[rec.id] = (np.asarray(rec.vector, dtype=np.float32), payload)
        return out
    finally:
        eng.close()


def _text(value: Any) -> Any:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def manifest(data_dir: Path) -> tuple[dict[tuple[Any, Any], tuple[Any, Any]], int]:
    """(file rows (root, path) -> (state, reason), open intents) of a stopped index."""
    db = data_dir / "manifest.sqlite"
    if not db.exists():
        return {}, 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.text_factory = bytes
    try:
        rows = {(_text(r[0]), _text(r[1])): (_text(r[2]), _text(r[3]))
                for r in con.execute("SELECT root, path, state, reason FROM files")}
        intents = int(con.execute("SELECT COUNT(*) FROM intents").fetchone()[0])
    finally:
        con.close()
    return rows, intents


@dataclass
class Diff:
    missing: list[str] = field(default_factory=list)  # in fresh, not in soak
    extra: list[str] = field(default_factory=list)  # in soak, not in fresh
    stale: list[str] = field(default_factory=list)  # same id, other payload or vector
    rows: list[str] = field(default_factory=list)  # manifest file rows that differ
    open_intents: int = 0

    @property
    def total(self) -> int:
        return (len(self.missing) + len(self.extra) + len(self.stale) + len(self.rows)
                + self.open_intents)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))


def compare(soak: Snapshot, fresh: Snapshot, soak_rows: dict[Any, Any],
            fresh_rows: dict[Any, Any], min_cosine: float) -> Diff:
    def where(snap: Snapshot, pid: str) -> str:
        p = snap[pid][1]
        return f"{p.get('path')!r}#{p.get('ordinal')}"
    d = Diff()
    d.missing = sorted(where(fresh, i) for i in set(fresh) - set(soak))
    d.extra = sorted(where(soak, i) for i in set(soak) - set(fresh))
    for pid in sorted(set(soak) & set(fresh)):
        (va, pa), (vb, pb) = soak[pid], fresh[pid]
        if pa != pb:
            keys = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
            d.stale.append(f"{where(soak, pid)} payload differs in {keys}")
        elif va.shape != vb.shape or not _cosine(va, vb) >= min_cosine:
            # The product's bar for "the same vector" (bf16 moves a chunk's vector by
            # ~5e-4 per component with its batch company), not bit equality.
            cos = _cosine(va, vb) if va.shape == vb.shape else float("nan")
            d.stale.append(f"{where(soak, pid)} vector differs: cosine {cos:.6f}")
    for key in sorted(set(soak_rows) | set(fresh_rows), key=repr):
        a, b = soak_rows.get(key), fresh_rows.get(key)
        if a != b:
            d.rows.append(f"{key[1]!r}: soak {a} fresh {b}")
    return d


# -- the soak -----------------------------------------------------------------------------


class Soak:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.tally = Tally()
        self.tree_dir = opts.root / "tree"
        self.home = opts.root / "home"
        self.tree_dir.mkdir(parents=True, exist_ok=True)
        self.tree = Tree(self.tree_dir, self.rng, opts, self.tally)
        self.daemon = Daemon(self.home, self.tree_dir, daemon_env(self.home, opts.max_file_bytes))
        self.ready_est = 6.0  # seconds from start to READY, learnt as rounds go
        self.final = False
        self.mode = ""
        self.t0 = time.monotonic()

    def seed_tree(self) -> None:
        for _ in range(30):
            self.tree.create()
        for _ in range(3):
            self.tree.mkdir()

    def learn_ready(self, seconds: float) -> None:
        self.ready_est = 0.7 * self.ready_est + 0.3 * seconds

    def round(self, n: int) -> str:
        """One start of the daemon, ended as its mode says; returns the progress detail."""
        rng, tree, d, opts = self.rng, self.tree, self.daemon, self.opts
        tree.burst(rng.randint(0, opts.ops_per_round))  # while the daemon is down
        mode = self.mode = rng.choices(MODES, MODE_WEIGHTS)[0]
        self.tally.modes[mode] += 1
        if mode == "step":
            return self.step_round()
        d.start()
        if mode == "early":
            at = rng.uniform(0.0, self.ready_est * 1.1)
            tree.burst(rng.randint(0, 3), gap=0.2)
            time.sleep(max(0.0, at - (time.monotonic() - d.started)))
            phase = d.phase()
            if d.died():
                raise Anomaly(d.died() or "", d)
            d.kill9()
            return f"kill  {mode:7} at {at:4.1f}s ({phase})"
        self.learn_ready(d.wait_ready(opts.max_round_s))
        d.check_status()
        if mode == "scan":
            delay = rng.uniform(0.0, 0.8)
            time.sleep(delay)
            d.kill9()
            return f"kill  {mode:7} +{delay:.2f}s after ready"
        k = rng.randint(1, opts.ops_per_round)
        tree.burst(k, gap=0.05)
        if mode == "write":
            if rng.random() < 0.5:
                # Watch the pipeline's stages and kill once it embeds or writes.
                stage = d.wait_stage(("embedding", "writing"), 8.0)
                time.sleep(rng.uniform(0.0, 0.05))
                d.kill9()
                return f"kill  {mode:7} while {stage} after {k} ops"
            delay = rng.uniform(0.0, 2.5)
            time.sleep(delay)
            d.kill9()
            return f"kill  {mode:7} +{delay:.2f}s after {k} ops"
        if mode == "term":
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
            t_term = time.monotonic()
            code = d.term(STOP_LIMIT_S + 15)
            took = time.monotonic() - t_term
            if code != 0 or took > STOP_LIMIT_S:
                raise Anomaly(f"SIGTERM {delay:.2f}s after {k} ops: exit status {code} "
                              f"after {took:.1f}s", d)
            return f"stop  {mode:7} +{delay:.2f}s after {k} ops (exit 0 in {took:.1f}s)"
        # between: idle, live indexing works, then a kill between operations
        d.wait_idle(opts.max_round_s)
        took = d.probe(tree, str(n), opts.max_round_s)
        tree.burst(rng.randint(0, 2))
        d.kill9()
        return f"kill  {mode:7} after idle, probe searchable in {took:.1f}s"

    def step_round(self) -> str:
        rng, tree, d, opts = self.rng, self.tree, self.daemon, self.opts
        point = f"{rng.choice(WRITE_STEPS)}:{rng.choices((1, 2), (3, 1))[0]}"
        d.start(crash_at=point)
        deadline = time.monotonic() + opts.max_round_s
        while not d.crashed_at_step() and d.phase() != "ready":
            if d.died():
                raise Anomaly(d.died() or "", d)
            if time.monotonic() > deadline:
                raise Anomaly(f"not ready within {opts.max_round_s:.0f} s", d)
            time.sleep(0.05)
        where = "in the start-up scan"
        if not d.crashed_at_step():
            self.learn_ready(time.monotonic() - d.started)
            where = "on live changes"
            tree.burst(rng.randint(1, opts.ops_per_round), gap=0.05)
            # Until it kills itself, or goes idle without passing the step that often.
            t_burst = time.monotonic()
            while not d.crashed_at_step() and time.monotonic() - t_burst < 15.0:
                if d.died():
                    raise Anomaly(d.died() or "", d)
                time.sleep(0.1)
                if time.monotonic() - t_burst > 1.0 and not d.crashed_at_step() and d.idle():
                    break
            if not d.crashed_at_step():
                where = "not reached: kill -9 from outside"
        d.kill9()
        return f"kill  step    at {point:9} {where}"

    def run(self) -> int:
        opts = self.opts
        self.seed_tree()
        print(f"soak: seed={opts.seed} kills={opts.kills} root={opts.root} "
              f"max_file_bytes={opts.max_file_bytes} bad_names={opts.bad_names} "
              f"bad_gitignore={opts.bad_gitignore}", flush=True)
        n = 0
        try:
            while self.tally.kills < opts.kills:
                n += 1
                t = time.monotonic()
                detail = self.round(n)
                secs = self.tally.seconds
                secs[self.mode] = secs.get(self.mode, 0.0) + time.monotonic() - t
                if detail.startswith("kill"):
                    self.tally.kills += 1
                else:
                    self.tally.stops += 1
                files = len(self.tree.listing()[0])
                print(f"[{self.tally.kills:4}/{opts.kills}] round {n:4} {detail:48} "
                      f"files={files:4} {time.monotonic() - t:5.1f}s "
                      f"elapsed={time.monotonic() - self.t0:6.0f}s", flush=True)
            return self.finish(n)
        except Anomaly as exc:
            return self.report_anomaly(exc, n)
        finally:
            if self.daemon.alive():
                self.daemon.kill9()

    def report_anomaly(self, exc: Anomaly, n: int) -> int:
        where = "the final start" if n > 0 and self.final else f"round {n}"
        print(f"\nANOMALY in {where}: {exc.what}", flush=True)
        if exc.status is not None:
            print("status: " + json.dumps(exc.status, indent=1, default=str))
        print("daemon log (this start, tail):\n" + exc.log_tail)
        self.summary(n, "ANOMALY", None)
        return 3

    def finish(self, n: int) -> int:
        d, opts = self.daemon, self.opts
        self.final = True
        t = time.monotonic()
        d.start()
        self.learn_ready(d.wait_ready(opts.final_wait_s))
        d.wait_idle(opts.final_wait_s)
        took = d.probe(self.tree, "final", opts.max_round_s)
        st = d.wait_idle(opts.final_wait_s)
        code = d.term(STOP_LIMIT_S + 15)
        if code != 0:
            raise Anomaly(f"final SIGTERM: exit status {code}", d)
        print(f"final: idle, probe searchable in {took:.1f}s, {st['totals']['files']} files, "
              f"{st['totals']['chunks']} chunks, stopped cleanly "
              f"({time.monotonic() - t:.1f}s)", flush=True)
        fresh_home = opts.root / "fresh"
        shutil.rmtree(fresh_home, ignore_errors=True)
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "repd.cli", "index", str(self.tree_dir),
                               "--json"], env=daemon_env(fresh_home, opts.max_file_bytes),
                              capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            print(f"fresh `repd index` exited {proc.returncode}:\n{proc.stderr[-4000:]}")
            self.summary(n, "NO-FRESH-INDEX", None)
            return 2
        print(f"fresh: `repd index` in {time.monotonic() - t:.1f}s", flush=True)
        soak_data, fresh_data = self.home / "data" / "repd", fresh_home / "data" / "repd"
        soak_rows, intents = manifest(soak_data)
        fresh_rows, _ = manifest(fresh_data)
        diff = compare(snapshot(soak_data), snapshot(fresh_data), soak_rows, fresh_rows,
                       opts.min_cosine)
        diff.open_intents = intents
        for label, items in (("missing", diff.missing), ("extra", diff.extra),
                             ("stale", diff.stale), ("manifest rows differing", diff.rows)):
            print(f"{label}: {len(items)}")
            for item in items[:8]:
                print(f"    {item}")
        print(f"open intents after a clean stop: {intents}")
        errors = {k: v for k, v in self.log_events().items() if not k.startswith("warning:")}
        print(f"daemon log errors: {sum(errors.values())}"
              + (" (allowed by --allow-log-errors)" if errors and opts.allow_log_errors else ""))
        ok = diff.total == 0 and (not errors or opts.allow_log_errors)
        self.summary(n, "PASS" if ok else "FAIL", diff)
        return 0 if ok else 1

    def summary(self, n: int, result: str, diff: Diff | None) -> None:
        t = self.tally
        counts = (f"missing={len(diff.missing)} extra={len(diff.extra)} stale={len(diff.stale)} "
                  f"rows={len(diff.rows)} intents={diff.open_intents}" if diff else "")
        events = self.log_events()
        files = self.tree.listing()[0]
        odd: Counter[str] = Counter()
        for f in files:
            name = os.path.basename(f)
            try:
                text = name.decode()
            except UnicodeDecodeError:
                odd["not UTF-8"] += 1
                continue
            odd["newline"] += "\n" in text
            odd["space"] += " " in text
            odd["non-ASCII"] += not text.isascii()
            odd[".gitignore"] += text == ".gitignore"
        print(f"tree: {len(files)} files; names: {dict(odd)}")
        print(f"ops by kind: {dict(sorted(t.ops.items()))} (failed ops: {t.op_errors})")
        print("rounds by mode: " + ", ".join(
            f"{m} {c} (mean {t.seconds[m] / c:.1f}s)" for m, c in sorted(t.modes.items())))
        if n:
            print(f"mean round: {sum(t.seconds.values()) / n:.1f}s")
        print(f"daemon log error/warning events: {events or 'none'}")
        print(f"kills that left a write to recover: "
              f"{events.get('warning:recovered_after_crash', 0)}")
        print(f"SOAK {result}: seed={self.opts.seed} kills={t.kills} stops={t.stops} rounds={n} "
              f"ops={sum(t.ops.values())} elapsed={time.monotonic() - self.t0:.0f}s {counts}",
              flush=True)

    def log_events(self) -> dict[str, int]:
        found: Counter[str] = Counter()
        if not self.daemon.log.exists():
            return {}
        with self.daemon.log.open("rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    # Plain output (a traceback on stderr): count its exception lines.
                    line = raw.decode(errors="replace").rstrip()
                    if line and not line[0].isspace() and not line.startswith("Traceback"):
                        found[f"stderr:{line[:90]}"] += 1
                    continue
                if isinstance(rec, dict) and rec.get("level") in ("error", "warning",
                                                                   "critical"):
                    found[f"{rec.get('level')}:{rec.get('event')}"] += 1
        return dict(found.most_common())


def parse(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kills", type=int, default=20, help="kill -9 rounds to run")
    ap.add_argument("--root", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder on success too")
    ap.add_argument("--ops-per-round", type=int, default=10)
    ap.add_argument("--max-round-s", type=float, default=120.0,
                    help="bound on waiting for READY, idle or a probe inside a round")
    ap.add_argument("--final-wait-s", type=float, default=300.0,
                    help="bound on the final start becoming idle")
    ap.add_argument("--max-file-bytes", type=int, default=4096,
                    help="REPD_MAX_FILE_BYTES for both indexes (small: huge files are cheap)")
    ap.add_argument("--max-files", type=int, default=150,
                    help="above this many files, operations only shrink the tree")
    ap.add_argument("--min-cosine", type=float, default=SAME_VECTORS_MIN_COSINE,
                    help="least cosine between a chunk's vector in the soaked and the fresh "
                         "index (default: repd's bar for the same vector, %(default)s)")
    ap.add_argument("--allow-log-errors", action="store_true",
                    help="pass even if the daemon logged errors (by default any fails)")
    ap.add_argument("--no-bad-names", dest="bad_names", action="store_false",
                    help="no file names that are not valid UTF-8")
    ap.add_argument("--no-bad-gitignore", dest="bad_gitignore", action="store_false",
                    help="no invalid .gitignore lines")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    root = a.root or Path(tempfile.mkdtemp(prefix="repd-soak-"))
    return Options(a.seed, a.kills, root.absolute(), a.keep, a.ops_per_round, a.max_round_s,
                   a.final_wait_s, a.max_file_bytes, a.max_files, a.min_cosine,
                   a.allow_log_errors, a.bad_names, a.bad_gitignore, a.verbose)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    opts = parse(argv)
    if opts.root.exists() and any(opts.root.iterdir()):
        print(f"--root {opts.root} is not empty", file=sys.stderr)
        return 2
    code = Soak(opts).run()
    if code == 0 and not opts.keep:
        shutil.rmtree(opts.root, ignore_errors=True)
    elif code != 0:
        print(f"kept for inspection: {opts.root}")
    return code


if __name__ == "__main__":
    sys.exit(main())
