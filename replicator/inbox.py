"""A peer's inbox in one mirror: the partial files its data lands in.

Incoming file data is written into a partial file in
``<root>/.replicator/partial/<peer>/`` (same filesystem, so the publish is an
atomic rename). Large partials get a sidecar naming the source version, so a
transfer cut by a crash or a broken link resumes where it stopped, across
restarts. ``PartialFile.wrote`` owns the writeback and checkpoint policy.
Publishing is publisher.py's.

Every partial is hashed as it grows (``blockmap.Progress``: bytes that came
inline are hashed from memory, spliced and copied ones read back from the
page cache a few MiB behind the writes) and checked against the sender's
block map when it is complete (``PartialFile.verify``): a file is published
only if it matches; otherwise the ranges that differ are asked for again.
A delta's unchanged ranges are copied from ``base``, the published file it
was made against.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import frames as F
from .blockmap import BlockMap, Progress, thread_buffer
from .conflicts import Base, Decision
from .errors import ApplyError
from .fd import OwnedFd
from .frames import EntryKind
from .manifest import EntryState, Preserve
from .paths import STATE_DIR, Root, open_dir_at, show
from .xattrs import apply as apply_xattrs

log = logging.getLogger(__name__)

#: Files of at least this size get a sidecar and can resume after a restart.
RESUME_MIN = 4 * 1024 * 1024
#: A resumable partial is made durable (and its sidecar updated) this often.
CHECKPOINT_BYTES = 64 * 1024 * 1024
#: Writeback of a file being received is started every this many bytes.
WRITEBACK_BYTES = 8 * 1024 * 1024
#: From this many files in a group, one syncfs() replaces per-file fsync().
SYNCFS_MIN = 8
#: Spliced or copied bytes are hashed (read back from the page cache) once
#: this many have been written since the last time.
HASH_BEHIND = 8 * 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
IS_ROOT = os.geteuid() == 0


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


#: The process umask, read once (os.open's mode is filtered by it).
UMASK = _umask()
EUID, EGID = os.geteuid(), os.getegid()


def creation_mode(mode: int) -> int:
    """The mode a partial created for a file of ``mode`` has: owner rw (we
    write it) plus the file's own rwx bits, less the umask."""
    return (mode & 0o777 | 0o600) & ~UMASK


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk,
    without waiting. A big file received this way reaches its final fsync
    with only the last few MiB still dirty (measured: 1.36 times the throughput
    of letting it all pile up; bench/throughput.py)."""
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = boot_id()


def apply_error(e: OSError, what: str) -> ApplyError:
    """Translate a file system error into the code the sender acts on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApplyError(F.ErrorCode.NO_SPACE, f"{what}: no space left on the replica")
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return ApplyError(F.ErrorCode.CONFLICT, f"{what}: {e.strerror}")
    if e.errno == errno.ENOENT:
        return ApplyError(F.ErrorCode.CONFLICT, f"{what}: {e.strerror}")
    return ApplyError(F.ErrorCode.IO_ERROR, f"{what}: {e.strerror or e}")


