"""A hostile peer speaking the protocol cannot write outside a mirror, cannot
push where it is not accepted, and cannot stop the daemon serving its real peer."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.blockmap import MIN_BLOCK, XXH3_128, map_bytes
from replicator.errors import RemoteProtocolError
from replicator.localcluster import LocalCluster, LocalNode, wait_for, write_key
from replicator.protocol import NEED_DATA, Connection, Established, Role
from replicator.verifying import MAX_MENDS

from ..helpers import wait_same


class Client:
    """A protocol-speaking test client (the initiator side)."""

    def __init__(self, node: LocalNode, name: str, key: bytes) -> None:
        self.sock = socket.create_connection((node.host, node.port), timeout=10)
        self.conn = Connection(Role.INITIATOR, name, os.urandom(32), lambda n: key)
        self.op = 0

    def close(self) -> None:
        self.sock.close()

    def next(self, timeout: float = 10) -> object:
        """The next event from the daemon; None at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.conn.next_event()
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
            if ev is not NEED_DATA:
                return ev
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return None
            self.conn.receive_data(data)

    def handshake(self) -> object:
        self.conn.start()
        self.sock.sendall(self.conn.data_to_send())
        return self.next()

    def send(self, *events: F.Event, payload: bytes = b"") -> None:
        data = b"".join(self.conn.send(ev) for ev in events)
        if payload:
            self.conn.payload_sent(len(payload))
        self.sock.sendall(data + payload)

    def expect(self, kind: type[F.Event]) -> F.Event:
        while True:
            ev = self.next()
            if isinstance(ev, F.Ping):
                self.send(F.Pong(ev.nonce))
                continue
            assert isinstance(ev, kind), f"expected {kind.__name__}, got {ev!r}"
            return ev

    def push_file(self, path: bytes, data: bytes) -> int:
        self.op += 1
        op = self.op
        bmap = map_bytes(data, XXH3_128, MIN_BLOCK)
        self.send(
            F.File(op, 1, 0, len(data), 0o644, time.time_ns(), 0, 0, 1, MIN_BLOCK, b"v", b"", path)
        )
        if data:
            self.send(F.Chunk(op, 0, len(data)), payload=data)
        self.send(F.End(op, bmap.file_digest))
        return op


def read_until_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
    return buf


def error_frames(data: bytes) -> list[F.Error]:
    out = []
    while len(data) >= F.HEADER_SIZE:
        kind, n = F.decode_header(data[: F.HEADER_SIZE])
        ev = F.decode_body(kind, data[F.HEADER_SIZE : F.HEADER_SIZE + n])
        if isinstance(ev, F.Error):
            out.append(ev)
        data = data[F.HEADER_SIZE + n :]
    return out


@pytest.fixture
def setup(cluster: LocalCluster, tmp_path: Path) -> Iterator[tuple[LocalNode, LocalNode, bytes]]:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    mallory_key = os.urandom(16).hex().encode()
    key_file = write_key(tmp_path / "keys" / "mallory.key", mallory_key)
    b.peers["mallory"] = {"address": "127.0.0.1:9", "key_file": str(key_file)}
    a.add_mirror("m", push_to=["b"])
    b.add_mirror("m", accept_from=["a", "mallory"])
    b.add_mirror("private", accept_from=["a"])
    (a.mirror_path("m") / "real.txt").write_text("from the real peer")
    cluster.start()
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    yield a, b, mallory_key
    # the daemon kept serving its real peer throughout
    (a.mirror_path("m") / "after.txt").write_text("still replicating")
    a.control("sync", mirror="m")
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    assert b.proc is not None and b.proc.poll() is None


def test_wrong_key_and_unknown_name_refused(setup: tuple[LocalNode, LocalNode, bytes]) -> None:
    _, b, key = setup
    for name, k in (("mallory", b"not the right key at all"), ("nobody", key), ("a", key)):
        c = Client(b, name, k)
        try:
            ev = c.handshake()
        except RemoteProtocolError as e:  # an unknown name fails before our Auth
            assert e.code is F.ErrorCode.AUTH
            ev = None
        assert isinstance(ev, F.Error) or ev is None
        if ev is not None:
            assert ev.code == F.ErrorCode.AUTH and ev.fatal
        c.close()
    assert "failed authentication" in b.log_path.read_text()


