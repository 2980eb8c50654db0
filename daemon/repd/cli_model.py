"""``repd model status|list|use|switch|rollback|prune|abort``: a new embedding model with no
downtime, through a running daemon.

``use`` starts a migration: the daemon builds a new generation (every file embedded again
with the new model) while the active one keeps answering. ``switch`` runs the gate's checks
and makes the new generation active; the previous one is kept, retired, so ``rollback``
returns to it at once, until ``prune`` deletes it. ``abort`` stops a migration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from repd.errors import EXIT_CONFIG, RepdError

#: Seconds ``repd model status|list`` wait for the daemon's answer; the commands wait
#: longer by default (see ``repd.api.client``), or ``--timeout``.
DEFAULT_TIMEOUT_S = 10.0
BAR_WIDTH = 24
_MIB = 1024 * 1024


class UsageError(RepdError):
    """Arguments that do not go together, or a confirmation that cannot be asked (exit 2)."""

    exit_code = EXIT_CONFIG


# -- talking to the daemon -------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from repd.api.client import ApiClient
    from repd.cli import _load

    # The whole config is read, as `repd status` does: a broken one is exit 2 here too.
    socket = _load(args).settings.api.socket
    return ApiClient(socket, timeout=args.timeout or DEFAULT_TIMEOUT_S)


def _absolute(path: str) -> str:
    """``path`` as the daemon must get it: absolute (its working folder is not ours)."""
    return os.path.abspath(Path(path).expanduser())


def _model_argument(name: str) -> str:
    """A local model folder made absolute; a Hugging Face name (``org/name``) as given."""
    looks_local = name.startswith(("/", "~", "./", "../")) or name in (".", "..")
    if looks_local or Path(name).expanduser().exists():
        return _absolute(name)
    return name


def _require_terminal(what: str) -> None:
    """Refuse a confirmation nobody can give: a script must say what it means (--yes)."""
    if not sys.stdin.isatty():
        raise UsageError(f"{what} needs a confirmation and stdin is not a terminal; "
                         "add --yes to go ahead")


def _ask(question: str) -> bool:
    """True when the person at the terminal answers yes; anything else (Enter) is no."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


# -- rendering -------------------------------------------------------------------------------


def _width() -> int:
    from repd.cli_output import output_width
    from repd.cli_status import DEFAULT_WIDTH, MIN_WIDTH

    return max(output_width(None) or DEFAULT_WIDTH, MIN_WIDTH)


def _local_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(iso)


def _ago(iso: str) -> str | None:
    from repd.cli_status import duration

    try:
        then = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    return duration((datetime.now(UTC) - then).total_seconds())


def mib(n: int) -> str:
    """Bytes as MiB: ``127 MiB``, ``1,536 MiB``."""
    return f"{n / _MIB:,.0f} MiB"


