"""The Connection state machine: handshake, ordering rules, limits, payload
accounting. A real initiator and acceptor talk to each other in memory
(``ConnectionPair``, after h11's tests/helpers.py); no sockets, no clocks."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import frames as F
from replicator.blockmap import MIN_BLOCK
from replicator.errors import LocalProtocolError, RemoteProtocolError
from replicator.protocol import (
    NEED_DATA,
    PAYLOAD,
    Connection,
    Established,
    Role,
    State,
    frame_keys,
    frame_tag,
    proof,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=50)

KEY = b"shared secret of a and b, 32 by"
WRONG_KEY = b"not the shared secret of a and b"
INI, ACC = Role.INITIATOR, Role.ACCEPTOR
E = F.ErrorCode


def nonce(n: int) -> bytes:
    return bytes([n]) * F.NONCE_SIZE


def pattern(offset: int, length: int) -> bytes:
    """Deterministic payload bytes of a file at ``offset``."""
    return bytes((offset + i) % 251 for i in range(length))


class ConnectionPair:
    """An INITIATOR and an ACCEPTOR Connection wired back to back.

    ``send(conn, *events)`` makes ``conn`` send the events (and, after a Chunk,
    its payload) and feeds the bytes to the other side, returning the events
    the other side decoded. Payload bytes the receiver takes from its buffer
    are collected in ``payload[role]``. ``inject(conn, *events)`` feeds frames
    to ``conn`` that its peer's own checks would have refused to send (tagged
    as the peer would tag them: the tests of ordering rules get past the
    integrity check).

    During ``handshake()`` a side that detects a violation answers with a fatal
    Error frame, as session.py and link.py do; ``failure`` records who and why.
    """

    def __init__(
        self,
        initiator: str = "a",
        acceptor: str = "b",
        *,
        initiator_keys: dict[str, bytes] | None = None,
        acceptor_keys: dict[str, bytes] | None = None,
        expect_peer: str | None = "",
        initiator_nonce: bytes = nonce(1),
        acceptor_nonce: bytes = nonce(2),
    ) -> None:
        ikeys = {acceptor: KEY} if initiator_keys is None else initiator_keys
        akeys = {initiator: KEY} if acceptor_keys is None else acceptor_keys
        self.initiator = Connection(
            INI,
            initiator,
            initiator_nonce,
            ikeys.get,
            expect_peer=acceptor if expect_peer == "" else expect_peer,
        )
        self.acceptor = Connection(ACC, acceptor, acceptor_nonce, akeys.get)
        self.events: dict[Role, list[object]] = {INI: [], ACC: []}
        self.payload: dict[Role, bytearray] = {INI: bytearray(), ACC: bytearray()}
        self.failure: tuple[Connection, RemoteProtocolError] | None = None
        #: Every transmission: (sender role, bytes).
        self.wire: list[tuple[Role, bytes]] = []

    def peer_of(self, conn: Connection) -> Connection:
        return self.acceptor if conn is self.initiator else self.initiator

    @property
    def conns(self) -> tuple[Connection, Connection]:
        return self.initiator, self.acceptor

    # -- moving bytes ------------------------------------------------------

    def receive(self, conn: Connection, data: bytes) -> list[object]:
        """Feed ``data`` to ``conn``; its events until it needs more data."""
        conn.receive_data(data)
        out: list[object] = []
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAYLOAD:
                self.payload[conn.role] += conn.payload_from_buffer(conn.payload_remaining)
                if conn.payload_remaining:
                    break
                continue
            out.append(ev)
            if conn.state is State.CLOSED:
                break  # a fatal Error: nothing more may be read
        self.events[conn.role] += out
        return out

    def transmit(self, src: Connection, data: bytes) -> list[object]:
        self.wire.append((src.role, data))
        return self.receive(self.peer_of(src), data)

    def send(self, conn: Connection, *events: F.Event) -> list[object]:
        data = bytearray()
        for ev in events:
            data += conn.send(ev)
            if isinstance(ev, F.Chunk):
                data += pattern(ev.offset, ev.length)
                conn.payload_sent(ev.length)
        return self.transmit(conn, bytes(data))

    def inject(self, conn: Connection, *events: F.Event) -> list[object]:
        return self.receive(conn, b"".join(self.forge(conn, F.encode(ev)) for ev in events))

    def forge(self, conn: Connection, frame: bytes) -> bytes:
        """``frame`` as ``conn``'s peer would send it, tag included (once
        established) but without the peer's own checks: the peer's sequence
        number moves on, so the pair stays in step."""
        return self.peer_of(conn)._seal(frame)

    # -- handshake -----------------------------------------------------------

    def _transmit_or_refuse(self, src: Connection, data: bytes) -> None:
        dst = self.peer_of(src)
        try:
            self.transmit(src, data)
        except RemoteProtocolError as e:
            self.failure = (dst, e)
            self.transmit(dst, dst.send(F.Error(e.code, 0, 1, str(e))))

    def handshake(self, *, bytewise: bool = False) -> dict[Role, list[object]]:
        self.initiator.start()
        moving = True
        while moving and self.failure is None:
            moving = False
            for src in self.conns:
                data = src.data_to_send()
                if not data:
                    continue
                moving = True
                pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
                for piece in pieces:
                    self._transmit_or_refuse(src, piece)
                    if self.failure is not None:
                        break
        return self.events

    def established(self) -> bool:
        return all(c.state is State.ESTABLISHED for c in self.conns)

    # -- common set-ups ------------------------------------------------------

    def open(self, mirror: int = 1, name: str = "m") -> None:
        assert self.send(self.initiator, F.Open(mirror, name)) == [F.Open(mirror, name)]
        assert self.send(self.acceptor, F.Opened(mirror, 0, 0, "")) == [F.Opened(mirror, 0, 0, "")]

    def unacked(self) -> tuple[int, int]:
        return self.initiator.unacked(), self.acceptor.unacked()


def established_pair() -> ConnectionPair:
    p = ConnectionPair()
    p.handshake()
    assert p.established()
    return p


@pytest.fixture
def pair() -> ConnectionPair:
    p = established_pair()
    p.open(1)
    return p


#: A file digest (End) or block digest (Blocks) of xxh3-128, the default algorithm.
DIGEST = bytes(range(16))
BLOCK = MIN_BLOCK


def file(
    op: int,
    size: int,
    offset: int = 0,
    mirror: int = 1,
    path: bytes = b"f",
    base: bytes = b"",
    algo: int = 1,
    block_size: int = BLOCK,
) -> F.File:
    return F.File(
        op,
        mirror,
        offset,
        size,
        0o644,
        1_000_000_000,
        1000,
        1000,
        algo,
        block_size,
        b"ver",
        base,
        path,
    )


def end(op: int, digest: bytes = DIGEST) -> F.End:
    return F.End(op, digest)


def mkdir(op: int, mirror: int = 1) -> F.Mkdir:
    return F.Mkdir(op, mirror, 0o755, 0, 0, 0, b"d")


def raises_remote(
    pair: ConnectionPair, conn: Connection, code: E, *events: F.Event
) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as exc:
        pair.inject(conn, *events)
    assert exc.value.code is code, exc.value
    return exc.value


# =============================================================================
# Handshake
# =============================================================================


@pytest.mark.parametrize(("ini_name", "acc_name"), [("a", "b"), ("b", "a"), ("nöde-1", "x")])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_handshake_succeeds(ini_name: str, acc_name: str, bytewise: bool) -> None:
    p = ConnectionPair(ini_name, acc_name)
    events = p.handshake(bytewise=bytewise)
    assert p.failure is None
    assert events[INI] == [Established(acc_name, 3)]
    assert events[ACC] == [Established(ini_name, 3)]
    assert (p.initiator.peer, p.acceptor.peer) == (acc_name, ini_name)
    assert p.established() and p.initiator.version == p.acceptor.version == 3
    if not bytewise:  # Hello, Hello, Auth, Auth: alternating, initiator first
        assert [r for r, _ in p.wire] == [INI, ACC, INI, ACC]
        kinds = [F.decode_header(d[:8])[0] for _, d in p.wire]
        assert kinds == [F.Hello.KIND, F.Hello.KIND, F.Auth.KIND, F.Auth.KIND]
    for c in p.conns:
        assert c.data_to_send() == b""
        assert c.next_event() is NEED_DATA


def test_handshake_frames_carry_our_name_and_nonce() -> None:
    p = ConnectionPair()
    p.handshake()
    hello_i, hello_a, auth_i, auth_a = (F.decode_body(d[0], d[8:]) for _, d in p.wire)
    assert hello_i == F.Hello(F.VERSION_MIN, F.VERSION_MAX, F.MAGIC, "a", nonce(1))
    assert hello_a == F.Hello(F.VERSION_MIN, F.VERSION_MAX, F.MAGIC, "b", nonce(2))
    assert auth_i == F.Auth(proof(KEY, b"initiator", "a", "b", nonce(1), nonce(2)))
    assert auth_a == F.Auth(proof(KEY, b"acceptor", "a", "b", nonce(1), nonce(2)))


def test_proof_binds_label_names_nonces_and_key() -> None:
    base = proof(KEY, b"initiator", "a", "b", nonce(1), nonce(2))
    assert len(base) == 32
    variants = [
        proof(KEY, b"acceptor", "a", "b", nonce(1), nonce(2)),
        proof(KEY, b"initiator", "b", "a", nonce(1), nonce(2)),
        proof(KEY, b"initiator", "a", "b", nonce(2), nonce(1)),
        proof(KEY, b"initiator", "a", "c", nonce(1), nonce(2)),
        proof(KEY, b"initiator", "a", "b", nonce(1), nonce(3)),
        proof(WRONG_KEY, b"initiator", "a", "b", nonce(1), nonce(2)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_wrong_key_is_caught_by_the_acceptor() -> None:
    p = ConnectionPair(acceptor_keys={"a": WRONG_KEY})
    events = p.handshake()
    assert p.failure is not None
    conn, err = p.failure
    assert conn is p.acceptor and err.code is E.AUTH
    # the acceptor never revealed its own proof
    assert [F.decode_header(d[:8])[0] for r, d in p.wire if r is ACC] == [
        F.Hello.KIND,
        F.Error.KIND,
    ]
    assert events[ACC] == []
    [error] = events[INI]
    assert isinstance(error, F.Error) and (error.code, error.fatal) == (E.AUTH, 1)
    assert p.initiator.state is p.acceptor.state is State.CLOSED


def test_forged_acceptor_proof_is_caught_by_the_initiator() -> None:
    p = ConnectionPair()
    p.initiator.start()
    p.transmit(p.initiator, p.initiator.data_to_send())  # Hello →
    p.transmit(p.acceptor, p.acceptor.data_to_send())  # ← Hello
    assert p.transmit(p.initiator, p.initiator.data_to_send()) == [Established("a", 3)]  # Auth →
    auth = bytearray(p.acceptor.data_to_send())
    auth[-1] ^= 1
    with pytest.raises(RemoteProtocolError) as exc:
        p.receive(p.initiator, bytes(auth))
    assert exc.value.code is E.AUTH
    assert p.initiator.state is State.AWAIT_AUTH


def test_unknown_initiator_is_refused_at_its_hello() -> None:
    p = ConnectionPair("mallory", "b", acceptor_keys={"a": KEY})
    p.handshake()
    assert p.failure is not None
    conn, err = p.failure
    assert conn is p.acceptor and err.code is E.AUTH
    assert p.acceptor.state is State.CLOSED
    assert [r for r, _ in p.wire] == [INI, ACC]  # Hello →, ← Error
    [error] = p.events[INI]
    assert isinstance(error, F.Error) and error.code == E.AUTH and error.fatal


def test_unknown_acceptor_is_refused_at_its_hello() -> None:
    p = ConnectionPair(initiator_keys={"c": KEY}, expect_peer=None)
    p.handshake()
    assert p.failure is not None
    conn, err = p.failure
    assert conn is p.initiator and err.code is E.AUTH
    assert [r for r, _ in p.wire] == [INI, ACC, INI]  # no Auth sent: the Error instead
    assert isinstance(p.events[ACC][0], F.Error)


def test_expect_peer_mismatch() -> None:
    # the acceptor says it is "b", the initiator dialled "c" (and even has a key for "b")
    p = ConnectionPair(initiator_keys={"b": KEY, "c": KEY}, expect_peer="c")
    p.handshake()
    assert p.failure is not None
    conn, err = p.failure
    assert conn is p.initiator and err.code is E.AUTH
    assert "'c'" in str(err) and "'b'" in str(err)
    # the initiator did not answer with a proof
    assert F.decode_header(p.wire[-1][1][:8])[0] == F.Error.KIND
    assert p.initiator.peer is None


def test_expect_peer_none_accepts_any_known_name() -> None:
    p = ConnectionPair(initiator_keys={"b": KEY}, expect_peer=None)
    p.handshake()
    assert p.established()


@pytest.mark.parametrize(
    ("vmin", "vmax", "ok"),
    [
        (3, 3, True),
        (1, 3, True),
        (3, 9, True),
        (0, 65535, True),
        (1, 1, False),
        (0, 1, False),
        (2, 2, False),  # version 2: no block maps
        (1, 2, False),
        (4, 5, False),
        (0, 0, False),
    ],
)
def test_version_negotiation(vmin: int, vmax: int, ok: bool) -> None:
    for receiver in (ACC, INI):
        p = ConnectionPair()
        conn = p.acceptor if receiver is ACC else p.initiator
        if receiver is INI:
            p.initiator.start()
        hello = F.Hello(vmin, vmax, F.MAGIC, "b" if receiver is INI else "a", nonce(9))
        if ok:
            assert p.inject(conn, hello) == []
            assert conn.state is State.AWAIT_AUTH and conn.version == 3
        else:
            err = raises_remote(p, conn, E.VERSION, hello)
            assert f"{vmin}..{vmax}" in str(err)
            # who has to be upgraded: an old peer (version 1 had no frame
            # tags), or this node
            assert ("upgrade replicator on the peer" in str(err)) is (vmax < 3)
            assert ("upgrade us" in str(err)) is (vmin > 3)


def speaking(version: int, monkeypatch: pytest.MonkeyPatch, conn: Connection) -> bytes:
    """The Hello of ``conn`` as a node that speaks only ``version`` sends it."""
    with monkeypatch.context() as m:
        m.setattr(F, "VERSION_MIN", version)
        m.setattr(F, "VERSION_MAX", version)
        if conn.role is INI:
            conn.start()
        else:
            conn._queue_hello()
        return conn.data_to_send()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("old", [INI, ACC])
def test_old_peer_is_refused(monkeypatch: pytest.MonkeyPatch, old: Role, version: int) -> None:
    """A node of version 1 (frames not authenticated) or 2 (no block maps)
    meets one of version 3, either way round: refused in the handshake,
    before any frame of either kind flows, with an Error that says which
    side to upgrade."""
    p = ConnectionPair()
    if old is INI:
        p._transmit_or_refuse(p.initiator, speaking(version, monkeypatch, p.initiator))
        refuser, refused = p.acceptor, p.initiator
    else:
        p.initiator.start()
        p.transmit(p.initiator, p.initiator.data_to_send())
        p.acceptor.data_to_send()  # its version 3 Hello, replaced:
        p._transmit_or_refuse(p.acceptor, speaking(version, monkeypatch, p.acceptor))
        refuser, refused = p.initiator, p.acceptor
    assert p.failure is not None
    conn, err = p.failure
    assert conn is refuser and err.code is E.VERSION
    want = f"speaks protocol {version}..{version}, we need 3..3: upgrade replicator on the peer"
    assert want in str(err)
    [error] = p.events[refused.role]
    assert isinstance(error, F.Error) and error.code == E.VERSION and error.fatal
    assert refuser.state is State.CLOSED


def test_version_mismatch_through_the_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """An initiator that speaks only version 4 meets an acceptor of version 3."""
    p = ConnectionPair()
    p._transmit_or_refuse(p.initiator, speaking(4, monkeypatch, p.initiator))
    assert p.failure is not None
    conn, err = p.failure
    assert conn is p.acceptor and err.code is E.VERSION
    assert "upgrade us" in str(err)
    [error] = p.events[INI]
    assert isinstance(error, F.Error) and error.code == E.VERSION


@pytest.mark.parametrize("magic", [b"", b"RPL", b"RPLD", b"rplc", b"RPLC\0", b"HTTP"])
def test_bad_magic(magic: bytes) -> None:
    for receiver in (ACC, INI):
        p = ConnectionPair()
        conn = p.acceptor if receiver is ACC else p.initiator
        name = "a" if receiver is ACC else "b"
        raises_remote(p, conn, E.MALFORMED, F.Hello(3, 3, magic, name, nonce(9)))
        assert conn.state is State.AWAIT_HELLO


@pytest.mark.parametrize("size", [0, 16, 31, 33, 255])
def test_bad_nonce_length(size: int) -> None:
    p = ConnectionPair()
    raises_remote(p, p.acceptor, E.MALFORMED, F.Hello(3, 3, F.MAGIC, "a", b"n" * size))


def test_own_nonce_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        Connection(ACC, "b", b"short", {"a": KEY}.get)


def test_bad_magic_from_a_non_replicator_peer() -> None:
    p = ConnectionPair()
    raw = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    with pytest.raises(RemoteProtocolError) as exc:
        p.receive(p.acceptor, raw)
    assert exc.value.code is E.MALFORMED  # "G" is no frame kind


#: One sample of every frame.
SAMPLE: dict[type[F.Event], F.Event] = {
    F.Hello: F.Hello(3, 3, F.MAGIC, "a", nonce(9)),
    F.Auth: F.Auth(b"p" * 32),
    F.Open: F.Open(1, "m"),
    F.Opened: F.Opened(1, 0, 0, ""),
    F.List: F.List(1, 1),
    F.Entry: F.Entry(1, 1, 0o644, 0, 0, 0, 0, b"f", b""),
    F.Partial: F.Partial(1, 5, b"v", b"f"),
    F.ListEnd: F.ListEnd(1, 1, 0),
    F.File: F.File(1, 1, 0, 0, 0, 0, 0, 0, 1, BLOCK, b"", b"", b"f"),
    F.Chunk: F.Chunk(1, 0, 1),
    F.Copy: F.Copy(1, 0, 1),
    F.Hole: F.Hole(1, 0, 1),
    F.Owner: F.Owner(2, 100, "users"),
    F.Xattr: F.Xattr(0, "user.a", b"v"),
    F.Blocks: F.Blocks(1, 0, DIGEST),
    F.End: end(1),
    F.Abort: F.Abort(1, 1),
    F.Mkdir: mkdir(1),
    F.Symlink: F.Symlink(1, 1, 0, 0, 0, b"l", b"t"),
    F.Delete: F.Delete(1, 1, b"f"),
    F.Rename: F.Rename(1, 1, b"f", b"g"),
    F.Meta: F.Meta(1, 1, 0, 0, 0, 0, b"f"),
    F.HardLink: F.HardLink(1, 1, 0, 0, b"g", b"f"),
    F.Ack: F.Ack(1),
    F.Ping: F.Ping(1),
    F.Pong: F.Pong(1),
    F.Error: F.Error(1, 0, 1, "x"),
    F.Want: F.Want(1, F.pack_ranges([(0, 1)])),
    F.Check: F.Check(1, 1, 1, BLOCK, b"f"),
    F.Checked: F.Checked(1, 0, 0, b""),
}
NOT_HELLO = [SAMPLE[c] for c in SAMPLE if c not in (F.Hello, F.Error)]
NOT_AUTH = [SAMPLE[c] for c in SAMPLE if c not in (F.Auth, F.Error)]


def test_sample_covers_every_frame() -> None:
    assert set(SAMPLE) == set(F.EVENTS.values())


@pytest.mark.parametrize("ev", NOT_HELLO, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("receiver", [ACC, INI], ids=["acceptor", "initiator"])
def test_anything_but_hello_first_is_unexpected(ev: F.Event, receiver: Role) -> None:
    p = ConnectionPair()
    conn = p.acceptor if receiver is ACC else p.initiator
    if receiver is INI:
        p.initiator.start()
    err = raises_remote(p, conn, E.UNEXPECTED, ev)
    assert "expected Hello" in str(err)


@pytest.mark.parametrize("ev", NOT_AUTH, ids=lambda e: type(e).__name__)
def test_anything_but_auth_second_is_unexpected(ev: F.Event) -> None:
    p = ConnectionPair()
    p.inject(p.acceptor, F.Hello(3, 3, F.MAGIC, "a", nonce(1)))
    assert p.acceptor.state is State.AWAIT_AUTH
    err = raises_remote(p, p.acceptor, E.UNEXPECTED, ev)
    assert "expected Auth" in str(err)


def test_error_during_handshake_is_an_event() -> None:
    p = ConnectionPair()
    p.initiator.start()
    err = F.Error(E.SHUTTING_DOWN, 0, 1, "going down")
    assert p.inject(p.initiator, err) == [err]
    assert p.initiator.state is State.CLOSED
    # a fresh acceptor gets a fatal Error instead of a Hello
    assert p.inject(p.acceptor, err) == [err]
    assert p.acceptor.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        p.acceptor.next_event()


def test_replayed_initiator_handshake_fails() -> None:
    """Recorded Hello+Auth of an initiator do not open a session with a new
    acceptor nonce."""
    old = established_pair()
    recorded = b"".join(d for r, d in old.wire if r is INI)
    victim = Connection(ACC, "b", nonce(7), {"a": KEY}.get)
    victim.receive_data(recorded)
    with pytest.raises(RemoteProtocolError) as exc:
        victim.next_event()
    assert exc.value.code is E.AUTH
    assert victim.state is State.AWAIT_AUTH


def test_replayed_acceptor_handshake_fails() -> None:
    old = established_pair()
    hello_a, auth_a = (d for r, d in old.wire if r is ACC)
    victim = Connection(INI, "a", nonce(8), {"b": KEY}.get, expect_peer="b")
    victim.start()
    victim.receive_data(hello_a)
    assert victim.next_event() is NEED_DATA
    victim.receive_data(auth_a)
    with pytest.raises(RemoteProtocolError) as exc:
        victim.next_event()
    assert exc.value.code is E.AUTH


def test_reflected_initiator_proof_fails() -> None:
    """A fake acceptor that sends the initiator's own Auth back."""
    p = ConnectionPair()
    p.initiator.start()
    p.transmit(p.initiator, p.initiator.data_to_send())
    p.transmit(p.acceptor, p.acceptor.data_to_send())
    own_auth = p.initiator.data_to_send()
    with pytest.raises(RemoteProtocolError) as exc:
        p.receive(p.initiator, own_auth)
    assert exc.value.code is E.AUTH


