"""Logging setup: stderr for the foreground, journald (structured) under systemd.

Modules log with ``extra={"PEER": ..., "MIRROR": ..., "PATH": ..., "CODE": ...}``.
Under systemd, with systemd-python installed, records go to journald and those
become journal fields of the same names, next to NODE (this node's name),
PRIORITY, LOGGER, THREAD_NAME and CODE_FILE/LINE/FUNC, so an operator can ask
``journalctl -u replicatord PEER=b MIRROR=media``. Anywhere else records go to
stderr and the formatter appends the fields in brackets, so a human sees the
same facts.

Nothing here may fail the daemon's start: without systemd-python the journal
is simply not used.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

FIELDS = ("PEER", "MIRROR", "PATH", "CODE")

#: Journal fields kept; JournalHandler would also send every LogRecord
#: attribute (MSG, ARGS, LEVELNO, CREATED, ...), which only adds noise.
JOURNAL_FIELDS = frozenset(
    {
        "MESSAGE_ID",
        "PRIORITY",
        "LOGGER",
        "THREAD_NAME",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "SYSLOG_IDENTIFIER",
        "EXCEPTION_TEXT",
        "NODE",
        *FIELDS,
    }
)

Sender = Callable[..., Any]


class _Formatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s replicatord[" + node + "] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None)]
        return f"{text} [{' '.join(extra)}]" if extra else text


def under_systemd() -> bool:
    """Whether systemd started us (as a service: its stdio may be the journal)."""
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def journal_handler(node: str, send: Sender | None = None) -> logging.Handler | None:
    """A systemd.journal.JournalHandler sending the fields above, or None
    without systemd-python. ``send`` replaces systemd.journal.send (tests)."""
    try:
        import systemd.journal
    except ImportError:
        return None
    target: Sender = send or systemd.journal.send

    def forward(message: str, /, **fields: Any) -> None:
        # positional-only: every record carries a "message" attribute too
        target(
            message, **{k: v for k, v in fields.items() if k in JOURNAL_FIELDS and v is not None}
        )

    handler: logging.Handler = systemd.journal.JournalHandler(
        sender_function=forward, SYSLOG_IDENTIFIER="replicatord", NODE=node
    )
    return handler


def setup(node: str, level: str = "INFO", journal: bool | None = None) -> logging.Handler:
    """Send the root logger's records to journald (``journal``: None decides
    by ``under_systemd()``) or else to stderr. Returns the handler."""
    root = logging.getLogger()
    root.handlers.clear()
    handler = journal_handler(node) if (under_systemd() if journal is None else journal) else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(node))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