def test_mirror_not_accepted_refused(setup: tuple[LocalNode, LocalNode, bytes]) -> None:
    _, b, key = setup
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "private"), F.Open(2, "nope"))
    ev1 = c.expect(F.Opened)
    ev2 = c.expect(F.Opened)
    assert isinstance(ev1, F.Opened) and ev1.code == F.ErrorCode.FORBIDDEN
    assert "accept_from" in ev1.message
    assert isinstance(ev2, F.Opened) and ev2.code == F.ErrorCode.UNKNOWN_MIRROR
    # a frame for the refused mirror is a protocol violation: fatal
    c.send(F.List(1, 1))
    err = c.expect(F.Error)
    assert isinstance(err, F.Error) and err.fatal and err.code == F.ErrorCode.UNEXPECTED
    c.close()


def test_escaping_paths_refused(setup: tuple[LocalNode, LocalNode, bytes], tmp_path: Path) -> None:
    _, b, key = setup
    root = b.mirror_path("m")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "esc").symlink_to(outside)
    (root / "victim").write_text("v")
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "m"))
    assert c.expect(F.Opened).code == 0  # type: ignore[attr-defined]
    bad = [
        b"../x",
        b"/etc/x",
        b"a/../../x",
        b"esc/pwned",
        b"x\x00y",
        b".replicator/partial/a/z",
        b"",
        b"./x",
        b"a//b",
    ]
    ops = {c.push_file(p, b"pwned") for p in bad}
    c.op += 1
    c.send(F.Mkdir(c.op, 1, 0o755, 0, 0, 0, b"esc/dir"))
    ops.add(c.op)
    c.op += 1
    c.send(F.Symlink(c.op, 1, 0, 0, 0, b"../evil", b"/etc/passwd"))
    ops.add(c.op)
    c.op += 1
    c.send(F.Rename(c.op, 1, b"victim", b"../victim"))
    ops.add(c.op)
    c.op += 1
    c.send(F.Delete(c.op, 1, b"esc/x"))
    ops.add(c.op)
    c.op += 1
    c.send(F.Meta(c.op, 1, 0o777, 0, 0, 0, b"/etc/passwd"))
    ops.add(c.op)
    refused = set()
    for _ in ops:
        err = c.expect(F.Error)
        assert isinstance(err, F.Error) and not err.fatal
        assert err.code == F.ErrorCode.BAD_PATH, err
        refused.add(err.op)
    assert refused == ops
    # the connection is still usable for honest work
    good = c.push_file(b"honest.txt", b"ok")
    ack = c.expect(F.Ack)
    assert isinstance(ack, F.Ack) and ack.op == good
    assert (root / "honest.txt").read_bytes() == b"ok"
    c.close()
    assert list(outside.iterdir()) == []
    assert not Path("/etc/x").exists()
    assert not (b.mirror_path("m").parent / "x").exists()
    assert not (b.mirror_path("m").parent / "victim").exists()
    assert (root / "victim").read_text() == "v"


def test_garbage_and_oversize_close_the_connection(
    setup: tuple[LocalNode, LocalNode, bytes],
) -> None:
    _, b, key = setup
    s = socket.create_connection((b.host, b.port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(100))
    errs = error_frames(read_until_eof(s))
    assert [e.code for e in errs] == [F.ErrorCode.MALFORMED]
    s.close()

    s = socket.create_connection((b.host, b.port))
    s.sendall(struct.pack("!BBHI", F.Hello.KIND, 0, 0, 0xFFFFFFFF))
    errs = error_frames(read_until_eof(s))
    assert [e.code for e in errs] == [F.ErrorCode.TOO_LARGE]
    s.close()

    # after authentication too
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.sock.sendall(struct.pack("!BBHI", F.File.KIND, 0, 0, 1 << 30))
    err = c.expect(F.Error)
    assert isinstance(err, F.Error) and err.code == F.ErrorCode.TOO_LARGE and err.fatal
    assert read_until_eof(c.sock) == b""  # and closed
    c.close()

    # a chunk larger than the limit
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "m"))
    c.expect(F.Opened)
    c.sock.sendall(
        c.conn.send(F.File(1, 1, 0, 1 << 40, 0o644, 0, 0, 0, 1, MIN_BLOCK, b"", b"", b"huge"))
    )
    body = struct.pack("!IQI", 1, 0, F.MAX_CHUNK + 1)
    # tagged as our Connection would (its own checks refuse such a Chunk)
    c.sock.sendall(c.conn._seal(struct.pack("!BBHI", F.Chunk.KIND, 0, 0, len(body)) + body))
    err = c.expect(F.Error)
    assert isinstance(err, F.Error) and err.code == F.ErrorCode.TOO_LARGE and err.fatal
    c.close()