def test_mirrored_hello_and_reflected_proof_fail() -> None:
    """A fake acceptor echoes the initiator's Hello (same name, same nonce),
    then its Auth: identical inputs, but the labels differ."""
    ini = Connection(INI, "a", nonce(1), {"a": KEY}.get)
    ini.start()
    hello = ini.data_to_send()
    ini.receive_data(hello)
    assert ini.next_event() is NEED_DATA
    ini.receive_data(ini.data_to_send())
    with pytest.raises(RemoteProtocolError) as exc:
        ini.next_event()
    assert exc.value.code is E.AUTH


def test_acceptor_proof_is_not_accepted_by_an_acceptor() -> None:
    """An acceptor's proof (label "acceptor") is no initiator proof, even with
    the very same names and nonces."""
    acc = Connection(ACC, "b", nonce(2), {"a": KEY}.get)
    acc.receive_data(F.encode(F.Hello(3, 3, F.MAGIC, "a", nonce(1))))
    assert acc.next_event() is NEED_DATA
    acc.receive_data(F.encode(F.Auth(proof(KEY, b"acceptor", "a", "b", nonce(1), nonce(2)))))
    with pytest.raises(RemoteProtocolError) as exc:
        acc.next_event()
    assert exc.value.code is E.AUTH


def test_acceptor_reveals_no_proof_before_verifying() -> None:
    acc = Connection(ACC, "b", nonce(2), {"a": KEY}.get)
    acc.receive_data(F.encode(F.Hello(3, 3, F.MAGIC, "a", nonce(1))))
    assert acc.next_event() is NEED_DATA
    assert F.decode_header(acc.data_to_send()[:8])[0] == F.Hello.KIND
    acc.receive_data(F.encode(F.Auth(b"\0" * 32)))
    with pytest.raises(RemoteProtocolError):
        acc.next_event()
    assert acc.data_to_send() == b""