@dataclass
class PartialFile:
    """A file being received: where its next bytes go (``written``), and
    when they are handed to the disk (``wrote``)."""

    inbox: Inbox
    name: bytes
    op: int
    path: bytes
    parts: tuple[bytes, ...]
    version: bytes
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    #: The partial file, open for writing until published or discarded.
    file: OwnedFd
    written: int
    resumable: bool
    checkpointed: int = 0
    #: Bytes whose writeback was started (start_writeback).
    flushed: int = 0
    #: Two-way mirrors: what the sending peer last had here (conflicts.py).
    base: Base | None = None
    decision: Decision | None = None
    #: The block map being computed from what was written, and the
    #: sender's block digests (Blocks frames).
    progress: Progress | None = None
    theirs: bytearray | None = None
    #: The verified map, once the file matched it.
    bmap: BlockMap | None = None
    #: A delta: the published file its Copy ranges come from, and its digest.
    delta_base: OwnedFd | None = None
    base_digest: bytes = b""
    #: Times the sender was asked for bad ranges again (Want).
    mends: int = 0
    #: Where the current chunk's bytes go, when a Want asked for ranges.
    mend_at: int | None = None
    #: The extended attributes it gets before it is published (None: the
    #: mirror does not preserve them).
    xattrs: list[tuple[str, bytes]] | None = None
    #: Sent by the peer's live lane (``FILE_LIVE``): published on its own,
    #: within milliseconds (groupcommit.py).
    live: bool = False

    @property
    def fd(self) -> int:
        """The partial's fd; -1 once closed."""
        return self.file.fd

    @property
    def state(self) -> EntryState:
        """The state the sender declared for this file."""
        return EntryState(
            EntryKind.FILE, self.mode & 0o7777, self.size, self.mtime_ns, self.uid, self.gid
        )

    def wrote(self, n: int) -> None:
        """``n`` more bytes were written at ``written`` (where the next chunk
        goes: the protocol checked the sender's offsets). Starts writeback
        every WRITEBACK_BYTES and checkpoints a resumable file every
        CHECKPOINT_BYTES. OSError: the file cannot go on (discard it)."""
        if self.mend_at is not None:
            self.mend_at += n
            return
        self.written += n
        if self.written - self.flushed >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.flushed, self.written - self.flushed)
            self.flushed = self.written
        p = self.progress
        if p is not None and self.written - p.done >= HASH_BEHIND:
            # At most a few times what came: a resumed file catches up on
            # its held bytes gradually, never in one long stall.
            upto = min(self.written, p.done + 4 * HASH_BEHIND)
            p.feed_fd(self.fd, upto, thread_buffer(), whole_blocks=True)
        if self.resumable and self.written - self.checkpointed >= CHECKPOINT_BYTES:
            self.checkpoint()

    def hash_inline(self, offset: int, data: bytes) -> None:
        """Bytes about to be written at ``offset`` that are in memory already."""
        if self.progress is not None and self.mend_at is None:
            self.progress.feed_bytes(offset, data)

    def verify(self, digest: bytes) -> list[tuple[int, int]] | None:
        """The file is complete: None if it matches the sender's map (whose
        file digest is ``digest``), else the byte ranges that do not (the
        whole file if the sender's block digests do not tell which)."""
        p = self.progress
        assert p is not None
        if p.done < p.size:
            p.feed_fd(self.fd, p.size, thread_buffer())
        ours = p.result()
        if ours.file_digest == digest:
            self.bmap = ours
            return None
        theirs = self.theirs
        if ours.count > 1 and theirs is not None and len(theirs) == len(ours.digests):
            d = ours.dsize
            bad = [i for i in range(ours.count) if ours.digest(i) != theirs[i * d : (i + 1) * d]]
            if bad:
                return ours.ranges(bad)
        return [(0, self.size)] if self.size else []

    def mending(self) -> None:
        """The bad ranges were asked for: hash everything again once they
        came (they are few, and rare)."""
        self.mends += 1
        self.mend_at = 0  # each Chunk says where its bytes go from now on
        assert self.progress is not None
        p = self.progress
        self.progress = Progress(p.algo, p.size, p.block_size)

    def checkpoint(self) -> None:
        """Make what was written durable and record it in the sidecar."""
        os.fdatasync(self.fd)
        self.checkpointed = self.written
        self.inbox.write_sidecar(self)

    def finish(self) -> None:
        """All data is here: set metadata, so the coming fsync covers it.
        The partial was created with ``creation_mode``; chmod/chown only
        when that or the creator's ids differ from what the sender declared
        (two syscalls a file saved on bursts of small files)."""
        fd = self.fd
        policy = self.inbox.preserve
        mode = policy.mode(self.mode)
        chowned = False
        if (
            policy & Preserve.OWNERS
            and IS_ROOT
            and ((self.uid, self.gid) != (EUID, EGID) or self.inbox.setgid)
        ):
            os.fchown(fd, self.uid, self.gid)
            chowned = True
        if chowned or creation_mode(mode) != mode:
            os.fchmod(fd, mode)  # after chown, which may clear setuid/setgid bits
        if self.xattrs is not None:
            apply_xattrs(fd, self.xattrs, policy, IS_ROOT)
        os.utime(fd, ns=(self.mtime_ns, self.mtime_ns))

    def close(self) -> None:
        self.file.close()
        if self.delta_base is not None:
            self.delta_base.close()

    def discard(self) -> None:
        self.close()
        self.inbox.remove(self.name)


@dataclass(frozen=True)
class HeldPartial:
    path: bytes
    version: bytes
    held: int


