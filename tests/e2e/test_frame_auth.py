"""Frames after the handshake are authenticated, end to end: two real daemons
with a man-in-the-middle between them that relays the handshake untouched and
then alters or injects one frame. The receiver refuses the connection with an
integrity error, acts on nothing it did not verify, and replication completes
once the path is clean again."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.localcluster import LocalCluster, LocalNode, wait_for

from ..helpers import wait_same

#: Frames a sends before its frames are tagged: Hello and Auth.
HANDSHAKE_FRAMES = 2


class Proxy:
    """A TCP relay from a to b that parses a's frames and, on the connection
    numbers given in ``plan``, tampers with a's first frame after the
    handshake: ``"flip"`` alters one byte of it, ``"inject"`` sends a
    well-formed Delete of ``victim`` with a garbage tag right after it."""

    def __init__(self, target: tuple[str, int], victim: bytes) -> None:
        self.target = target
        self.victim = victim
        self.plan: dict[int, str] = {}
        self.connections = 0
        self.tampered = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name="mitm-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()
        self.drop_all()

    def drop_all(self) -> None:
        """Cut every relayed connection (a reconnects through us)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=10)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self.connections += 1
                action = self.plan.get(self.connections)
                self._socks += [down, up]
            threading.Thread(target=self._relay, args=(up, down), daemon=True).start()
            threading.Thread(target=self._a_to_b, args=(down, up, action), daemon=True).start()

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _a_to_b(self, src: socket.socket, dst: socket.socket, action: str | None) -> None:
        buf = bytearray()
        index = 0  # frames of a seen
        payload = 0  # Chunk payload bytes still to relay as they are
        try:
            while data := src.recv(65536):
                buf += data
                out = bytearray()
                while True:
                    if payload:
                        n = min(payload, len(buf))
                        out += buf[:n]
                        del buf[:n]
                        payload -= n
                        if payload:
                            break
                    if len(buf) < F.HEADER_SIZE:
                        break
                    kind, length = F.decode_header(buf[: F.HEADER_SIZE])
                    tag = F.TAG_SIZE if index >= HANDSHAKE_FRAMES else 0
                    size = F.HEADER_SIZE + length + tag
                    if len(buf) < size:
                        break
                    frame = bytearray(buf[:size])
                    del buf[:size]
                    if kind == F.Chunk.KIND:
                        payload = struct.unpack_from("!I", frame, F.HEADER_SIZE + 12)[0]
                    if index == HANDSHAKE_FRAMES and action == "flip":
                        frame[F.HEADER_SIZE + length - 1] ^= 0x01  # last byte of the body
                        self.tampered.set()
                    out += frame
                    if index == HANDSHAKE_FRAMES and action == "inject":
                        assert kind == F.Open.KIND
                        mirror = struct.unpack_from("!H", frame, F.HEADER_SIZE)[0]
                        forged = F.encode(F.Delete(1, mirror, self.victim))
                        out += forged + os.urandom(F.TAG_SIZE)
                        self.tampered.set()
                    index += 1
                dst.sendall(out)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def mitm(cluster: LocalCluster) -> Iterator[tuple[LocalNode, LocalNode, Proxy]]:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    a.node_extra.update(backoff_initial=0.1, backoff_max=0.5)
    a.add_mirror("m", push_to=["b"])
    b.add_mirror("m", accept_from=["a"])
    proxy = Proxy((b.host, b.port), b"keep.txt")
    a.peers["b"]["address"] = proxy.address
    try:
        yield a, b, proxy
    finally:
        proxy.close()


def integrity_refusals(node: LocalNode) -> int:
    return node.log_path.read_text(errors="replace").count("protocol error (INTEGRITY)")


def test_altered_frame_is_refused_and_replication_recovers(
    cluster: LocalCluster, mitm: tuple[LocalNode, LocalNode, Proxy]
) -> None:
    a, b, proxy = mitm
    (a.mirror_path("m") / "one.txt").write_text("first")
    proxy.plan[1] = "flip"
    cluster.start(wait_links=False)
    wait_for(proxy.tampered.is_set, 30, "the proxy to alter a frame")
    wait_for(lambda: integrity_refusals(b) >= 1, 30, "b to refuse the altered frame")
    log = b.log_path.read_text(errors="replace")
    assert "frame #0 from 'a' (Open," in log and "failed its integrity check" in log
    # the link comes back through the (now honest) proxy and catches up
    wait_for(lambda: proxy.connections >= 2, 30, "a to reconnect")
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    (a.mirror_path("m") / "two.txt").write_text("second")
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    assert integrity_refusals(b) == 1
    assert b.proc is not None and b.proc.poll() is None


def test_injected_frame_is_refused_and_not_applied(
    cluster: LocalCluster, mitm: tuple[LocalNode, LocalNode, Proxy]
) -> None:
    a, b, proxy = mitm
    (a.mirror_path("m") / "keep.txt").write_text("precious")
    cluster.start()
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    victim = b.mirror_path("m") / "keep.txt"
    # the next connection gets a forged Delete right after a's Open
    proxy.plan[proxy.connections + 1] = "inject"
    proxy.drop_all()
    wait_for(proxy.tampered.is_set, 30, "the proxy to inject a frame")
    wait_for(lambda: integrity_refusals(b) >= 1, 30, "b to refuse the injected frame")
    assert "(Delete," in b.log_path.read_text(errors="replace")
    assert victim.read_text() == "precious"
    # and the link recovers on the next, clean connection
    wait_for(a.links_connected, 30, "a's link to come back")
    (a.mirror_path("m") / "after.txt").write_text("still replicating")
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    assert victim.read_text() == "precious"
    assert b.proc is not None and b.proc.poll() is None


def test_mitm_relays_honest_traffic(
    cluster: LocalCluster, mitm: tuple[LocalNode, LocalNode, Proxy], tmp_path: Path
) -> None:
    """The proxy's own parsing is right: untouched, a file with chunks goes
    through it (so the refusals above come from the tampering alone)."""
    a, b, proxy = mitm
    (a.mirror_path("m") / "big.bin").write_bytes(os.urandom(3 << 20))
    cluster.start()
    wait_same(a.mirror_path("m"), b.mirror_path("m"))
    assert integrity_refusals(b) == 0 and proxy.connections == 1
