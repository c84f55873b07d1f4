"""replicatorctl verify: the client side of a scrub (scrub.py is the daemon's).

Starts the scrubs, shows their progress on a terminal, and lists what
differs once they end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from .ctl import ATTENTION, LINK_DOWN, OK, fmt_bytes

Call = Callable[[dict[str, Any]], dict[str, Any]]


def verify(call: Call, args: argparse.Namespace) -> int:
    """Start scrubs, show their progress, list what differs. Exit 0 if every
    file checked matches (or was repaired), 5 (attention) if some differ, 3
    if a scrub could not finish (the link went down)."""
    req: dict[str, Any] = {"cmd": "verify", "repair": args.repair}
    if args.mirror is not None:
        req["mirror"] = args.mirror
    if args.peer is not None:
        req["peer"] = args.peer
    asked = time.time()
    pairs = [tuple(p) for p in call(req)["started"]]
    print("verifying " + ", ".join(f"{m} on {p}" for p, m in pairs), flush=True)
    if args.no_wait:
        return OK
    last = ""
    while True:
        time.sleep(0.5)
        st = call({"cmd": "status"})["status"]
        reports = {
            (p, m): st["links"].get(p, {}).get("mirrors", {}).get(m, {}).get("verify") or {}
            for p, m in pairs
        }
        line = "; ".join(
            f"{m} on {p}: {r.get('files_checked', 0)} files, "
            f"{fmt_bytes(r.get('bytes_checked', 0))} checked, {r.get('differing', 0)} differ"
            for (p, m), r in reports.items()
        )
        if line != last and sys.stderr.isatty():
            print("\r" + line, end="", file=sys.stderr, flush=True)
            last = line
        # done: a scrub that ended after we asked (a new one, or one that
        # was already running: one at a time per mirror and peer)
        if all(
            r.get("state") not in (None, "running")
            and max(r.get("started") or 0, r.get("finished") or 0) >= asked - 1
            for r in reports.values()
        ):
            break
    if sys.stderr.isatty():
        print(file=sys.stderr)
    code = OK
    for (p, m), r in reports.items():
        print(
            f"{m} on {p}: {r['state']}: {r['files_checked']} files "
            f"({fmt_bytes(r['bytes_checked'])}) checked, {r['differing']} differ, "
            f"{r['repaired']} repaired, {r['skipped']} skipped (changes pending)"
        )
        for d in r["differences"]:
            there = "missing" if d["size_there"] is None else f"{d['size_there']} bytes"
            print(
                f"  {d['path']}: differs from offset {d['offset']} "
                f"({d['size_here']} bytes here, {there} there) [{d['state']}]"
            )
        if r["state"] != "done":
            print(f"  not finished: {r.get('error')}", file=sys.stderr)
            code = max(code, LINK_DOWN)
        elif r["differing"] > r["repaired"]:
            code = max(code, ATTENTION)
    return code
