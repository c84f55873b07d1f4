"""The per-role rules of an established connection (ordering.py), driven
directly: no handshake, no bytes. tests/unit/test_protocol.py checks the same
rules through ``Connection``; these pin the pieces it is made of."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from replicator import frames as F
from replicator.blockmap import BLAKE3, MAX_BLOCK, MIN_BLOCK, XXH3_128
from replicator.errors import LocalProtocolError, RemoteProtocolError
from replicator.ordering import (
    ACCEPTOR_RECEIVES,
    INITIATOR_RECEIVES,
    AcceptorRules,
    InitiatorRules,
    OpenFile,
)

E = F.ErrorCode


#: One xxh3-128 digest: a file digest (End, File.base) or a block digest (Blocks).
D = bytes(range(16))
BS = MIN_BLOCK
#: Valid values of the block map fields (a whole file of algorithm 1).
NEUTRAL: dict[str, Any] = {
    "algo": XXH3_128,
    "block_size": BS,
    "base": b"",
    "digest": D,
    "digests": D,
    "ranges": F.pack_ranges([(0, 1)]),
}


def make(cls: type[F.Event], **given: Any) -> F.Event:
    """A frame of ``cls`` for mirror 1 / operation 7, other fields neutral."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name in ("mirror", "op"):
            values[f.name] = 1 if f.name == "mirror" else 7
        elif f.name in NEUTRAL:
            values[f.name] = NEUTRAL[f.name]
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
    "cls",
    sorted(
        ACCEPTOR_RECEIVES
        - {F.Chunk, F.Copy, F.Hole, F.Blocks, F.End, F.Abort, F.Check, F.Owner, F.Xattr},
        key=lambda c: c.KIND,
    ),
)
def test_the_operations_are_those_of_frames(cls: type[F.Event]) -> None:
    """The rules name the operation frames in match patterns: they must be
    frames.OPERATIONS, no more and no less, on both sides. (Chunk, Copy,
    Blocks, End and Abort name the operation of their File; a Check takes
    an id of the same space but is answered by Checked, not Ack.)"""
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
    assert ini.sending(F.End(7, D)) == 0
    assert ini.files == {} and ini.unacked == {7}  # answered by the Ack, not by End
    assert ini.received(F.Ack(7)) == 0
    assert ini.unacked == set()


