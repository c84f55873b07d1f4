"""replicatord: startup, main loop and shutdown of one node.

Threads: one listener (accepts peers, one Session thread each), one Link per
peer this node pushes to (plus its reader), the control server. The main
thread only waits for signals: SIGTERM/SIGINT stop (a second one forces
exit), SIGHUP reloads (see ``reload``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

from . import __version__, config, logs, net
from .backlog import Store
from .changes import Rescan
from .config import Config
from .control import ControlServer
from .errors import ConfigError, ControlError, KeyFileError
from .link import Link, SourceMirror
from .manifest import Excludes
from .marker import Marker
from .scanner import Scanner
from .session import Session
from .stats import LinkStats, SessionStats
from .watcher import OverflowHook, Watcher, watched_inodes

log = logging.getLogger("replicator")

#: Sessions beyond this many are refused at once (a flood of half-open
#: connections must not exhaust threads).
MAX_SESSIONS = 64
#: How often every mirror root's inotify watch is verified.
ROOT_CHECK_INTERVAL = 2.0
#: Rescan once inotify has not overflowed for this long.
OVERFLOW_QUIET = 0.5


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.keys = config.read_keys(cfg)
        self.started = time.time()
        self.stopping = threading.Event()
        self.links: dict[str, Link] = {}
        self._sessions: dict[int, Session] = {}
        self._by_peer: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._listen_thread: threading.Thread | None = None
        self.control = ControlServer(cfg.node.control_socket, self._control)
        self.markers: dict[str, Marker] = {}
        self.watcher: Watcher | None = None
        self.scanner: Scanner | None = None
        self._overflow = OverflowHook(self._on_overflow)
        self._last_overflow = 0.0
        self._overflow_handled = 0.0
        self.overflows = 0
        self.watcher_restarts = 0
        self._next_root_check = 0.0

    # -- lifecycle -------------------------------------------------------------

    def _pushed(self) -> dict[str, tuple[bytes, Excludes]]:
        return {
            name: (os.fsencode(m.path), Excludes(m.exclude))
            for name, m in self.cfg.mirrors.items()
            if m.push_to
        }

    def start(self) -> None:
        node = self.cfg.node
        os.makedirs(node.state_dir, mode=0o750, exist_ok=True)
        for name, m in self.cfg.mirrors.items():
            marker = Marker(node.state_dir, name, m.path)
            marker.ensure()
            self.markers[name] = marker
        pushed = self._pushed()
        if pushed:
            self.scanner = Scanner(pushed, self._route)
            self.watcher = Watcher(pushed, self._route, self.scanner.request)
            self._overflow.install()
            self.watcher.start()
            self.scanner.start()
        host, port = net.parse_address(self.cfg.node.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((host, port))
        except OSError as e:
            ls.close()
            raise ConfigError(
                f"node.listen: cannot listen on {self.cfg.node.listen}: {e.strerror}"
            ) from None
        ls.listen(128)
        self._listener = ls
        self._listen_thread = threading.Thread(target=self._accept, name="listener", daemon=True)
        self._listen_thread.start()
        for peer in self._pushed_peers(self.cfg):
            self._start_link(peer)
        self.control.start()  # last: a status reply means the node is fully up
        log.info(
            "node %s listening on %s; pushing to %s; version %s",
            self.cfg.node.name,
            self.cfg.node.listen,
            ", ".join(sorted(self.links)) or "nobody",
            __version__,
        )

    @staticmethod
    def _pushed_peers(cfg: Config) -> list[str]:
        return sorted({p for m in cfg.mirrors.values() for p in m.push_to})

    def _start_link(self, peer: str) -> None:
        mirrors = [
            SourceMirror.from_config(i + 1, name, m)
            for i, (name, m) in enumerate(sorted(self.cfg.mirrors.items()))
            if peer in m.push_to
        ]
        for sm in mirrors:
            sm.marker = self.markers.get(sm.name)
        pcfg = self.cfg.peers[peer]
        store = Store(os.path.join(self.cfg.node.state_dir, "backlog.sqlite3"), peer)
        link = Link(
            self.cfg.node,
            peer,
            pcfg,
            self.keys[peer],
            mirrors,
            LinkStats(peer, pcfg.address),
            store,
        )
        self.links[peer] = link
        link.start()

    def _route(self, msg: object) -> None:
        """Hand a change (Dirty/Moved/Rescan) to every link pushing its mirror."""
        mirror = getattr(msg, "mirror", None)
        for link in self.links.values():
            if mirror is None or mirror in link.by_name:
                link.post(msg)

    def _on_overflow(self) -> None:
        # Called from watchdog's thread, often many times in a row during a
        # burst: check_workers rescans once the overflows have stopped.
        self.overflows += 1
        self._last_overflow = time.monotonic()

    def _rescan_after_overflow(self) -> None:
        if self._last_overflow <= self._overflow_handled:
            return
        if time.monotonic() - self._last_overflow < OVERFLOW_QUIET:
            return
        self._overflow_handled = self._last_overflow
        log.warning(
            "inotify queue overflowed (%d times so far): events were lost; rescanning "
            "every mirror. Consider raising fs.inotify.max_queued_events",
            self.overflows,
        )
        self._route(Rescan(None))
        if self.scanner is not None:
            self.scanner.check_watches()

    def _roots_watched(self) -> bool:
        """Whether every pushed mirror's root holds an inotify watch. A root
        loses it when its filesystem is unmounted (and a remount does not
        bring it back) or when the directory is replaced."""
        watched = watched_inodes()
        for root, _ in self._pushed().values():
            try:
                st = os.stat(root)
            except OSError:
                continue  # missing root: nothing to watch (the marker check says so)
            if (st.st_dev, st.st_ino) not in watched:
                return False
        return True

    def check_workers(self) -> bool:
        """Called every second: restart a dead watcher (or one whose roots
        lost their watches). True if every worker is alive."""
        ok = True
        self._rescan_after_overflow()
        w = self.watcher
        now = time.monotonic()
        if w is not None and not self.stopping.is_set():
            reason = None
            if not w.alive():
                reason = "the file watcher died"
            elif now >= self._next_root_check:
                self._next_root_check = now + ROOT_CHECK_INTERVAL
                if not self._roots_watched():
                    reason = "a mirror root lost its inotify watch (unmounted or replaced?)"
            if reason is not None:
                ok = False
                self._restart_watcher(reason)
        for link in self.links.values():
            if not link.is_alive() and not self.stopping.is_set():
                ok = False
        return ok

    def _restart_watcher(self, reason: str) -> None:
        self.watcher_restarts += 1
        log.error("%s; restarting the watcher and rescanning every mirror", reason)
        if self.watcher is not None:
            self.watcher.stop()
        scanner = self.scanner
        assert scanner is not None
        pushed = {n: v for n, v in self._pushed().items() if os.path.isdir(v[0])}
        self.watcher = Watcher(pushed, self._route, scanner.request)
        try:
            self.watcher.start()
        except OSError as e:
            log.error("cannot restart the file watcher: %s", e)
        self._route(Rescan(None))
        scanner.check_watches()

    def stop(self) -> None:
        self.stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        self._overflow.remove()
        if self.scanner is not None:
            self.scanner.stop()
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for link in self.links.values():
            link.stop()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.shutdown()
        deadline = time.monotonic() + 10
        for link in self.links.values():
            link.join(max(0.1, deadline - time.monotonic()))
        self.control.close()
        log.info("node %s stopped", self.cfg.node.name)

    # -- listener --------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopping.is_set():
            ls = self._listener
            if ls is None:
                return
            try:
                sock, addr = ls.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            with self._lock:
                crowded = len(self._sessions) >= MAX_SESSIONS
            if crowded:
                log.warning("refusing connection from %s: %d sessions open", addr[0], MAX_SESSIONS)
                sock.close()
                continue
            where = f"{addr[0]}:{addr[1]}"
            session = Session(
                sock,
                where,
                self.cfg,
                self.keys,
                self.stopping,
                SessionStats("", where),
                on_established=self._established,
                markers=self.markers,
            )
            t = threading.Thread(
                target=self._run_session, args=(session,), name=f"session-{where}", daemon=True
            )
            with self._lock:
                self._sessions[id(session)] = session
            t.start()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.pop(id(session), None)
                if self._by_peer.get(session.peer) is session:
                    del self._by_peer[session.peer]

    def _established(self, session: Session) -> None:
        """A peer authenticated: an older session from it is stale (its TCP
        connection died without us noticing yet); the newest one wins."""
        with self._lock:
            old = self._by_peer.get(session.peer)
            self._by_peer[session.peer] = session
        if old is not None and old is not session:
            log.info(
                "peer %s reconnected; closing its previous session",
                session.peer,
                extra={"PEER": session.peer},
            )
            old.shutdown()
            # It may still hold this peer's partial files open: let it
            # checkpoint and close them before the new session lists them.
            if not old.done.wait(15):
                log.warning("previous session of %s did not end in 15 s", session.peer)

    # -- control -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions = [s.stats.snapshot() for s in self._sessions.values()]
        mirrors = {}
        scans = self.scanner.status() if self.scanner is not None else {}
        for name, m in self.cfg.mirrors.items():
            marker = self.markers.get(name)
            mirrors[name] = {
                "marker_ok": marker.ok() if marker else None,
                "watched": name in scans,
                **scans.get(name, {}),
                "path": m.path,
                "push_to": m.push_to,
                "accept_from": m.accept_from,
                "delete": m.delete,
                "links": {
                    p: link.stats.mirrors.get(name, {})
                    for p, link in self.links.items()
                    if p in m.push_to
                },
            }
        return {
            "node": self.cfg.node.name,
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": time.time() - self.started,
            "listen": self.cfg.node.listen,
            "links": {p: link.status() for p, link in self.links.items()},
            "sessions": sessions,
            "mirrors": mirrors,
            "watcher": {
                "alive": self.watcher.alive() if self.watcher else None,
                "restarts": self.watcher_restarts,
                "overflows": self.overflows,
            },
        }

    def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "sync":
            mirror = req.get("mirror")
            if mirror is not None and mirror not in self.cfg.mirrors:
                raise ControlError(f"no mirror {mirror!r} on this node")
            for link in self.links.values():
                link.post(Rescan(mirror))
            return {"ok": True}
        raise ControlError(f"unknown command {cmd!r}")


def _install_signals(daemon: Daemon) -> dict[int, Any]:
    old: dict[int, Any] = {}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: stopping", signal.Signals(signum).name)
        daemon.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, on_stop)
    return old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="replicatord", description="zero-copy file replication")
    ap.add_argument("--config", "-c", default="/etc/replicator/replicator.toml")
    ap.add_argument("--log-level", default=os.environ.get("REPLICATOR_LOG_LEVEL", "INFO"))
    ap.add_argument("--version", action="version", version=f"replicatord {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"replicatord: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    logs.setup(cfg.node.name, args.log_level)
    try:
        daemon = Daemon(cfg, args.config)
        daemon.start()
    except (ConfigError, KeyFileError) as e:
        print(f"replicatord: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"replicatord: cannot start: {e}", file=sys.stderr)
        return 1
    old = _install_signals(daemon)
    try:
        while not daemon.stopping.wait(1.0):
            daemon.check_workers()
    finally:
        daemon.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