def test_handshake_api_misuse() -> None:
    p = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        p.acceptor.start()
    for c in p.conns:
        with pytest.raises(LocalProtocolError):
            c.send(F.Ping(1))
    # a (fatal) Error may always be sent while the handshake runs
    assert F.decode_header(p.acceptor.send(F.Error(E.SHUTTING_DOWN, 0, 1, "bye"))[:8])[0] == 21
    assert p.acceptor.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        p.acceptor.send(F.Error(E.SHUTTING_DOWN, 0, 1, "again"))


@pytest.mark.parametrize("ev", [SAMPLE[F.Hello], SAMPLE[F.Auth]], ids=["Hello", "Auth"])
def test_handshake_frames_after_established_are_unexpected(ev: F.Event) -> None:
    p = established_pair()
    for c in p.conns:
        raises_remote(p, c, E.UNEXPECTED, ev)
        with pytest.raises(LocalProtocolError):
            c.send(ev)


# =============================================================================
# Roles: which frames flow which way
# =============================================================================

INITIATOR_SENDS = {
    F.Open,
    F.List,
    F.File,
    F.Chunk,
    F.Copy,
    F.Blocks,
    F.End,
    F.Abort,
    F.Mkdir,
    F.Symlink,
    F.Delete,
    F.Rename,
    F.Meta,
    F.HardLink,
    F.Check,
    F.Hole,
    F.Owner,
    F.Xattr,
    F.Ping,
    F.Pong,
    F.Error,
}
ACCEPTOR_SENDS = {
    F.Opened,
    F.Entry,
    F.Partial,
    F.ListEnd,
    F.Ack,
    F.Want,
    F.Checked,
    F.Ping,
    F.Pong,
    F.Error,
}


@pytest.mark.parametrize("cls", [F.EVENTS[k] for k in sorted(F.EVENTS)], ids=lambda c: c.__name__)
def test_frames_in_the_wrong_direction(cls: type[F.Event]) -> None:
    ev = SAMPLE[cls]
    p = established_pair()
    if cls not in ACCEPTOR_SENDS:
        err = raises_remote(p, p.initiator, E.UNEXPECTED, ev)
        assert "not allowed" in str(err) or "expected" in str(err)
        with pytest.raises(LocalProtocolError):
            p.acceptor.send(ev)
    if cls not in INITIATOR_SENDS:
        raises_remote(p, p.acceptor, E.UNEXPECTED, ev)
        with pytest.raises(LocalProtocolError):
            p.initiator.send(ev)


def test_ping_pong_both_ways_without_a_mirror() -> None:
    p = established_pair()
    assert p.send(p.initiator, F.Ping(1)) == [F.Ping(1)]
    assert p.send(p.acceptor, F.Pong(1), F.Ping(2)) == [F.Pong(1), F.Ping(2)]
    assert p.send(p.initiator, F.Pong(2)) == [F.Pong(2)]


# =============================================================================
# Mirrors
# =============================================================================

MIRROR_OPS = [
    F.List(1, 1),
    file(1, 0),
    mkdir(1),
    F.Symlink(1, 1, 0, 0, 0, b"l", b"t"),
    F.Delete(1, 1, b"f"),
    F.Rename(1, 1, b"f", b"g"),
    F.Meta(1, 1, 0, 0, 0, 0, b"f"),
]


@pytest.mark.parametrize("ev", MIRROR_OPS, ids=lambda e: type(e).__name__)
def test_mirror_frames_need_an_opened_mirror(ev: F.Event) -> None:
    p = established_pair()
    raises_remote(p, p.acceptor, E.UNEXPECTED, ev)
    # Open alone does not open it: the acceptor's Opened with code 0 does
    p = established_pair()
    p.send(p.initiator, F.Open(1, "m"))
    raises_remote(p, p.acceptor, E.UNEXPECTED, ev)
    p.send(p.acceptor, F.Opened(1, 0, 0, ""))
    assert p.inject(p.acceptor, ev) == [ev]


