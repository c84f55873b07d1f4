"""The janitor, on real daemons: partial files nobody will finish are removed
(old ones; all of a peer the mirror no longer accepts), at start and after a
reload; a partial that a live transfer holds open is kept, however old;
symlinks planted in the partial folders are never followed."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.localcluster import LocalCluster, LocalNode, free_port, wait_for

from ..helpers import MiB, fill, wait_same
from .test_ctl import ctl

HOUR = 3600.0


def _partials(root: Path, peer: str) -> Path:
    return root / ".replicator" / "partial" / peer


def _plant(path: Path, size: int, age: float) -> int:
    """A file of ``size`` bytes whose mtime is ``age`` seconds ago."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(b"p" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    return size


def _age(path: Path, age: float) -> None:
    t = time.time() - age
    os.utime(path, (t, t), follow_symlinks=False)


def _janitor(node: LocalNode) -> dict[str, Any]:
    return dict(node.status()["janitor"])


def _ran(node: LocalNode, runs: int) -> dict[str, Any]:
    return dict(wait_for(lambda: (j := _janitor(node))["runs"] >= runs and j, 30, "a janitor run"))


def test_old_and_unaccepted_partials_are_removed(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.node("a")
    b = cluster.node("b")
    cluster.connect("a", "b")  # a is never started: no session touches b's partials
    b.node_extra["partial_max_age"] = HOUR
    m = b.add_mirror("m", accept_from=["a"])
    k = b.add_mirror("k", accept_from=["a"])
    n = b.add_mirror("n", accept_from=["a"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.part").write_bytes(b"not the daemon's")
    _age(outside / "precious.part", 100 * HOUR)
    (outside / "zz").mkdir()
    (outside / "zz" / "x.part").write_bytes(b"not the daemon's either")
    _age(outside / "zz" / "x.part", 100 * HOUR)

    pa = _partials(m, "a")
    freed = _plant(pa / "old1.part", 3000, 2 * HOUR) + _plant(pa / "old1.side", 100, 2 * HOUR)
    freed += _plant(pa / "orphan.side.tmp", 10, 3 * HOUR)
    _plant(pa / "young.part", 500, 0.5 * HOUR)
    _plant(pa / "young.side", 50, 0.5 * HOUR)
    # a partial is as young as the newer of it and its sidecar
    _plant(pa / "mixed.part", 700, 5 * HOUR)
    _plant(pa / "mixed.side", 70, 0.1 * HOUR)
    _plant(pa / "notes.txt", 5, 10 * HOUR)  # not the daemon's: left alone
    os.symlink(outside / "precious.part", pa / "link.part")  # old link, to a file outside
    _age(pa / "link.part", 10 * HOUR)
    # the folder of a peer m does not accept: removed whole, whatever the age
    freed += _plant(_partials(m, "ghost") / "g.part", 4000, 0)
    freed += _plant(_partials(m, "ghost") / "deeper" / "h.part", 1000, 0)
    os.symlink(outside, _partials(m, "evil"))  # a planted symlink: removed, not followed
    # k's partial folder is a symlink: never entered
    (k / ".replicator").mkdir()
    os.symlink(outside, k / ".replicator" / "partial")
    young_n = _plant(_partials(n, "a") / "y.part", 10, 0)

    b.start()
    j = _ran(b, 1)
    assert sorted(p.name for p in pa.iterdir()) == [
        "mixed.part",
        "mixed.side",
        "notes.txt",
        "young.part",
        "young.side",
    ]
    assert sorted(p.name for p in (m / ".replicator" / "partial").iterdir()) == ["a"]
    assert (outside / "precious.part").read_bytes() == b"not the daemon's"
    assert (outside / "zz" / "x.part").exists() and (k / ".replicator" / "partial").is_symlink()
    assert (_partials(n, "a") / "y.part").exists()
    # old1.part, old1.side, orphan.side.tmp, link.part, g.part, h.part, evil
    assert j["files_removed"] == j["last_files_removed"] == 7
    assert j["bytes_freed"] == j["last_bytes_freed"] == freed
    assert j["folders_removed"] == 1
    assert j["partial_max_age"] == HOUR and j["last_run"] and j["last_errors"] == []
    text = ctl(b, "status").stdout
    assert "janitor: last run" in text and "7 partial files" in text

    # A reload: n no longer accepts a, and another partial of m has aged.
    b.mirrors["n"]["accept_from"] = []
    _age(pa / "young.part", 2 * HOUR)
    _age(pa / "young.side", 2 * HOUR)
    b.write_config()
    assert ctl(b, "reload").returncode == 0
    j = _ran(b, 2)
    assert not _partials(n, "a").exists()
    assert sorted(p.name for p in pa.iterdir()) == ["mixed.part", "mixed.side", "notes.txt"]
    assert j["last_files_removed"] == 3 and j["last_bytes_freed"] == young_n + 550
    assert j["files_removed"] == 10 and j["folders_removed"] == 2
    log = b.log_path.read_text()
    assert "janitor: mirror n: removed the partial files of a (1 files, 10 bytes)" in log
    assert "Traceback" not in log


class Gate:
    """A TCP relay that forwards the first ``limit`` bytes its clients send,
    then holds the rest until ``release()``; replies always flow."""

    def __init__(self, target: str, limit: int) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.limit = limit
        self.forwarded = 0
        self.held = threading.Event()
        self._open = threading.Event()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._ls = socket.create_server(("127.0.0.1", self.port))
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self._ls.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._ls.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:  # not listening yet: the client retries
                client.close()
                continue
            upstream.settimeout(None)
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while True:
                n = 1 << 16
                if gated and not self._open.is_set():
                    n = self.limit - self.forwarded
                    if n <= 0:
                        self.held.set()
                        self._open.wait()
                        n = 1 << 16
                data = src.recv(min(n, 1 << 16))
                if not data:
                    break
                dst.sendall(data)
                if gated:
                    self.forwarded += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for g in made:
        g.close()


def test_partial_held_by_a_live_transfer_is_kept(cluster: LocalCluster, gates: list[Gate]) -> None:
    a, b = cluster.node("a"), cluster.node("b")
    cluster.connect("a", "b")
    for n in (a, b):  # the held transfer must not count as a dead peer
        n.node_extra.update(dead_after=300.0, partial_max_age=HOUR)
    src = a.add_mirror("m", push_to=["b"])
    dst = b.add_mirror("m", accept_from=["a"])
    size = 32 * MiB
    fill(src / "big.bin", size)
    gate = Gate(b.address, 8 * MiB)
    gates.append(gate)
    a.peers["b"]["address"] = gate.address
    cluster.start(wait_links=False)
    wait_for(gate.held.is_set, 60, "the relay to hold the transfer")
    folder = _partials(dst, "a")
    part = wait_for(lambda: [p for p in folder.glob("*.part") if p.stat().st_size], 30, "data")[0]
    held = part.stat().st_size
    assert 0 < held < size
    assert part.with_suffix(".side").exists()  # a big file: resumable
    # As if it had sat there for days; then a janitor run. The receiver may
    # still be writing what reached it before the relay held: then the run
    # proves nothing (the partial was young again), and is repeated.
    for _ in range(20):
        for p in folder.iterdir():
            _age(p, 100 * HOUR)
        runs = _janitor(b)["runs"]
        assert ctl(b, "reload").returncode == 0
        j = _ran(b, runs + 1)
        if part.stat().st_mtime < time.time() - HOUR:
            break  # old all through the run: kept because it is open
    else:
        raise AssertionError("the partial kept changing while the relay held the transfer")
    assert j["last_files_removed"] == 0
    assert part.exists() and part.with_suffix(".side").exists()
    gate.release()
    wait_same(src, dst, timeout=120)
    assert not list(folder.iterdir())  # published: nothing left behind
    assert "Traceback" not in a.log_path.read_text() + b.log_path.read_text()
