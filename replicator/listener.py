"""The listening socket: accepts peers and admits each connection as a Session.

The listener owns the socket, the accept loop, the registry of sessions and
the lock that guards it. It decides who may hold a session thread:

- A connection is *unauthenticated* until its handshake completes. Those
  get their own small budget (``PREAUTH_MAX``, ``PREAUTH_PER_ADDRESS``) and
  ``session.HANDSHAKE_TIMEOUT``. When the budget is full, the newcomer is
  admitted and the unauthenticated connection that made the least progress
  (sent nothing, then sent no valid Hello; oldest first) is dropped. A real
  peer sends its Hello at once and authenticates within a round trip, so a
  flood of idle connections cannot keep it out; refusing newcomers instead
  would let whoever holds the slots first keep them.
- An authenticated session is never counted against that budget. A peer
  may hold ``SESSIONS_PER_PEER`` (its live session and the one replacing it);
  the newest wins.

Every accept iteration is guarded: an error in one (EMFILE, a thread that
cannot start) is logged, rate-limited, and the loop goes on, backing off
while the process is out of file descriptors. Refusals are logged at most
``TALLY_BURST`` lines per ``TALLY_WINDOW``, then as one line with counts.

A reload that changes the listen address opens the new socket itself and
hands it over (``rebind``): the accept loop moves to it, the old one is
closed, sessions accepted on it go on.

This module never reads frames itself and never touches a mirror: sessions do.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import frames as F
from . import net
from .errors import LinkError, RemoteProtocolError
from .session import HANDSHAKE_TIMEOUT, MIN_SESSION_FDS, SESSION_FDS, Session

log = logging.getLogger("replicator")

#: Unauthenticated connections held at once, from all addresses...
PREAUTH_MAX = 16
#: ...and from one address (the rest of the budget stays for others).
PREAUTH_PER_ADDRESS = 4
#: Authenticated sessions of one peer: its live one and the one replacing it
#: (a reconnect after the old TCP connection died unnoticed).
SESSIONS_PER_PEER = 2
#: File descriptors kept for everything but inbound sessions (links and the
#: files they send, the scanner's walks, inotify, the backlog, control).
RESERVED_FDS = 256
#: Individual log lines per window; the rest is summed up in one line.
TALLY_BURST = 5
TALLY_WINDOW = 10.0
#: Connections the kernel queues until the accept loop takes them.
BACKLOG = 128
#: Longest pause of the accept loop while the process is out of descriptors.
MAX_BACKOFF = 1.0


class Tally:
    """Counts events by reason and address; logs the first ``burst`` of each
    window as they come, then one summary line per window."""

    def __init__(self, what: str, window: float = TALLY_WINDOW, burst: int = TALLY_BURST) -> None:
        #: The summary line's subject, with {n} for the count.
        self.what = what
        self.window = window
        self.burst = burst
        self.total = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._counts: collections.Counter[str] = collections.Counter()
        self._addrs: set[str] = set()
        self._shown = 0

    def note(self, addr: str, reason: str, level: int, message: str) -> None:
        with self._lock:
            self._roll(time.monotonic())
            self.total += 1
            self._counts[reason] += 1
            self._addrs.add(addr)
            show = self._shown < self.burst
            self._shown += show
        if show:
            log.log(level, "%s", message)

    def tick(self) -> None:
        with self._lock:
            self._roll(time.monotonic())

    def _roll(self, now: float) -> None:
        elapsed = now - self._start
        if elapsed < self.window:
            return
        n = sum(self._counts.values())
        if n > self._shown:
            reasons = ", ".join(f"{r}: {c}" for r, c in self._counts.most_common())
            log.warning(
                "%s from %d address%s in the last %.0f s (%s; %d logged above)",
                self.what.format(n=n),
                len(self._addrs),
                "" if len(self._addrs) == 1 else "es",
                elapsed,
                reasons,
                self._shown,
            )
        self._start = now
        self._counts.clear()
        self._addrs.clear()
        self._shown = 0


@dataclass(eq=False)
class _Entry:
    session: Session
    host: str
    since: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    authenticated: bool = False
    #: Dropped to make room for a newer unauthenticated connection.
    evicted: bool = False


def _has_input(sock: socket.socket) -> bool:
    """Whether the peer sent anything not read yet (peeks, never blocks)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _close_listening(ls: socket.socket | None) -> None:
    """Shut down (wakes a thread waiting on it) and close a listening socket."""
    if ls is not None:
        with contextlib.suppress(OSError):
            ls.shutdown(socket.SHUT_RDWR)
        ls.close()


