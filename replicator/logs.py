"""Logging setup: stderr for the foreground, journald (structured) under systemd.

Modules log with ``extra={"PEER": ..., "MIRROR": ..., "PATH": ..., "CODE": ...}``;
the journald handler turns those into journal fields, the stderr formatter
appends them in brackets so a human sees the same facts.
"""

from __future__ import annotations

import logging
import sys

FIELDS = ("PEER", "MIRROR", "PATH", "CODE")


class _Formatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s replicatord[" + node + "] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None)]
        return f"{text} [{' '.join(extra)}]" if extra else text


def setup(node: str, level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(node))
    root.addHandler(handler)
    root.setLevel(level.upper())
