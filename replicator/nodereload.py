"""Reloading the ``[node]`` section: what a running daemon can take live.

Every field of NodeConfig is in exactly one of two tables:

- ``RESTART_ONLY``: the node's identity and the places it holds open (its
  name, state_dir, control_socket). A reload that changes one is refused
  whole, naming each such field and why; nothing of it is applied.
- ``LIVE``: applied without a restart and without dropping a link or a
  session. ``listen`` and ``metrics_listen`` are rebound: the new socket is
  opened first (``Fresh.open``; if that fails the reload is refused naming
  the address and the error, and the old one keeps serving), then switched
  to, then the old one is closed. Connections accepted on the old listener
  stay up. The timing fields (``TIMING``) are posted to every link and
  session (``retime``); ``verify_rate`` applies to scrubs started from now
  on, ``partial_max_age`` to the janitor's next run.

``plan`` is the pure decision; ``Fresh`` holds what a reload opened before
it switches to it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import metrics, net
from .config import NodeConfig
from .errors import ConfigError
from .link import Link
from .listener import BACKLOG
from .session import Session

#: Fields only a restart can change, and why.
RESTART_ONLY = {
    "name": "the node's identity: its peers know it by this name (handshakes, accept_from)",
    "state_dir": "the backlog, block maps and conflict log are open in it",
    "control_socket": "replicatorctl reaches the daemon through it, this reload too",
}
#: What links and sessions time and size their traffic by: applied to them live.
TIMING = ("heartbeat_interval", "dead_after", "backoff_initial", "backoff_max", "inline_max")
#: Fields a reload applies without a restart.
LIVE = ("listen", "metrics_listen", *TIMING, "verify_rate", "partial_max_age")

RESTART = "restart the daemon (systemctl restart replicatord)"


@dataclass(frozen=True)
class NodeChanges:
    """The [node] fields a reload changes, in NodeConfig's order: those it
    applies live and those that need a restart."""

    live: tuple[str, ...]
    refused: tuple[str, ...]

    @property
    def retime(self) -> bool:
        """Links and sessions get new timings (or links a new verify_rate)."""
        return any(f in TIMING or f == "verify_rate" for f in self.live)


def plan(old: NodeConfig, new: NodeConfig) -> NodeChanges:
    """Which fields changed from ``old`` to ``new``, split into live and refused."""
    changed = [k for k in NodeConfig.model_fields if getattr(old, k) != getattr(new, k)]
    return NodeChanges(
        live=tuple(k for k in changed if k in LIVE),
        refused=tuple(k for k in changed if k in RESTART_ONLY),
    )


def refusal(changes: NodeChanges, source: str) -> str | None:
    """The error refusing the reload, one line per field; None if none is refused."""
    if not changes.refused:
        return None
    return "\n".join(
        f"{source}: node.{k} changed: {RESTART_ONLY[k]}; {RESTART}" for k in changes.refused
    )


def bind_error(field: str, address: str, e: OSError, keeps: str = "") -> ConfigError:
    """The error for an address ``field`` cannot be bound to: errno, hint
    and, on a reload, what keeps running (``keeps``)."""
    code = errno.errorcode.get(e.errno or 0, "error")
    hint = ""
    if e.errno == errno.EADDRNOTAVAIL:
        hint = " (no interface of this host has that address, or IPv6 is disabled)"
    elif e.errno == errno.EAFNOSUPPORT:
        hint = " (IPv6 is not available on this host: /proc/sys/net/ipv6)"
    elif e.errno == errno.EADDRINUSE:
        hint = " (another process, or this daemon, holds it)"
    return ConfigError(
        f"node.{field}: cannot listen on {address}: {e.strerror or e} ({code}){hint}{keeps}"
    )


class Fresh:
    """What a reload opened before switching to it: the new listening
    socket and metrics server, if their address changed."""

    def __init__(self) -> None:
        self.listen: socket.socket | None = None
        #: True if metrics_listen changed; ``metrics`` is then the new server
        #: (None: no endpoint, or prometheus_client is missing).
        self.metrics_changed = False
        self.metrics: object | None = None

    @classmethod
    def open(
        cls,
        changes: NodeChanges,
        old: NodeConfig,
        new: NodeConfig,
        status: Callable[[], dict[str, Any]],
    ) -> Fresh:
        """Bind every changed address; ConfigError naming the address and
        the error if one cannot be (what was opened is closed again)."""
        fresh = cls()
        try:
            if "listen" in changes.live:
                fresh.listen = _listen(new.listen, f"; still listening on {old.listen}")
            if "metrics_listen" in changes.live:
                fresh.metrics_changed = True
                if new.metrics_listen is not None:
                    keeps = f"; metrics still on {old.metrics_listen}" if old.metrics_listen else ""
                    fresh.metrics = _metrics(new.metrics_listen, status, keeps)
        except BaseException:
            fresh.close()
            raise
        return fresh

    def close(self) -> None:
        """The reload is not applied after all: close what was opened."""
        if self.listen is not None:
            self.listen.close()
            self.listen = None
        metrics.stop(self.metrics)
        self.metrics = None


def _listen(address: str, keeps: str) -> socket.socket:
    try:
        return net.listen_socket(address, BACKLOG)
    except OSError as e:
        raise bind_error("listen", address, e, keeps) from None


def _metrics(address: str, status: Callable[[], dict[str, Any]], keeps: str) -> object | None:
    try:
        return metrics.serve(address, status)
    except OSError as e:
        raise bind_error("metrics_listen", address, e, keeps) from None


def retime(node: NodeConfig, links: Iterable[Link], sessions: Iterable[Session]) -> None:
    """Post the new timings to every live link and session."""
    for link in links:
        link.retime(node)
    for s in sessions:
        s.retime(node)