@pytest.mark.parametrize("ev", MIRROR_OPS, ids=lambda e: type(e).__name__)
def test_refused_mirror_stays_closed(ev: F.Event) -> None:
    p = established_pair()
    p.send(p.initiator, F.Open(1, "m"))
    refusal = F.Opened(1, E.FORBIDDEN, 0, "not from you")
    assert p.send(p.acceptor, refusal) == [refusal]
    raises_remote(p, p.acceptor, E.UNEXPECTED, ev)


def test_mirror_ids_are_separate(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, mkdir(1, mirror=2))
    pair.open(2, "other")
    assert pair.send(pair.initiator, mkdir(1, mirror=2)) == [mkdir(1, mirror=2)]


def test_open_of_an_opened_mirror_is_unexpected(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Open(1, "again"))


def test_opened_for_a_mirror_never_opened(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.initiator, E.UNEXPECTED, F.Opened(7, 0, 0, ""))


def test_listing(pair: ConnectionPair) -> None:
    assert pair.send(pair.initiator, F.List(1, 3)) == [F.List(1, 3)]
    answer = [
        F.Entry(1, F.EntryKind.DIR, 0o755, 0, 1, 0, 0, b"d", b""),
        F.Entry(1, F.EntryKind.SYMLINK, 0o777, 1, 1, 0, 0, b"d/l", b"x"),
        F.Partial(1, 4096, b"version", b"d/big"),
        F.ListEnd(1, 3, 2),
    ]
    assert pair.send(pair.acceptor, *answer) == answer
    assert pair.unacked() == (0, 0)


# =============================================================================
# Operations
# =============================================================================


def test_operation_acknowledged(pair: ConnectionPair) -> None:
    ops = [
        mkdir(1),
        F.Symlink(2, 1, 0, 0, 0, b"l", b"t"),
        F.Delete(3, 1, b"x"),
        F.Rename(4, 1, b"a", b"b"),
        F.Meta(5, 1, 0o600, 0, 0, 0, b"a"),
    ]
    assert pair.send(pair.initiator, *ops) == ops
    assert pair.unacked() == (5, 5)
    acks = [F.Ack(op) for op in (3, 1, 5)]  # in any order
    assert pair.send(pair.acceptor, *acks) == acks
    assert pair.unacked() == (2, 2)


@pytest.mark.parametrize("ev", MIRROR_OPS[1:], ids=lambda e: type(e).__name__)
def test_operation_id_zero_is_malformed(pair: ConnectionPair, ev: F.Event) -> None:
    zero = dataclasses.replace(ev, op=0)  # type: ignore[type-var]
    raises_remote(pair, pair.acceptor, E.MALFORMED, zero)


def test_reused_operation_id(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(5))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Delete(5, 1, b"x"))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(F.Delete(5, 1, b"x"))


@pytest.mark.parametrize("answer", [F.Ack(5), F.Error(E.CONFLICT, 5, 0, "no")])
def test_operation_id_free_again_once_answered(pair: ConnectionPair, answer: F.Event) -> None:
    pair.send(pair.initiator, mkdir(5))
    assert pair.send(pair.acceptor, answer) == [answer]
    assert pair.unacked() == (0, 0)
    assert pair.send(pair.initiator, F.Delete(5, 1, b"x")) == [F.Delete(5, 1, b"x")]


def test_file_id_in_use_until_acked(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, file(5, 0), end(5))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, mkdir(5))
    pair.send(pair.acceptor, F.Ack(5))
    assert pair.send(pair.initiator, mkdir(5)) == [mkdir(5)]


def test_ack_for_unknown_operation(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.initiator, E.UNEXPECTED, F.Ack(9))


def test_ack_twice(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(9))
    pair.send(pair.acceptor, F.Ack(9))
    raises_remote(pair, pair.initiator, E.UNEXPECTED, F.Ack(9))


def test_ack_after_refusal(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(9))
    pair.send(pair.acceptor, F.Error(E.BAD_PATH, 9, 0, "no"))
    raises_remote(pair, pair.initiator, E.UNEXPECTED, F.Ack(9))


def test_unacked_limit() -> None:
    p = established_pair()
    p.open()
    ops = b"".join(p.forge(p.acceptor, F.encode(mkdir(op))) for op in range(1, F.MAX_UNACKED + 1))
    assert len(p.receive(p.acceptor, ops)) == F.MAX_UNACKED
    assert p.acceptor.unacked() == F.MAX_UNACKED
    raises_remote(p, p.acceptor, E.LIMIT, mkdir(F.MAX_UNACKED + 1))


def test_unacked_limit_counts_answers() -> None:
    p = established_pair()
    p.open()
    ops = b"".join(p.forge(p.acceptor, F.encode(mkdir(op))) for op in range(1, F.MAX_UNACKED + 1))
    p.receive(p.acceptor, ops)
    p.acceptor.send(F.Ack(1))  # answered: one more may come
    assert p.inject(p.acceptor, mkdir(F.MAX_UNACKED + 1)) == [mkdir(F.MAX_UNACKED + 1)]
    raises_remote(p, p.acceptor, E.LIMIT, mkdir(F.MAX_UNACKED + 2))


def test_nonfatal_error_refuses_one_operation(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(1), mkdir(2))
    err = F.Error(E.NO_SPACE, 1, 0, "full")
    assert pair.send(pair.acceptor, err) == [err]
    assert pair.unacked() == (1, 1)
    assert all(c.state is State.ESTABLISHED for c in pair.conns)


@pytest.mark.parametrize("sender", [INI, ACC])
def test_fatal_error_closes_both_sides(pair: ConnectionPair, sender: Role) -> None:
    src = pair.initiator if sender is INI else pair.acceptor
    dst = pair.peer_of(src)
    err = F.Error(E.SHUTTING_DOWN, 0, 1, "bye")
    assert pair.send(src, err) == [err]
    assert src.state is dst.state is State.CLOSED
    for c in pair.conns:
        with pytest.raises(LocalProtocolError):
            c.send(F.Ping(1))
    with pytest.raises(RemoteProtocolError) as exc:
        dst.next_event()
    assert exc.value.code is E.UNEXPECTED


# =============================================================================
# Files and chunks
# =============================================================================


def test_file_transfer(pair: ConnectionPair) -> None:
    frames = [file(1, 10), F.Chunk(1, 0, 4), F.Chunk(1, 4, 6), end(1)]
    assert pair.send(pair.initiator, *frames) == frames
    assert bytes(pair.payload[ACC]) == pattern(0, 10)
    assert pair.initiator.open_files() == 0
    assert pair.unacked() == (1, 1)
    pair.send(pair.acceptor, F.Ack(1))
    assert pair.unacked() == (0, 0)


def test_empty_file_needs_no_chunk(pair: ConnectionPair) -> None:
    assert pair.send(pair.initiator, file(1, 0), end(1)) == [file(1, 0), end(1)]


def test_resumed_file_starts_at_its_offset(pair: ConnectionPair) -> None:
    frames = [file(1, 10, offset=6), F.Chunk(1, 6, 4), end(1)]
    assert pair.send(pair.initiator, *frames) == frames
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, file(2, 10, offset=6), F.Chunk(2, 0, 4))


def test_resume_at_the_very_end(pair: ConnectionPair) -> None:
    assert pair.send(pair.initiator, file(1, 10, offset=10), end(1))[-1] == end(1)


def test_file_offset_beyond_size(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.MALFORMED, file(1, 10, offset=11))


def test_chunks_of_files_interleave(pair: ConnectionPair) -> None:
    frames = [
        file(1, 8),
        file(2, 8),
        F.Chunk(1, 0, 4),
        F.Chunk(2, 0, 4),
        file(3, 2),
        F.Chunk(3, 0, 2),
        end(3),
        F.Chunk(2, 4, 4),
        F.Chunk(1, 4, 4),
        end(1),
        end(2),
    ]
    assert pair.send(pair.initiator, *frames) == frames
    assert bytes(pair.payload[ACC]) == (
        pattern(0, 4) + pattern(0, 4) + pattern(0, 2) + pattern(4, 4) + pattern(4, 4)
    )


def test_chunk_for_a_file_not_open(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Chunk(1, 0, 1))


def test_chunk_for_an_operation_that_is_no_file(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(1))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Chunk(1, 0, 1))


def test_chunk_after_end(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, file(1, 1), F.Chunk(1, 0, 1), end(1))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Chunk(1, 1, 1))


@pytest.mark.parametrize(
    "chunk",
    [F.Chunk(1, 1, 2), F.Chunk(1, 0, 2), F.Chunk(1, 3, 2), F.Chunk(1, 2**63, 1)],
    ids=["overlap", "repeat", "gap", "huge"],
)
def test_chunk_at_the_wrong_offset(pair: ConnectionPair, chunk: F.Chunk) -> None:
    pair.send(pair.initiator, file(1, 10), F.Chunk(1, 0, 2))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, chunk)
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(chunk)


@pytest.mark.parametrize(
    ("first", "bad"),
    [(0, F.Chunk(1, 0, 11)), (8, F.Chunk(1, 8, 3)), (10, F.Chunk(1, 10, 1))],
)
def test_chunk_past_the_declared_size(pair: ConnectionPair, first: int, bad: F.Chunk) -> None:
    pair.send(pair.initiator, file(1, 10))
    if first:
        pair.send(pair.initiator, F.Chunk(1, 0, first))
    err = raises_remote(pair, pair.acceptor, E.UNEXPECTED, bad)
    assert "size 10" in str(err)
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(bad)


