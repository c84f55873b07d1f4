"""A TCP relay for tests: sits between two real daemons, records every byte
each way, and can be told to stop relaying. Threads and blocking sockets,
nothing clever: it exists to see what really crossed the wire."""

from __future__ import annotations

import socket
import threading

from replicator.localcluster import free_port


class Recorder:
    """Listens on 127.0.0.1:``port`` and relays each connection to ``target``."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.forward = bytearray()  # initiator → target, all connections
        self.backward = bytearray()
        self._lock = threading.Lock()
        self._ls = socket.create_server(("127.0.0.1", self.port))
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def seen(self, needle: bytes) -> bool:
        with self._lock:
            return needle in self.forward or needle in self.backward

    def sent_bytes(self) -> int:
        with self._lock:
            return len(self.forward)

    def close(self) -> None:
        self._closed = True
        self._ls.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        buf = self.forward if forward else self.backward
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
