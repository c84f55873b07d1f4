"""Run several replicatord processes on this machine: the demo, the
integration tests and the benchmarks all use this one harness.

Each ``LocalNode`` is a real ``python -m replicator`` process with its own
config, key files, control socket and log file under a work directory.
Nothing here waits a fixed time: ``wait_for`` polls a condition with a
deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .control import request
from .errors import ControlError
from .net import format_address

_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, never one this process handed out before.

    The kernel may give the same ephemeral port to two binds in a row once
    the first socket is closed; two nodes of one cluster then collide (the
    config check refuses a peer at the node's own address).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        with socket.socket(family) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port
    raise RuntimeError(f"no fresh free port on {host} after 1000 tries")


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll ``cond`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # conditions may race with the daemon
            last_exc = e
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what}"
                + (f" (last error: {last_exc})" if last_exc else "")
            )
        time.sleep(interval)


def write_key(path: Path, secret: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((secret or os.urandom(24).hex().encode()) + b"\n")
    path.chmod(0o600)
    return path


@dataclass
class LocalNode:
    name: str
    workdir: Path
    #: An IPv4 or IPv6 address (``::1``, without brackets).
    host: str = "127.0.0.1"
    #: 0: a port free now on the loopback address of ``host``'s family
    #: (``host`` may be in a network namespace: ``netns``).
    port: int = 0
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    mirrors: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None
    #: A command the daemon runs under (its argv follows), e.g. an unshare.
    wrap: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port("::1" if ":" in self.host else "127.0.0.1")
        self.dir = self.workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def config_path(self) -> Path:
        return self.dir / "replicator.toml"

    @property
    def control_socket(self) -> str:
        return str(self.dir / "control.sock")

    @property
    def log_path(self) -> Path:
        return self.dir / "replicatord.log"

    def mirror_path(self, mirror: str) -> Path:
        return Path(self.mirrors[mirror]["path"])

    def add_mirror(
        self,
        name: str,
        push_to: list[str] | None = None,
        accept_from: list[str] | None = None,
        **extra: Any,
    ) -> Path:
        path = Path(extra.pop("path", self.dir / name))
        path.mkdir(parents=True, exist_ok=True)
        self.mirrors[name] = {
            "path": str(path),
            "push_to": push_to or [],
            "accept_from": accept_from or [],
            **extra,
        }
        return path

    def render_config(self) -> str:
        def val(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, (int, float)):
                return repr(v)
            if isinstance(v, list):
                return "[" + ", ".join(val(x) for x in v) + "]"
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            "[node]",
            f"name = {val(self.name)}",
            f"listen = {val(self.address)}",
            f"state_dir = {val(str(self.dir / 'state'))}",
            f"control_socket = {val(self.control_socket)}",
        ]
        lines += [f"{k} = {val(v)}" for k, v in self.node_extra.items()]
        for peer, p in sorted(self.peers.items()):
            lines += ["", f"[peers.{peer}]"] + [f"{k} = {val(v)}" for k, v in p.items()]
        for name, m in sorted(self.mirrors.items()):
            lines += ["", f"[mirrors.{name}]"] + [f"{k} = {val(v)}" for k, v in m.items()]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        self.config_path.write_text(self.render_config())
        return self.config_path

    def start(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> None:
        self.write_config()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        cmd = [
            sys.executable,
            "-m",
            "replicator",
            "--config",
            str(self.config_path),
            "--log-level",
            env.get("REPLICATOR_LOG_LEVEL", "INFO"),
        ]
        cmd = [*self.wrap, *cmd]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        if wait:
            wait_for(self._ready, 30, f"node {self.name} to answer on its control socket")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"node {self.name} exited with {self.proc.returncode}:\n" + self.log_tail()
            )
        return bool(self.status())

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        reply = request(self.control_socket, {"cmd": "status"}, timeout=5)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        return dict(reply["status"])

    def control(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request(self.control_socket, {"cmd": cmd, **args}, timeout=10)

    def links_connected(self) -> bool:
        return all(ln["state"] == "connected" for ln in self.status()["links"].values())

    def link(self, peer: str) -> dict[str, Any]:
        return dict(self.status()["links"][peer])

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


class LocalCluster:
    """Nodes sharing one work directory; keys for every pair are made on demand."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.nodes: dict[str, LocalNode] = {}

    def node(self, name: str, **kw: Any) -> LocalNode:
        n = LocalNode(name, self.workdir, **kw)
        self.nodes[name] = n
        return n

    def key_file(self, a: str, b: str) -> Path:
        x, y = sorted((a, b))
        path = self.workdir / "keys" / f"{x}-{y}.key"
        if not path.exists():
            write_key(path)
        return path

    def connect(self, a: str, b: str) -> None:
        """Make ``a`` and ``b`` peers of each other (same key on both ends)."""
        key = str(self.key_file(a, b))
        na, nb = self.nodes[a], self.nodes[b]
        na.peers[b] = {"address": nb.address, "key_file": key}
        nb.peers[a] = {"address": na.address, "key_file": key}

    def start(self, wait_links: bool = True) -> None:
        """Start every node; with ``wait_links``, return once every
        outbound link is connected."""
        for n in self.nodes.values():
            n.start(wait=False)
        for n in self.nodes.values():
            wait_for(n._ready, 30, f"node {n.name} to start")
        if wait_links:
            for n in self.nodes.values():
                wait_for(n.links_connected, 30, f"node {n.name}'s links to connect")

    def stop(self) -> None:
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- comparing trees -----------------------------------------------------------


def tree(root: str | Path, content: bool = True) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` except the daemon's own folder:
    path → (type, mode, size, mtime_ns, sha256 or symlink target)."""
    top = os.fsencode(str(root))
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == top:
            dirnames[:] = [d for d in dirnames if d != b".replicator"]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, top).decode("utf-8", "surrogateescape")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", None, None, st.st_mtime_ns, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), None, st.st_mtime_ns, None)
            else:
                digest = _sha256(full) if content else None
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return out


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def diff_trees(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k!r}: {a.get(k)} != {b.get(k)}")
    return out


def walk_files(root: Path) -> Iterator[Path]:
    for p in root.rglob("*"):
        if ".replicator" not in p.parts and p.is_file():
            yield p
