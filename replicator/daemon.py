"""replicatord: startup, main loop, reload and shutdown of one node.

The Daemon is the composition root: it builds the parts and wires them.
Threads: the listener (accepts peers, one Session thread each; listener.py),
one Link per peer this node pushes to (plus its reader; LinkSet, linkset.py),
the watcher and the scanner (WatchSupervisor, watching.py), the control
server. The main thread only handles signals and supervises: SIGTERM/SIGINT
stop with a bounded drain (a second one forces exit), SIGHUP reloads the
config (see ``reload``), and once a second ``check_workers`` restarts a dead
watcher and tells systemd whether every other worker is alive (a dead one
stops the watchdog pings: systemd restarts); every few minutes the janitor
removes partial files nobody will finish.

Only the main thread changes the daemon's shape (links, watcher, scanner,
config): a ``replicatorctl reload`` is posted to it and waited for
(``request_reload``), so reloads never overlap each other or a watcher
restart. Other threads only read: the table of links is replaced whole,
never changed in place (``LinkSet.snapshot``), so a reader that took it once
iterates a dict that stays as it was.

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
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import __version__, config, janitor, logs, metrics
from .changes import PeerHas, Rescan
from .config import Config
from .control import ControlServer
from .errors import ConfigError, ControlError, KeyFileError
from .janitor import Janitor
from .link import Pause
from .linkset import LinkSet
from .listener import Listener
from .manifest import EntryState
from .marker import Marker
from .sdnotify import Notifier
from .session import Session
from .stats import SessionStats
from .watching import WatchSupervisor

log = logging.getLogger("replicator")

#: On SIGTERM, links get this long to see their operations in flight acknowledged.
DRAIN_SECONDS = 5.0
#: How long a control request waits for the main thread to run its reload.
RELOAD_WAIT = 120.0


class Wakeup:
    """Wakes the main thread from signal handlers and other threads.

    A pipe, not a threading.Event: Event.set takes a lock, and a signal
    handler that runs on the main thread while it holds that same lock
    (inside Event.wait) would wait for itself forever; os.write cannot."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)

    def set(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass  # full: a wakeup is pending anyway (or closed: nobody waits)

    def wait(self, timeout: float) -> None:
        """Until ``set`` (since the last wait) or ``timeout`` seconds."""
        if self._poll.poll(max(0, int(timeout * 1000))):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._r, 4096):
                    pass

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@dataclass
class _ReloadRequest:
    """A reload asked for through the control socket, run by the main thread."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)

    def finish(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.done.set()


#: Kernel protections a mirror written by untrusted local users relies on
#: (docs/security.md): without them a user can link a file they cannot read
#: into a mirror, and the root daemon would replicate it.
PROTECTIONS = ("fs.protected_hardlinks", "fs.protected_symlinks")


def unsafe_sysctls(proc: str = "/proc/sys") -> list[str]:
    """One warning per protection that is off on this host."""
    out = []
    for key in PROTECTIONS:
        try:
            with open(os.path.join(proc, *key.split("."))) as f:
                value = f.read().strip()
        except OSError:
            continue  # not this kernel, or no /proc: nothing to say
        if value == "0":
            out.append(
                f"{key} = 0: a local user who can write into a mirror can link a file "
                f"they cannot read into it, and this daemon would replicate it; set "
                f"{key} = 1 (sysctl -w {key}=1, and in /etc/sysctl.d)"
            )
    return out


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.keys = config.read_keys(cfg, config_path)
        self.started = time.time()
        self.stopping = threading.Event()
        self.links = LinkSet()
        self.watching = WatchSupervisor(self.route, self.stopping)
        self.listener = Listener(
            cfg.node.listen, self._new_session, self.stopping, self._inbound_peers
        )
        self.control = ControlServer(cfg.node.control_socket, self._control)
        self.markers: dict[str, Marker] = {}
        self.reloads = 0
        self.wakeup = Wakeup()
        #: SIGHUPs received: counted by the handler (a plain attribute, see
        #: Wakeup), compared with those reloaded for by the main thread.
        self.hups = 0
        self._hups_done = 0
        self._lock = threading.Lock()  # guards _reload_requests
        self._reload_requests: list[_ReloadRequest] = []
        self.janitor = Janitor(cfg.node.partial_max_age, self._receiving)
        self._metrics: object | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        node = self.cfg.node
        os.makedirs(node.state_dir, mode=0o750, exist_ok=True)
        self._ensure_markers()
        for problem in unsafe_sysctls():
            log.warning("%s", problem)
        try:
            self.listener.bind()
        except OSError as e:
            raise ConfigError(
                f"node.listen: cannot listen on {node.listen}: {e.strerror}"
            ) from None
        self.watching.apply(self.cfg)
        self.listener.start()
        self.links.apply(self.cfg, self.keys, self.markers)
        if node.metrics_listen:
            self._metrics = metrics.serve(node.metrics_listen, self.status)
        self.control.start()  # last: a status reply means the node is fully up
        log.info(
            "node %s listening on %s; pushing to %s; version %s",
            node.name,
            node.listen,
            ", ".join(sorted(self.links.snapshot())) or "nobody",
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

    def first_scan_done(self) -> bool:
        """Watches are in place and every pushed mirror was walked once."""
        return self.watching.first_scan_done()

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop accepting, let links drain what is in flight (bounded), stop."""
        self.stopping.set()
        with self._lock:
            waiting, self._reload_requests = self._reload_requests, []
        for req in waiting:
            req.finish({"ok": False, "error": "the daemon is stopping: not reloaded"})
        self.watching.stop()
        self.listener.close()
        deadline = self.links.stop(drain)
        sessions = self.listener.sessions()
        for s in sessions:  # they publish what is complete before closing
            s.shutdown()
        for s in sessions:
            s.done.wait(max(0.1, deadline - time.monotonic()))
        self.control.close()
        if self._metrics is not None:
            self._metrics.shutdown()  # type: ignore[attr-defined]
        log.info("node %s stopped", self.cfg.node.name)

    # -- reload ------------------------------------------------------------------

    def request_reload(self, timeout: float = RELOAD_WAIT) -> dict[str, Any]:
        """From a thread other than the main one: have the main thread
        reload, wait for it, and return the control reply. Requests made
        while a reload runs are served by the next one (which reads the
        file after they were made); requests waiting together share one."""
        req = _ReloadRequest()
        with self._lock:
            if self.stopping.is_set():
                return {"ok": False, "error": "the daemon is stopping: not reloaded"}
            self._reload_requests.append(req)
        self.wakeup.set()
        if not req.done.wait(timeout):
            return {
                "ok": False,
                "error": f"the reload did not finish within {timeout:.0f} s (see the log)",
            }
        return req.reply

    def handle_reloads(self, notify: Notifier | None = None) -> bool:
        """On the main thread: one reload for the SIGHUP and the control
        requests that came since the last one, if any. True if it ran."""
        with self._lock:
            waiting, self._reload_requests = self._reload_requests, []
        # Only the handler writes hups: a SIGHUP arriving now is either
        # counted in this read or seen next time, never lost.
        hups = self.hups
        hup, self._hups_done = hups != self._hups_done, hups
        if not waiting and not hup:
            return False
        why = ["SIGHUP"] if hup else []
        if waiting:
            why.append(f"{len(waiting)} control request{'s' if len(waiting) > 1 else ''}")
        log.info("reloading %s (%s)", self.config_path, " and ".join(why))
        if notify is not None:
            notify.reloading()
        try:
            reply = {"ok": True, "message": self.reload()}
        except (ConfigError, KeyFileError) as e:
            log.error("reload refused, the running config stays: %s", e)
            reply = {"ok": False, "error": f"reload refused, the running config stays:\n{e}"}
        except BaseException as e:
            # Half applied: let the daemon fail (systemd restarts it), but
            # answer first.
            for req in waiting:
                req.finish({"ok": False, "error": f"reload failed: {e!r} (see the log)"})
            raise
        for req in waiting:
            req.finish(reply)
        if notify is not None:
            notify.ready(self.summary())
        return True

    def reload(self) -> str:
        """Re-read the config file and apply it (on the main thread only:
        ``request_reload`` from others). Links whose peer or mirrors
        did not change stay up. An invalid config changes nothing: the error
        is raised (ConfigError/KeyFileError) and the old config keeps running."""
        new, keys = self._load_new_config()
        old_cfg, old_keys = self.cfg, self.keys
        self.cfg, self.keys = new, keys
        self._ensure_markers()
        links = self.links.apply(new, keys, self.markers)
        self.watching.apply(new)
        self._drop_stale_sessions(old_cfg, old_keys)
        self.janitor.run_soon()  # peers or mirrors may have gone
        self.reloads += 1
        summary = f"reloaded {self.config_path}: {links.summary()}"
        log.info("%s", summary)
        return summary

    def _load_new_config(self) -> tuple[Config, dict[str, bytes]]:
        """The config file and its keys, checked; ConfigError/KeyFileError if
        they are invalid or change what only a restart can change ([node])."""
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
        return new, keys

    def _drop_stale_sessions(self, old: Config, old_keys: dict[str, bytes]) -> None:
        """Close sessions whose peer, key or accepted mirrors changed: the
        peer reconnects and is judged by the new config."""
        new = self.cfg
        for s in self.listener.sessions():
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
        links = self.links.snapshot()
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
        link = self.links.snapshot().get(peer)
        return None if link is None else link.peer_state(mirror, path)

    # -- supervision -----------------------------------------------------------------

    def check_workers(self) -> bool:
        """Called every second: restart a dead watcher (or one whose roots
        lost their watches). True if every worker is alive."""
        restarted = self.watching.check()
        return not restarted and not self.dead_workers()

    def dead_workers(self) -> list[str]:
        """Long-lived threads that died (the watcher is restarted instead)."""
        if self.stopping.is_set():
            return []
        dead = self.listener.dead() + self.watching.dead()
        if not self.control.alive():
            dead.append("control")
        return dead + self.links.dead()

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        links = self.links.snapshot().values()
        up = sum(1 for link in links if link.stats.state == "connected")
        queued = sum(link.stats.queue_files for link in links)
        lag = max((link.stats.lag() or 0.0 for link in links), default=0.0)
        sessions = len(self.listener.sessions())
        dead = self.dead_workers()
        return (
            f"{up}/{len(links)} links up, {sessions} inbound, {queued} queued, lag {lag:.1f} s"
            + (f"; DEAD: {', '.join(dead)} (watchdog pings stopped)" if dead else "")
        )

    # -- inbound sessions ------------------------------------------------------------

    def _new_session(self, sock: socket.socket, where: str) -> Session:
        return Session(
            sock, where, self.cfg, self.keys, self.stopping, SessionStats("", where), self
        )

    # The SessionHost of every inbound session (with peer_state above): the
    # listener admits and counts sessions, markers guard mirrors, links hear.

    def established(self, session: Session) -> None:
        self.listener.established(session)

    def preauth_ended(self, session: Session, reason: str, level: int, message: str) -> None:
        self.listener.preauth_ended(session, reason, level, message)

    def marker_ok(self, mirror: str) -> bool:
        marker = self.markers.get(mirror)
        return marker is None or marker.ok()

    def notify(self, msg: object) -> None:
        self.route(msg)

    def _inbound_peers(self) -> int:
        return len({p for m in self.cfg.mirrors.values() for p in m.accept_from})

    def _receiving(self) -> set[tuple[str, str]]:
        """(mirror, peer) of every inbound session with the mirror open."""
        return {
            (m, s.peer) for s in self.listener.sessions() if s.peer for m in list(s.stats.mirrors)
        }

    def run_janitor(self) -> None:
        """On the main thread: a janitor run, if one is due. Housekeeping:
        whatever goes wrong in it is logged, replication goes on."""
        if self.janitor.due() and not self.stopping.is_set():
            try:
                self.janitor.run(self.cfg.mirrors)
            except Exception:
                log.exception("janitor: the run failed (next one in %.0f s)", janitor.INTERVAL)

    # -- control ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything ``replicatorctl status`` shows. Called from the control
        and metrics threads: it reads what other threads write, so it takes
        each of them once (links, config, scanner, watcher) and copies."""
        cfg, links = self.cfg, self.links.snapshot()
        sessions = [s.stats.snapshot() for s in self.listener.sessions()]
        link_status = {p: link.status() for p, link in links.items()}
        mirrors = {}
        scans = self.watching.scans()
        for name, m in cfg.mirrors.items():
            marker = self.markers.get(name)
            per_link = {
                p: ls["mirrors"].get(name, {}) for p, ls in link_status.items() if p in m.push_to
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
            "node": cfg.node.name,
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": time.time() - self.started,
            "listen": cfg.node.listen,
            "config": self.config_path,
            "reloads": self.reloads,
            "links": link_status,
            "sessions": sessions,
            "listener": self.listener.status(),
            "dead_workers": self.dead_workers(),
            "mirrors": mirrors,
            "watcher": self.watching.status(),
            "janitor": self.janitor.status(),
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
            return self.request_reload()
        raise ControlError(f"unknown command {cmd!r}")

    def _pause(self, req: dict[str, Any], on: bool) -> dict[str, Any]:
        peer, mirror = req.get("peer"), req.get("mirror")
        links = self.links.snapshot()
        if peer is not None and peer not in links:
            raise ControlError(f"this node does not push to a peer {peer!r}")
        if mirror is not None and mirror not in self.cfg.mirrors:
            raise ControlError(f"no mirror {mirror!r} on this node")
        for name, link in links.items():
            if peer is None or name == peer:
                link.post(Pause(on, mirror))
        return {"ok": True}


def _install_signals(daemon: Daemon) -> dict[int, Any]:
    old: dict[int, Any] = {}

    # The main thread never waits on daemon.stopping (only on the wakeup
    # pipe), so setting it here cannot meet its own lock.
    def on_stop(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping.is_set():
            os.write(2, b"replicatord: second signal: exiting now\n")
            os._exit(1)
        daemon.stopping.set()
        daemon.wakeup.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        daemon.hups += 1
        daemon.wakeup.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, on_stop)
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    return old


#: How long READY=1 waits for the first scan of the mirrors (systemd's
#: TimeoutStartSec must be longer; a huge tree can take minutes).
FIRST_SCAN_TIMEOUT = 600.0
#: STATUS= is refreshed this often.
STATUS_EVERY = 5.0


def serve(daemon: Daemon, notify: Notifier) -> None:
    """The main thread's loop: readiness, reloads, supervision, watchdog,
    janitor. It wakes at once for a signal or a reload request."""
    notify.status("scanning mirrors")
    deadline = time.monotonic() + FIRST_SCAN_TIMEOUT
    while not daemon.first_scan_done() and time.monotonic() < deadline:
        daemon.wakeup.wait(0.05)
        if daemon.stopping.is_set():
            return
        daemon.handle_reloads()  # not ready yet: systemd hears of it with READY=1
    notify.ready(daemon.summary())
    watched = notify.watchdog_interval() is not None  # the loop below runs every second
    next_status = time.monotonic() + STATUS_EVERY
    while True:
        daemon.wakeup.wait(1.0)
        if daemon.stopping.is_set():
            break
        daemon.handle_reloads(notify)
        daemon.run_janitor()
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
        serve(daemon, notify)
    finally:
        notify.stopping("draining and stopping")
        daemon.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        daemon.wakeup.close()
    return 0
