"""replicatorctl: show and steer a running replicatord through its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import config
from .control import request
from .errors import ConfigError, ControlError, KeyFileError


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.0f} min"


def render(st: dict[str, Any]) -> str:
    lines = [
        f"● replicatord node {st['node']} — version {st['version']}, pid {st['pid']}, "
        f"up {_fmt_age(st['uptime'])}, listening on {st['listen']}",
    ]
    for peer, ln in sorted(st["links"].items()):
        lines.append(
            f"  → {peer} ({ln['address']}): {ln['state']}"
            + (f", rtt {ln['rtt_ms']:.2f} ms" if ln.get("rtt_ms") is not None else "")
        )
        lines.append(
            f"      sent {_fmt_bytes(ln['bytes_sent'])}, {ln['files_sent']} files; "
            f"queue {ln['queue_files']} files / {_fmt_bytes(ln['queue_bytes'])}; "
            f"in flight {ln['in_flight']}; lag {_fmt_age(ln['lag_seconds'])}"
        )
        cur = ln.get("current")
        if cur:
            lines.append(
                f"      sending {cur['mirror']}:{cur['path']} "
                f"{_fmt_bytes(cur['offset'])}/{_fmt_bytes(cur['size'])} at "
                f"{_fmt_bytes(ln['rate_bps'])}/s"
            )
        if ln.get("last_error"):
            lines.append(f"      last error: {ln['last_error']}")
    for s in st["sessions"]:
        lines.append(
            f"  ← {s['peer'] or '?'} ({s['address']}): {s['state']}, received "
            f"{_fmt_bytes(s['payload_bytes_received'])}, {s['files_received']} files, "
            f"mode {s['mode']}"
        )
    for name, m in sorted(st["mirrors"].items()):
        lines.append(
            f"  mirror {name}: {m['path']} push_to={','.join(m['push_to']) or '-'} "
            f"accept_from={','.join(m['accept_from']) or '-'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="replicatorctl")
    ap.add_argument("--config", "-c", default="/etc/replicator/replicator.toml")
    ap.add_argument("--socket", "-s", help="control socket (default: from the config)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="show links, queues, lag")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true")
    p = sub.add_parser("sync", help="reconcile now")
    p.add_argument("mirror", nargs="?")
    p = sub.add_parser("check-config", help="validate a config file offline")
    p.add_argument("file")
    args = ap.parse_args(argv)

    if args.cmd == "check-config":
        try:
            cfg = config.load(args.file)
            config.read_keys(cfg)
        except (ConfigError, KeyFileError) as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.file}: OK")
        return 0
    sock = args.socket
    if sock is None:
        try:
            sock = config.load(args.config).node.control_socket
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
    try:
        if args.cmd == "status":
            while True:
                reply = request(sock, {"cmd": "status"})
                if not reply.get("ok"):
                    raise ControlError(reply.get("error", "request failed"))
                out = (
                    json.dumps(reply["status"], indent=2, default=str)
                    if args.json
                    else render(reply["status"])
                )
                if not args.watch:
                    print(out)
                    return 0
                print("\033[H\033[2J" + out, flush=True)
                time.sleep(1)
        reply = request(sock, {"cmd": args.cmd, "mirror": getattr(args, "mirror", None)})
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return 0
    except ControlError as e:
        print(f"replicatorctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
