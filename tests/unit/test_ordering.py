"""The per-role rules of an established connection (ordering.py), driven
directly: no handshake, no bytes. tests/unit/test_protocol.py checks the same
rules through ``Connection``; these pin the pieces it is made of."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from replicator import frames as F
from replicator.errors import LocalProtocolError, RemoteProtocolError
from replicator.ordering import (
    ACCEPTOR_RECEIVES,
    INITIATOR_RECEIVES,
    AcceptorRules,
    InitiatorRules,
)

E = F.ErrorCode


def make(cls: type[F.Event], **given: Any) -> F.Event:
    """A frame of ``cls`` for mirror 1 / operation 7, other fields neutral."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name in ("mirror", "op"):
            values[f.name] = 1 if f.name == "mirror" else 7
        elif f.type == "int":
            values[f.name] = 0
        elif f.type == "bytes":
            values[f.name] = b"x"
        else:
            values[f.name] = "x"
    return cls(**values)


def opened_acceptor() -> AcceptorRules:
    acc = AcceptorRules()
    assert acc.sending(F.Opened(1, 0, 0, "")) == 0
    return acc


def test_the_tables_cover_every_frame_once() -> None:
    """Hello and Auth belong to the handshake; every other frame flows one
    way only, except Ping, Pong and Error, which both sides send."""
    both = ACCEPTOR_RECEIVES & INITIATOR_RECEIVES
    assert both == {F.Ping, F.Pong, F.Error}
    assert ACCEPTOR_RECEIVES | INITIATOR_RECEIVES | {F.Hello, F.Auth} == set(F.EVENTS.values())


@pytest.mark.parametrize(
    "cls", sorted(ACCEPTOR_RECEIVES - {F.Chunk, F.End, F.Abort}, key=lambda c: c.KIND)
)
def test_the_operations_are_those_of_frames(cls: type[F.Event]) -> None:
    """The rules name the operation frames in match patterns: they must be
    frames.OPERATIONS, no more and no less, on both sides. (Chunk, End and
    Abort name the operation of their File.)"""
    ev = make(cls, mirror=2) if cls is F.Open else make(cls)
    acc = opened_acceptor()
    acc.received(ev)
    assert (7 in acc.unacked) is (cls in F.OPERATIONS)
    ini = InitiatorRules()
    ini.sending(ev)
    assert (7 in ini.unacked) is (cls in F.OPERATIONS)


@pytest.mark.parametrize("cls", F.OPERATIONS)
def test_operation_id_0_is_reserved(cls: type[F.Event]) -> None:
    acc = opened_acceptor()
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(make(cls, op=0))
    assert e.value.code is E.MALFORMED


def test_initiator_file_chunks_end() -> None:
    ini = InitiatorRules()
    assert ini.sending(make(F.Open)) == 0
    assert ini.mirrors == {1}
    assert ini.sending(make(F.File, size=10, offset=4)) == 0
    assert ini.unacked == {7} and ini.files[7].next_offset == 4
    assert ini.sending(F.Chunk(7, 4, 6)) == 6
    assert ini.sending(F.End(7)) == 0
    assert ini.files == {} and ini.unacked == {7}  # answered by the Ack, not by End
    assert ini.received(F.Ack(7)) == 0
    assert ini.unacked == set()


@pytest.mark.parametrize(
    "bad",
    [
        F.Chunk(7, 3, 1),  # not where the file continues
        F.Chunk(7, 0, 11),  # beyond its size
        F.Chunk(8, 0, 1),  # not open
        F.End(7),  # incomplete
        F.Abort(8, 1),  # not open
        F.File(7, 1, 0, 1, 0, 0, 0, 0, b"", b"p"),  # operation id in use
        F.Ack(7),  # the initiator does not send it
    ],
)
def test_initiator_refuses_and_changes_nothing(bad: F.Event) -> None:
    ini = InitiatorRules()
    ini.sending(make(F.File, size=10))
    before = (set(ini.unacked), dict(ini.files), ini.files[7].next_offset)
    with pytest.raises(LocalProtocolError):
        ini.sending(bad)
    assert (ini.unacked, ini.files, ini.files[7].next_offset) == before


def test_initiator_open_file_limit() -> None:
    ini = InitiatorRules()
    for op in range(1, F.MAX_OPEN_FILES + 1):
        ini.sending(make(F.File, op=op, size=1))
    with pytest.raises(LocalProtocolError, match="too many open files"):
        ini.sending(make(F.File, op=999, size=1))
    assert 999 not in ini.unacked
    ini.sending(F.Abort(1, F.AbortReason.CANCELLED))
    assert 1 not in ini.unacked and len(ini.files) == F.MAX_OPEN_FILES - 1
    ini.sending(make(F.File, op=999, size=1))


