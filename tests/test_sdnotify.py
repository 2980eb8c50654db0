"""The sd_notify client and the progress-gated watchdog, against a real datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from repd.adapters.sdnotify import Notifier, WatchdogGate

# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SUN_PATH = 107


class Receiver:
    """The service manager's end: a bound AF_UNIX datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        out: list[bytes] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    short_dir: str | None = None
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        # A long pytest basetemp would overflow sun_path; the socket test is about the
        # protocol, not the folder, so fall back to a short one.
        short_dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
        path = Path(short_dir) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        if short_dir is not None:
            Path(short_dir).rmdir()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- Notifier ---------------------------------------------------------------------------


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    n = Notifier(environ={"WATCHDOG_USEC": "60000000"})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_each_message_arrives_exactly(receiver: Receiver) -> None:
    n = Notifier(environ=receiver.env())
    assert n.enabled
    assert n.ready()
    assert receiver.recv() == b"READY=1"
    assert n.ready(status="serving 2 roots")
    assert receiver.recv() == b"READY=1\nSTATUS=serving 2 roots"
    assert n.status("indexing 3/10 files")
    assert receiver.recv() == b"STATUS=indexing 3/10 files"
    assert n.stopping()
    assert receiver.recv() == b"STOPPING=1"
    assert n.stopping(status="draining queue")
    assert receiver.recv() == b"STOPPING=1\nSTATUS=draining queue"
    assert n.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"
    assert n.extend_timeout(90_000_000)
    assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=90000000"
    assert n.set_watchdog_timeout(600_000_000)
    assert receiver.recv() == b"WATCHDOG_USEC=600000000"
    n.close()


def test_status_cannot_smuggle_extra_fields(receiver: Receiver) -> None:
    n = Notifier(environ=receiver.env())
    n.status("line one\nREADY=1\r\nline three")
    assert receiver.recv() == b"STATUS=line one READY=1 line three"


def test_reloading_carries_the_monotonic_timestamp(receiver: Receiver) -> None:
    n = Notifier(environ=receiver.env(), monotonic_usec=lambda: 123_456_789)
    assert n.reloading()
    assert receiver.recv() == b"RELOADING=1\nMONOTONIC_USEC=123456789"


def test_reloading_uses_clock_monotonic_by_default(receiver: Receiver) -> None:
    n = Notifier(environ=receiver.env())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receiver.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_address() -> None:
    name = f"repd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        sock.settimeout(2)
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_unsupported_address_disables_notifications() -> None:
    assert not Notifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier(environ={"NOTIFY_SOCKET": "relative/path"}).enabled
    assert not Notifier(environ={"NOTIFY_SOCKET": "@"}).enabled


def test_send_failure_is_reported_not_raised_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "later"
    n = Notifier(environ={"NOTIFY_SOCKET": str(path)})
    assert n.enabled
    assert n.ready() is False  # nobody listening yet
    assert n.watchdog() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        assert n.watchdog() is True
        sock.settimeout(2)
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_extend_and_watchdog_timeout_reject_nonpositive(receiver: Receiver) -> None:
    n = Notifier(environ=receiver.env())
    with pytest.raises(ValueError):
        n.extend_timeout(0)
    with pytest.raises(ValueError):
        n.set_watchdog_timeout(-1)
    assert receiver.pending() == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "sixty"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(
    receiver: Receiver, extra: dict[str, str], expected: float | None
) -> None:
    assert Notifier(environ=receiver.env(**extra)).watchdog_interval() == expected