class Inbox:
    """The partial files one peer is sending into one mirror."""

    def __init__(self, root: Root, peer: str, preserve: Preserve = Preserve.NONE) -> None:
        self.root = root
        self.peer = peer
        #: What this mirror applies as the peer declared it (the rest: ours).
        self.preserve = preserve
        parts = (STATE_DIR, b"partial", os.fsencode(peer))
        self._dir = OwnedFd(open_dir_at(root.fd, parts, mkdir_mode=0o700))
        try:
            #: A setgid partial folder would give new files its group: chown then.
            self.setgid = bool(os.fstat(self._dir.fd).st_mode & stat.S_ISGID)
        except BaseException:
            self._dir.close()
            raise

    @property
    def fd(self) -> int:
        """The partial folder's fd; -1 once closed."""
        return self._dir.fd

    def close(self) -> None:
        self._dir.close()

    @staticmethod
    def _name(path: bytes) -> bytes:
        return hashlib.sha256(path).hexdigest()[:32].encode()

    def remove(self, name: bytes) -> None:
        for suffix in (b".part", b".side"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name + suffix, dir_fd=self.fd)

    def write_sidecar(self, p: PartialFile) -> None:
        doc = {
            "path": p.path.hex(),
            "version": p.version.hex(),
            "size": p.size,
            "boot_id": BOOT_ID,
            "durable": p.checkpointed,
            "base": p.base_digest.hex(),
        }
        tmp = p.name + b".side.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=self.fd
        )
        try:
            os.write(fd, json.dumps(doc).encode())
        finally:
            os.close(fd)
        os.rename(tmp, p.name + b".side", src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _read_sidecar(self, name: bytes) -> dict[str, object] | None:
        try:
            fd = os.open(
                name + b".side", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd
            )
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(os.read(fd, 65536))
        except ValueError:
            return None
        finally:
            os.close(fd)
        return doc if isinstance(doc, dict) else None

    def _held(self, name: bytes) -> tuple[dict[str, object], int] | None:
        doc = self._read_sidecar(name)
        if doc is None:
            return None
        try:
            st = os.stat(name + b".part", dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        # Same boot: the page cache survived a process crash, every byte in
        # the file is real. Another boot: only checkpointed bytes are.
        durable = doc.get("durable")
        held = st.st_size if doc.get("boot_id") == BOOT_ID else durable
        if not isinstance(held, int):
            return None
        return doc, min(held, st.st_size)

    def partials(self) -> Iterator[HeldPartial]:
        """Resumable partials held for this peer; cleans up the rest."""
        names = {os.fsencode(n) for n in os.listdir(self.fd)}
        for n in sorted(names):
            base, _, suffix = n.rpartition(b".")
            if suffix == b"part" and base + b".side" in names:
                held = self._held(base)
                if held is not None and held[1] > 0:
                    doc, h = held
                    try:
                        yield HeldPartial(
                            bytes.fromhex(str(doc["path"])), bytes.fromhex(str(doc["version"])), h
                        )
                        continue
                    except (KeyError, ValueError):
                        pass
                self.remove(base)
            elif suffix == b"part" or (suffix == b"side" and base + b".part" not in names):
                self.remove(base)
            elif suffix == b"tmp":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(n, dir_fd=self.fd)

    def begin(self, ev: F.File, parts: tuple[bytes, ...]) -> PartialFile:
        """Open the partial for ``ev`` (fresh, or resumed at ``ev.offset``)."""
        name = self._name(ev.path)
        resumable = ev.size >= RESUME_MIN
        if ev.offset:
            held = self._held(name)
            if (
                held is None
                or held[0].get("version") != ev.version.hex()
                or held[0].get("base", "") != ev.base.hex()
                or held[1] < ev.offset
            ):
                raise ApplyError(
                    F.ErrorCode.RESUME_MISMATCH,
                    f"{show(ev.path)}: no partial of this version with {ev.offset} bytes to resume",
                )
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        else:
            # Read as well: the partial is hashed from the page cache.
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            # Created with its final mode (the partial folder is 0700, so
            # nobody else can open it meanwhile): usually no chmod is needed.
            fd = os.open(name + b".part", flags, ev.mode & 0o777 | 0o600, dir_fd=self.fd)
            # (the mode that results is creation_mode(ev.mode))
        except OSError as e:
            raise apply_error(e, show(ev.path)) from e
        p = PartialFile(
            self,
            name,
            ev.op,
            ev.path,
            parts,
            ev.version,
            ev.size,
            ev.mode,
            ev.mtime_ns,
            ev.uid,
            ev.gid,
            OwnedFd(fd),
            ev.offset,
            resumable,
            ev.offset,
            progress=Progress(ev.algo, ev.size, ev.block_size),
            theirs=bytearray(),
            base_digest=ev.base,
        )
        try:
            if ev.offset:
                os.ftruncate(fd, ev.offset)
            elif resumable:
                self.write_sidecar(p)
        except OSError as e:
            p.discard()
            raise apply_error(e, show(ev.path)) from e
        return p
