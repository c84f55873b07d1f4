"""replicatord: startup, main loop, reload and shutdown of one node.

Threads: the listener (accepts peers, one Session thread each), one Link per
peer this node pushes to (plus its reader), the watcher and the scanner, the
control server. The main thread only handles signals and supervises:
SIGTERM/SIGINT stop with a bounded drain (a second one forces exit), SIGHUP
reloads the config (see ``reload``), and once a second ``check_workers``
restarts a dead watcher and tells systemd whether everything is alive.

Changes flow through ``route``: watcher and scanner produce Dirty/Moved
messages for the links pushing that mirror; sessions produce PeerHas
messages for the link to the peer that sent the change (echo suppression).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

from . import __version__, config, logs, metrics, net
from .backlog import Store
from .changes import PeerHas, Rescan
from .config import Config
from .control import ControlServer
from .errors import ConfigError, ControlError, KeyFileError
from .link import Link, Pause, SourceMirror
from .manifest import EntryState, Excludes
from .marker import Marker
from .scanner import Scanner
from .sdnotify import Notifier
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
#: On SIGTERM, links get this long to see their operations in flight acknowledged.
DRAIN_SECONDS = 5.0


def _link_spec(cfg: Config, keys: dict[str, bytes], peer: str) -> tuple[Any, ...]:
    """Everything a link to ``peer`` is built from: a reload restarts the
    link only if this changes."""
    mirrors = tuple(
        (name, m.model_dump_json()) for name, m in sorted(cfg.mirrors.items()) if peer in m.push_to
    )
    return (cfg.peers[peer].model_dump_json(), keys.get(peer), mirrors)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.keys = config.read_keys(cfg, config_path)
        self.started = time.time()
        self.stopping = threading.Event()
        self.links: dict[str, Link] = {}
        self._specs: dict[str, tuple[Any, ...]] = {}
        self._sessions: dict[int, Session] = {}
        self._by_peer: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.control = ControlServer(cfg.node.control_socket, self._control)
        self.markers: dict[str, Marker] = {}
        self.watcher: Watcher | None = None
        self.scanner: Scanner | None = None
        self._overflow = OverflowHook(self._on_overflow)
        self._last_overflow = 0.0
        self._overflow_handled = 0.0
        self.overflows = 0
        self.watcher_restarts = 0
        self.reloads = 0
        self._next_root_check = 0.0
        self.reload_requested = threading.Event()
        self._metrics: object | None = None

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
        self._ensure_markers()
        host, port = net.parse_address(node.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((host, port))
        except OSError as e:
            ls.close()
            raise ConfigError(
                f"node.listen: cannot listen on {node.listen}: {e.strerror}"
            ) from None
        ls.listen(128)
        self._listener = ls
        self._start_watching()
        threading.Thread(target=self._accept, name="listener", daemon=True).start()
        for peer in self._pushed_peers(self.cfg):
            self._start_link(peer)
        if node.metrics_listen:
            self._metrics = metrics.serve(node.metrics_listen, self.status)
        self.control.start()  # last: a status reply means the node is fully up
        log.info(
            "node %s listening on %s; pushing to %s; version %s",
            node.name,
            node.listen,
            ", ".join(sorted(self.links)) or "nobody",
            __version__,
        )

    def _ensure_markers(self) -> None:
        for name, m in self.cfg.mirrors.items():
            if name not in self.markers or self.markers[name].root != os.fsencode(m.path):
                marker = Marker(self.cfg.node.state_dir, name, m.path)
                try:
                    marker.ensure()
                except OSError as e:
                    hint = ""
                    if e.errno == errno.EROFS:
                        hint = (
                            "; under systemd, add the mirror root to ReadWritePaths= with a "
                            "drop-in (docs/deployment.md)"
                        )
                    elif e.errno == errno.EACCES:
                        hint = "; the daemon's user must be able to write there"
                    raise ConfigError(
                        f"mirrors.{name}.path: cannot write the mirror marker in {m.path}: "
                        f"{e.strerror}{hint}"
                    ) from None
                self.markers[name] = marker

    def _start_watching(self) -> None:
        pushed = self._pushed()
        if not pushed:
            return
        self.scanner = Scanner(pushed, self.route)
        self.watcher = Watcher(pushed, self.route, self.scanner.request)
        self._overflow.install()
        self.watcher.start()
        self.scanner.start()

    def _stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self._overflow.remove()
        if self.scanner is not None:
            self.scanner.stop()
            self.scanner = None

    def first_scan_done(self) -> bool:
        """Watches are in place and every pushed mirror was walked once."""
        return self.scanner is None or self.scanner.checked.is_set()

    @staticmethod
    def _pushed_peers(cfg: Config) -> list[str]:
        return sorted({p for m in cfg.mirrors.values() for p in m.push_to})

    def _start_link(self, peer: str) -> None:
        mirrors = [
            SourceMirror.from_config(i + 1, name, m, peer, self.markers.get(name))
            for i, (name, m) in enumerate(sorted(self.cfg.mirrors.items()))
            if peer in m.push_to
        ]
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
        self._specs[peer] = _link_spec(self.cfg, self.keys, peer)
        link.start()

    def _stop_link(self, peer: str) -> None:
        link = self.links.pop(peer)
        self._specs.pop(peer, None)
        link.stop()
        link.join(10)

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop accepting, let links drain what is in flight (bounded), stop."""
        self.stopping.set()
        self._stop_watching()
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for link in self.links.values():
            link.stop(drain)
        deadline = time.monotonic() + drain + 2
        for link in self.links.values():
            link.join(max(0.1, deadline - time.monotonic()))
            if link.is_alive():  # stuck in a send: cut the connection
                link.stop()
                link.join(5)
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:  # they publish what is complete before closing
            s.shutdown()
        for s in sessions:
            s.done.wait(max(0.1, deadline - time.monotonic()))
        self.control.close()
        if self._metrics is not None:
            self._metrics.shutdown()  # type: ignore[attr-defined]
        log.info("node %s stopped", self.cfg.node.name)

    # -- reload ------------------------------------------------------------------

    def reload(self) -> str:
        """Re-read the config file and apply it. Links whose peer or mirrors
        did not change stay up. An invalid config changes nothing: the error
        is raised (ConfigError/KeyFileError) and the old config keeps running."""
        if self.config_path is None:
            raise ConfigError("no config file to reload from")
        new = config.load(self.config_path)
        config.check_filesystem(new, self.config_path)
        keys = config.read_keys(new, self.config_path)
        if new.node != self.cfg.node:
            changed = [
                k
                for k in type(new.node).model_fields
                if getattr(new.node, k) != getattr(self.cfg.node, k)
            ]
            raise ConfigError(
                f"{self.config_path}: "
                + ", ".join(f"node.{k}" for k in changed)
                + " changed: the [node] section needs a restart (systemctl restart replicatord)"
            )
        old_cfg, old_keys = self.cfg, self.keys
        self.cfg, self.keys = new, keys
        self._ensure_markers()
        started, stopped = [], []
        for peer in sorted(set(self.links) | set(self._pushed_peers(new))):
            want = peer in self._pushed_peers(new)
            if peer in self.links and (
                not want or self._specs[peer] != _link_spec(new, keys, peer)
            ):
                self._stop_link(peer)
                stopped.append(peer)
            if want and peer not in self.links:
                self._start_link(peer)
                started.append(peer)
        old_pushed = {n: (m.path, m.exclude) for n, m in old_cfg.mirrors.items() if m.push_to}
        new_pushed = {n: (m.path, m.exclude) for n, m in new.mirrors.items() if m.push_to}
        if old_pushed != new_pushed:
            self._stop_watching()
            self._start_watching()
        self._drop_stale_sessions(old_cfg, old_keys)
        self.reloads += 1
        restarted = sorted(set(started) & set(stopped))
        summary = (
            f"reloaded {self.config_path}: links restarted: {', '.join(restarted) or 'none'}; "
            f"started: {', '.join(sorted(set(started) - set(restarted))) or 'none'}; "
            f"stopped: {', '.join(sorted(set(stopped) - set(restarted))) or 'none'}"
        )
        log.info("%s", summary)
        return summary

    def _drop_stale_sessions(self, old: Config, old_keys: dict[str, bytes]) -> None:
        """Close sessions whose peer, key or accepted mirrors changed: the
        peer reconnects and is judged by the new config."""
        new = self.cfg
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            peer = s.peer
            if not peer:
                continue
            stale = peer not in new.peers or old_keys.get(peer) != self.keys.get(peer)
            for name in s.stats.mirrors:
                before, after = old.mirrors.get(name), new.mirrors.get(name)
                if (
                    after is None
                    or before is None
                    or peer not in after.accept_from
                    or (before.path, before.push_to) != (after.path, after.push_to)
                ):
                    stale = True
            if stale:
                log.info(
                    "closing the session of %s: its part of the config changed",
                    peer,
                    extra={"PEER": peer},
                )
                s.shutdown()

    # -- routing -------------------------------------------------------------------

    def route(self, msg: object) -> None:
        """Hand a change to the links it concerns: PeerHas to the link to that
        peer; Dirty/Moved/Rescan to every link pushing its mirror."""
        links = self.links
        if isinstance(msg, PeerHas):
            link = links.get(msg.peer)
            if link is not None:
                link.post(msg)
            return
        mirror = getattr(msg, "mirror", None)
        for link in list(links.values()):
            if mirror is None or mirror in link.by_name:
                link.post(msg)

    def peer_state(self, peer: str, mirror: str, path: bytes) -> EntryState | None:
        link = self.links.get(peer)
        return None if link is None else link.peer_state(mirror, path)

    # -- supervision -----------------------------------------------------------------

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
            "inotify queue overflowed (%d times so far): events were lost; rescanning every "
            "mirror. Consider raising fs.inotify.max_queued_events",
            self.overflows,
        )
        self.route(Rescan(None))
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
        if self.scanner is not None and not self.scanner.is_alive():
            ok = False
        for link in self.links.values():
            if not link.is_alive() and not self.stopping.is_set():
                ok = False
        return ok and (self._listener is not None) and self.control.alive()

    def _restart_watcher(self, reason: str) -> None:
        self.watcher_restarts += 1
        log.error("%s; restarting the watcher and rescanning every mirror", reason)
        if self.watcher is not None:
            self.watcher.stop()
        scanner = self.scanner
        assert scanner is not None
        pushed = {n: v for n, v in self._pushed().items() if os.path.isdir(v[0])}
        self.watcher = Watcher(pushed, self.route, scanner.request)
        try:
            self.watcher.start()
        except OSError as e:
            log.error("cannot restart the file watcher: %s", e)
        self.route(Rescan(None))
        scanner.check_watches()

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        up = sum(1 for link in self.links.values() if link.stats.state == "connected")
        queued = sum(link.stats.queue_files for link in self.links.values())
        lag = max((link.stats.lag() or 0.0 for link in self.links.values()), default=0.0)
        with self._lock:
            sessions = len(self._sessions)
        return (
            f"{up}/{len(self.links)} links up, {sessions} inbound, {queued} queued, lag {lag:.1f} s"
        )

    # -- listener ------------------------------------------------------------------

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
                peer_state=self.peer_state,
                notify=self.route,
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

    # -- control ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions = [s.stats.snapshot() for s in self._sessions.values()]
        mirrors = {}
        scans = self.scanner.status() if self.scanner is not None else {}
        for name, m in self.cfg.mirrors.items():
            marker = self.markers.get(name)
            per_link = {
                p: link.stats.mirrors.get(name, {})
                for p, link in self.links.items()
                if p in m.push_to
            }
            scan = scans.get(name, {})
            mirrors[name] = {
                "path": m.path,
                "push_to": m.push_to,
                "accept_from": m.accept_from,
                "delete": m.delete,
                "marker_ok": marker.ok() if marker else None,
                "watched": name in scans,
                "dirs": scan.get("dirs"),
                "unwatched_dirs": scan.get("unwatched_dirs"),
                "last_watch_check": scan.get("last_watch_check"),
                "links": per_link,
            }
        return {
            "node": self.cfg.node.name,
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": time.time() - self.started,
            "listen": self.cfg.node.listen,
            "config": self.config_path,
            "reloads": self.reloads,
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
            self.route(Rescan(mirror))
            return {"ok": True}
        if cmd in ("pause", "resume"):
            return self._pause(req, cmd == "pause")
        if cmd == "reload":
            try:
                return {"ok": True, "message": self.reload()}
            except (ConfigError, KeyFileError) as e:
                log.error("reload refused, the running config stays: %s", e)
                return {"ok": False, "error": f"reload refused, the running config stays:\n{e}"}
        raise ControlError(f"unknown command {cmd!r}")

    def _pause(self, req: dict[str, Any], on: bool) -> dict[str, Any]:
        peer, mirror = req.get("peer"), req.get("mirror")
        if peer is not None and peer not in self.links:
            raise ControlError(f"this node does not push to a peer {peer!r}")
        if mirror is not None and mirror not in self.cfg.mirrors:
            raise ControlError(f"no mirror {mirror!r} on this node")
        for name, link in self.links.items():
            if peer is None or name == peer:
                link.post(Pause(on, mirror))
        return {"ok": True}


def _install_signals(daemon: Daemon) -> dict[int, Any]:
    old: dict[int, Any] = {}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping.is_set():
            os.write(2, b"replicatord: second signal: exiting now\n")
            os._exit(1)
        daemon.stopping.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        daemon.reload_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, on_stop)
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    return old


