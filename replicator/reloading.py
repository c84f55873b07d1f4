"""Reloads: asking for one, serving the requests, and what a new config means.

A reload is asked for by SIGHUP (the handler only counts: ``Reloads.hups``)
or by ``replicatorctl reload`` (a control thread calls ``request`` and waits).
Only the main thread reloads, in ``handle``: one reload serves the SIGHUP and
every request that came since the last one, so reloads never overlap. What
a reload does to the running parts is the daemon's (``Daemon.reload``); the
checks it starts with (``load_config``) and the sessions it closes
(``stale_sessions``) are here; what a new [node] section means is
nodereload.py's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import config, nodereload
from .config import Config
from .errors import ConfigError, KeyFileError
from .sdnotify import Notifier
from .session import Session

log = logging.getLogger("replicator")

#: How long a control request waits for the main thread to run its reload.
RELOAD_WAIT = 120.0

STOPPING = {"ok": False, "error": "the daemon is stopping: not reloaded"}


@dataclass
class ReloadRequest:
    """A reload asked for through the control socket, run by the main thread."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)

    def finish(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.done.set()


class Reloads:
    """The reloads asked for and not yet run: SIGHUPs and control requests."""

    def __init__(self, wake: Callable[[], None], stopping: threading.Event) -> None:
        self._wake = wake
        self._stopping = stopping
        #: SIGHUPs received: counted by the handler (a plain attribute: a
        #: lock taken in a signal handler can deadlock the main thread, see
        #: daemon.Wakeup), compared with those reloaded for by ``handle``.
        self.hups = 0
        self._hups_done = 0
        self._lock = threading.Lock()  # guards _requests
        self._requests: list[ReloadRequest] = []

    def request(self, timeout: float = RELOAD_WAIT) -> dict[str, Any]:
        """From a thread other than the main one: have the main thread
        reload, wait for it, and return the control reply. Requests made
        while a reload runs are served by the next one (which reads the
        file after they were made); requests waiting together share one."""
        req = ReloadRequest()
        with self._lock:
            if self._stopping.is_set():
                return dict(STOPPING)
            self._requests.append(req)
        self._wake()
        if not req.done.wait(timeout):
            return {
                "ok": False,
                "error": f"the reload did not finish within {timeout:.0f} s (see the log)",
            }
        return req.reply

    def refuse_waiting(self) -> None:
        """The daemon stops: answer every request still waiting."""
        with self._lock:
            waiting, self._requests = self._requests, []
        for req in waiting:
            req.finish(dict(STOPPING))

    def handle(
        self,
        reload: Callable[[], str],
        config_path: str | None,
        summary: Callable[[], str],
        notify: Notifier | None = None,
    ) -> bool:
        """On the main thread: one ``reload`` for the SIGHUP and the control
        requests that came since the last one, if any. True if it ran."""
        with self._lock:
            waiting, self._requests = self._requests, []
        # Only the handler writes hups: a SIGHUP arriving now is either
        # counted in this read or seen next time, never lost.
        hups = self.hups
        hup, self._hups_done = hups != self._hups_done, hups
        if not waiting and not hup:
            return False
        why = ["SIGHUP"] if hup else []
        if waiting:
            why.append(f"{len(waiting)} control request{'s' if len(waiting) > 1 else ''}")
        log.info("reloading %s (%s)", config_path, " and ".join(why))
        if notify is not None:
            notify.reloading()
        try:
            reply = {"ok": True, "message": reload()}
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
            notify.ready(summary())
        return True


def load_config(path: str | None, running: Config) -> tuple[Config, dict[str, bytes]]:
    """The config file at ``path`` and its keys, checked; ConfigError or
    KeyFileError if they are invalid or change what only a restart can
    change (the [node] fields of the ``running`` config in
    nodereload.RESTART_ONLY, each named with why)."""
    if path is None:
        raise ConfigError("no config file to reload from")
    new = config.load(path)
    config.check_filesystem(new, path)
    keys = config.read_keys(new, path)
    refused = nodereload.refusal(nodereload.plan(running.node, new.node), path)
    if refused is not None:
        raise ConfigError(refused)
    return new, keys


def stale_sessions(
    sessions: Iterable[Session],
    old: Config,
    old_keys: Mapping[str, bytes],
    new: Config,
    new_keys: Mapping[str, bytes],
) -> list[Session]:
    """The authenticated sessions whose peer, key or accepted mirrors
    changed from ``old`` to ``new``: closed, the peer reconnects and is
    judged by the new config."""
    out = []
    for s in sessions:
        peer = s.peer
        if not peer:
            continue
        stale = peer not in new.peers or old_keys.get(peer) != new_keys.get(peer)
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
            out.append(s)
    return out
