"""The loads of bench/live.py's "under load" section, and where they run.

Nothing here measures: bench/live.py times the loads and the small live
changes written meanwhile. Here:

  LoopExt4         a fresh ext4 on a sparse file (mkfs.ext4 -q, losetup,
                   mount); unmounted and detached on the way out, whatever
                   happened (also on Ctrl-C, and on SIGTERM while
                   ``exit_on_sigterm`` is in force).
  make_cold_tree   N small files (200-1,000 B) spread over N/20 directories.
  stage_tree       ``cp -a`` of real trees (/usr/include, Python's stdlib)
                   into a staging directory, to be renamed into a mirror.
  write_big        one big file of random-looking data, written with large
                   writes.
  partial_size     how far the receiver got with its partial files.
  count_entries    entries below a directory (files, directories, links).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

#: Files per directory in the cold-sync tree (200,000 files: 10,000 dirs).
COLD_PER_DIR = 20
COLD_MIN, COLD_MAX = 200, 1000


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout.strip()


class LoopExt4:
    """``with LoopExt4(image, mnt, size_gib) as mnt: ...``: a new ext4 with
    a journal (mkfs defaults, one inode per 8 KiB, inode tables initialised
    now rather than by ext4lazyinit during the run) on a loop device with
    direct I/O (no second copy of every page in the backing file's cache)."""

    def __init__(self, image: Path, mnt: Path, size_gib: float) -> None:
        self.image, self.mnt, self.size = image, mnt, int(size_gib * (1 << 30))
        self.dev: str | None = None
        self.mounted = False

    def __enter__(self) -> Path:
        try:
            with open(self.image, "wb") as f:
                f.truncate(self.size)  # sparse
            self.dev = _run(["losetup", "-f", "--show", "--direct-io=on", str(self.image)])
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-i",
                    "8192",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    self.dev,
                ]
            )
            self.mnt.mkdir(parents=True, exist_ok=True)
            _run(["mount", "-t", "ext4", self.dev, str(self.mnt)])
            self.mounted = True
        except BaseException:
            self.close()
            raise
        return self.mnt

    def close(self) -> None:
        if self.mounted:
            try:
                _run(["umount", str(self.mnt)])
            except RuntimeError:
                # something still holds it open: detach it now, freed when let go
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            self.mounted = False
        if self.dev is not None:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None
        with contextlib.suppress(OSError):
            self.image.unlink()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit (so ``finally`` blocks and ``with`` exits run)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_cold_tree(top: Path, files: int, seed: int = 1) -> tuple[int, int]:
    """``files`` files of COLD_MIN..COLD_MAX bytes in ``files / COLD_PER_DIR``
    directories below ``top``: (entries below ``top``, bytes)."""
    rnd = random.Random(seed)
    blob = os.urandom(COLD_MAX)
    dirs = max(1, -(-files // COLD_PER_DIR))
    top.mkdir(parents=True)
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for d in range(dirs):
        sub = top / f"d{d:05d}"
        sub.mkdir()
        for i in range(d * COLD_PER_DIR, min(files, (d + 1) * COLD_PER_DIR)):
            size = rnd.randint(COLD_MIN, COLD_MAX)
            fd = os.open(sub / f"f{i:06d}", flags, 0o644)
            try:
                os.write(fd, i.to_bytes(8, "little") + blob[8:size])
            finally:
                os.close(fd)
            total += size
    return files + dirs, total


def real_trees() -> list[Path]:
    """/usr/include and the running Python's standard library."""
    return [Path("/usr/include"), Path(sysconfig.get_paths()["stdlib"])]


def stage_tree(dest: Path, sources: list[Path]) -> tuple[int, int]:
    """``cp -a`` each of ``sources`` into the new directory ``dest``:
    (entries below ``dest``, bytes of its files)."""
    dest.mkdir(parents=True)
    for src in sources:
        _run(["cp", "-a", str(src), str(dest / src.name)])
    return count_entries(dest), tree_bytes(dest)


def count_entries(top: Path, skip: str = ".replicator") -> int:
    """Entries below ``top`` (not following links); a ``skip`` directory
    right below ``top`` is left out."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == str(top):
            dirnames[:] = [d for d in dirnames if d != skip]
        n += len(dirnames) + len(filenames)
    return n


def tree_bytes(top: Path) -> int:
    total = 0
    for dirpath, _dirs, filenames in os.walk(top):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def write_big(path: Path, mib: int) -> None:
    """``mib`` MiB of incompressible-looking data (one random MiB, each
    copy stamped with its index), written 1 MiB at a time."""
    block = bytearray(os.urandom(1 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "little")
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def partial_size(dst: Path, peer: str = "a") -> int | None:
    """Size of the biggest partial file the receiver holds from ``peer``
    (``<dst>/.replicator/partial/<peer>/*.part``); None if there is none."""
    best: int | None = None
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(dst / ".replicator" / "partial" / peer):
            if e.name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    size = e.stat(follow_symlinks=False).st_size
                    best = size if best is None else max(best, size)
    return best


def daemon_import_path(cwd: Path | None = None) -> str:
    """Where ``python -m replicator`` started here (same interpreter,
    environment and working directory as the daemons) imports it from."""
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import replicator, os; print(os.path.dirname(replicator.__file__))",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    return res.stdout.strip() or f"? ({res.stderr.strip()[-200:]})"
