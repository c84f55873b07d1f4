"""replicatorctl: show and steer a running replicatord through its control socket.

Exit codes (for monitoring scripts; docs/operations.md):

    0  healthy; wait: every path is durable on every target
    1  the daemon could not be reached, or refused the request
    2  usage or configuration error (check-config: the file is invalid;
       wait: a path outside every mirror, excluded, missing)
    3  a link is not connected (status); wait: timed out (the reason says
       why: a link down, paused, ...), or a reload rebuilt a link
    4  a link's lag exceeds --max-lag (status)
    5  a mirror needs attention: marker missing, directories without a
       watch, unresolved two-way conflicts, or the watcher or another
       worker thread is dead (status); wait: a target refused a path or the
       mirror
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, config, ctlconflicts
from .control import request
from .errors import ConfigError, ControlError, KeyFileError
from .rates import show_rate

OK, UNREACHABLE, USAGE, LINK_DOWN, LAGGING, ATTENTION = 0, 1, 2, 3, 4, 5
#: ``wait``: not durable in time (or a link was rebuilt); a target refused.
TIMED_OUT, REFUSED = LINK_DOWN, ATTENTION
#: ``wait --timeout`` default, seconds: a script that forgot it must not
#: hang for ever on a peer that is down.
WAIT_TIMEOUT = 300.0

#: The user the packaged systemd unit runs replicatord as.
DAEMON_USER = "replicator"


def _key_owners(user: str | None) -> set[int]:
    """Who may own key files for check-config: root, whoever runs it, and
    the daemon's user (a name or a uid; without ``user``, DAEMON_USER if
    that user exists)."""
    owners = set(config.key_owners())
    if user is not None and user.isdigit():
        owners.add(int(user))
        return owners
    try:
        owners.add(pwd.getpwnam(user or DAEMON_USER).pw_uid)
    except KeyError:
        if user is not None:
            raise ConfigError(f"--user {user}: no such user") from None
    return owners


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _when(t: float | None) -> str:
    return "never" if not t else f"{fmt_age(time.time() - t)} ago"


def _days(s: float) -> str:
    return f"{s / 86400:.3g} days" if s >= 86400 else fmt_age(s)


def _link_state(ln: dict[str, Any]) -> str:
    state = str(ln["state"])
    if state == "backoff" and ln.get("next_retry"):
        state += f", next retry in {max(0.0, ln['next_retry'] - time.time()):.1f} s"
    if ln.get("paused"):
        state += " (paused)"
    return state


def _bwlimit(ln: dict[str, Any]) -> str:
    """``, bwlimit 50.0 MiB/s`` when the link has one; what the connection
    reports when that differs (the limit is being applied, or failed)."""
    limit, applied = ln.get("bwlimit") or 0, ln.get("bwlimit_applied")
    out = f", bwlimit {show_rate(limit)}" if limit else ""
    if applied is not None and applied != limit:
        out += f" (the connection reports {show_rate(applied)})"
    return out


def render(st: dict[str, Any]) -> str:
    """A human summary, in the spirit of systemctl status / drbdadm status."""
    problems = health(st, max_lag=None)[1]
    dot = "●" if not problems else "!"
    lines = [
        f"{dot} replicatord node {st['node']} — version {st['version']}, pid {st['pid']}, "
        f"up {fmt_age(st['uptime'])}",
        f"    listening on {st['listen']}"
        + (f"; metrics on {st['metrics_listen']}" if st.get("metrics_listen") else "")
        + f"; config {st.get('config') or '-'}"
        f" (reloaded {st.get('reloads', 0)} times)",
    ]
    w = st.get("watcher") or {}
    if w.get("alive") is not None:
        lines.append(
            f"    watcher: {'alive' if w['alive'] else 'DEAD'}, {w['restarts']} restarts, "
            f"{w['overflows']} inotify overflows"
        )
    li = st.get("listener")
    if li:
        lim = li["limits"]
        lines.append(
            f"    inbound: {li['authenticated']} authenticated, {li['unauthenticated']} "
            f"unauthenticated (at most {lim['unauthenticated']}, "
            f"{lim['unauthenticated_per_address']} per address); "
            f"{li['refused_unauthenticated']} refused, {li['accept_errors']} accept errors"
        )
    if st.get("dead_workers"):
        lines.append(
            f"    DEAD workers: {', '.join(st['dead_workers'])} (watchdog pings stopped: "
            "systemd restarts the daemon)"
        )
    j = st.get("janitor")
    if j:
        lines.append(
            f"    janitor: last run {_when(j['last_run'])}; since start removed "
            f"{j['files_removed']} partial files ({fmt_bytes(j['bytes_freed'])}), "
            f"{j['folders_removed']} folders of peers no longer accepted; partials expire "
            f"after {_days(j['partial_max_age'])}"
        )
        for err in j.get("last_errors") or ():
            lines.append(f"        last run: {err}")
    if st["links"]:
        lines.append("  Outbound links (this node sends):")
    for peer, ln in sorted(st["links"].items()):
        rtt = f", rtt {ln['rtt_ms']:.2f} ms" if ln.get("rtt_ms") is not None else ""
        lines.append(f"    → {peer} ({ln['address']}): {_link_state(ln)}{rtt}{_bwlimit(ln)}")
        lines.append(
            f"        sent {fmt_bytes(ln['bytes_sent'])} ({ln['files_sent']} files, "
            f"{ln['ops_sent']} operations, {ln['renames']} renames, "
            f"{ln['resumed_files']} resumed); rate {fmt_bytes(ln['rate_bps'])}/s"
        )
        if ln.get("delta_files") or ln.get("mend_requests"):
            lines.append(
                f"        deltas: {ln.get('delta_files', 0)} files, "
                f"{fmt_bytes(ln.get('delta_bytes_copied', 0))} not sent (the peer had them); "
                f"damaged on arrival: {ln.get('mend_requests', 0)} files, "
                f"{fmt_bytes(ln.get('mend_bytes', 0))} sent again"
            )
        lines.append(
            f"        queue {ln['queue_files']} files / {fmt_bytes(ln['queue_bytes'])}, "
            f"in flight {ln['in_flight']}, lag {fmt_age(ln['lag_seconds'])}"
        )
        lanes = ln.get("lanes") or {}
        if lanes:
            parts = []
            for name in ("live", "bulk"):
                lane = lanes.get(name)
                if lane is None:
                    continue
                extra = f", {ln.get('in_flight_bulk', 0)} in flight" if name == "bulk" else ""
                parts.append(
                    f"{name} {lane['files']} files / {fmt_bytes(lane['bytes'])}, "
                    f"oldest {fmt_age(lane.get('oldest_age_seconds'))}{extra}"
                )
            lines.append("        lanes: " + "; ".join(parts))
        cur = ln.get("current")
        if cur:
            lines.append(
                f"        sending {cur['mirror']}:{cur['path']} "
                f"{fmt_bytes(cur['offset'])} / {fmt_bytes(cur['size'])}"
            )
        for name, m in sorted((ln.get("mirrors") or {}).items()):
            v = m.get("verify")
            if v:
                when = _when(v["finished"]) if v.get("finished") else "now"
                lines.append(
                    f"        mirror {name}: verify {v['state']} ({when}): "
                    f"{v['files_checked']} files, {fmt_bytes(v['bytes_checked'])} checked, "
                    f"{v['differing']} differ, {v['repaired']} repaired"
                    + (f"; {v['error']}" if v.get("error") else "")
                )
            if m.get("refused"):
                lines.append(f"        mirror {name}: REFUSED by the peer: {m['refused']}")
            elif m.get("paused"):
                lines.append(f"        mirror {name}: paused")
        if ln.get("last_error"):
            lines.append(
                f"        last error ({_when(ln.get('last_error_at'))}): {ln['last_error']}"
            )
    if st["sessions"]:
        lines.append("  Inbound sessions (this node receives):")
    for s in st["sessions"]:
        lines.append(
            f"    ← {s['peer'] or '?'} ({s['address']}): {s['state']} since {_when(s['since'])}, "
            f"received {fmt_bytes(s['payload_bytes_received'])} in {s['files_received']} files "
            f"and {s['ops_applied']} operations, {s['conflicts']} conflicts, mode {s['mode']}"
            + (f", receive buffer {fmt_bytes(s['rcvbuf'])}" if s.get("rcvbuf") else "")
        )
        if s.get("delta_files") or s.get("verify_mismatches") or s.get("base_changed"):
            lines.append(
                f"        deltas: {s.get('delta_files', 0)} files, "
                f"{fmt_bytes(s.get('delta_bytes_copied', 0))} copied here, "
                f"{s.get('base_changed', 0)} refused (our copy had changed); "
                f"block map mismatches: {s.get('verify_mismatches', 0)} "
                f"({s.get('verify_failed', 0)} given up)"
            )
        if s.get("last_error"):
            lines.append(f"        last error: {s['last_error']}")
    lines.append("  Mirrors:")
    for name, m in sorted(st["mirrors"].items()):
        roles = []
        if m["push_to"]:
            roles.append("→ " + ", ".join(m["push_to"]))
        if m["accept_from"]:
            roles.append("← " + ", ".join(m["accept_from"]))
        lines.append(f"    {name}: {m['path']} ({'; '.join(roles) or 'idle'})")
        if m.get("watched"):
            dirs = m.get("dirs") or 0
            unwatched = m.get("unwatched_dirs") or 0
            lines.append(f"        watches {dirs - unwatched} of {dirs} directories")
        for peer, lm in sorted((m.get("links") or {}).items()):
            if lm.get("last_scan"):
                # "there" is current (every Ack counts); "here" is what the
                # last scan counted, so it says when that was.
                up = st["links"].get(peer, {}).get("state") == "connected"
                lines.append(
                    f"        to {peer}: {lm.get('remote_entries', 0)} entries there"
                    f"{'' if up else ' (when the link was last up)'}; "
                    f"{lm.get('source_entries', 0)} here at the last scan "
                    f"{_when(lm['last_scan'])} ({lm.get('last_scan_duration', 0):.2f} s)"
                )
        if m.get("marker_ok") is False:
            lines.append("        WARNING: marker missing (disk not mounted?): deletions held back")
        if m.get("unwatched_dirs"):
            lines.append(
                f"        WARNING: {m['unwatched_dirs']} directories have no inotify "
                "watch (raise fs.inotify.max_user_watches); they are polled"
            )
        if m.get("conflicts_unresolved"):
            lines.append(f"        {_unresolved(name, m['conflicts_unresolved'])}")
    if problems:
        lines.append("  Problems:")
        lines += [f"    - {p}" for p in problems]
    return "\n".join(lines)


def _unresolved(mirror: str, n: int) -> str:
    return f"{n} unresolved conflict{'' if n == 1 else 's'} (replicatorctl conflicts {mirror})"


def health(st: dict[str, Any], max_lag: float | None) -> tuple[int, list[str]]:
    """(exit code, reasons) for monitoring."""
    reasons: list[tuple[int, str]] = []
    for peer, ln in st["links"].items():
        if ln["state"] != "connected":
            reasons.append(
                (
                    LINK_DOWN,
                    f"link to {peer} is {ln['state']}: {ln.get('last_error') or 'not connected'}",
                )
            )
        lag = ln.get("lag_seconds")
        if max_lag is not None and lag is not None and lag > max_lag:
            reasons.append((LAGGING, f"link to {peer} lags {lag:.1f} s (> {max_lag:g} s)"))
    for name, m in st["mirrors"].items():
        if m.get("marker_ok") is False:
            reasons.append((ATTENTION, f"mirror {name}: marker missing in {m['path']}"))
        if m.get("unwatched_dirs"):
            reasons.append((ATTENTION, f"mirror {name}: {m['unwatched_dirs']} unwatched dirs"))
        if m.get("conflicts_unresolved"):
            unresolved = _unresolved(name, m["conflicts_unresolved"])
            reasons.append((ATTENTION, f"mirror {name}: {unresolved}"))
    if (st.get("watcher") or {}).get("alive") is False:
        reasons.append((ATTENTION, "the file watcher is dead"))
    for worker in st.get("dead_workers") or ():
        reasons.append((ATTENTION, f"worker thread died: {worker}"))
    code = min((c for c, _ in reasons), default=OK)
    return code, [r for _, r in reasons]


def _peers(st: dict[str, Any]) -> str:
    rows = [("PEER", "DIRECTION", "STATE", "ADDRESS", "BYTES", "FILES", "QUEUE", "LAG")]
    for peer, ln in sorted(st["links"].items()):
        rows.append(
            (
                peer,
                "out",
                ln["state"],
                ln["address"],
                fmt_bytes(ln["bytes_sent"]),
                str(ln["files_sent"]),
                str(ln["queue_files"]),
                fmt_age(ln["lag_seconds"]),
            )
        )
    for s in st["sessions"]:
        rows.append(
            (
                s["peer"] or "?",
                "in",
                s["state"],
                s["address"],
                fmt_bytes(s["payload_bytes_received"]),
                str(s["files_received"]),
                "-",
                "-",
            )
        )
    return _table(rows)


def _mirrors(st: dict[str, Any]) -> str:
    rows = [("MIRROR", "PATH", "PUSH_TO", "ACCEPT_FROM", "MARKER", "WATCHED_DIRS")]
    for name, m in sorted(st["mirrors"].items()):
        dirs = m.get("dirs")
        watched = "-" if dirs is None else f"{dirs - (m.get('unwatched_dirs') or 0)}/{dirs}"
        rows.append(
            (
                name,
                m["path"],
                ",".join(m["push_to"]) or "-",
                ",".join(m["accept_from"]) or "-",
                "ok" if m.get("marker_ok") else "MISSING",
                watched,
            )
        )
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


#: A reload waits for the daemon's main thread, which may be restarting links.
RELOAD_TIMEOUT = 130.0


def _call(sock: str, req: dict[str, Any]) -> dict[str, Any]:
    reply = request(sock, req, timeout=RELOAD_TIMEOUT if req.get("cmd") == "reload" else 10.0)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request failed")))
    return reply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="replicatorctl", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config",
        "-c",
        default="/etc/replicator/replicator.toml",
        help="the daemon's config (to find its control socket)",
    )
    ap.add_argument("--socket", "-s", help="control socket (default: from the config)")
    ap.add_argument("--version", action="version", version=f"replicatorctl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="links, queues, lag, mirrors; exit code tells health")
    p.add_argument("--json", action="store_true", help="the full status as JSON")
    p.add_argument("--watch", action="store_true", help="refresh every second")
    p.add_argument(
        "--max-lag", type=float, metavar="SECONDS", help="exit 4 if a link lags more than this"
    )
    sub.add_parser("peers", help="one line per peer")
    sub.add_parser("mirrors", help="one line per mirror")
    p = sub.add_parser("sync", help="reconcile now (all mirrors, or one)")
    p.add_argument("mirror", nargs="?")
    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} sending (all, or one peer and/or mirror)")
        p.add_argument("--peer")
        p.add_argument("--mirror")
    sub.add_parser("reload", help="re-read the config (like SIGHUP); errors are shown")
    p = sub.add_parser(
        "verify",
        help="scrub: compare every file with each target's copy, read from disk on both sides",
    )
    p.add_argument("mirror", nargs="?")
    p.add_argument("--peer")
    p.add_argument("--repair", action="store_true", help="send again what differs")
    p.add_argument(
        "--no-wait", action="store_true", help="start it and return (progress is in status)"
    )
    p = sub.add_parser("conflicts", help="list the two-way conflicts this node decided, unsettled")
    p.add_argument("mirror", nargs="?")
    p.add_argument("--json", action="store_true", help="as JSON")
    p = sub.add_parser("resolve", help="settle a conflict: keep the file, its copy, or both")
    p.add_argument("path", help="the file in conflict, or its conflict copy")
    p.add_argument(
        "--keep",
        required=True,
        choices=["local", "remote", "both"],
        help="local: the file at PATH as it is now (the copy is deleted); remote: the copy, "
        "renamed over PATH; both: keep both, forget the conflict",
    )
    p = sub.add_parser(
        "wait",
        help="return once what each PATH holds now is durable on every target (a barrier)",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="a file or directory (tree) inside a mirror"
    )
    p.add_argument("--peer", help="only this target")
    p.add_argument(
        "--timeout",
        type=float,
        default=WAIT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long, exit 3 (default: {WAIT_TIMEOUT:.0f}; 0: never)",
    )
    p = sub.add_parser("check-config", help="validate a config file offline")
    p.add_argument(
        "--user",
        help="the user replicatord runs as: key files may belong to it or to root "
        f"(default: {DAEMON_USER}, the packaged unit's user, if it exists; "
        "run-as-root deployments: --user root)",
    )
    p.add_argument("file")
    args = ap.parse_args(argv)

    if args.cmd == "check-config":
        try:
            cfg = config.load(args.file)
            config.check_filesystem(cfg, args.file)
            config.read_keys(cfg, args.file, _key_owners(args.user))
        except (ConfigError, KeyFileError) as e:
            print(e, file=sys.stderr)
            return USAGE
        print(f"{args.file}: OK ({len(cfg.peers)} peers, {len(cfg.mirrors)} mirrors)")
        return OK
    sock = args.socket
    if sock is None:
        try:
            sock = config.load(args.config).node.control_socket
        except ConfigError as e:
            print(f"replicatorctl: {e}\n(use --socket to name the control socket)", file=sys.stderr)
            return USAGE
    try:
        if args.cmd == "status":
            return _status(sock, args)
        if args.cmd == "verify":
            from . import ctlverify  # here: it uses this module's helpers

            return ctlverify.verify(lambda req: _call(sock, req), args)
        if args.cmd == "conflicts":
            return ctlconflicts.conflicts(lambda req: _call(sock, req), args)
        if args.cmd == "resolve":
            return ctlconflicts.resolve(lambda req: _call(sock, req), args)
        if args.cmd == "wait":
            return _wait(sock, args)
        if args.cmd in ("peers", "mirrors"):
            st = _call(sock, {"cmd": "status"})["status"]
            print(_peers(st) if args.cmd == "peers" else _mirrors(st))
            return OK
        req: dict[str, Any] = {"cmd": args.cmd}
        for key in ("mirror", "peer"):
            if getattr(args, key, None) is not None:
                req[key] = getattr(args, key)
        reply = _call(sock, req)
        if reply.get("message"):
            print(reply["message"])
        return OK
    except ControlError as e:
        print(f"replicatorctl: {e}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130


def _wait(sock: str, args: argparse.Namespace) -> int:
    """Wait until each path is durable on its targets (waits.py, barrier.py).
    Exit 0 when it is, 2 for a path that cannot be waited for, 3 when the
    timeout passed first (or a reload rebuilt a link), 5 when a target
    refused it."""
    req: dict[str, Any] = {"cmd": "wait", "paths": [os.path.abspath(p) for p in args.paths]}
    if args.peer is not None:
        req["peer"] = args.peer
    reply = request(sock, req)
    if not reply.get("ok"):
        print(f"replicatorctl: wait: {reply.get('error')}", file=sys.stderr)
        return USAGE if reply.get("usage") else UNREACHABLE
    wid = reply["id"]
    deadline = None if args.timeout <= 0 else time.monotonic() + args.timeout
    tty = sys.stderr.isatty()
    try:
        while True:
            left = POLL if deadline is None else deadline - time.monotonic()
            st = _call(sock, {"cmd": "wait-poll", "id": wid, "max": min(POLL, max(0.0, left))})
            if st["state"] != "waiting" or left <= 0:
                break
            if tty:
                print("\r" + "; ".join(st["reasons"]), end="", file=sys.stderr, flush=True)
            if not st.get("waited"):  # the daemon had no long poll free
                time.sleep(min(0.25, max(0.0, left)))
    except KeyboardInterrupt:
        _cancel(sock, wid)
        raise
    if tty:
        print(file=sys.stderr)
    state = st["state"]
    if state == "done":
        held = (f"{p} ({pr['entries']} entries)" for p, pr in sorted(st["peers"].items()))
        print("durable on " + ", ".join(held))
        return OK
    if state == "waiting":
        _cancel(sock, wid)
        print(f"replicatorctl: wait: timed out after {args.timeout:g} s", file=sys.stderr)
    for r in st["reasons"]:
        print(f"replicatorctl: wait: {r}", file=sys.stderr)
    return {"refused": REFUSED, "waiting": TIMED_OUT, "interrupted": TIMED_OUT}.get(
        state, UNREACHABLE
    )


#: A wait's poll waits in the daemon this long at most.
POLL = 2.0


def _cancel(sock: str, wid: int) -> None:
    with contextlib.suppress(ControlError, OSError):
        request(sock, {"cmd": "wait-cancel", "id": wid}, timeout=5)


def _status(sock: str, args: argparse.Namespace) -> int:
    while True:
        st = _call(sock, {"cmd": "status"})["status"]
        code, reasons = health(st, args.max_lag)
        st["health"] = {"code": code, "problems": reasons}
        out = json.dumps(st, indent=2, default=str) if args.json else render(st)
        if not args.watch:
            print(out)
            for r in reasons:
                print(f"replicatorctl: {r}", file=sys.stderr)
            return code
        print("\033[H\033[2J" + out, flush=True)
        time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