#: How long READY=1 waits for the first scan of the mirrors (systemd's
#: TimeoutStartSec must be longer; a huge tree can take minutes).
FIRST_SCAN_TIMEOUT = 600.0
#: STATUS= is refreshed this often.
STATUS_EVERY = 5.0


def serve(daemon: Daemon, notify: Notifier, config_path: str) -> None:
    """The main thread's loop: readiness, reloads, supervision, watchdog."""
    notify.status("scanning mirrors")
    deadline = time.monotonic() + FIRST_SCAN_TIMEOUT
    while not daemon.first_scan_done() and time.monotonic() < deadline:
        if daemon.stopping.wait(0.05):
            return
    notify.ready(daemon.summary())
    watched = notify.watchdog_interval() is not None  # the loop below runs every second
    next_status = time.monotonic() + STATUS_EVERY
    while not daemon.stopping.wait(1.0):
        if daemon.reload_requested.is_set():
            daemon.reload_requested.clear()
            log.info("SIGHUP: reloading %s", config_path)
            notify.reloading()
            try:
                daemon.reload()
            except (ConfigError, KeyFileError) as e:
                log.error("reload refused, the running config stays: %s", e)
            notify.ready(daemon.summary())
        if daemon.check_workers() and watched:
            notify.watchdog()  # only while every worker is alive
        if time.monotonic() >= next_status:
            notify.status(daemon.summary())
            next_status = time.monotonic() + STATUS_EVERY
    log.info("stopping (draining for up to %.0f s)", DRAIN_SECONDS)


def _raise_fd_limit() -> None:
    """Sessions, partial files and directory fds add up: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="replicatord", description="zero-copy file replication")
    ap.add_argument("--config", "-c", default="/etc/replicator/replicator.toml")
    ap.add_argument("--log-level", default=os.environ.get("REPLICATOR_LOG_LEVEL", "INFO"))
    ap.add_argument("--version", action="version", version=f"replicatord {__version__}")
    args = ap.parse_args(argv)
    # watchdog walks a mirror recursively (os.walk); a legal path can be
    # ~2,000 directories deep.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    _raise_fd_limit()
    try:
        cfg = config.load(args.config)
        config.check_filesystem(cfg, args.config)
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
    notify = Notifier()
    try:
        serve(daemon, notify, args.config)
    finally:
        notify.stopping("draining and stopping")
        daemon.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
