"""Block maps of large files, computed on a thread of their own.

A large file's chunks go out with sendfile while this thread reads the same
pages from the page cache and hashes them (pread into a reused buffer, the
GIL released by both): the map is ready about when the last chunk is sent,
so hashing adds CPU but little time. A delta has to wait for its map before
it knows what to send.

``Hasher.submit`` takes a duplicate of the file's descriptor (the caller may
close its own) and returns a ``Job``; when the job is done the thread calls
``wake()`` (the link posts itself a message, so it looks at its files
again). ``Job.cancel`` stops a job between blocks.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from .blockmap import READ_SIZE, BlockMap, map_fd
from .checking import drop_cached
from .errors import SourceShrank

log = logging.getLogger(__name__)


class Job:
    def __init__(
        self, fd: int, size: int, algo: int, block_size: int, from_disk: bool = False
    ) -> None:
        self.fd = fd
        #: Read from the disk, not the page cache (a scrub).
        self.from_disk = from_disk
        self.size = size
        self.algo = algo
        self.block_size = block_size
        self.map: BlockMap | None = None
        #: Why there is no map (the file shrank, could not be read, cancelled).
        self.error: str | None = None
        self.done = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Hasher:
    """One thread hashing files for one link, in the order they came."""

    def __init__(self, name: str, wake: Callable[[], None]) -> None:
        self._name = name
        self._wake = wake
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._buf = bytearray(READ_SIZE)

    def submit(
        self, fd: int, size: int, algo: int, block_size: int, from_disk: bool = False
    ) -> Job:
        job = Job(os.dup(fd), size, algo, block_size, from_disk)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._q.put(job)
        return job

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                if job.cancelled:
                    job.error = "cancelled"
                else:
                    if job.from_disk:
                        drop_cached(job.fd, 0, job.size)
                    job.map = map_fd(
                        job.fd,
                        job.size,
                        job.algo,
                        job.block_size,
                        self._buf,
                        lambda j=job: j.cancelled,  # type: ignore[misc]
                    )
            except SourceShrank as e:
                job.error = str(e)
            except OSError as e:
                job.error = f"cannot read it: {e.strerror or e}"
            except Exception as e:  # never lose the thread
                log.exception("hashing a file failed")
                job.error = f"internal error: {e}"
            finally:
                os.close(job.fd)
                job.done.set()
            if not job.cancelled:
                self._wake()