def test_silent_client_is_dropped(setup: tuple[LocalNode, LocalNode, bytes]) -> None:
    _, b, _ = setup
    s = socket.create_connection((b.host, b.port))
    # says nothing: the handshake times out and the daemon closes the socket
    wait_for(lambda: read_until_eof(s) is not None, 30, "the daemon to drop a silent client")
    s.close()


def test_data_that_does_not_match_its_map_is_never_published(
    setup: tuple[LocalNode, LocalNode, bytes],
) -> None:
    """A peer (or the network under a broken NIC) delivers bytes that differ
    from the block map: the receiver asks for the bad block again (Want),
    publishes once it matches, and refuses the file after MAX_MENDS rounds
    of bad data; no wrong byte is ever published."""
    _, b, key = setup
    root = b.mirror_path("m")
    c = Client(b, "mallory", key)
    assert isinstance(c.handshake(), Established)
    c.send(F.Open(1, "m"))
    assert c.expect(F.Opened).code == 0  # type: ignore[attr-defined]
    good = os.urandom(3 * MIN_BLOCK + 100)
    bmap = map_bytes(good, XXH3_128, MIN_BLOCK)
    bad = bytearray(good)
    bad[MIN_BLOCK + 5] ^= 0xFF  # block 1

    def push(op: int, path: bytes, data: bytes) -> None:
        c.send(
            F.File(op, 1, 0, len(data), 0o644, time.time_ns(), 0, 0, 1, MIN_BLOCK, b"v", b"", path)
        )
        c.send(F.Chunk(op, 0, len(data)), payload=data)
        c.send(F.Blocks(op, 0, bmap.digests), F.End(op, bmap.file_digest))

    # 1. repaired: the bad block is asked for, sent right, published
    push(1, b"repaired", bytes(bad))
    want = c.expect(F.Want)
    assert isinstance(want, F.Want)
    assert F.unpack_ranges(want.ranges) == [(MIN_BLOCK, MIN_BLOCK)]
    assert not (root / "repaired").exists()
    block = good[MIN_BLOCK : 2 * MIN_BLOCK]
    c.send(F.Chunk(1, MIN_BLOCK, len(block)), payload=block)
    c.send(F.End(1, bmap.file_digest))
    ack = c.expect(F.Ack)
    assert isinstance(ack, F.Ack) and ack.op == 1
    assert (root / "repaired").read_bytes() == good

    # 2. bad every time: refused after the last repair, never published
    push(2, b"never", bytes(bad))
    for _ in range(MAX_MENDS):
        want = c.expect(F.Want)
        assert isinstance(want, F.Want)
        (off, n), *_ = F.unpack_ranges(want.ranges)
        c.send(F.Chunk(2, off, n), payload=bytes(bad[off : off + n]))
        c.send(F.End(2, bmap.file_digest))
    err = c.expect(F.Error)
    assert isinstance(err, F.Error) and err.code == F.ErrorCode.VERIFY_FAILED and not err.fatal
    assert "did not match its block map" in err.message
    assert not (root / "never").exists()
    assert not list((root / ".replicator" / "partial" / "mallory").glob("*.part"))
    log_text = b.log_path.read_text()
    assert "did not match its block map at offset 131077" not in log_text  # offsets are blocks
    assert f"did not match its block map at offset {MIN_BLOCK}" in log_text
    c.close()