@pytest.mark.parametrize(
    "bad",
    [
        F.Chunk(7, 3, 1),  # not where the file continues
        F.Chunk(7, 0, 11),  # beyond its size
        F.Chunk(8, 0, 1),  # not open
        F.End(7, D),  # incomplete
        F.Abort(8, 1),  # not open
        make(F.File, size=1),  # operation id in use
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
    with pytest.raises(LocalProtocolError, match="more than 64 files in flight"):
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
    with pytest.raises(RemoteProtocolError, match="Ack for unknown or unfinished operation 7"):
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


def test_a_hard_link_is_an_operation_of_an_open_mirror() -> None:
    """HardLink (initiator → acceptor) needs its mirror open, takes a fresh
    operation id and is answered by Ack or Error like any operation."""
    acc = AcceptorRules()
    with pytest.raises(RemoteProtocolError, match="HardLink for mirror id 1, which is not open"):
        acc.received(make(F.HardLink))
    acc.sending(F.Opened(1, 0, 0, ""))
    acc.received(make(F.HardLink, op=3))
    assert acc.unacked == {3}
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(make(F.HardLink, op=3))  # the id is in use
    assert e.value.code is E.UNEXPECTED
    acc.sending(F.Error(E.LINK_TARGET, 3, 0, "send the data"))
    assert acc.unacked == set()
    ini = InitiatorRules()
    ini.sending(make(F.Open))
    ini.sending(make(F.HardLink, op=4))
    with pytest.raises(LocalProtocolError):
        ini.sending(make(F.HardLink, op=4))
    ini.received(F.Ack(4))
    assert ini.unacked == set()
    with pytest.raises(RemoteProtocolError):
        ini.received(F.Ack(4))  # answered already


def test_acceptor_file_chunks_end_ack() -> None:
    acc = opened_acceptor()
    assert acc.received(make(F.File, size=10, offset=2)) == 0
    assert acc.received(F.Chunk(7, 2, 5)) == 5
    with pytest.raises(RemoteProtocolError) as e:
        acc.received(F.Chunk(7, 6, 1))
    assert e.value.code is E.UNEXPECTED and "expected offset 7, size 10" in str(e.value)
    acc.received(F.Chunk(7, 7, 3))
    acc.received(F.End(7, D))
    assert acc.files == {} and acc.unacked == {7}
    acc.sending(F.Ack(7))
    assert acc.unacked == set()


@pytest.mark.parametrize(
    ("ev", "code"),
    [
        (F.Chunk(7, 0, 0), E.TOO_LARGE),
        (F.Chunk(7, 0, F.MAX_CHUNK + 1), E.TOO_LARGE),
        (F.Chunk(8, 0, 1), E.UNEXPECTED),
        (F.End(7, D), E.UNEXPECTED),
        (F.End(8, D), E.UNEXPECTED),
        (F.Abort(8, 1), E.UNEXPECTED),
        (make(F.File, size=1), E.UNEXPECTED),  # op reused
        (make(F.File, op=9, offset=2, size=1), E.MALFORMED),  # offset > size
        (make(F.File, op=9, mirror=2, size=1), E.UNEXPECTED),  # mirror not open
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


# -- block maps (protocol version 3): both ends, one set of rules --------------------------
#
# The initiator checks the frames it sends with the same rules the acceptor
# applies to them: a frame the sender may not send raises
# LocalProtocolError (and changes nothing), the acceptor refuses it with a
# RemoteProtocolError and its code. A Want goes the other way round.

Rules = InitiatorRules | AcceptorRules


def f(
    op: int = 7,
    size: int = 10,
    offset: int = 0,
    base: bytes = b"",
    algo: int = XXH3_128,
    block_size: int = BS,
) -> F.File:
    return F.File(op, 1, offset, size, 0o644, 0, 0, 0, algo, block_size, b"v", base, b"p")


def want(op: int, *ranges: tuple[int, int]) -> F.Want:
    return F.Want(op, F.pack_ranges(list(ranges)))


class Pair:
    """An initiator's and an acceptor's rules, fed the same frames."""

    def __init__(self) -> None:
        self.ini = InitiatorRules()
        self.ini.sending(F.Open(1, "m"))
        self.ini.received(F.Opened(1, 0, 0, ""))
        self.acc = opened_acceptor()

    def __call__(self, *events: F.Event) -> Pair:
        """Frames both ends agree on, each in its direction (Error: the
        acceptor's refusal)."""
        for ev in events:
            if initiator_sends(ev):
                n = self.ini.sending(ev)
                assert self.acc.received(ev) == n
            else:
                assert self.acc.sending(ev) == 0
                assert self.ini.received(ev) == 0
        return self

    def refused(self, ev: F.Event, code: F.ErrorCode) -> RemoteProtocolError:
        """``ev`` may not be sent: the sender's rules raise and change
        nothing; the receiver's refuse it with ``code``."""
        sender: Rules = self.ini if initiator_sends(ev) else self.acc
        receiver: Rules = self.acc if initiator_sends(ev) else self.ini
        before = state(sender)
        with pytest.raises(LocalProtocolError):
            sender.sending(ev)
        assert state(sender) == before
        with pytest.raises(RemoteProtocolError) as e:
            receiver.received(ev)
        assert e.value.code is code, e.value
        return e.value

    def settled(self) -> None:
        """Nothing open, ended or unanswered on either side: no leak."""
        for r in (self.ini, self.acc):
            assert (r.files, r._files.ended, r.unacked) == ({}, {}, set())


def initiator_sends(ev: F.Event) -> bool:
    return type(ev) in ACCEPTOR_RECEIVES and not isinstance(ev, F.Error)


def state(r: Rules) -> object:
    """A copy of ``r``'s bookkeeping of files and operations."""

    def copy(files: dict[int, OpenFile]) -> dict[int, OpenFile]:
        return {
            op: dataclasses.replace(o, mend=None if o.mend is None else list(o.mend))
            for op, o in files.items()
        }

    return copy(r._files.open), copy(r._files.ended), set(r.unacked)


def whole(op: int = 7, size: int = 10, **kw: Any) -> list[F.Event]:
    """A file of one chunk and (for several blocks) all its digests."""
    out: list[F.Event] = [f(op, size, **kw)]
    if size:
        out.append(F.Chunk(op, 0, size))
    count = -(-size // kw.get("block_size", BS))
    if count > 1:
        out.append(F.Blocks(op, 0, D * count))
    return out


# File


@pytest.mark.parametrize("algo", [XXH3_128, BLAKE3])
@pytest.mark.parametrize("block_size", [MIN_BLOCK, 1 << 20, MAX_BLOCK, MIN_BLOCK + 1])
def test_file_algorithms_and_block_sizes(algo: int, block_size: int) -> None:
    digest = b"d" * (16 if algo == XXH3_128 else 32)
    p = Pair()(f(size=0, algo=algo, block_size=block_size, base=digest))
    p(F.End(7, b"x" * len(digest)))
    assert p.acc._files.ended[7].algo == algo
    p(F.Ack(7)).settled()


@pytest.mark.parametrize(
    "bad",
    [
        f(algo=0),
        f(algo=3),
        f(algo=255),
        f(block_size=MIN_BLOCK - 1),
        f(block_size=MAX_BLOCK + 1),
        f(block_size=0),
        f(block_size=4096),
        f(base=b"d"),
        f(base=b"d" * 15),
        f(base=b"d" * 17),
        f(base=b"d" * 32),  # a BLAKE3 digest for an xxh3-128 map
        f(algo=BLAKE3, base=b"d" * 16),
    ],
    ids=lambda ev: f"algo {ev.algo}, block {ev.block_size}, base {len(ev.base)}",
)
def test_file_with_a_bad_block_map_geometry(bad: F.File) -> None:
    p = Pair()
    p.refused(bad, E.MALFORMED)
    assert p.ini.unacked == set() and p.ini.files == {}


# Copy


def test_a_delta_mixes_copies_and_chunks() -> None:
    size = 3 * BS + 10
    p = Pair()(
        f(size=size, base=D),
        F.Copy(7, 0, BS),
        F.Chunk(7, BS, 100),
        F.Chunk(7, BS + 100, BS - 100),
        F.Copy(7, 2 * BS, BS + 10),  # longer than a Chunk may be: nothing travels
        F.Blocks(7, 0, D * 4),
        F.End(7, D),
    )
    p(F.Ack(7)).settled()
    # a delta may copy everything, or nothing
    Pair()(f(size=size, base=D), F.Copy(7, 0, size), F.Blocks(7, 0, D * 4), F.End(7, D))
    Pair()(*whole(size=size, base=D), F.End(7, D))
    # a resumed delta continues at its offset
    Pair()(f(size=size, offset=BS, base=D), F.Copy(7, BS, 2 * BS + 10), F.Blocks(7, 0, D * 4))


def test_copy_is_only_for_a_delta() -> None:
    p = Pair()(f(size=3 * BS))
    err = p.refused(F.Copy(7, 0, BS), E.UNEXPECTED)
    assert "no delta" in str(err)


@pytest.mark.parametrize(
    ("copy", "code"),
    [
        (F.Copy(7, 2 * BS, BS), E.UNEXPECTED),  # a gap
        (F.Copy(7, BS - 1, 2), E.UNEXPECTED),  # an overlap
        (F.Copy(7, 0, BS), E.UNEXPECTED),  # again
        (F.Copy(7, BS, 2 * BS + 11), E.UNEXPECTED),  # past the size
        (F.Copy(7, BS, 2**64 - 1), E.UNEXPECTED),
        (F.Copy(7, BS, 0), E.MALFORMED),
        (F.Copy(8, 0, 1), E.UNEXPECTED),  # no such file
    ],
)
def test_copy_must_continue_the_data(copy: F.Copy, code: F.ErrorCode) -> None:
    p = Pair()(f(size=3 * BS + 10, base=D), F.Copy(7, 0, BS))
    p.refused(copy, code)
    assert p.ini.files[7].next_offset == BS


# Blocks


def test_blocks_in_several_frames() -> None:
    size = 5 * BS + 1  # 6 blocks
    p = Pair()(f(size=size), F.Chunk(7, 0, size), F.Blocks(7, 0, D), F.Blocks(7, 1, D * 3))
    assert p.ini.files[7].blocks == p.acc.files[7].blocks == 4
    p.refused(F.End(7, D), E.UNEXPECTED)  # 2 digests still due
    p(F.Blocks(7, 4, D * 2), F.End(7, D), F.Ack(7)).settled()


def test_blocks_of_blake3_maps() -> None:
    size = 2 * BS
    d = b"b" * 32
    p = Pair()(f(size=size, algo=BLAKE3), F.Chunk(7, 0, size))
    p.refused(F.Blocks(7, 0, D), E.UNEXPECTED)  # half a BLAKE3 digest
    p(F.Blocks(7, 0, d * 2), F.End(7, d))


@pytest.mark.parametrize("sent", [0, 1, 3 * BS - 1])
def test_blocks_only_after_all_the_data(sent: int) -> None:
    p = Pair()(f(size=3 * BS))
    if sent:
        p(F.Chunk(7, 0, sent))
    err = p.refused(F.Blocks(7, 0, D), E.UNEXPECTED)
    assert "after all of its data" in str(err)


@pytest.mark.parametrize(
    "bad",
    [
        F.Blocks(7, 1, D),  # skips block 0
        F.Blocks(7, 2**32 - 1, D),
        F.Blocks(7, 0, D * 4),  # beyond the 3 blocks
        F.Blocks(7, 0, b""),  # no digest
        F.Blocks(7, 0, D[:15]),  # part of one
        F.Blocks(7, 0, D + D[:1]),  # a digest and a byte
        F.Blocks(8, 0, D),  # no such file
    ],
    ids=["skip", "far", "beyond the count", "empty", "part", "and a byte", "not open"],
)
def test_blocks_in_order_whole_and_within_the_count(bad: F.Blocks) -> None:
    p = Pair()(f(size=3 * BS), F.Chunk(7, 0, 3 * BS))
    p.refused(bad, E.UNEXPECTED)
    p(F.Blocks(7, 0, D), F.Blocks(7, 1, D * 2))
    for again in (F.Blocks(7, 0, D), F.Blocks(7, 1, D), F.Blocks(7, 3, D)):
        p.refused(again, E.UNEXPECTED)  # a repeat, or beyond the count
    p(F.End(7, D))
    p.refused(F.Blocks(7, 3, D), E.UNEXPECTED)  # ended


def test_one_block_needs_no_blocks_and_may_have_one() -> None:
    Pair()(*whole(size=BS), F.End(7, D))
    p = Pair()(*whole(size=BS), F.Blocks(7, 0, D))
    p.refused(F.Blocks(7, 1, D), E.UNEXPECTED)
    p(F.End(7, D))


def test_an_empty_file_has_no_blocks() -> None:
    p = Pair()(f(size=0))
    p.refused(F.Blocks(7, 0, D), E.UNEXPECTED)
    p(F.End(7, D), F.Ack(7)).settled()


# End


@pytest.mark.parametrize("have", [0, 1, 2])
def test_end_needs_every_digest_of_a_multi_block_file(have: int) -> None:
    p = Pair()(f(size=2 * BS + 1), F.Chunk(7, 0, 2 * BS + 1))
    if have:
        p(F.Blocks(7, 0, D * have))
    err = p.refused(F.End(7, D), E.UNEXPECTED)
    assert f"{have} of 3 block digests" in str(err)


@pytest.mark.parametrize(
    ("algo", "digest"),
    [
        (XXH3_128, b""),
        (XXH3_128, D[:15]),
        (XXH3_128, D + b"x"),
        (XXH3_128, D * 2),
        (BLAKE3, D),
        (BLAKE3, D * 2 + b"x"),
    ],
)
def test_end_with_a_digest_of_the_wrong_size(algo: int, digest: bytes) -> None:
    p = Pair()(*whole(size=10, algo=algo))
    err = p.refused(F.End(7, digest), E.UNEXPECTED)
    assert f"{len(digest)}-byte digest" in str(err)
    assert 7 in p.ini.files and 7 in p.acc.files  # still open


def test_ended_files_are_dropped_when_answered() -> None:
    p = Pair()
    for op in (1, 2, 3):
        p(*whole(op), F.End(op, D))
    assert set(p.ini._files.ended) == set(p.acc._files.ended) == {1, 2, 3}
    p(F.Ack(1), F.Error(E.NO_SPACE, 2, 0, "full"), F.Error(E.INTERNAL, 3, 0, "oops"))
    p.settled()
    # an op id answered is free again, for a file too
    p(*whole(2), F.End(2, D), F.Ack(2)).settled()


def test_a_fatal_error_answers_nothing() -> None:
    p = Pair()(*whole(), F.End(7, D))
    p.acc.sending(F.Error(E.SHUTTING_DOWN, 7, 1, "bye"))
    p.ini.received(F.Error(E.SHUTTING_DOWN, 7, 1, "bye"))
    for r in (p.ini, p.acc):
        assert r.unacked == {7} and set(r._files.ended) == {7}


def test_an_error_for_an_open_file_keeps_it_open_until_its_abort() -> None:
    p = Pair()(f(size=20), F.Chunk(7, 0, 5), F.Error(E.NO_SPACE, 7, 0, "full"))
    for r in (p.ini, p.acc):
        assert r.unacked == set() and 7 in r.files  # answered, still in the stream
    p(F.Chunk(7, 5, 5))  # it may go on
    p.refused(F.Ack(7), E.UNEXPECTED)  # but is answered already
    p(F.Abort(7, F.AbortReason.CANCELLED)).settled()


def test_an_error_for_an_open_file_then_its_end_leaves_nothing() -> None:
    p = Pair()(f(size=3 * BS), F.Error(E.BASE_CHANGED, 7, 0, "changed"))
    p(F.Chunk(7, 0, 3 * BS), F.Blocks(7, 0, D * 3), F.End(7, D)).settled()
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # a refused file is never mended


def test_ack_of_a_file_still_open_is_refused() -> None:
    p = Pair()(f(size=10), F.Chunk(7, 0, 4))
    err = p.refused(F.Ack(7), E.UNEXPECTED)
    assert "unfinished" in str(err)
    p(F.Chunk(7, 4, 6), F.End(7, D), F.Ack(7)).settled()


# Want


def test_want_chunk_end_then_ack() -> None:
    size = 3 * BS + 10
    p = Pair()(*whole(size=size), F.End(7, D))
    p(want(7, (0, 10), (BS, BS), (3 * BS, 10)))  # 3 ranges
    for r in (p.ini, p.acc):
        assert r._files.ended == {} and r.files[7].mend == [(0, 10), (BS, BS), (3 * BS, 10)]
        assert r.unacked == {7}  # a Want answers nothing
    p(F.Chunk(7, 0, 10))
    p.refused(F.End(7, D), E.UNEXPECTED)  # ranges still due
    p(F.Chunk(7, BS, 1), F.Chunk(7, BS + 1, BS - 1))  # a range in two chunks
    p.refused(F.Ack(7), E.UNEXPECTED)  # reopened: not finished
    p(F.Chunk(7, 3 * BS, 10), F.End(7, D))  # no Blocks again
    for r in (p.ini, p.acc):
        assert r.files == {} and set(r._files.ended) == {7}
    # mended and still damaged: another round
    p(want(7, (BS, 1)), F.Chunk(7, BS, 1), F.End(7, D))
    p(F.Ack(7)).settled()


def test_want_may_be_answered_by_an_abort_or_a_refusal() -> None:
    p = Pair()(*whole(), F.End(7, D), want(7, (0, 10)), F.Chunk(7, 0, 4))
    p(F.Abort(7, F.AbortReason.SOURCE_CHANGED)).settled()
    with pytest.raises(RemoteProtocolError):
        p.ini.received(F.Ack(7))  # an aborted file needs no answer
    # the receiver gives up on it (VERIFY_FAILED) while it is mended
    p(*whole(8), F.End(8, D), want(8, (0, 10)), F.Error(E.VERIFY_FAILED, 8, 0, "no"))
    assert 8 in p.ini.files and 8 in p.acc.files  # the stream goes on to its End
    p(F.Chunk(8, 0, 10), F.End(8, D)).settled()


def test_adjacent_ranges_are_allowed() -> None:
    p = Pair()(*whole(size=100), F.End(7, D), want(7, (0, 10), (10, 10), (90, 10)))
    p(F.Chunk(7, 0, 10), F.Chunk(7, 10, 10), F.Chunk(7, 90, 10), F.End(7, D))


@pytest.mark.parametrize(
    "ranges",
    [
        [(5, 1), (0, 1)],  # not ascending
        [(0, 10), (9, 10)],  # overlapping
        [(0, 10), (5, 1)],  # inside the previous one
        [(90, 11)],  # past the size
        [(100, 1)],
        [(2**64 - 1, 1)],
        [(0, 0)],  # empty
        [(0, 1), (5, 0)],
    ],
)
def test_want_with_bad_ranges(ranges: list[tuple[int, int]]) -> None:
    p = Pair()(*whole(size=100), F.End(7, D))
    err = p.refused(want(7, *ranges), E.UNEXPECTED)
    assert "Want of file 7" in str(err)
    assert 7 in p.ini._files.ended and 7 not in p.ini.files


@pytest.mark.parametrize("raw", [b"", b"\0" * 15, b"\0" * 17], ids=["none", "15", "17"])
def test_want_ranges_that_are_not_whole(raw: bytes) -> None:
    p = Pair()(*whole(size=100), F.End(7, D))
    p.refused(F.Want(7, raw), E.UNEXPECTED)


def test_want_only_for_a_file_ended_and_unanswered() -> None:
    p = Pair()
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # unknown
    p(f(size=10))
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # still open
    p(F.Chunk(7, 0, 10))
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # still open, all data sent
    p(F.End(7, D), want(7, (0, 1)))
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # reopened already
    p(F.Chunk(7, 0, 1), F.End(7, D), F.Ack(7))
    p.refused(want(7, (0, 1)), E.UNEXPECTED)  # answered
    p(make(F.Mkdir, op=8))
    p.refused(want(8, (0, 1)), E.UNEXPECTED)  # no file
    p(F.Ack(8), *whole(9), F.Abort(9, F.AbortReason.SOURCE_GONE))
    p.refused(want(9, (0, 1)), E.UNEXPECTED)  # aborted
    p.settled()


@pytest.mark.parametrize(
    "bad",
    [
        F.Chunk(7, 0, 10),  # not the range due
        F.Chunk(7, 11, 1),  # inside it, not at its start
        F.Chunk(7, 10, 11),  # longer than it
        F.Chunk(7, 50, 5),  # the next range before this one
        F.Copy(7, 10, 10),  # no Copy while mending, even in a delta
        F.Blocks(7, 0, D),  # no Blocks while mending
        F.End(7, D),  # before all the ranges
    ],
)
def test_mend_chunks_must_match_the_wanted_ranges(bad: F.Event) -> None:
    p = Pair()(*whole(size=100, base=D), F.End(7, D), want(7, (10, 10), (50, 5)))
    p.refused(bad, E.UNEXPECTED)
    p(F.Chunk(7, 10, 10), F.Chunk(7, 50, 5))
    p.refused(F.Chunk(7, 55, 1), E.UNEXPECTED)  # all sent: nothing more is due
    p(F.End(7, D), F.Ack(7)).settled()


def test_files_sent_again_do_not_count_as_open_files() -> None:
    """A Want and a File may cross on the wire: if files sent again counted,
    the two ends would disagree on the 65th open file. So a Want reopens a
    file whatever is open, and only files on their first pass count."""
    p = Pair()(*whole(1), F.End(1, D), *whole(2), F.End(2, D))
    for op in range(3, F.MAX_OPEN_FILES + 3):
        p(f(op))
    assert len(p.ini.files) == F.MAX_OPEN_FILES
    p(want(1, (0, 1)), want(2, (0, 1)))
    assert len(p.ini.files) == len(p.acc.files) == F.MAX_OPEN_FILES + 2
    p.refused(f(100), E.LIMIT)  # the 65th on its first pass
    p(F.Chunk(1, 0, 1), F.End(1, D), F.Abort(2, F.AbortReason.SOURCE_CHANGED))
    p.refused(f(101), E.LIMIT)  # (a refused frame is fatal: a fresh op id each time)
    p(F.Abort(3, F.AbortReason.CANCELLED), f(102))


def test_a_want_crossing_a_file_on_the_wire() -> None:
    """The acceptor sends a Want while the initiator's 64th File is on its
    way: both ends accept both frames, in their own order."""
    ini, acc = InitiatorRules(), opened_acceptor()
    ini.sending(F.Open(1, "m"))
    ini.received(F.Opened(1, 0, 0, ""))
    for ev in [*whole(1), F.End(1, D), *[f(op) for op in range(2, F.MAX_OPEN_FILES + 1)]]:
        ini.sending(ev)
        acc.received(ev)
    crossing_file, crossing_want = f(F.MAX_OPEN_FILES + 1), want(1, (0, 10))
    ini.sending(crossing_file)  # 64 open on the initiator
    acc.sending(crossing_want)  # 63 open on the acceptor, before the File arrives
    ini.received(crossing_want)
    acc.received(crossing_file)
    assert set(ini.files) == set(acc.files) == set(range(1, F.MAX_OPEN_FILES + 2))


# -- Check / Checked (scrub) ------------------------------------------------------------

D16 = bytes(16)


def check(op: int = 30, bs: int = BS) -> F.Check:
    return F.Check(op, 1, 1, bs, b"f")


def test_a_check_is_answered_by_its_checked_frames() -> None:
    pair = Pair()
    pair(check(30), F.Checked(30, 3 * BS, 0, D16 * 2), F.Checked(30, 3 * BS, 2, D16))
    pair.settled()
    assert pair.ini._checks.pending == {} and pair.acc._checks.pending == {}


def test_an_empty_file_is_one_checked_without_digests() -> None:
    pair = Pair()
    pair(check(31), F.Checked(31, 0, 0, b""))
    pair.settled()


def test_a_refused_check_is_answered() -> None:
    pair = Pair()
    pair(check(32), F.Error(F.ErrorCode.CONFLICT, 32, 0, "not a regular file here"))
    pair.settled()
    assert pair.acc._checks.pending == {}


@pytest.mark.parametrize(
    "bad",
    [
        F.Checked(33, 3 * BS, 1, D16),  # not from the first block
        F.Checked(33, 3 * BS, 0, D16 * 4),  # more blocks than the file has
        F.Checked(33, 3 * BS, 0, b"\0" * 15),  # not whole digests
        F.Checked(33, 3 * BS, 0, b""),  # no digest for a non-empty file
        F.Checked(99, 3 * BS, 0, D16),  # no such Check
    ],
)
def test_checked_frames_follow_their_check(bad: F.Checked) -> None:
    pair = Pair()
    pair(check(33))
    pair.refused(bad, F.ErrorCode.UNEXPECTED)


def test_checked_frames_agree_on_the_size() -> None:
    pair = Pair()
    pair(check(34), F.Checked(34, 3 * BS, 0, D16))
    pair.refused(F.Checked(34, 4 * BS, 1, D16), F.ErrorCode.UNEXPECTED)


def test_a_check_is_not_acked() -> None:
    pair = Pair()
    pair(check(35))
    with pytest.raises(LocalProtocolError):
        pair.acc.sending(F.Ack(35))
    with pytest.raises(RemoteProtocolError):
        pair.ini.received(F.Ack(35))


@pytest.mark.parametrize("bad", [F.Check(36, 1, 9, BS, b"f"), F.Check(36, 1, 1, 4096, b"f")])
def test_a_check_names_a_known_digest_and_block_size(bad: F.Check) -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.ini.sending(bad)
    with pytest.raises(RemoteProtocolError) as e:
        pair.acc.received(bad)
    assert e.value.code is F.ErrorCode.MALFORMED


# -- Hole (sparse files) ---------------------------------------------------------------


def test_holes_advance_a_file_like_data() -> None:
    pair = Pair()
    ev = F.File(40, 1, 0, 3 * BS, 0o644, 0, 0, 0, 1, BS, b"v", b"", b"sparse")
    pair(ev, F.Chunk(40, 0, 10), F.Hole(40, 10, 2 * BS), F.Chunk(40, 2 * BS + 10, BS - 10))
    pair(F.Blocks(40, 0, D16 * 3), F.End(40, D16))


@pytest.mark.parametrize(
    "bad",
    [F.Hole(41, 5, 10), F.Hole(41, 0, 0), F.Hole(41, 0, 3 * BS + 1), F.Hole(99, 0, 1)],
)
def test_a_hole_continues_its_file(bad: F.Hole) -> None:
    pair = Pair()
    pair(F.File(41, 1, 0, 3 * BS, 0o644, 0, 0, 0, 1, BS, b"v", b"", b"sparse"))
    pair.refused(bad, F.ErrorCode.UNEXPECTED)
