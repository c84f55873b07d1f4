"""replicatorctl conflicts and resolve: the client side (resolving.py is the
daemon's).

``conflicts`` prints each unresolved conflict this node decided: the path,
the two versions (whose, size, mtime, digest), which is at the path and
which in the copy, the peer, when. ``resolve`` sends an absolute path (made
from the current directory) and prints what the daemon did.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from .logs import escape

Call = Callable[[dict[str, Any]], dict[str, Any]]

LEGEND = (
    "settle one with: replicatorctl resolve PATH --keep local|remote|both\n"
    "  local: keep the file at PATH as it is now, delete the copy\n"
    "  remote: put the copy in its place (the copy's name goes)\n"
    "  both: keep both, forget the conflict (the copy stays as an ordinary file)"
)


def _version(v: dict[str, Any]) -> str:
    who = f"{v['node']}'s version" + (" (this node)" if v["from"] == "local" else "")
    sec, ns = divmod(int(v["mtime_ns"]), 1_000_000_000)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)) + f".{ns:09d} UTC"
    digest = v.get("digest") or "-"
    return f"{who}, {v['size']} bytes, modified {when}, digest {digest}"


def render(reply: dict[str, Any], now: float | None = None) -> str:
    """The listing for a person (names escaped: they come from anyone)."""
    now = time.time() if now is None else now
    found = reply["conflicts"]
    n = len(found)
    lines = [f"node {reply['node']}: {n} unresolved conflict{'' if n == 1 else 's'}"]
    for c in found:
        ago = max(0.0, now - c["decided"])
        decided = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(c["decided"]))
        lines += [
            "",
            f"{c['mirror']}: {escape(c['full_path'])} — with {c['peer']}, decided {decided} "
            f"({_ago(ago)} ago)",
            f"    at the path: {_version(c['at_path'])}",
            f"    in the copy: {_version(c['in_copy'])}",
            f"                 {escape(c['full_copy'])}",
        ]
        if c.get("same_content"):
            lines.append("    (same content: only the modification times differ)")
    for name in reply.get("unchecked") or ():
        lines.append(
            f"\nmirror {name}: marker missing (disk not mounted?): its conflicts are listed "
            "as recorded, unchecked"
        )
    if found:
        lines += ["", LEGEND]
    return "\n".join(lines)


def _ago(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def conflicts(call: Call, args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "conflicts"}
    if args.mirror is not None:
        req["mirror"] = args.mirror
    reply = call(req)
    if args.json:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2))
    else:
        print(render(reply))
    return 0


def resolve(call: Call, args: argparse.Namespace) -> int:
    # abspath, not realpath: the path names the entry itself, never what a
    # symlink there points to.
    reply = call({"cmd": "resolve", "path": os.path.abspath(args.path), "keep": args.keep})
    print(reply.get("message") or "settled")
    return 0