def session_fd_budget(sessions: int) -> int:
    """File descriptors one inbound session may hold when ``sessions``
    authenticated sessions may run at once under this process's limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return SESSION_FDS
    share = (soft - RESERVED_FDS - PREAUTH_MAX) // max(1, sessions)
    return max(MIN_SESSION_FDS, min(SESSION_FDS, share))


class Listener:
    """Socket, accept loop, session registry and its lock. ``established``
    and ``preauth_ended`` are the sessions' SessionHost calls (their host,
    routing.Router, forwards them here)."""

    def __init__(
        self,
        address: str,
        make_session: Callable[[socket.socket, str], Session],
        stopping: threading.Event,
        inbound_peers: Callable[[], int] = lambda: 1,
    ) -> None:
        self.address = address
        self._make_session = make_session
        self._inbound_peers = inbound_peers
        self.stopping = stopping
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Every session whose thread runs (or is about to), by id(session).
        self._sessions: dict[int, _Entry] = {}
        #: The unauthenticated subset, oldest first.
        self._preauth: dict[int, _Entry] = {}
        self._by_peer: dict[str, Session] = {}
        self.refused = Tally("refused {n} unauthenticated connections")
        self.errors = Tally("{n} errors in the accept loop")
        self.session_crashes = 0

    # -- lifecycle -------------------------------------------------------------

    def bind(self) -> None:
        """Open the listening socket (OSError if the address is unusable;
        ``[::]:PORT`` is dual-stack: net.listen_socket)."""
        self._sock = net.listen_socket(self.address, BACKLOG)

    def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._accept_loop, name="listener", daemon=True)
        self._thread.start()

    def rebind(self, sock: socket.socket, address: str) -> None:
        """Accept on ``sock``, a listening socket on ``address`` the caller
        opened (a reload), from now on; the old socket is closed. Sessions
        accepted on it go on; connections it had queued and not accepted
        yet are refused (their peers retry, on the new address)."""
        old, self._sock, self.address = self._sock, sock, address
        _close_listening(old)  # wakes the accept loop, which takes the new one

    def close(self) -> None:
        """Stop accepting (sessions go on until shut down)."""
        ls, self._sock = self._sock, None
        _close_listening(ls)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._sock is not None

    def dead(self) -> list[str]:
        """Threads of the listener that died while they should run."""
        if self.stopping.is_set() or self._thread is None:
            return []
        out = [] if self.alive() else ["listener"]
        with self._lock:
            entries = list(self._sessions.values())
        for e in entries:
            # A session always deregisters as its thread ends: one that is
            # still here with its thread gone died past every handler.
            if e.thread is not None and e.thread.ident is not None and not e.thread.is_alive():
                out.append(f"session {e.session.addr}")
        return out

    def sessions(self) -> list[Session]:
        with self._lock:
            return [e.session for e in self._sessions.values()]

    def status(self) -> dict[str, Any]:
        with self._lock:
            authenticated = sum(e.authenticated for e in self._sessions.values())
            unauthenticated = len(self._preauth)
        return {
            "alive": self.alive() or self.stopping.is_set(),
            "authenticated": authenticated,
            "unauthenticated": unauthenticated,
            "refused_unauthenticated": self.refused.total,
            "accept_errors": self.errors.total,
            "session_crashes": self.session_crashes,
            "limits": {
                "unauthenticated": PREAUTH_MAX,
                "unauthenticated_per_address": PREAUTH_PER_ADDRESS,
                "handshake_timeout": HANDSHAKE_TIMEOUT,
                "sessions_per_peer": SESSIONS_PER_PEER,
                "session_fds": self._fd_budget(),
            },
        }

    def _fd_budget(self) -> int:
        return session_fd_budget(SESSIONS_PER_PEER * max(1, self._inbound_peers()))

    # -- accepting -------------------------------------------------------------

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            ls = self._sock
            if ls is None:
                return
            try:
                self.refused.tick()
                self.errors.tick()
                if backoff and self.stopping.wait(backoff):
                    return
                if not net.wait_readable(ls, 1.0):
                    continue
                sock, addr = ls.accept()
            except OSError as e:
                if self._sock is None or self.stopping.is_set():
                    return
                if self._sock is not ls:
                    continue  # rebound: ls was closed under the loop
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays in the backlog: without a pause
                    # the loop would spin on it.
                    backoff = min(MAX_BACKOFF, max(0.01, backoff * 2))
                self.errors.note(
                    "-",
                    errno.errorcode.get(e.errno or 0, "error"),
                    logging.ERROR,
                    f"cannot accept a connection on {self.address}: {e.strerror or e}"
                    + ("; retrying with a back-off" if backoff else ""),
                )
                continue
            except Exception as e:
                if self._sock is not ls:
                    continue  # rebound: a closed ls can fail otherwise (ValueError)
                self.errors.note("-", type(e).__name__, logging.ERROR, f"accept failed: {e!r}")
                backoff = min(MAX_BACKOFF, max(0.01, backoff * 2))
                continue
            backoff = 0.0
            try:
                self._admit(sock, addr)
            except Exception as e:
                with contextlib.suppress(OSError):
                    sock.close()
                if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                    backoff = 0.01
                self.errors.note(
                    str(addr[0]),
                    type(e).__name__,
                    logging.ERROR,
                    f"cannot start a session for {addr[0]}: {e!r}; the connection was closed",
                )

    def _admit(self, sock: socket.socket, addr: Any) -> None:
        host = net.peer_host(str(addr[0]))  # an IPv4 client of [::] as a.b.c.d
        where = net.format_address(host, int(addr[1]))
        session = self._make_session(sock, where)
        session.fd_budget = self._fd_budget()
        entry = _Entry(session, host)
        t = threading.Thread(
            target=self._run_session, args=(entry,), name=f"session-{where}", daemon=True
        )
        entry.thread = t
        with self._lock:
            self._make_room(host)
            self._sessions[id(session)] = entry
            self._preauth[id(session)] = entry
        try:
            t.start()
        except BaseException:
            with self._lock:
                self._sessions.pop(id(session), None)
                self._preauth.pop(id(session), None)
            session.close()
            raise

    def _make_room(self, host: str) -> None:
        """Drop unauthenticated connections so that one more from ``host``
        fits in the budget. Caller holds the lock."""
        mine = [e for e in self._preauth.values() if e.host == host]
        if len(mine) >= PREAUTH_PER_ADDRESS:
            self._evict(self._victim(mine), f"{PREAUTH_PER_ADDRESS} from that address")
        if len(self._preauth) >= PREAUTH_MAX:
            self._evict(self._victim(list(self._preauth.values())), f"{PREAUTH_MAX} in all")

    @staticmethod
    def _victim(entries: list[_Entry]) -> _Entry:
        """The connection that made the least progress, oldest first: sent
        nothing < sent something but no valid Hello < introduced itself."""

        def progress(e: _Entry) -> tuple[int, float]:
            if e.session.introduced:
                return (2, e.since)
            return (1 if _has_input(e.session.sock) else 0, e.since)

        return min(entries, key=progress)

    def _evict(self, e: _Entry, why: str) -> None:
        e.evicted = True
        self._preauth.pop(id(e.session), None)
        e.session.shutdown()
        self.refused.note(
            e.host,
            "dropped for a newer one",
            logging.WARNING,
            f"dropped an unauthenticated connection from {e.session.addr} after "
            f"{time.monotonic() - e.since:.1f} s to admit a newer one (at most {why} "
            "before authentication)",
        )

    def preauth_ended(self, session: Session, reason: str, level: int, message: str) -> None:
        """A connection ended before it authenticated (timeout, bad frames,
        wrong key): counted, and logged within the rate limit."""
        with self._lock:
            e = self._sessions.get(id(session))
            self._preauth.pop(id(session), None)
        if e is None or e.evicted:
            return  # counted when it was dropped
        self.refused.note(e.host, reason, level, message)

    def _run_session(self, e: _Entry) -> None:
        try:
            e.session.run()
        except BaseException:
            self.session_crashes += 1
            log.exception("session %s died; its connection is closed", e.session.addr)
            with contextlib.suppress(Exception):
                e.session.close()
        finally:
            with self._lock:
                self._sessions.pop(id(e.session), None)
                self._preauth.pop(id(e.session), None)
                peer = e.session.peer
                if self._by_peer.get(peer) is e.session:
                    del self._by_peer[peer]

    def established(self, session: Session) -> None:
        """A peer authenticated: admit it as a session of its own (outside
        the unauthenticated budget). An older session from it is stale (its
        TCP connection died without us noticing yet): the newest one wins."""
        peer = session.peer
        with self._lock:
            e = self._sessions.get(id(session))
            if e is None or e.evicted:
                raise LinkError("dropped before it authenticated")
            same = [
                o
                for o in self._sessions.values()
                if o.authenticated and o.session.peer == peer and o is not e
            ]
            if len(same) >= SESSIONS_PER_PEER:
                raise RemoteProtocolError(
                    F.ErrorCode.LIMIT,
                    f"peer {peer!r} already has {len(same)} sessions here (the previous one "
                    "is still closing); retry later",
                )
            self._preauth.pop(id(session), None)
            e.authenticated = True
            old = self._by_peer.get(peer)
            self._by_peer[peer] = session
        if old is not None and old is not session:
            log.info(
                "peer %s reconnected; closing its previous session", peer, extra={"PEER": peer}
            )
            old.shutdown()
            # It may still hold this peer's partial files open: let it
            # checkpoint and close them before the new session lists them.
            if not old.done.wait(15):
                log.warning("previous session of %s did not end in 15 s", peer)
