"""The control socket: length-prefixed JSON requests and replies on a Unix socket.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON, capped at
``MAX_MESSAGE``. One request, one reply, per frame; a client may send several
requests on one connection. A client that sends garbage, too much, or nothing
for ``CLIENT_TIMEOUT`` seconds is disconnected; it cannot block the daemon
(each client has its own short-lived thread, and at most ``MAX_CLIENTS``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .errors import ControlError

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 * 1024 * 1024
CLIENT_TIMEOUT = 10.0
MAX_CLIENTS = 16
_LEN = struct.Struct("!I")

Handler = Callable[[dict[str, Any]], dict[str, Any]]

#: The control socket's mode: root and the daemon's group may connect.
SOCKET_MODE = 0o660


def bind_unix(path: str, mode: int) -> socket.socket:
    """A Unix stream socket bound at ``path`` with ``mode``, never reachable
    with wider permissions, and without touching the umask (process-wide:
    other threads create files meanwhile).

    bind() creates the socket file with 0777 minus the umask, and an
    AF_UNIX socket cannot be fchmod'ed before it has a name. So it is bound
    in a fresh 0700 folder next to ``path`` (mkdtemp: only we can reach
    it), chmod'ed there, then renamed over ``path`` (atomic; a stale socket
    of an earlier run is replaced). Connecting goes by the file's inode, so
    the rename keeps it working. (The names are short: a socket path is
    limited to 107 bytes, and the temporary one is about as long as ``path``.)"""
    parent = os.path.dirname(path) or "."
    tmpdir = tempfile.mkdtemp(prefix=".ctl", dir=parent)
    tmp = os.path.join(tmpdir, "s")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.rmdir(tmpdir)
    return s


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ControlError("connection closed")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise ControlError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
    try:
        doc = json.loads(_recv_exact(sock, n))
    except ValueError as e:
        raise ControlError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ControlError("a message must be a JSON object")
    return doc


def write_message(sock: socket.socket, doc: dict[str, Any]) -> None:
    data = json.dumps(doc, default=str).encode()
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"reply of {len(data)} bytes exceeds {MAX_MESSAGE}")
    sock.sendall(_LEN.pack(len(data)) + data)


def request(path: str, doc: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Client side: send one request, return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise ControlError(
                f"cannot reach the daemon at {path}: {e.strerror} (is replicatord running?)"
            ) from None
        write_message(s, doc)
        return read_message(s)


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, mode=0o755, exist_ok=True)
        s = bind_unix(self.path, SOCKET_MODE)
        s.listen(16)
        self._sock = s
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    write_message(client, {"ok": False, "error": "too many control clients"})
                client.close()
                continue
            threading.Thread(
                target=self._serve, args=(client,), daemon=True, name="control-client"
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(CLIENT_TIMEOUT)
            while True:
                try:
                    req = read_message(client)
                except ControlError as e:
                    if str(e) != "connection closed":
                        with contextlib.suppress(OSError, ControlError):
                            write_message(client, {"ok": False, "error": str(e)})
                    return
                try:
                    reply = self.handler(req)
                except ControlError as e:
                    reply = {"ok": False, "error": str(e)}
                except Exception as e:
                    log.exception("control request %r failed", req.get("cmd"))
                    reply = {"ok": False, "error": f"internal error: {e}"}
                write_message(client, reply)
        except (OSError, ControlError):
            pass
        finally:
            client.close()
            self._slots.release()