def bar(progress: float, width: int = BAR_WIDTH) -> str:
    """``[#########-------]`` for a share from 0 to 1."""
    filled = round(max(0.0, min(1.0, progress)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _generation_text(g: dict[str, Any]) -> str:
    return f"{g['model']}, dim {g['dim']}, {g['points']:,} points"


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """The gate's verdict, then one line per check (plain text, not yet wrapped)."""
    if gate.get("forced"):
        verdict = "forced: switched although a check failed"
    else:
        verdict = "passed" if gate.get("ok") else "REFUSED: a check failed"
    out = [verdict, *(f"- {check}" for check in gate.get("checks", []))]
    active, new = gate.get("ndcg_active"), gate.get("ndcg_new")
    if active is not None or new is not None:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"
        out.append(f"- nDCG@10 on the labeled queries: active {fmt(active)}, new {fmt(new)}")
    return out


def _next_step(m: dict[str, Any]) -> str:
    state = m["state"]
    if state in ("loading", "backfilling", "gating"):
        return ("the active generation keeps answering meanwhile; `repd model abort` stops "
                "the migration")
    if state == "ready":
        gate = m.get("gate")
        if gate and not gate.get("ok") and not gate.get("forced"):
            return ("`repd model switch --force` switches anyway; `repd model abort` gives up "
                    "the new generation")
        return "`repd model switch` makes the new generation active"
    return "`repd model abort` removes what was built; then `repd model use` tries again"


def render_model_status(ms: dict[str, Any], width: int) -> str:
    """The ``repd model status`` text (names and messages made printable)."""
    from repd.cli_status import percent, wrap_field

    cols = width
    gens = {g["id"]: g for g in ms.get("generations", [])}
    lines: list[str] = []
    active = ms.get("active")
    if active is not None and active in gens:
        lines += wrap_field("active", f"generation {active}: {_generation_text(gens[active])}",
                            cols)
    else:
        lines += wrap_field("active", "none yet (indexing a first root creates one)", cols)
    retired = [g for g in gens.values() if g["state"] == "retired"]
    for g in retired:
        lines += wrap_field("retired", f"generation {g['id']}: {_generation_text(g)}", cols)
    m = ms.get("migration")
    if not m:
        lines += wrap_field("migration", "none; `repd model use NAME` starts one", cols)
        if retired:
            lines += wrap_field("next", "`repd model rollback` returns to the newest retired "
                                "generation; `repd model prune` deletes the retired ones", cols)
        return "\n".join(lines)
    to = f"generation {m['to_generation']}" if m.get("to_generation") else "(not created yet)"
    lines += wrap_field("migration", f"{m['state']}: generation {m['from_generation']} → {to}",
                        cols)
    model = m["model"] + (f" ({m['model_id']})" if m.get("model_id") and
                          m["model_id"] != m["model"] else "")
    lines += wrap_field("new model", model, cols)
    if m["state"] != "loading":
        lines += wrap_field("progress", f"{bar(m['progress'])} {percent(m['progress'])}  "
                            f"{m['files_done']:,} of {m['files_total']:,} files", cols)
        embedded = f"{m['chunks_embedded']:,} chunks embedded"
        if m["state"] == "backfilling":
            from repd.cli_status import duration

            eta = m.get("eta_s")
            lines += wrap_field("rate", f"{m['files_per_s']:.1f} files/s, eta "
                                f"{duration(eta) if eta is not None else 'unknown'}, "
                                f"{embedded}", cols)
        else:  # a rate once the backfill is over would be an old one
            lines += wrap_field("embedded", embedded, cols)
    memory = m.get("model_memory_bytes")
    if memory is not None:
        lines += wrap_field("memory", f"{mib(memory)} for the second model's weights", cols)
    ago = _ago(m["started_at"])
    lines += wrap_field("started", _local_time(m["started_at"]) + (f" ({ago} ago)" if ago
                                                                    else ""), cols)
    if m.get("gate"):
        verdict, *checks = gate_lines(m["gate"])
        lines += wrap_field("gate", verdict, cols)
        for check in checks:
            lines += wrap_field("", check, cols)
    if m.get("message"):
        lines += wrap_field("message", m["message"], cols)
    lines += wrap_field("next", _next_step(m), cols)
    return "\n".join(lines)


def render_generations(gens: list[dict[str, Any]], width: int | None) -> str:
    """The ``repd model list`` table; the model column takes the room left (cut from the
    left, where a path's start matters least), or the whole name without a width."""
    from repd.cli_output import text_width
    from repd.cli_status import _left_fit
    from repd.textsafe import printable

    if not gens:
        return "no generations yet: indexing a first root creates one"
    head = ("ID", "STATE", "MODEL", "DIM", "POINTS", "CREATED")
    rows = [(str(g["id"]), g["state"], printable(g["model"]), str(g["dim"]),
             f"{g['points']:,}", _local_time(g["created_at"])) for g in gens]
    widths = [max(text_width(r[i]) for r in (head, *rows)) for i in range(len(head))]
    if width is not None:
        others = sum(w for i, w in enumerate(widths) if i != 2) + 2 * (len(head) - 1)
        widths[2] = max(min(widths[2], width - others), 12)

    def line(r: tuple[str, ...]) -> str:
        model = _left_fit(r[2], widths[2])
        pad = widths[2] - text_width(model) + len(model)
        return (f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {model:<{pad}}  "
                f"{r[3]:>{widths[3]}}  {r[4]:>{widths[4]}}  {r[5]:<{widths[5]}}").rstrip()

    return "\n".join(line(r) for r in (head, *rows))


def _print_result(res: dict[str, Any]) -> None:
    from repd.textsafe import printable

    print(printable(res.get("message") or "done"))
    if res.get("gate"):
        for text in gate_lines(res["gate"]):
            print(f"  {printable(text)}")


# -- the commands ----------------------------------------------------------------------------


def cmd_model_status(args: argparse.Namespace) -> int:
    """Show the active generation, the retired ones and the migration in progress."""
    ms = _client(args).model_status()
    if args.json:
        print(json.dumps(ms, indent=2))
    else:
        print(render_model_status(ms, _width()))
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    """List every generation as a table (``--json``: an array)."""
    from repd.cli_output import output_width

    ms = _client(args).model_status()
    gens = sorted(ms.get("generations", []), key=lambda g: int(g["id"]))
    if args.json:
        print(json.dumps(gens, indent=2))
    else:
        print(render_generations(gens, output_width(None)))
    return 0


def cmd_model_use(args: argparse.Namespace) -> int:
    """Start migrating to another model."""
    if sys.stderr.isatty():  # the daemon answers once the model is loaded: say why we wait
        print("loading the model in the daemon...", file=sys.stderr, flush=True)
    res = _client(args).model_use(_model_argument(args.target_model), timeout=args.timeout)
    _print_result(res)  # the daemon's message says what happens next
    return 0


def cmd_model_switch(args: argparse.Namespace) -> int:
    """Run the gate and make the new generation active."""
    from repd.api.client import ApiRequestError

    if (args.queries is None) != (args.qrels is None):
        raise UsageError("--queries and --qrels go together: give both or neither")
    if args.mapping is not None and args.queries is None:
        raise UsageError("--mapping needs --queries and --qrels")
    files = {}
    for name in ("queries", "qrels", "mapping"):
        given = getattr(args, name)
        if given is not None:
            path = _absolute(given)
            if not Path(path).is_file():
                raise UsageError(f"--{name} {given}: no such file")
            files[name] = path
    client = _client(args)
    try:
        res = client.model_switch(args.force, files.get("queries"), files.get("qrels"),
                                  files.get("mapping"), timeout=args.timeout)
    except ApiRequestError as exc:
        if exc.status == 409:
            _explain_refusal(client)
        raise
    _print_result(res)
    return 0


def _explain_refusal(client: Any) -> None:
    """After a refused switch: what the gate found, when it ran (best effort)."""
    from repd.api.client import ApiClientError
    from repd.textsafe import printable

    try:
        m = client.model_status().get("migration") or {}
    except ApiClientError:
        return
    if m.get("gate"):
        for text in gate_lines(m["gate"]):
            print(f"  {printable(text)}", file=sys.stderr)


def cmd_model_rollback(args: argparse.Namespace) -> int:
    """Make the most recently retired generation active again."""
    _print_result(_client(args).model_rollback(timeout=args.timeout))
    return 0


def cmd_model_prune(args: argparse.Namespace) -> int:
    """Delete the retired generations, after a confirmation."""
    if not args.yes:
        _require_terminal("repd model prune")  # before anything is asked of the daemon
        client = _client(args)
        retired = [g for g in client.model_status().get("generations", [])
                   if g["state"] == "retired"]
        if retired:
            from repd.textsafe import printable

            names = "; ".join(f"generation {g['id']} ({printable(g['model'])}, "
                              f"{g['points']:,} points)" for g in retired)
            question = (f"Delete {names}? Rolling back to "
                        f"{'it' if len(retired) == 1 else 'them'} will no longer be possible.")
            if not _ask(question):
                print("nothing deleted")
                return 1
    else:
        client = _client(args)
    _print_result(client.model_prune(timeout=args.timeout))
    return 0


def cmd_model_abort(args: argparse.Namespace) -> int:
    """Stop the migration in progress and delete its generation, after a confirmation."""
    if not args.yes:
        _require_terminal("repd model abort")
        client = _client(args)
        m = client.model_status().get("migration")
        if m:
            from repd.textsafe import printable

            built = (f"generation {m['to_generation']}" if m.get("to_generation")
                     else "the new generation")
            question = (f"Stop the migration to {printable(m['model'])} and delete {built} "
                        f"({m['files_done']:,} of {m['files_total']:,} files embedded)?")
            if not _ask(question):
                print("the migration goes on")
                return 1
    else:
        client = _client(args)
    _print_result(client.model_abort(timeout=args.timeout))
    return 0


def add_model_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``repd model ...``."""
    from repd.cli_service import subcommand_help

    model = sub.add_parser(
        "model", help="upgrade the embedding model with no downtime: status, list, use, "
        "switch, rollback, prune, abort",
        description="A generation is the index built with one embedding model. `use` builds "
        "a new one in the background while the active one answers; `switch` checks it and "
        "makes it active, keeping the old one for `rollback` until `prune`.")
    model.set_defaults(func=subcommand_help(model))
    msub = model.add_subparsers(dest="model_command", metavar="ACTION")
    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument("--timeout", type=float, default=None, metavar="S",
                         help=f"seconds to wait for the daemon's answer (default "
                         f"{DEFAULT_TIMEOUT_S:g}; longer for the commands: use 600 (the "
                         "model loads first), switch 300, prune 120, others 60)")
    yes = argparse.ArgumentParser(add_help=False)
    yes.add_argument("-y", "--yes", action="store_true",
                     help="do not ask for confirmation (needed when stdin is not a terminal)")

    st = msub.add_parser("status", parents=[common, timeout],
                         help="the active generation and the migration in progress")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_model_status)
    ls = msub.add_parser("list", parents=[common, timeout],
                         help="every generation: id, state, model, dim, points, created")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_model_list)
    use = msub.add_parser("use", parents=[common, timeout],
                          help="start migrating to another model (built in the background)")
    # Not "model": that is the common --model option's destination.
    use.add_argument("target_model", metavar="NAME_OR_PATH",
                     help="Hugging Face model name, or a local model folder; NAME+int8 "
                     "for its int8 variant (OpenVINO on the CPU, calibrated on the index's "
                     "own chunks)")
    use.set_defaults(func=cmd_model_use)
    sw = msub.add_parser("switch", parents=[common, timeout],
                         help="run the gate's checks and make the new generation active")
    sw.add_argument("--force", action="store_true",
                    help="switch even when a check fails")
    sw.add_argument("--queries", metavar="FILE",
                    help="BEIR queries.jsonl: compare both generations' nDCG@10 before the "
                    "switch (with --qrels)")
    sw.add_argument("--qrels", metavar="FILE", help="BEIR qrels TSV (with --queries)")
    sw.add_argument("--mapping", metavar="FILE",
                    help="document id -> file path, TSV or JSON (as for `repd eval`)")
    sw.set_defaults(func=cmd_model_switch)
    rb = msub.add_parser("rollback", parents=[common, timeout],
                         help="make the most recently retired generation active again")
    rb.set_defaults(func=cmd_model_rollback)
    pr = msub.add_parser("prune", parents=[common, timeout, yes],
                         help="delete the retired generations (no rollback to them after)")
    pr.set_defaults(func=cmd_model_prune)
    ab = msub.add_parser("abort", parents=[common, timeout, yes],
                         help="stop the migration in progress and delete what it built")
    ab.set_defaults(func=cmd_model_abort)
