"""replicatord: startup, main loop, reload and shutdown of one node.

The Daemon is the composition root: it builds the parts and wires them.
Threads: the listener (accepts peers, one Session thread each; listener.py),
one Link per peer this node pushes to (plus its reader; LinkSet, linkset.py),
the watcher and the scanner (WatchSupervisor, watching.py), the control
server (its commands and the status: commands.py). Messages from watcher,
scanner and sessions reach the links through the Router (routing.py), which
is also every session's host. The main thread only handles signals and supervises: SIGTERM/SIGINT
stop with a bounded drain (a second one forces exit), SIGHUP reloads the
config (see ``reload``), and once a second ``check_workers`` restarts a dead
watcher and tells systemd whether every other worker is alive (a dead one
stops the watchdog pings: systemd restarts); every few minutes the janitor
removes partial files nobody will finish.

Only the main thread changes the daemon's shape (links, watcher, scanner,
config): a ``replicatorctl reload`` is posted to it and waited for
(``Reloads``, reloading.py), so reloads never overlap each other or a watcher
restart. Other threads only read: the table of links is replaced whole,
never changed in place (``LinkSet.snapshot``), so a reader that took it once
iterates a dict that stays as it was.
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
from types import FrameType
from typing import Any

from . import __version__, config, janitor, logs, metrics, nodereload
from .commands import Commands
from .config import Config
from .control import ControlServer
from .errors import ConfigError, KeyFileError
from .fd import OwnedFd
from .janitor import Janitor
from .linkset import LinkSet
from .listener import Listener
from .marker import Marker
from .reloading import Reloads, load_config, stale_sessions
from .routing import Router
from .sdnotify import Notifier
from .session import Session
from .stats import SessionStats
from .watching import WatchSupervisor

log = logging.getLogger("replicator")

#: On SIGTERM, links get this long to see their operations in flight acknowledged.
DRAIN_SECONDS = 5.0


class Wakeup:
    """Wakes the main thread from signal handlers and other threads.

    A pipe, not a threading.Event: Event.set takes a lock, and a signal
    handler that runs on the main thread while it holds that same lock
    (inside Event.wait) would wait for itself forever; os.write cannot."""

    def __init__(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._r, self._w = OwnedFd(r), OwnedFd(w)
        self._poll = select.poll()
        self._poll.register(r, select.POLLIN)

    def set(self) -> None:
        try:
            os.write(self._w.fd, b"\0")
        except OSError:
            pass  # full: a wakeup is pending anyway (or closed: nobody waits)

    def wait(self, timeout: float) -> None:
        """Until ``set`` (since the last wait) or ``timeout`` seconds."""
        if self._poll.poll(max(0, int(timeout * 1000))):
            with contextlib.suppress(BlockingIOError):
                while os.read(self._r.fd, 4096):
                    pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


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
    """The parts of one node, and their start, reload, supervision and stop."""

    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.keys = config.read_keys(cfg, config_path)
        self.started = time.time()
        self.stopping = threading.Event()
        #: By mirror; changed in place, never replaced (the router holds this dict).
        self.markers: dict[str, Marker] = {}
        self.links = LinkSet()
        self.listener = Listener(
            cfg.node.listen, self._new_session, self.stopping, self._inbound_peers
        )
        self.router = Router(self.links, self.listener, self.markers)
        self.watching = WatchSupervisor(self.router.route, self.stopping)
        self.commands = Commands(self)
        self.control = ControlServer(cfg.node.control_socket, self.commands.handle)
        self.reloads = 0
        self.wakeup = Wakeup()
        self.reload_requests = Reloads(self.wakeup.set, self.stopping)
        self.janitor = Janitor(cfg.node.partial_max_age, self.router.receiving)
        self._metrics: object | None = None
        #: Where ``_metrics`` serves (status), None without an endpoint.
        self.metrics_address: str | None = None

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
            raise nodereload.bind_error("listen", node.listen, e) from None
        if node.metrics_listen:  # before any thread starts: a bad address exits cleanly
            try:
                self._metrics = metrics.serve(node.metrics_listen, self.status)
            except OSError as e:
                raise nodereload.bind_error("metrics_listen", node.metrics_listen, e) from None
            self.metrics_address = node.metrics_listen if self._metrics else None
        self.watching.apply(self.cfg)
        self.listener.start()
        self.links.apply(self.cfg, self.keys, self.markers)
        self.control.start()  # last: a status reply means the node is fully up
        log.info(
            "node %s listening on %s; pushing to %s; version %s",
            node.name,
            node.listen,
            ", ".join(sorted(self.links.snapshot())) or "nobody",
            __version__,
        )

    def _ensure_markers(self, cfg: Config | None = None) -> None:
        """A marker in every mirror of ``cfg`` (default: the running config)."""
        cfg = cfg or self.cfg
        for name, m in cfg.mirrors.items():
            if name not in self.markers or self.markers[name].root != os.fsencode(m.path):
                marker = Marker(cfg.node.state_dir, name, m.path)
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
        self.reload_requests.refuse_waiting()
        self.watching.stop()
        self.listener.close()
        deadline = self.links.stop(drain)
        sessions = self.listener.sessions()
        for s in sessions:  # they publish what is complete before closing
            s.shutdown()
        for s in sessions:
            s.done.wait(max(0.1, deadline - time.monotonic()))
        self.control.close()
        metrics.stop(self._metrics)
        log.info("node %s stopped", self.cfg.node.name)

    # -- reload ------------------------------------------------------------------

    def handle_reloads(self, notify: Notifier | None = None) -> bool:
        """On the main thread: one reload for the SIGHUP and the control
        requests that came since the last one, if any. True if it ran."""
        return self.reload_requests.handle(self.reload, self.config_path, self.summary, notify)

    def reload(self) -> str:
        """Re-read the config file and apply it (on the main thread only:
        ``reload_requests.request`` from others). Links whose peer or mirrors
        did not change stay up, and so do sessions; [node] changes are applied
        live where they can be (nodereload.py). An invalid config, one that
        changes what needs a restart, or a new address that cannot be bound
        changes nothing: the error is raised (ConfigError/KeyFileError) and
        the old config keeps running."""
        new, keys = load_config(self.config_path, self.cfg)
        node = nodereload.plan(self.cfg.node, new.node)
        fresh = nodereload.Fresh.open(node, self.cfg.node, new.node, self.status)
        try:
            self._ensure_markers(new)
        except BaseException:
            fresh.close()
            raise
        old_cfg, old_keys = self.cfg, self.keys
        self.cfg, self.keys = new, keys
        self._apply_node(node, fresh)
        links = self.links.apply(new, keys, self.markers)
        self.watching.apply(new)
        for s in stale_sessions(self.listener.sessions(), old_cfg, old_keys, new, keys):
            log.info(
                "closing the session of %s: its part of the config changed",
                s.peer,
                extra={"PEER": s.peer},
            )
            s.shutdown()
        self.janitor.run_soon()  # peers or mirrors may have gone
        self.reloads += 1
        summary = f"reloaded {self.config_path}: {links.summary()}"
        if node.live:
            summary += "; node settings applied live: " + ", ".join(node.live)
        log.info("%s", summary)
        return summary

    def _apply_node(self, changes: nodereload.NodeChanges, fresh: nodereload.Fresh) -> None:
        """Switch to what ``fresh`` opened, then close the old; post new
        timings to the live links and sessions, the partial files' age to
        the janitor (the running config is the new one)."""
        node = self.cfg.node
        if fresh.listen is not None:
            self.listener.rebind(fresh.listen, node.listen)
            log.info("listening on %s (rebound by the reload)", node.listen)
        if fresh.metrics_changed:
            old, self._metrics = self._metrics, fresh.metrics
            self.metrics_address = node.metrics_listen if fresh.metrics else None
            metrics.stop(old)
        if changes.retime:
            nodereload.retime(node, self.links.snapshot().values(), self.listener.sessions())
        self.janitor.max_age = node.partial_max_age  # its next run: right after the reload

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

    def run_janitor(self) -> None:
        """On the main thread: a janitor run, if one is due. Housekeeping:
        whatever goes wrong in it is logged, replication goes on."""
        if self.janitor.due() and not self.stopping.is_set():
            try:
                self.janitor.run(self.cfg.mirrors)
            except Exception:
                log.exception("janitor: the run failed (next one in %.0f s)", janitor.INTERVAL)

    def status(self) -> dict[str, Any]:
        """Everything ``replicatorctl status`` shows (commands.py)."""
        return self.commands.status()

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        return self.commands.summary()

    # -- inbound sessions ------------------------------------------------------------

    def _new_session(self, sock: socket.socket, where: str) -> Session:
        return Session(
            sock, where, self.cfg, self.keys, self.stopping, SessionStats("", where), self.router
        )

    def _inbound_peers(self) -> int:
        return len({p for m in self.cfg.mirrors.values() for p in m.accept_from})


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
        daemon.reload_requests.hups += 1
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
