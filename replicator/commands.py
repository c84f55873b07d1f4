"""Commands: what the control socket's requests do, and the status they show.

``handle`` answers one request of ``replicatorctl`` (control.py frames and
serves them): status, sync, pause, resume, reload, verify, and the three of
``wait`` (begin, poll, cancel: waits.py). ``status`` assembles
everything ``replicatorctl status`` and the metrics endpoint show;
``summary`` is the one line systemd's STATUS= shows.

Called from the control and metrics threads (and ``summary`` from the main
thread): it only reads what other threads write, taking each part once
(links, config, scanner, watcher) and copying. A reload is not run here but
posted to the main thread (``reloading.Reloads.request``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

from . import __version__
from .changes import Reconcile
from .config import Config
from .errors import ControlError
from .janitor import Janitor
from .link import Pause
from .linkset import LinkSet
from .listener import Listener
from .marker import Marker
from .reloading import Reloads
from .resolving import Conflicts
from .routing import Router
from .scrub import Verify
from .waits import Unwaitable, Waits
from .watching import WatchSupervisor


class Node(Protocol):
    """What the commands read from the daemon (daemon.Daemon)."""

    cfg: Config
    config_path: str | None
    started: float
    reloads: int
    #: Where /metrics is served, None without an endpoint.
    metrics_address: str | None
    links: LinkSet
    listener: Listener
    watching: WatchSupervisor
    janitor: Janitor
    router: Router
    reload_requests: Reloads

    @property
    def markers(self) -> Mapping[str, Marker]: ...

    def dead_workers(self) -> list[str]: ...


class Commands:
    """The control commands of one node, and its status."""

    def __init__(self, node: Node) -> None:
        self.node = node
        #: Two-way conflicts decided here (resolving.py).
        self.conflicts = Conflicts(node)
        #: ``replicatorctl wait``: what it waits for, read from the current config and links.
        self.waits = Waits(lambda: node.cfg, lambda: node.links.snapshot())

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """The reply to one control request; ControlError if it is wrong."""
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "sync":
            mirror = req.get("mirror")
            if mirror is not None and mirror not in self.node.cfg.mirrors:
                raise ControlError(f"no mirror {mirror!r} on this node")
            self.node.router.route(Reconcile(mirror))
            return {"ok": True}
        if cmd in ("pause", "resume"):
            return self._pause(req, cmd == "pause")
        if cmd == "reload":
            return self.node.reload_requests.request()
        if cmd == "verify":
            return self._verify(req)
        if cmd == "conflicts":
            return self.conflicts.listing(req.get("mirror"))
        if cmd == "resolve":
            return self.conflicts.resolve(str(req.get("path") or ""), str(req.get("keep")))
        if cmd == "wait":
            try:
                return self.waits.start(req)
            except Unwaitable as e:
                return {"ok": False, "error": str(e), "usage": True}
        if cmd == "wait-poll":
            return self.waits.poll(req)
        if cmd == "wait-cancel":
            return self.waits.cancel(req)
        raise ControlError(f"unknown command {cmd!r}")

    def _pause(self, req: dict[str, Any], on: bool) -> dict[str, Any]:
        peer, mirror = req.get("peer"), req.get("mirror")
        links = self.node.links.snapshot()
        if peer is not None and peer not in links:
            raise ControlError(f"this node does not push to a peer {peer!r}")
        if mirror is not None and mirror not in self.node.cfg.mirrors:
            raise ControlError(f"no mirror {mirror!r} on this node")
        for name, link in links.items():
            if peer is None or name == peer:
                link.post(Pause(on, mirror))
        return {"ok": True}

    def _verify(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start a scrub of each (peer, mirror) asked for (scrub.py); the
        pairs started are returned, their progress shows in status."""
        peer, mirror = req.get("peer"), req.get("mirror")
        cfg = self.node.cfg
        links = self.node.links.snapshot()
        if peer is not None and peer not in links:
            raise ControlError(f"this node does not push to a peer {peer!r}")
        if mirror is not None and mirror not in cfg.mirrors:
            raise ControlError(f"no mirror {mirror!r} on this node")
        started = []
        for name, m in sorted(cfg.mirrors.items()):
            if mirror is not None and name != mirror:
                continue
            for p in m.push_to:
                if (peer is None or p == peer) and p in links:
                    links[p].post(Verify(name, bool(req.get("repair"))))
                    started.append([p, name])
        if not started:
            raise ControlError("nothing to verify: no mirror of this node pushes to that peer")
        return {"ok": True, "started": started}

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        node = self.node
        links = node.links.snapshot().values()
        up = sum(1 for link in links if link.stats.state == "connected")
        queued = sum(link.stats.queue_files for link in links)
        lag = max((link.stats.lag() or 0.0 for link in links), default=0.0)
        sessions = len(node.listener.sessions())
        dead = node.dead_workers()
        return (
            f"{up}/{len(links)} links up, {sessions} inbound, {queued} queued, lag {lag:.1f} s"
            + (f"; DEAD: {', '.join(dead)} (watchdog pings stopped)" if dead else "")
        )

    def status(self) -> dict[str, Any]:
        """Everything ``replicatorctl status`` shows (docs/operations.md)."""
        node = self.node
        cfg, links = node.cfg, node.links.snapshot()
        sessions = [s.stats.snapshot() for s in node.listener.sessions()]
        link_status = {p: link.status() for p, link in links.items()}
        mirrors = {}
        scans = node.watching.scans()
        for name, m in cfg.mirrors.items():
            marker = node.markers.get(name)
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
                "conflicts_unresolved": self.conflicts.count(name),
            }
        return {
            "node": cfg.node.name,
            "version": __version__,
            "pid": os.getpid(),
            "started": node.started,
            "uptime": time.time() - node.started,
            # Where the sockets are bound now (a reload may have moved them).
            "listen": node.listener.address,
            "metrics_listen": node.metrics_address,
            "config": node.config_path,
            "reloads": node.reloads,
            "links": link_status,
            "sessions": sessions,
            "listener": node.listener.status(),
            "dead_workers": node.dead_workers(),
            "mirrors": mirrors,
            "watcher": node.watching.status(),
            "janitor": node.janitor.status(),
        }