def test_initiator_receives() -> None:
    ini = InitiatorRules()
    with pytest.raises(RemoteProtocolError) as e:
        ini.received(F.Opened(1, 0, 0, ""))
    assert e.value.code is E.UNEXPECTED and "unknown mirror 1" in str(e.value)
    ini.sending(make(F.Open))
    ini.received(F.Opened(1, 0, 0, ""))
    with pytest.raises(RemoteProtocolError, match="Ack for unknown operation 7"):
        ini.received(F.Ack(7))
    with pytest.raises(RemoteProtocolError, match=r"File is not allowed here \(we are initiator\)"):
        ini.received(make(F.File))
    ini.sending(make(F.Delete, op=5))
    ini.sending(make(F.Delete, op=6))
    ini.received(F.Error(E.FORBIDDEN, 5, 0, "no"))  # a refusal answers its operation
    ini.received(F.Error(E.INTERNAL, 6, 1, "bye"))  # a fatal one answers nothing
    assert ini.unacked == {6}


def test_acceptor_mirrors() -> None:
    acc = AcceptorRules()
    acc.received(make(F.Open))  # opening twice is refused only once it is open
    acc.received(make(F.Open))
    with pytest.raises(RemoteProtocolError, match="List for mirror id 1, which is not open"):
        acc.received(make(F.List))
    acc.sending(F.Opened(1, E.FORBIDDEN, 0, "refused"))
    assert acc.mirrors == set()
    acc.sending(F.Opened(1, 0, 0, ""))
    assert acc.mirrors == {1}
    with pytest.raises(RemoteProtocolError, match="opened twice"):
        acc.received(make(F.Open))
    assert acc.received(make(F.List)) == 0


def test_acceptor_file_chunks_end_ack() -> None:
    acc = opened_acceptor()
    assert acc.received(make(F.File, size=10, offset=2)) == 0
    assert acc.received(F.Chunk(7, 2, 5)) == 5
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(F.Chunk(7, 6, 1))
    assert e.value.code is E.UNEXPECTED and "expected offset 7, size 10" in str(e.value)
    acc.received(F.Chunk(7, 7, 3))
    acc.received(F.End(7))
    assert acc.files == {} and acc.unacked == {7}
    acc.sending(F.Ack(7))
    assert acc.unacked == set()


@pytest.mark.parametrize(
    ("ev", "code"),
    [
        (F.Chunk(7, 0, 0), E.TOO_LARGE),
        (F.Chunk(7, 0, F.MAX_CHUNK + 1), E.TOO_LARGE),
        (F.Chunk(8, 0, 1), E.UNEXPECTED),
        (F.End(7), E.UNEXPECTED),
        (F.End(8), E.UNEXPECTED),
        (F.Abort(8, 1), E.UNEXPECTED),
        (F.File(7, 1, 0, 1, 0, 0, 0, 0, b"", b"p"), E.UNEXPECTED),  # op reused
        (F.File(9, 1, 2, 1, 0, 0, 0, 0, b"", b"p"), E.MALFORMED),  # offset > size
        (F.File(9, 2, 0, 1, 0, 0, 0, 0, b"", b"p"), E.UNEXPECTED),  # mirror not open
        (F.Ack(7), E.UNEXPECTED),  # not a frame the acceptor receives
    ],
)
def test_acceptor_refuses(ev: F.Event, code: F.ErrorCode) -> None:
    acc = opened_acceptor()
    acc.received(make(F.File, size=F.MAX_CHUNK * 2))
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(ev)
    assert e.value.code is code


def test_acceptor_limits() -> None:
    acc = opened_acceptor()
    for op in range(1, F.MAX_OPEN_FILES + 1):
        acc.received(make(F.File, op=op, size=1))
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(make(F.File, op=100, size=1))
    assert e.value.code is E.LIMIT
    acc = opened_acceptor()
    for op in range(1, F.MAX_UNACKED + 1):
        acc.received(make(F.Delete, op=op))
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(make(F.Delete, op=F.MAX_UNACKED + 1))
    assert e.value.code is E.LIMIT


def test_acceptor_answers() -> None:
    acc = opened_acceptor()
    acc.received(make(F.File, size=1))
    acc.received(F.Abort(7, F.AbortReason.SOURCE_GONE))
    assert acc.unacked == set()  # an aborted file needs no answer
    acc.received(make(F.Mkdir, op=3))
    acc.received(make(F.Rename, op=4))
    acc.sending(F.Error(E.CONFLICT, 3, 0, "refused"))
    acc.sending(F.Error(E.INTERNAL, 4, 1, "fatal"))
    assert acc.unacked == {4}
    with pytest.raises(LocalProtocolError, match="the acceptor does not send File"):
        acc.sending(make(F.File))
