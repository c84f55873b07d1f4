"""File names (from the wire and from local users) cannot forge log records
or send terminal escape sequences: every control character in a record's
message and fields is escaped, one record stays one line."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator import logs
from replicator.inbox import BOOT_ID, Inbox
from replicator.localcluster import LocalCluster, wait_for
from replicator.outgoing import version_of

from ..helpers import wait_same
from .test_topologies import idle

#: What an attacker wants to see at the start of a line of the log.
FAKE = "2099-01-01 00:00:00,000 ERROR   replicatord[b] FAKE RECORD"
#: A file name carrying it, and a terminal escape (red text) for good measure.
EVIL = f"evil\n{FAKE}\x1b[31mred"


def _shown(text: str) -> str:
    """How ``text`` must appear in a log: control characters escaped."""
    return text.replace("\n", "\\n").replace("\x1b", "\\x1b")


def _forged(log: str) -> list[str]:
    return [line for line in log.split("\n") if line.startswith(FAKE)]


@pytest.fixture
def stderr_log() -> Iterator[io.StringIO]:
    """The daemon's stderr logging (logs.setup), into a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.setattr("sys.stderr", buf)
    try:
        logs.setup("n", "INFO", journal=False)
        yield buf
    finally:
        mp.undo()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_messages_and_fields_are_escaped(stderr_log: io.StringIO) -> None:
    log = logging.getLogger("replicator.test")
    log.warning(
        "cannot read %s", EVIL, extra={"PATH": EVIL, "PEER": "b\r\nx", "MIRROR": "m\u2028y"}
    )
    log.info("bidi \u202egnp.exe and a lone surrogate \udcff")
    text = stderr_log.getvalue()
    assert text.count("\n") == 2  # two records, two lines
    first, second = text.split("\n")[:2]
    assert (
        f"cannot read {_shown(EVIL)} [PEER=b\\r\\nx MIRROR=m\\u2028y PATH={_shown(EVIL)}]" in first
    )
    assert "bidi \\u202egnp.exe and a lone surrogate \\udcff" in second
    assert "\x1b" not in text and not _forged(text)


def test_a_fields_logger_adds_its_fields_to_the_call_s(stderr_log: io.StringIO) -> None:
    """A link logs through logs.Fields: its PEER, the call's MIRROR/PATH (at()
    or extra), all escaped like any field."""
    link = logs.Fields(logging.getLogger("replicator.link"), PEER="b")
    link.at(MIRROR="media", PATH=EVIL).warning("cannot read %s", EVIL)
    link.info("up", extra={"CODE": "AUTH"})
    first, second = stderr_log.getvalue().split("\n")[:2]
    assert first.endswith(f"cannot read {_shown(EVIL)} [PEER=b MIRROR=media PATH={_shown(EVIL)}]")
    assert second.endswith("up [PEER=b CODE=AUTH]")
    assert link.fields == {"PEER": "b"}  # at() made a new logger


def test_traceback_lines_are_indented(stderr_log: io.StringIO) -> None:
    log = logging.getLogger("replicator.test")
    try:
        raise ValueError(f"bad name {EVIL}")
    except ValueError:
        log.exception("failed on %s", EVIL, extra={"PATH": EVIL})
    lines = stderr_log.getvalue().rstrip("\n").split("\n")
    assert f"failed on {_shown(EVIL)} [PATH={_shown(EVIL)}]" in lines[0]
    assert lines[1] == "    Traceback (most recent call last):"
    # the exception's message keeps its line breaks, but every line of the
    # traceback is indented: none passes for a record
    assert all(line.startswith("    ") for line in lines[1:])
    assert lines[-2:] == ["    ValueError: bad name evil", f"    {_shown(FAKE)}\\x1b[31mred"]
    assert not _forged("\n".join(lines))


