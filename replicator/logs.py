"""Logging setup: stderr for the foreground, journald (structured) under systemd.

Modules log with ``extra={"PEER": ..., "MIRROR": ..., "PATH": ..., "CODE": ...}``,
or through a ``Fields`` adapter that carries some of them (a link's PEER).
Under systemd, with systemd-python installed, records go to journald and those
become journal fields of the same names, next to NODE (this node's name),
PRIORITY, LOGGER, THREAD_NAME and CODE_FILE/LINE/FUNC, so an operator can ask
``journalctl -u replicatord PEER=b MIRROR=media``. Anywhere else records go to
stderr and the formatter appends the fields in brackets, so a human sees the
same facts.

Nothing here may fail the daemon's start: without systemd-python the journal
is simply not used.

Log lines carry names from the wire and from local users (file paths, peer
messages), so both handlers escape every control character in a record's
message and fields: a file whose name holds a newline and a fake record, or
terminal escape sequences, logs as ``x\\n2024-... ERROR fake`` / ``\\x1b[31m``,
and one record stays one line. Only a traceback spans several lines, each
indented on stderr, so no line of it can pass for a record of its own (in the
journal an entry is one record, whatever lines it holds).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
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

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escapes() -> dict[int, str]:
    """What ``escape`` replaces: C0 and C1 controls and DEL, line and
    paragraph separators, bidirectional overrides (they reorder what a
    terminal shows), and lone surrogates (undecodable bytes that slipped
    through as surrogateescape; they cannot even be encoded to UTF-8)."""
    cps = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
    cps += [*range(0x200E, 0x2010), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
    cps += range(0xD800, 0xE000)
    out = {}
    for cp in cps:
        ch = chr(cp)
        out[cp] = _NAMED.get(ch) or (f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}")
    return out


_ESCAPES = _escapes()


def escape(text: str) -> str:
    """``text`` on one line, with every control character escaped
    (``\\n``, ``\\x1b``, ``\\u2028``): safe to write to a log or a terminal."""
    return text.translate(_ESCAPES)


def _lines(text: str, indent: str) -> str:
    """A traceback (or stack) for below its record: each line escaped and
    indented (an exception's message may hold a file name, newlines and
    all: indented, no line of it can pass for a record in a text log)."""
    return "\n".join(indent + escape(line) for line in text.split("\n"))


def _render(record: logging.LogRecord, formatter: logging.Formatter, indent: str) -> str:
    """``formatter``'s format with the message escaped, then the traceback
    (and stack) if any, below it. Fields are left to the caller."""
    record.message = escape(record.getMessage())
    if formatter.usesTime():
        record.asctime = formatter.formatTime(record, formatter.datefmt)
    text = formatter.formatMessage(record)
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        text += "\n" + _lines(record.exc_text, indent)
    if record.stack_info:
        text += "\n" + _lines(formatter.formatStack(record.stack_info), indent)
    return text


class _Formatter(logging.Formatter):
    """stderr: one line per record, fields appended in brackets."""

    def __init__(self, node: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s replicatord[" + node + "] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = _render(record, self, "    ")
        extra = [f"{f}={escape(str(v))}" for f in FIELDS if (v := getattr(record, f, None))]
        if not extra:
            return text
        head, nl, tail = text.partition("\n")  # the fields go on the record's own line
        return f"{head} [{' '.join(extra)}]{nl}{tail}"


class _JournalFormatter(logging.Formatter):
    """journald's MESSAGE: the message escaped, a traceback below it (each
    line escaped; not indented: a journal entry is one record whatever it
    holds, and journalctl indents continuation lines itself)."""

    def format(self, record: logging.LogRecord) -> str:
        return _render(record, self, "")


class Fields(logging.LoggerAdapter[logging.Logger]):
    """A logger that puts the same fields on every record (a link: PEER),
    merged with those of the call's ``extra`` (the stdlib adapter would
    replace them) and those added by ``at``."""

    def __init__(self, logger: logging.Logger, **fields: str) -> None:
        super().__init__(logger, fields)
        self.fields = fields

    def at(self, **fields: str) -> Fields:
        """This logger with more fields: ``log.at(MIRROR=m, PATH=p).info(...)``."""
        return Fields(self.logger, **{**self.fields, **fields})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**self.fields, **(kwargs.get("extra") or {})}
        return msg, kwargs


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
        # positional-only: every record carries a "message" attribute too.
        # MESSAGE comes escaped from _JournalFormatter; field values are
        # escaped here (a traceback keeps its line breaks).
        kept = {}
        for k, v in fields.items():
            if k not in JOURNAL_FIELDS or v is None:
                continue
            if isinstance(v, str):
                v = _lines(v, "") if k == "EXCEPTION_TEXT" else escape(v)
            kept[k] = v
        target(message, **kept)

    handler: logging.Handler = systemd.journal.JournalHandler(
        sender_function=forward, SYSLOG_IDENTIFIER="replicatord", NODE=node
    )
    handler.setFormatter(_JournalFormatter())
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
