"""Run a command under the seccomp part of a systemd unit's sandbox, without systemd.

Usage (with the system Python, which has libseccomp's bindings, python3-seccomp):
    /usr/bin/python3 tests/unit_sandbox.py UNIT_FILE [--strict] -- COMMAND...

Applies what systemd implements with seccomp, read from UNIT_FILE: NoNewPrivileges=,
SystemCallFilter= (allow list, then "~" removals, groups expanded by
``systemd-analyze syscall-filter``), SystemCallArchitectures=native,
MemoryDenyWriteExecute=, LockPersonality=, RestrictAddressFamilies=, RestrictNamespaces=
and RestrictRealtime=, with systemd's actions (EPERM, or SIGSYS where systemd kills).
The mount, user and network namespaces (PrivateUsers=, PrivateNetwork=, ProcSubset=)
are applied around this by ``unshare``; see tests/test_systemd_units.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import seccomp  # type: ignore[import-not-found]  # python3-seccomp, system Python only

PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
SCHED_FIFO, SCHED_RR, SCHED_DEADLINE = 1, 2, 6
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def unit_settings(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        if name.startswith("@"):
            calls |= expand(groups[name], groups)
        elif name:
            calls.add(name.partition(":")[0])
    return calls


def syscall_groups() -> dict[str, list[str]]:
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.split()[0])
    return groups


def build(settings: dict[str, list[str]], strict: bool = False) -> seccomp.SyscallFilter:
    # As systemd does it: a call outside SystemCallFilter= fails with
    # SystemCallErrorNumber= when set (else SIGSYS), the other restrictions with EPERM
    # (EAFNOSUPPORT for address families). ``strict`` kills on every one instead, to list
    # what the program tries (run it under strace).
    eperm = seccomp.KILL_PROCESS if strict else seccomp.ERRNO(errno.EPERM)
    number = settings.get("SystemCallErrorNumber")
    kill = (seccomp.ERRNO(getattr(errno, number[-1])) if number and not strict
            else seccomp.KILL_PROCESS)
    groups = syscall_groups()
    allow: set[str] | None = None
    deny: set[str] = set()
    for value in settings.get("SystemCallFilter", []):
        negate = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allow is None and not negate:
            allow = set(names)
        elif negate:
            if allow is not None:
                allow -= names
            else:
                deny |= names
        else:
            assert allow is not None
            allow |= names
    if allow is not None:
        flt = seccomp.SyscallFilter(defaction=kill)
        for name in sorted(allow):
            try:
                flt.add_rule(seccomp.ALLOW, name)
            except Exception:  # a name this architecture does not have
                continue
        # The rules below narrow calls the allow list lets through.
        narrow = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    else:
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in sorted(deny):
            try:
                flt.add_rule(kill, name)
            except Exception:
                continue
        narrow = flt
    yes = {"yes", "true", "1", "on"}
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] in yes:
        narrow.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_WRITE | PROT_EXEC,
                                                   PROT_WRITE | PROT_EXEC))
        narrow.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        narrow.add_rule(eperm, "pkey_mprotect",
                        seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        narrow.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    if settings.get("LockPersonality", ["no"])[-1] in yes:
        # Stricter than systemd, which also lets the current persona be set again: only
        # the query (0xffffffff) passes.
        narrow.add_rule(eperm, "personality", seccomp.Arg(0, seccomp.NE, 0xFFFFFFFF))
    families = settings.get("RestrictAddressFamilies")
    if families:
        allowed = {FAMILIES[f] for f in families[-1].split() if f in FAMILIES}
        for fam in (1, 2, 10, 16, 17):
            if fam not in allowed:
                narrow.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
                                seccomp.Arg(0, seccomp.EQ, fam))
    if settings.get("RestrictNamespaces", ["no"])[-1] in yes:
        narrow.add_rule(eperm, "unshare", seccomp.Arg(0, seccomp.NE, 0))
        narrow.add_rule(eperm, "setns")
    if settings.get("RestrictRealtime", ["no"])[-1] in yes:
        for policy in (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE):
            narrow.add_rule(eperm, "sched_setscheduler", seccomp.Arg(1, seccomp.EQ, policy))
    if narrow is not flt:
        narrow.load()  # loaded first: the allow list below must still permit seccomp()
    return flt


def main() -> int:
    sep = sys.argv.index("--")
    unit, command = sys.argv[1], sys.argv[sep + 1:]
    settings = unit_settings(unit)
    flt = build(settings, strict="--strict" in sys.argv[2:sep])
    flt.load()
    os.execvp(command[0], command)
    return 127


if __name__ == "__main__":
    sys.exit(main())