def test_journal_fields_are_escaped() -> None:
    pytest.importorskip("systemd.journal")
    sent: list[tuple[str, dict[str, Any]]] = []

    def send(message: str, **fields: Any) -> None:
        sent.append((message, fields))

    handler = logs.journal_handler("n", send=send)
    assert handler is not None
    log = logging.getLogger("replicator.test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise OSError(f"{EVIL}")
        except OSError:
            log.exception("cannot read %s", EVIL, extra={"PATH": EVIL, "PEER": "b"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    ((message, fields),) = sent
    # One journal entry is one record: a traceback keeps its lines there
    # (journalctl indents them), but nothing else does, and nothing is raw.
    head, _, tail = message.partition("\n")
    assert head == f"cannot read {_shown(EVIL)}"
    assert tail.startswith("Traceback (most recent call last):\n")
    assert tail.endswith(f"OSError: evil\n{_shown(FAKE)}\\x1b[31mred")
    assert fields["PATH"] == _shown(EVIL) and fields["PEER"] == "b" and fields["NODE"] == "n"
    assert fields["EXCEPTION_TEXT"] == tail
    assert "\x1b" not in message


def _plant_resumable(receiver_root: Path, peer: str, rel: bytes, source: Path) -> None:
    """A partial of ``source`` (its first half) in the receiver's partial
    folder for ``peer``, as a cut transfer leaves it: the sender resumes it,
    and says so in its log."""
    folder = receiver_root / ".replicator" / "partial" / peer
    folder.mkdir(mode=0o700, parents=True)
    data = source.read_bytes()
    name = os.fsdecode(Inbox._name(rel))
    (folder / f"{name}.part").write_bytes(data[: len(data) // 2])
    side = {
        "path": rel.hex(),
        "version": version_of(source.stat()).hex(),
        "size": len(data),
        "boot_id": BOOT_ID,
        "durable": 0,
    }
    (folder / f"{name}.side").write_text(json.dumps(side))


def test_evil_file_names_do_not_forge_log_lines(cluster: LocalCluster) -> None:
    """Real daemons: the sender logs the name as it resumes the file, the
    receivers log it in a conflict. Neither log gets a line of the
    attacker's making, nor a raw escape sequence."""
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    pa = a.add_mirror("m", push_to=["b"], accept_from=["b"], two_way=True)
    pb = b.add_mirror("m", push_to=["a"], accept_from=["a"], two_way=True)
    resumed = f"{EVIL} resumed"
    (pa / resumed).write_bytes(os.urandom(100_000))
    _plant_resumable(pb, "a", os.fsencode(resumed), pa / resumed)
    cluster.start()
    wait_for(lambda: idle(a, "b") and idle(b, "a"), 30, "both links idle")
    assert a.link("b")["resumed_files"] == 1
    # a conflict on a file with the evil name: both sides change it while paused
    clash = f"{EVIL} clash.txt"
    for n, peer in ((a, "b"), (b, "a")):
        assert n.control("pause", peer=peer)["ok"]
    (pa / clash).write_text("edited on a\n")
    os.utime(pa / clash, ns=(1_800_000_000_000_000_000,) * 2)
    (pb / clash).write_text("edited on b, later\n")
    os.utime(pb / clash, ns=(1_800_000_100_000_000_000,) * 2)
    for n, peer in ((a, "b"), (b, "a")):
        assert n.control("resume", peer=peer)["ok"]
    wait_same(pa, pb)

    def logs_of_both() -> str:
        return a.log_path.read_text() + b.log_path.read_text()

    wait_for(lambda: "conflict on " in logs_of_both(), 10, "the conflict to be logged")
    sender = a.log_path.read_text()
    assert f"resuming {_shown(resumed)} at offset" in sender
    assert f"PATH={_shown(resumed)}]" in sender
    assert f"conflict on {_shown(clash)}" in logs_of_both()
    for node in (a, b):
        text = node.log_path.read_text()
        assert not _forged(text), f"forged lines in {node.name}'s log: {_forged(text)}"
        assert "\x1b" not in text, f"a raw escape sequence in {node.name}'s log"
