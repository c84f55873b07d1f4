"""Tell systemd how the daemon is doing: sd_notify(3) READY, STATUS, WATCHDOG,
RELOADING, STOPPING.

systemd passes the address of a datagram socket in ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket) and, when the unit sets WatchdogSec=, the
deadline in ``$WATCHDOG_USEC`` (for the process ``$WATCHDOG_PID`` if set).
A message is one datagram of ``KEY=value`` lines.

systemd-python's ``systemd.daemon.notify`` (libsystemd's sd_notify) is used
when it can be imported; otherwise a dependency-free sender of a few lines
does the same, like gunicorn's ``gunicorn/systemd.py``. Setting
``REPLICATOR_SD_NOTIFY=builtin`` (or ``Notifier(builtin=True)``) forces the
latter, so tests can drive both.

This module must never raise into the daemon: outside systemd every call is a
no-op, and a failed send is logged once, at debug level, and otherwise ignored
(systemd's watchdog notices a daemon that really stopped talking).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: Environment variable that forces the built-in sender ("builtin").
FORCE_ENV = "REPLICATOR_SD_NOTIFY"


def _libsystemd_sender() -> Callable[[str], object] | None:
    try:
        import systemd.daemon
    except ImportError:
        return None
    notify: Callable[[str], object] = systemd.daemon.notify
    return notify


class Notifier:
    """Sends sd_notify messages for this process; a no-op outside systemd."""

    def __init__(self, *, builtin: bool = False) -> None:
        env = os.environ
        addr = env.get("NOTIFY_SOCKET", "")
        #: Whether systemd listens (NOTIFY_SOCKET names a socket).
        self.enabled: bool = addr.startswith(("/", "@"))
        self._address = "\0" + addr[1:] if addr.startswith("@") else addr
        self._watchdog_usec = _watchdog_usec(env)
        self._failed = False
        #: "libsystemd", "builtin", or "off" (not under systemd).
        self.backend = "off"
        self._send: Callable[[str], object] = self._send_builtin
        if self.enabled:
            forced = builtin or env.get(FORCE_ENV) == "builtin"
            lib = None if forced else _libsystemd_sender()
            if lib is not None:
                self._send, self.backend = lib, "libsystemd"
            else:
                self.backend = "builtin"

    # -- the messages ----------------------------------------------------------

    def ready(self, status: str) -> None:
        """Startup (or a reload) is complete; ``status`` is the one-line summary."""
        self._notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        self._notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """I am alive and every worker is too. Call every ``watchdog_interval()``."""
        self._notify("WATCHDOG=1")

    def reloading(self) -> None:
        """A reload (SIGHUP) began; send ``ready()`` when it is done.
        MONOTONIC_USEC lets systemd >= 253 match this to its reload job."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        self._notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=), or None if
        systemd does not watch this process."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    # -- sending ---------------------------------------------------------------

    def _notify(self, *lines: str) -> None:
        if not self.enabled:
            return
        try:
            self._send("\n".join(lines))
        except Exception as e:  # never into the daemon: see the module docstring
            if not self._failed:
                self._failed = True
                log.debug(
                    "sd_notify to %r failed (%s); further failures are not logged", self._address, e
                )

    def _send_builtin(self, message: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), self._address)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (sd_watchdog_enabled(3))."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment in the datagram.
    return " ".join(text.splitlines())