@pytest.mark.parametrize("length", [0, F.MAX_CHUNK + 1, 2**32 - 1])
def test_chunk_length_out_of_bounds(pair: ConnectionPair, length: int) -> None:
    pair.send(pair.initiator, file(1, 2**40))
    raises_remote(pair, pair.acceptor, E.TOO_LARGE, F.Chunk(1, 0, length))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(F.Chunk(1, 0, length))
    assert pair.initiator.payload_owed == 0


def test_largest_chunk(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, file(1, F.MAX_CHUNK))
    assert pair.inject(pair.acceptor, F.Chunk(1, 0, F.MAX_CHUNK)) == [F.Chunk(1, 0, F.MAX_CHUNK)]
    assert pair.acceptor.payload_remaining == F.MAX_CHUNK
    assert pair.initiator.send(F.Chunk(1, 0, F.MAX_CHUNK))
    assert pair.initiator.payload_owed == F.MAX_CHUNK


@pytest.mark.parametrize("sent", [0, 4, 9])
def test_end_before_all_bytes(pair: ConnectionPair, sent: int) -> None:
    pair.send(pair.initiator, file(1, 10))
    if sent:
        pair.send(pair.initiator, F.Chunk(1, 0, sent))
    err = raises_remote(pair, pair.acceptor, E.UNEXPECTED, end(1))
    assert "not complete" in str(err)


def test_end_of_a_file_never_begun(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, end(1))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(end(1))


def test_open_files_limit(pair: ConnectionPair) -> None:
    files = [file(op, 1) for op in range(1, F.MAX_OPEN_FILES + 1)]
    assert pair.send(pair.initiator, *files) == files
    assert pair.initiator.open_files() == F.MAX_OPEN_FILES
    extra = file(F.MAX_OPEN_FILES + 1, 1)
    raises_remote(pair, pair.acceptor, E.LIMIT, extra)


def test_open_files_limit_frees_on_end_and_abort(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, *[file(op, 1) for op in range(1, F.MAX_OPEN_FILES + 1)])
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(file(100, 1))
    pair.send(pair.initiator, F.Chunk(1, 0, 1), end(1), F.Abort(2, F.AbortReason.CANCELLED))
    assert pair.initiator.open_files() == F.MAX_OPEN_FILES - 2
    assert pair.send(pair.initiator, file(100, 1), file(101, 1)) == [file(100, 1), file(101, 1)]
    raises_remote(pair, pair.acceptor, E.LIMIT, file(102, 1))


def test_other_operations_do_not_count_as_open_files(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, *[file(op, 1) for op in range(1, F.MAX_OPEN_FILES + 1)])
    assert pair.send(pair.initiator, mkdir(1000)) == [mkdir(1000)]


# =============================================================================
# Abort
# =============================================================================


def test_abort_clears_the_operation_on_both_sides(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, mkdir(9), file(5, 10), F.Chunk(5, 0, 4))
    assert pair.unacked() == (2, 2) and pair.initiator.open_files() == 1
    abort = F.Abort(5, F.AbortReason.SOURCE_CHANGED)
    assert pair.send(pair.initiator, abort) == [abort]
    assert pair.unacked() == (1, 1) and pair.initiator.open_files() == 0
    # the aborted file is gone on the receiver...
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Chunk(5, 4, 6))


def test_abort_needs_no_answer_and_frees_the_id(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, file(5, 10), F.Abort(5, F.AbortReason.SOURCE_GONE))
    # no Ack may come for it...
    raises_remote(pair, pair.initiator, E.UNEXPECTED, F.Ack(5))


def test_aborted_id_can_be_used_again(pair: ConnectionPair) -> None:
    pair.send(pair.initiator, file(5, 10), F.Abort(5, F.AbortReason.SOURCE_GONE))
    frames = [file(5, 3), F.Chunk(5, 0, 3), end(5)]
    assert pair.send(pair.initiator, *frames) == frames


def test_abort_after_filler_completes_the_chunk(pair: ConnectionPair) -> None:
    """The source shrank mid-chunk: the sender completes the declared length
    (filler), then aborts; the stream stays framed."""
    ini = pair.initiator
    data = ini.send(file(5, 100)) + ini.send(F.Chunk(5, 0, 50))
    data += b"real" + bytes(46)  # 4 real bytes, then zero filler
    ini.payload_sent(4)
    assert ini.payload_owed == 46
    ini.payload_sent(46)
    data += ini.send(F.Abort(5, F.AbortReason.SOURCE_CHANGED)) + ini.send(F.Ping(1))
    events = pair.receive(pair.acceptor, data)
    assert events == [file(5, 100), F.Chunk(5, 0, 50), F.Abort(5, 1), F.Ping(1)]
    assert pair.unacked() == (0, 0)


def test_abort_of_a_file_not_open(pair: ConnectionPair) -> None:
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Abort(5, 1))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(F.Abort(5, 1))
    pair.send(pair.initiator, mkdir(6))
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, F.Abort(6, 1))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(F.Abort(6, 1))


def test_refused_file_is_still_sent_to_its_end(pair: ConnectionPair) -> None:
    """The receiver refuses a file (nonfatal Error) while it is being sent:
    the sender may complete it or abort it; the op needs no further answer."""
    pair.send(pair.initiator, file(5, 10), F.Chunk(5, 0, 5))
    pair.send(pair.acceptor, F.Error(E.NO_SPACE, 5, 0, "full"))
    assert pair.unacked() == (0, 0)
    assert pair.send(pair.initiator, F.Chunk(5, 5, 5), end(5))[-1] == end(5)
    pair.send(pair.initiator, file(6, 10))
    pair.send(pair.acceptor, F.Error(E.NO_SPACE, 6, 0, "full"))
    assert pair.send(pair.initiator, F.Abort(6, F.AbortReason.CANCELLED)) == [F.Abort(6, 3)]


# =============================================================================
# Block maps (version 3): Copy, Blocks, End's digest, Want
# =============================================================================