def test_watchdog_interval_needs_a_notify_socket() -> None:
    assert Notifier(environ={"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None


# --- WatchdogGate -----------------------------------------------------------------------


def gate_for(receiver: Receiver, clock: FakeClock, interval: float | None = 60.0) -> WatchdogGate:
    return WatchdogGate(Notifier(environ=receiver.env()), interval, clock=clock)


def test_pings_while_every_stage_beats(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock)
    gate.register("watcher")
    gate.register("embedder")
    for _ in range(5):
        clock.advance(20)
        gate.beat("watcher")
        gate.beat("embedder")
        assert gate.tick() is True
        assert receiver.recv() == b"WATCHDOG=1"


def test_a_stuck_stage_stops_the_pings_until_it_beats_again(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock)
    gate.register("watcher")
    gate.register("embedder")
    clock.advance(30)
    gate.beat("watcher")
    assert gate.tick() is True  # embedder silent 30 s: still within the interval
    assert receiver.recv() == b"WATCHDOG=1"
    clock.advance(30)
    gate.beat("watcher")  # the watcher idles happily; the embedder is inside a hung call
    assert gate.stale() == ["embedder"]
    assert gate.tick() is False
    clock.advance(30)
    gate.beat("watcher")
    assert gate.tick() is False
    assert receiver.pending() == []
    assert gate.ages() == {"watcher": 0.0, "embedder": 90.0}
    gate.beat("embedder")  # the call returned after all
    assert gate.tick() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_silence_of_exactly_the_interval_is_stale(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock, interval=10.0)
    gate.register("embedder")
    clock.advance(9.999)
    assert gate.stale() == []
    clock.advance(0.001)
    assert gate.stale() == ["embedder"]
    assert gate.tick() is False
    assert receiver.pending() == []


def test_no_registered_stage_means_alive(receiver: Receiver) -> None:
    gate = gate_for(receiver, FakeClock())
    assert gate.tick() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_beats_from_unregistered_stages_are_ignored(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock)
    gate.register("embedder")
    gate.unregister("embedder")
    gate.beat("embedder")  # a late beat during shutdown must not put it back
    gate.beat("typo")
    assert gate.ages() == {}
    clock.advance(1000)
    assert gate.tick() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_unregistered_stage_no_longer_blocks_pings(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock)
    gate.register("scanner")
    gate.register("embedder")
    clock.advance(100)
    gate.beat("embedder")
    assert gate.tick() is False
    gate.unregister("scanner")  # the start-up scan finished
    assert gate.tick() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_without_watchdog_the_gate_only_keeps_ages(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock, interval=None)
    gate.register("embedder")
    clock.advance(5)
    assert gate.ages() == {"embedder": 5.0}
    assert gate.stale() == []
    assert gate.tick() is False
    gate.start()
    gate.stop()
    assert receiver.pending() == []
    assert gate.interval is None
    assert gate.idle_wait == 15.0


def test_idle_wait_leaves_room_within_the_interval(receiver: Receiver) -> None:
    gate = gate_for(receiver, FakeClock(), interval=60.0)
    assert gate.idle_wait == 15.0
    assert gate.interval == 60.0


def test_nonpositive_interval_is_rejected(receiver: Receiver) -> None:
    with pytest.raises(ValueError):
        gate_for(receiver, FakeClock(), interval=0.0)


def test_grace_raises_the_timeout_for_one_long_call(receiver: Receiver) -> None:
    clock = FakeClock()
    gate = gate_for(receiver, clock, interval=60.0)
    gate.register("writer")
    gate.register("embedder")
    with gate.grace(900):
        assert receiver.recv() == b"WATCHDOG_USEC=900000000"
        clock.advance(300)  # e.g. an HNSW build holding the GIL: every stage froze
        assert gate.tick() is False
        assert receiver.pending() == []
    assert receiver.recv() == b"WATCHDOG_USEC=60000000"
    assert gate.ages() == {"writer": 0.0, "embedder": 0.0}
    assert gate.tick() is True
    assert receiver.recv() == b"WATCHDOG=1"


def test_grace_restores_the_timeout_when_the_call_fails(receiver: Receiver) -> None:
    gate = gate_for(receiver, FakeClock(), interval=60.0)
    with pytest.raises(RuntimeError), gate.grace(120):
        raise RuntimeError("optimize failed")
    assert receiver.pending() == [b"WATCHDOG_USEC=120000000", b"WATCHDOG_USEC=60000000"]


def test_thread_pings_at_half_the_interval_and_stops(receiver: Receiver) -> None:
    gate = WatchdogGate(Notifier(environ=receiver.env()), 0.4)
    gate.register("indexer")
    stop = threading.Event()

    def indexer() -> None:
        while not stop.wait(0.02):
            gate.beat("indexer")

    worker = threading.Thread(target=indexer)
    worker.start()
    gate.start()
    try:
        pings = [receiver.recv(timeout=2.0) for _ in range(3)]  # at 0 s, 0.2 s, 0.4 s
    finally:
        gate.stop()
        stop.set()
        worker.join()
    assert pings == [b"WATCHDOG=1"] * 3
    receiver.pending()  # drop a ping that may have raced with stop()
    time.sleep(0.5)
    assert receiver.pending() == []


def test_thread_stops_pinging_when_a_stage_hangs(receiver: Receiver) -> None:
    gate = WatchdogGate(Notifier(environ=receiver.env()), 0.3)
    gate.register("embedder")  # never beats again: a model call that never returns
    gate.start()
    try:
        assert receiver.recv(timeout=2.0) == b"WATCHDOG=1"  # fresh at registration
        time.sleep(0.9)  # three tick periods; at most one more while still fresh
        late = receiver.pending()
    finally:
        gate.stop()
    assert late in ([], [b"WATCHDOG=1"])
    assert gate.stale() == ["embedder"]


class _FlakyNotifier(Notifier):
    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(environ=env)
        self.failures = 1

    def watchdog(self) -> bool:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("bug")
        return super().watchdog()


def test_thread_survives_a_failing_tick(receiver: Receiver) -> None:
    gate = WatchdogGate(_FlakyNotifier(receiver.env()), 0.2)
    gate.start()
    try:
        assert receiver.recv(timeout=2.0) == b"WATCHDOG=1"
    finally:
        gate.stop()
