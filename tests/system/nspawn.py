"""Boot a real systemd in a container (systemd-nspawn) to test the package.

The host need not run systemd (CI machines here do not): systemd-nspawn runs
as a plain child process (--register=no --keep-unit) in a cgroup of its own,
and commands run inside through ``nsenter`` into the namespaces of the
container's PID 1 (``machinectl shell`` and ``systemd-run --machine`` need
systemd-machined on the host).

The root file system is debootstrapped once into ``ROOTFS`` (built in a
temporary directory, then renamed into place) and reused by every later run
on the machine. Containers never change it: each boots it read-only under a
tmpfs overlay (--volatile=overlay), with a private network namespace (only
``lo``), so nothing a test does survives the container.

Every step has a timeout; ``Container.close()`` powers the container off,
kills what is left in its cgroup and removes the cgroup, even after a failed
test.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from replicator.localcluster import wait_for as _wait_for

SUITE = "bookworm"
#: procps, python3 and libsystemd0 are what the .deb depends on; minbase lacks them.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "libsystemd0")
ROOTFS = Path(
    os.environ.get("REPLICATOR_TEST_ROOTFS", f"/var/cache/replicator-test/rootfs-{SUITE}")
)
MIRROR = os.environ.get("REPLICATOR_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: The container's systemd and its services each take inotify instances,
#: which count against root's on the host (same user): 128 is too few.
INOTIFY_INSTANCES = 1024

_counter = itertools.count(1)
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing() -> str | None:
    """Why containers cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (packaging/dev-setup.sh installs it)"
    return None


def ensure_rootfs(path: Path = ROOTFS, timeout: float = 900) -> Path:
    """The cached root file system, debootstrapped first if it is missing or
    was made with another package list."""
    stamp = path / ".replicator-rootfs"
    wanted = f"{SUITE} minbase {','.join(INCLUDE)}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time on this machine
        with contextlib.suppress(OSError):
            if stamp.read_text() == wanted:
                return path
        for stale in path.parent.glob(f".{path.name}.*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".{path.name}.tmp"
        try:
            include = f"--include={','.join(INCLUDE)}"
            subprocess.run(
                ["debootstrap", "--variant=minbase", include, SUITE, str(tmp), MIRROR],
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            (tmp / ".replicator-rootfs").write_text(wanted)
            old = path.parent / f".{path.name}.old"
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"debootstrap failed:\n{e.stdout[-3000:]}{e.stderr[-3000:]}"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """localcluster.wait_for, polling slower: conditions here start nsenter."""
    return _wait_for(cond, timeout, what, interval)


@contextlib.contextmanager
def sysctl_at_least(key: str, value: int) -> Iterator[None]:
    """Raise /proc/sys/``key`` to ``value`` if it is lower; restore it after."""
    p = Path("/proc/sys") / key.replace(".", "/")
    old = int(p.read_text())
    if old < value:
        p.write_text(str(value))
    try:
        yield
    finally:
        if old < value:
            p.write_text(str(old))


class Cgroup:
    """A cgroup of its own in every hierarchy that holds processes by name
    (cgroup v2, or on a hybrid host the v1 name=systemd one and the v2 one)."""

    def __init__(self, name: str) -> None:
        roots = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
        if (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
            roots = [Path("/sys/fs/cgroup")]  # pure cgroup v2
        self.dirs = [r / name for r in roots if (r / "cgroup.procs").exists()]
        for d in self.dirs:
            d.mkdir()

    def enter_command(self) -> list[str]:
        """A shell prefix that moves itself into this cgroup and then execs."""
        moves = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs) or "true"
        return ["sh", "-c", f'{moves} && exec "$@"', "sh"]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    found.update(int(x) for x in procs.read_text().split())
        return found

    def close(self) -> None:
        """Kill whatever is still inside, then remove the tree."""
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self._kill_all(), 10, "the container's processes to die")
        for d in self.dirs:
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()

    def _kill_all(self) -> set[int]:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


class Container:
    """A booted systemd-nspawn container of ``rootfs``; use as a context manager.

    ``binds`` maps host directories to paths inside, bound read-only.
    """

    def __init__(self, rootfs: Path, workdir: Path, binds: dict[str, str] | None = None) -> None:
        self.rootfs = rootfs
        self.name = f"replicator-test-{os.getpid()}-{next(_counter)}"
        self.log_path = workdir / f"{self.name}.log"
        self.binds = binds or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.cgroup: Cgroup | None = None
        self._stack = contextlib.ExitStack()

    def start(self, timeout: float = 90) -> None:
        self._stack.enter_context(
            sysctl_at_least("fs.inotify.max_user_instances", INOTIFY_INSTANCES)
        )
        self.cgroup = Cgroup(self.name)
        cmd = [
            *self.cgroup.enter_command(),
            "systemd-nspawn",
            "--boot",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=passive",
            *(f"--bind-ro={host}:{guest}" for host, guest in self.binds.items()),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.leader = wait_for(self._find_leader, 30, "the container's PID 1")
        # "running", or "degraded" if some unit of the minimal image failed.
        wait_for(self._booted, timeout, f"container {self.name} to boot", interval=0.5)

    def _find_leader(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log()}")
        for pid in self.cgroup.pids() if self.cgroup else ():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
                if nspid.split()[-1] == "1" and len(nspid.split()) > 2:
                    return pid
        return 0

    def _booted(self) -> bool:
        r = self.run("systemctl", "is-system-running", check=False, timeout=10)
        state = r.stdout.strip()
        if state in ("running", "degraded"):
            return True
        if state not in ("initializing", "starting", ""):
            raise RuntimeError(f"container state {state!r}")
        return False

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container, as root, with a clean environment."""
        argv = ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd"]
        argv += ["env", "-i", _PATH, "LANG=C.UTF-8", "SYSTEMD_PAGER=", *cmd]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(
                f"in the container, {' '.join(cmd)} exited with {r.returncode}:\n"
                f"{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
        return r

    def write(self, path: str, text: str, mode: str = "644", owner: str = "root:root") -> None:
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1" && chown "$3" "$1"'
        self.run("sh", "-c", script, "sh", path, mode, owner, input=text)

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, timeout: float = 30) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                # nspawn turns SIGTERM into an orderly halt of the container.
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            if self.cgroup is not None:
                self.cgroup.close()
            self._stack.close()

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