def ended(pair: ConnectionPair, op: int, size: int, **kw: object) -> None:
    """File ``op`` of ``size`` bytes, all held by the acceptor already (a
    resume at its very end: no payload), its digests sent, ended."""
    count = -(-size // BLOCK)
    frames: list[F.Event] = [file(op, size, offset=size, **kw)]  # type: ignore[arg-type]
    if count > 1:
        frames.append(F.Blocks(op, 0, DIGEST * count))
    pair.send(pair.initiator, *frames, end(op))


def rules_settled(pair: ConnectionPair) -> None:
    """Nothing open, ended or unanswered on either side: nothing leaked."""
    for c in pair.conns:
        r = c._rules
        assert (r.files, r._files.ended, r.unacked) == ({}, {}, set())


def test_a_file_of_several_blocks(pair: ConnectionPair) -> None:
    size = 2 * BLOCK + 3
    frames = [
        file(1, size),
        F.Chunk(1, 0, BLOCK),
        F.Chunk(1, BLOCK, BLOCK + 3),
        F.Blocks(1, 0, DIGEST),
        F.Blocks(1, 1, DIGEST * 2),
        end(1),
    ]
    assert pair.send(pair.initiator, *frames) == frames
    assert bytes(pair.payload[ACC]) == pattern(0, BLOCK) + pattern(BLOCK, BLOCK + 3)
    pair.send(pair.acceptor, F.Ack(1))
    rules_settled(pair)


def test_a_delta_copies_without_payload(pair: ConnectionPair) -> None:
    size = 3 * BLOCK
    ini, acc = pair.initiator, pair.acceptor
    frames = [
        file(1, size, base=DIGEST),
        F.Copy(1, 0, BLOCK),
        F.Chunk(1, BLOCK, 10),
        F.Copy(1, BLOCK + 10, 2 * BLOCK - 10),
        F.Blocks(1, 0, DIGEST * 3),
        end(1),
    ]
    assert pair.send(ini, *frames) == frames
    assert bytes(pair.payload[ACC]) == pattern(BLOCK, 10)  # only the Chunk's bytes
    assert ini.payload_owed == 0 and acc.payload_remaining == 0
    # a Copy is followed by no payload: the next frame comes right after it
    data = ini.send(file(2, size, base=DIGEST)) + ini.send(F.Copy(2, 0, size)) + ini.send(F.Ping(4))
    assert pair.receive(acc, data) == [file(2, size, base=DIGEST), F.Copy(2, 0, size), F.Ping(4)]


@pytest.mark.parametrize(
    ("setup", "bad", "code"),
    [
        ([file(1, 10, algo=3)], None, E.MALFORMED),
        ([file(1, 10, block_size=BLOCK // 2)], None, E.MALFORMED),
        ([file(1, 10, block_size=F.MAX_CHUNK + 1)], None, E.MALFORMED),
        ([file(1, 10, base=b"b")], None, E.MALFORMED),
        ([file(1, 10)], F.Copy(1, 0, 10), E.UNEXPECTED),  # not a delta
        ([file(1, 10, base=DIGEST)], F.Copy(1, 1, 9), E.UNEXPECTED),  # not contiguous
        ([file(1, 10, base=DIGEST)], F.Copy(1, 0, 11), E.UNEXPECTED),  # past the size
        ([file(1, 10, base=DIGEST)], F.Copy(1, 0, 0), E.MALFORMED),
        ([file(1, 3 * BLOCK)], F.Blocks(1, 0, DIGEST), E.UNEXPECTED),  # before the data
        ([file(1, 3 * BLOCK, offset=3 * BLOCK)], F.Blocks(1, 1, DIGEST), E.UNEXPECTED),
        ([file(1, 3 * BLOCK, offset=3 * BLOCK)], F.Blocks(1, 0, DIGEST * 4), E.UNEXPECTED),
        ([file(1, 3 * BLOCK, offset=3 * BLOCK)], F.Blocks(1, 0, DIGEST[:8]), E.UNEXPECTED),
        ([file(1, 3 * BLOCK, offset=3 * BLOCK), F.Blocks(1, 0, DIGEST * 2)], end(1), E.UNEXPECTED),
        ([file(1, 10, offset=10)], end(1, DIGEST[:15]), E.UNEXPECTED),
        ([file(1, 10, offset=10)], end(1, DIGEST * 2), E.UNEXPECTED),
        ([file(1, 10, offset=10, algo=2)], end(1), E.UNEXPECTED),  # BLAKE3: 32 bytes
    ],
)
def test_block_map_violations(
    pair: ConnectionPair, setup: list[F.Event], bad: F.Event | None, code: E
) -> None:
    """The acceptor refuses them with ``code``; the initiator does not send them."""
    if bad is None:
        *setup, bad = setup
    pair.send(pair.initiator, *setup)
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(bad)
    raises_remote(pair, pair.acceptor, code, bad)


def test_want_chunks_end_ack(pair: ConnectionPair) -> None:
    ini, acc = pair.initiator, pair.acceptor
    size = 3 * BLOCK
    frames = [file(1, size), F.Chunk(1, 0, size), F.Blocks(1, 0, DIGEST * 3), end(1)]
    pair.send(ini, *frames)
    assert ini.open_files() == 0 and pair.unacked() == (1, 1)
    wanted = F.Want(1, F.pack_ranges([(BLOCK, BLOCK), (2 * BLOCK, 5)]))
    assert pair.send(acc, wanted) == [wanted]
    assert ini.open_files() == 1 and pair.unacked() == (1, 1)  # reopened, still unanswered
    with pytest.raises(LocalProtocolError):
        acc.send(F.Ack(1))  # not before its End
    raises_remote(pair, ini, E.UNEXPECTED, F.Ack(1))
    pair.payload[ACC].clear()
    again = [F.Chunk(1, BLOCK, 7), F.Chunk(1, BLOCK + 7, BLOCK - 7), F.Chunk(1, 2 * BLOCK, 5)]
    assert pair.send(ini, *again, end(1)) == [*again, end(1)]
    assert bytes(pair.payload[ACC]) == pattern(BLOCK, BLOCK) + pattern(2 * BLOCK, 5)
    assert ini.open_files() == 0
    pair.send(acc, F.Ack(1))
    assert pair.unacked() == (0, 0)
    rules_settled(pair)


def test_want_then_abort_or_refusal(pair: ConnectionPair) -> None:
    ini, acc = pair.initiator, pair.acceptor
    ended(pair, 1, 10)
    pair.send(acc, F.Want(1, F.pack_ranges([(0, 10)])))
    pair.send(ini, F.Abort(1, F.AbortReason.SOURCE_CHANGED))
    rules_settled(pair)
    ended(pair, 2, 10)
    pair.send(acc, F.Want(2, F.pack_ranges([(0, 10)])))
    pair.send(acc, F.Error(E.VERIFY_FAILED, 2, 0, "given up"))  # answered: no Ack will come
    assert pair.unacked() == (0, 0) and ini.open_files() == 1  # but the stream goes on
    pair.send(ini, F.Chunk(2, 0, 10), end(2))
    rules_settled(pair)


@pytest.mark.parametrize(
    "ranges",
    [
        [],
        [(0, 0)],
        [(5, 5), (0, 5)],
        [(0, 6), (5, 5)],
        [(0, 11)],
        [(10, 1)],
    ],
    ids=["none", "empty range", "unsorted", "overlapping", "beyond the size", "at the end"],
)
def test_want_with_bad_ranges(pair: ConnectionPair, ranges: list[tuple[int, int]]) -> None:
    ended(pair, 1, 10)
    bad = F.Want(1, F.pack_ranges(ranges))
    with pytest.raises(LocalProtocolError):
        pair.acceptor.send(bad)
    raises_remote(pair, pair.initiator, E.UNEXPECTED, bad)


def test_want_only_for_an_ended_unanswered_file(pair: ConnectionPair) -> None:
    ini, acc = pair.initiator, pair.acceptor
    w = F.Want(1, F.pack_ranges([(0, 1)]))
    raises_remote(pair, ini, E.UNEXPECTED, w)  # never sent
    pair.send(ini, file(1, 10))
    with pytest.raises(LocalProtocolError):
        acc.send(w)  # not ended
    raises_remote(pair, ini, E.UNEXPECTED, w)
    pair.send(ini, F.Chunk(1, 0, 10), end(1))
    pair.send(acc, F.Ack(1))
    with pytest.raises(LocalProtocolError):
        acc.send(w)  # answered
    raises_remote(pair, ini, E.UNEXPECTED, w)
    pair.send(ini, mkdir(1))
    with pytest.raises(LocalProtocolError):
        acc.send(w)  # no file
    raises_remote(pair, ini, E.UNEXPECTED, w)


@pytest.mark.parametrize(
    "bad",
    [
        F.Chunk(1, 0, 1),  # not the range due
        F.Chunk(1, 4, 3),  # past the range
        F.Chunk(1, 8, 2),  # the second range first
        F.Copy(1, 2, 2),
        F.Blocks(1, 0, DIGEST),
        end(1),  # ranges still due
    ],
)
def test_mend_sends_exactly_the_wanted_ranges(pair: ConnectionPair, bad: F.Event) -> None:
    ended(pair, 1, 10, base=DIGEST)
    pair.send(pair.acceptor, F.Want(1, F.pack_ranges([(2, 2), (8, 2)])))
    with pytest.raises(LocalProtocolError):
        pair.initiator.send(bad)
    raises_remote(pair, pair.acceptor, E.UNEXPECTED, bad)


def test_block_digests_and_wanted_ranges_are_authenticated(pair: ConnectionPair) -> None:
    """A changed digest or range fails the frame's tag (the payload is
    checked by the block map, the map by the tags)."""
    raw = bytearray(pair.initiator.send(file(1, 2 * BLOCK, offset=2 * BLOCK)))
    assert pair.receive(pair.acceptor, bytes(raw))
    raw = bytearray(pair.initiator.send(F.Blocks(1, 0, DIGEST * 2)))
    raw[F.HEADER_SIZE + 10] ^= 1  # the first digest
    refused(pair.acceptor, bytes(raw), 2, F.Blocks)
    q = established_pair()
    q.open()
    ended(q, 1, 10)
    raw = bytearray(q.acceptor.send(F.Want(1, F.pack_ranges([(0, 10)]))))
    raw[F.HEADER_SIZE + 6 + 15] ^= 1  # the length of the range
    refused(q.initiator, bytes(raw), 1, F.Want)  # #0 was the Opened


# =============================================================================
# Payload accounting, receiving side
# =============================================================================


def chunk_stream(pair: ConnectionPair, length: int = 10) -> tuple[bytes, bytes]:
    """Frames of a file of ``length`` bytes in one chunk: (header bytes, payload)."""
    ini = pair.initiator
    head = ini.send(file(1, length)) + ini.send(F.Chunk(1, 0, length))
    ini.payload_sent(length)
    return head, pattern(0, length)


def test_payload_state_until_all_bytes_taken(pair: ConnectionPair) -> None:
    acc = pair.acceptor
    head, payload = chunk_stream(pair)
    tail = pair.initiator.send(end(1))
    acc.receive_data(head + payload[:3])
    assert acc.next_event() == file(1, 10)
    assert acc.next_event() == F.Chunk(1, 0, 10)
    assert acc.payload_remaining == 10
    for _ in range(3):  # it stays there, however often asked
        assert acc.next_event() is PAYLOAD
    assert acc.payload_from_buffer(2) == payload[:2]
    assert acc.payload_remaining == 8
    assert acc.payload_from_buffer(100) == payload[2:3]  # only what is buffered
    assert acc.payload_from_buffer(100) == b""
    assert acc.next_event() is PAYLOAD
    acc.receive_data(payload[3:] + tail)  # the End is right behind the payload
    assert acc.next_event() is PAYLOAD  # the End's bytes are payload until taken
    assert acc.payload_from_buffer(100) == payload[3:]
    assert acc.payload_remaining == 0
    assert acc.next_event() == end(1)
    assert acc.next_event() is NEED_DATA


def test_payload_consumed_from_the_socket(pair: ConnectionPair) -> None:
    """The splice path: bytes were moved by the caller, never fed in."""
    acc = pair.acceptor
    head, _ = chunk_stream(pair)
    acc.receive_data(head)
    assert acc.next_event() == file(1, 10)
    assert acc.next_event() == F.Chunk(1, 0, 10)
    acc.payload_consumed(4)
    assert acc.next_event() is PAYLOAD and acc.payload_remaining == 6
    acc.payload_consumed(6)
    assert acc.next_event() is NEED_DATA
    acc.receive_data(pair.initiator.send(end(1)))
    assert acc.next_event() == end(1)


def test_rewind_returns_and_forgets_the_buffered_bytes(pair: ConnectionPair) -> None:
    """The session's flow: peek, parse, rewind what was not parsed, consume
    exactly the parsed bytes, splice the payload, peek again."""
    acc = pair.acceptor
    head, payload = chunk_stream(pair)
    tail = pair.initiator.send(end(1)) + pair.initiator.send(F.Ping(5))
    peeked = head + payload[:7]  # what one MSG_PEEK returned
    acc.receive_data(peeked)
    assert acc.next_event() == file(1, 10)
    assert acc.next_event() == F.Chunk(1, 0, 10)
    assert acc.next_event() is PAYLOAD
    assert acc.buffered() == 7
    assert acc.rewind() == 7
    assert acc.buffered() == 0
    assert acc.rewind() == 0
    assert len(peeked) - 7 == len(head)  # the caller consumes exactly the frames
    acc.payload_consumed(10)  # spliced
    acc.receive_data(tail)  # the next peek
    assert acc.next_event() == end(1)
    assert acc.next_event() == F.Ping(5)


def test_rewind_of_a_partial_frame(pair: ConnectionPair) -> None:
    acc = pair.acceptor
    raw = pair.initiator.send(F.Ping(5))
    acc.receive_data(raw[:5])
    assert acc.next_event() is NEED_DATA
    assert acc.rewind() == 5
    acc.receive_data(raw)
    assert acc.next_event() == F.Ping(5)


def test_payload_consumed_with_buffered_bytes_is_refused(pair: ConnectionPair) -> None:
    acc = pair.acceptor
    head, payload = chunk_stream(pair)
    acc.receive_data(head + payload[:1])
    acc.next_event(), acc.next_event()
    with pytest.raises(LocalProtocolError):
        acc.payload_consumed(10)
    assert acc.payload_remaining == 10 and acc.buffered() == 1  # nothing changed
    acc.rewind()
    acc.payload_consumed(10)
    assert acc.payload_remaining == 0


def test_payload_consumed_beyond_the_chunk_is_refused(pair: ConnectionPair) -> None:
    acc = pair.acceptor
    head, _ = chunk_stream(pair)
    acc.receive_data(head)
    acc.next_event(), acc.next_event()
    with pytest.raises(LocalProtocolError):
        acc.payload_consumed(11)
    assert acc.payload_remaining == 10
    acc.payload_consumed(10)
    with pytest.raises(LocalProtocolError):
        acc.payload_consumed(1)


def test_no_payload_outside_a_chunk(pair: ConnectionPair) -> None:
    acc = pair.acceptor
    acc.receive_data(F.encode(F.Ping(1)))
    assert acc.payload_from_buffer(100) == b""
    assert acc.buffered() == F.HEADER_SIZE + 8
    assert acc.rewind() == F.HEADER_SIZE + 8
    with pytest.raises(LocalProtocolError):
        acc.payload_consumed(1)


@SETTINGS
@given(
    size=st.integers(1, 3000),
    cuts=st.lists(st.integers(1, 1000), max_size=10),
    splice=st.lists(st.booleans(), min_size=1, max_size=40),
)
def test_any_chunking_and_any_mix_of_inline_and_splice(
    size: int, cuts: list[int], splice: list[bool]
) -> None:
    """The sender cuts a file into arbitrary chunks; the receiver takes each
    payload either from its buffer or (after rewind) "from the socket"."""
    p = established_pair()
    p.open()
    ini, acc = p.initiator, p.acceptor
    # sender
    sent: list[F.Event] = [file(1, size)]
    stream = bytearray(ini.send(sent[0]))
    offset = 0
    for cut in itertools.cycle(cuts or [size]):
        n = min(cut, size - offset)
        sent.append(F.Chunk(1, offset, n))
        stream += ini.send(sent[-1]) + pattern(offset, n)
        ini.payload_sent(n)
        offset += n
        if offset == size:
            break
    sent.append(end(1))
    stream += ini.send(sent[-1])
    received: list[object] = []
    # receiver: reads of 700 bytes
    got = bytearray()
    pos = 0
    modes = itertools.cycle(splice)
    while pos < len(stream):
        read = stream[pos : pos + 700]
        acc.receive_data(read)
        pos += len(read)
        while (ev := acc.next_event()) is not NEED_DATA:
            if ev is not PAYLOAD:
                received.append(ev)
                continue
            if next(modes):
                unparsed = acc.rewind()
                pos -= unparsed  # "still in the kernel"
                due = acc.payload_remaining
                got += stream[pos : pos + due]
                pos += due
                acc.payload_consumed(due)
            else:
                data = acc.payload_from_buffer(acc.payload_remaining)
                got += data
                if acc.payload_remaining:
                    break
    assert bytes(got) == pattern(0, size)
    assert received == sent and acc.payload_remaining == 0 and acc.buffered() == 0
    assert acc.unacked() == 1 and ini.open_files() == 0


# =============================================================================
# Sending side
# =============================================================================


@pytest.mark.parametrize(
    "ev", [F.Ping(1), end(1), F.Abort(1, 1), mkdir(2), F.Error(E.INTERNAL, 0, 1, "x")]
)
def test_send_while_payload_owed(pair: ConnectionPair, ev: F.Event) -> None:
    ini = pair.initiator
    ini.send(file(1, 10))
    ini.send(F.Chunk(1, 0, 10))
    assert ini.payload_owed == 10
    with pytest.raises(LocalProtocolError):
        ini.send(ev)
    ini.payload_sent(9)
    with pytest.raises(LocalProtocolError):
        ini.send(ev)
    ini.payload_sent(1)
    assert ini.payload_owed == 0
    if isinstance(ev, F.End | F.Abort):
        ini.send(ev)


def test_payload_sent_beyond_the_chunk(pair: ConnectionPair) -> None:
    ini = pair.initiator
    with pytest.raises(LocalProtocolError):
        ini.payload_sent(1)
    ini.send(file(1, 10))
    ini.send(F.Chunk(1, 0, 4))
    with pytest.raises(LocalProtocolError):
        ini.payload_sent(5)
    assert ini.payload_owed == 4


def test_refused_send_changes_nothing(pair: ConnectionPair) -> None:
    ini = pair.initiator
    # a frame that cannot be encoded
    with pytest.raises(F.FrameError):
        ini.send(file(1, 10, path=b"p" * (F.MAX_PATH + 1)))
    assert ini.unacked() == 0 and ini.open_files() == 0
    assert pair.send(ini, file(1, 10)) == [file(1, 10)]
    # End of an incomplete file: the file stays open
    with pytest.raises(LocalProtocolError):
        ini.send(end(1))
    assert ini.open_files() == 1
    assert pair.send(ini, F.Chunk(1, 0, 10), end(1))[-1] == end(1)
    # one file too many: its id is not taken
    pair.send(ini, *[file(op, 1) for op in range(10, 10 + F.MAX_OPEN_FILES)])
    before = ini.unacked()
    with pytest.raises(LocalProtocolError):
        ini.send(file(99, 1))
    assert ini.unacked() == before
    # a Chunk past its file's end owes nothing
    with pytest.raises(LocalProtocolError):
        ini.send(F.Chunk(10, 0, 2))
    assert ini.payload_owed == 0
    # an acceptor's Error whose op id does not fit keeps its operation
    pair.send(ini, F.Chunk(10, 0, 1), end(10))
    with pytest.raises(F.FrameError):
        pair.acceptor.send(F.Error(E.IO_ERROR, 10, 256, "fatal flag out of range"))
    assert pair.acceptor.unacked() == ini.unacked()


def test_send_returns_the_encoded_frame_and_its_tag(pair: ConnectionPair) -> None:
    i2a, a2i = frame_keys(KEY, 3, "a", "b", nonce(1), nonce(2))
    # frames #0 were the Open and the Opened of the fixture
    raw = F.encode(mkdir(1))
    assert pair.initiator.send(mkdir(1)) == raw + frame_tag(i2a, 1, raw)
    raw = F.encode(F.Pong(3))
    assert pair.acceptor.send(F.Pong(3)) == raw + frame_tag(a2i, 1, raw)


def frames_of(events: Iterable[object]) -> list[type]:
    return [type(e) for e in events]


def test_a_whole_session(pair: ConnectionPair) -> None:
    """Open, list with a partial, resume it, send a new file and a directory."""
    ini, acc = pair.initiator, pair.acceptor
    pair.send(ini, F.List(1, 1))
    pair.send(acc, F.Partial(1, 6, b"v1", b"big"), F.ListEnd(1, 1, 0))
    got = pair.send(
        ini,
        mkdir(1),
        F.File(2, 1, 6, 16, 0o644, 0, 0, 0, 1, BLOCK, b"v1", b"", b"big"),
        F.Chunk(2, 6, 10),
        file(3, 4, path=b"small"),
        F.Chunk(3, 0, 4),
        end(3),
        end(2),
    )
    assert frames_of(got) == [F.Mkdir, F.File, F.Chunk, F.File, F.Chunk, F.End, F.End]
    assert bytes(pair.payload[ACC]) == pattern(6, 10) + pattern(0, 4)
    assert pair.unacked() == (3, 3)
    pair.send(acc, F.Ack(1), F.Ack(3), F.Error(E.RESUME_MISMATCH, 2, 0, "gone"))
    assert pair.unacked() == (0, 0)
    assert frames_of(pair.events[INI][-3:]) == [F.Ack, F.Ack, F.Error]


# =============================================================================
# Frame integrity: every frame after the handshake carries a tag over an
# implicit per-direction sequence number, its header and its body.
# =============================================================================


def wire_of(conn: Connection, *events: F.Event) -> list[bytes]:
    """The frames ``conn`` sends for ``events``, each as it goes on the wire."""
    out = []
    for ev in events:
        out.append(conn.send(ev))
        if isinstance(ev, F.Chunk):
            conn.payload_sent(ev.length)
    return out


def refused(conn: Connection, data: bytes, seq: int, kind: type[F.Event]) -> None:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as exc:
        while conn.next_event() is not NEED_DATA:
            pass
    assert exc.value.code is E.INTEGRITY, exc.value
    assert f"frame #{seq} " in str(exc.value) and f"({kind.__name__}," in str(exc.value)


@pytest.mark.parametrize("src", [INI, ACC])
def test_tagged_round_trip_both_directions(src: Role) -> None:
    p = established_pair()
    p.open()
    conn = p.initiator if src is INI else p.acceptor
    evs: list[F.Event] = (
        [mkdir(1), file(2, 3), F.Chunk(2, 0, 3), end(2), F.Ping(1)]
        if src is INI
        else [F.Entry(1, 1, 0o644, 0, 0, 0, 0, b"f", b""), F.ListEnd(1, 1, 1), F.Pong(7)]
    )
    key = frame_keys(KEY, 3, "a", "b", nonce(1), nonce(2))[0 if src is INI else 1]
    for seq, (ev, raw) in enumerate(zip(evs, wire_of(conn, *evs), strict=True), start=1):
        body = F.encode(ev)
        assert raw == body + frame_tag(key, seq, body)  # #0 was Open / Opened
        got = p.receive(p.peer_of(conn), raw + (pattern(0, 3) if isinstance(ev, F.Chunk) else b""))
        assert got == [ev]


def test_keys_differ_per_direction_and_connection() -> None:
    i2a, a2i = frame_keys(KEY, 3, "a", "b", nonce(1), nonce(2))
    assert len({i2a, a2i}) == 2 and len(i2a) == 32
    others = [
        frame_keys(KEY, 3, "a", "b", nonce(1), nonce(3)),
        frame_keys(KEY, 3, "a", "b", nonce(3), nonce(2)),
        frame_keys(KEY, 3, "b", "a", nonce(1), nonce(2)),
        frame_keys(KEY, 2, "a", "b", nonce(1), nonce(2)),  # version 2
        frame_keys(WRONG_KEY, 3, "a", "b", nonce(1), nonce(2)),
        frame_keys(KEY, 3, "a|", "b", nonce(1), nonce(2)),  # names are length-prefixed
        frame_keys(KEY, 3, "a", "|b", nonce(1), nonce(2)),
    ]
    assert len({i2a, a2i, *(k for pair in others for k in pair)}) == 2 + 2 * len(others)


@pytest.mark.parametrize("where", ["kind", "length", "body", "tag"])
def test_altered_frame_is_refused(where: str) -> None:
    p = established_pair()
    p.open()
    raw = bytearray(p.initiator.send(F.Delete(1, 1, b"keep-me")))
    if where == "kind":
        raw[0] = F.Rename.KIND  # another valid kind
    elif where == "length":
        raw[7] -= 1  # a shorter body: the tag is read from the wrong place
    elif where == "body":
        raw[F.HEADER_SIZE + 8] ^= 0x20  # one bit of the path
    else:
        raw[-1] ^= 1
    kind = F.Rename if where == "kind" else F.Delete
    refused(p.acceptor, bytes(raw), 1, kind)
    assert p.acceptor.unacked() == 0  # nothing of it was acted on


def test_altered_chunk_header_is_refused_payload_is_not_covered() -> None:
    p = established_pair()
    p.open()
    f, chunk = wire_of(p.initiator, file(1, 10), F.Chunk(1, 0, 10))
    assert p.receive(p.acceptor, f) == [file(1, 10)]
    bad = bytearray(chunk)
    bad[F.HEADER_SIZE + 4 + 7] ^= 1  # offset 0 -> 1
    refused(p.acceptor, bytes(bad), 2, F.Chunk)
    # the payload is not covered: other bytes pass (the block map's digests will)
    q = established_pair()
    q.open()
    f, chunk = wire_of(q.initiator, file(1, 10), F.Chunk(1, 0, 10))
    q.receive(q.acceptor, f + chunk + b"X" * 10)
    assert bytes(q.payload[ACC]) == b"X" * 10


def test_dropped_frame_is_detected() -> None:
    p = established_pair()
    p.open()
    first, _dropped, third = wire_of(p.initiator, mkdir(1), mkdir(2), F.Ping(3))
    assert p.receive(p.acceptor, first) == [mkdir(1)]
    refused(p.acceptor, third, 2, F.Ping)  # #2 is due, #3 came


def test_replayed_frame_is_detected() -> None:
    p = established_pair()
    p.open()
    [raw] = wire_of(p.initiator, mkdir(1))
    assert p.receive(p.acceptor, raw) == [mkdir(1)]
    refused(p.acceptor, raw, 2, F.Mkdir)


def test_frame_replayed_from_another_connection_is_detected() -> None:
    """Same key, same names, but the acceptor's fresh nonce makes new keys."""
    old = established_pair()
    old.open()
    [raw] = wire_of(old.initiator, mkdir(1))
    new = ConnectionPair(acceptor_nonce=nonce(3))
    new.handshake()
    new.open()
    refused(new.acceptor, raw, 1, F.Mkdir)


def test_swapped_frames_are_detected() -> None:
    p = established_pair()
    p.open()
    first, second = wire_of(p.initiator, mkdir(1), mkdir(2))
    refused(p.acceptor, second + first, 1, F.Mkdir)


def test_injected_frame_with_a_wrong_tag_is_refused() -> None:
    """Well formed, legal where it lands, but tagged by someone without the key."""
    p = established_pair()
    p.open()
    raw = F.encode(F.Delete(1, 1, b"precious"))
    for tag in (bytes(F.TAG_SIZE), frame_tag(WRONG_KEY, 1, raw)):
        p2 = established_pair()
        p2.open()
        refused(p2.acceptor, raw + tag, 1, F.Delete)
    # an untagged frame (as version 1 sent them) just waits for its tag; the
    # next frame's bytes then fail the check
    p.acceptor.receive_data(raw)
    assert p.acceptor.next_event() is NEED_DATA
    refused(p.acceptor, p.initiator.send(F.Ping(1)), 1, F.Delete)


def test_reflected_frame_is_refused() -> None:
    """A frame the acceptor sent, played back to it as if from the initiator
    (Ping and Error may flow both ways)."""
    p = established_pair()
    p.open()
    [raw] = wire_of(p.acceptor, F.Ping(5))
    refused(p.acceptor, raw, 1, F.Ping)
    q = established_pair()
    q.open()
    [raw] = wire_of(q.initiator, F.Ping(5))
    refused(q.initiator, raw, 1, F.Ping)


def test_handshake_frames_are_not_tagged_later_ones_are() -> None:
    p = established_pair()
    hs = [len(d) for _, d in p.wire]
    assert all(F.HEADER_SIZE + F.decode_header(d[:8])[1] == len(d) for _, d in p.wire), hs
    p.open()
    for _, d in p.wire[4:]:
        assert len(d) == F.HEADER_SIZE + F.decode_header(d[:8])[1] + F.TAG_SIZE


def test_integrity_error_is_fatal_and_the_peer_reads_why() -> None:
    """The refusing side's fatal Error is itself tagged (the other direction
    is intact) and closes both ends."""
    p = established_pair()
    p.open()
    bad = bytearray(p.initiator.send(mkdir(1)))
    bad[-1] ^= 1
    with pytest.raises(RemoteProtocolError) as exc:
        p.receive(p.acceptor, bytes(bad))
    [err] = p.send(p.acceptor, F.Error(exc.value.code, 0, 1, str(exc.value)))
    assert isinstance(err, F.Error) and err.code == E.INTEGRITY and err.fatal
    assert "integrity" in err.message
    assert p.initiator.state is p.acceptor.state is State.CLOSED


def test_tagged_stream_one_byte_at_a_time() -> None:
    p = established_pair()
    p.open()
    evs: list[F.Event] = [mkdir(1), file(2, 4), F.Chunk(2, 0, 4), end(2), F.Ping(9)]
    data = b""
    for ev, raw in zip(evs, wire_of(p.initiator, *evs), strict=True):
        data += raw + (b"abcd" if isinstance(ev, F.Chunk) else b"")
    got = []
    for i in range(len(data)):
        got += p.receive(p.acceptor, data[i : i + 1])
    assert got == evs and bytes(p.payload[ACC]) == b"abcd"


@SETTINGS
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_is_caught(pos: int, bit: int) -> None:
    """Flip one bit anywhere in a tagged stream (payload aside): the frame it
    lands in is refused (INTEGRITY, or MALFORMED / TOO_LARGE from a header
    that is malformed on its face), never decoded; the frames before it are."""
    p = established_pair()
    p.open()
    evs: list[F.Event] = [mkdir(1), F.Rename(2, 1, b"a", b"b"), F.Delete(3, 1, b"c"), F.Ping(4)]
    frames = wire_of(p.initiator, *evs)
    data = bytearray(b"".join(frames))
    pos %= len(data)
    data[pos] ^= 1 << bit
    hit = next(i for i in range(len(frames)) if pos < sum(map(len, frames[: i + 1])))
    # a longer body_length leaves the frame waiting: what follows then fails it
    more = b"".join(wire_of(p.initiator, *[F.Ping(5)] * 600))
    acc, got = p.acceptor, []
    acc.receive_data(bytes(data) + more)
    with pytest.raises(RemoteProtocolError) as exc:
        while (ev := acc.next_event()) is not NEED_DATA:
            got.append(ev)
    assert exc.value.code in (E.INTEGRITY, E.MALFORMED, E.TOO_LARGE)
    assert got == evs[:hit]
