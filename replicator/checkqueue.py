"""The scrub checks one inbound connection answers, in order, a slice at a
time between frames (each a ``checking.CheckJob``)."""

from __future__ import annotations

from collections import deque

from . import frames as F
from .checking import CheckJob
from .errors import SourceShrank
from .receiving import Refuse


class CheckQueue:
    def __init__(self) -> None:
        self._jobs: deque[CheckJob] = deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: CheckJob | Refuse) -> Refuse | None:
        """Answer ``job`` after those before it (``step``); a Refuse (the
        mirror refused the Check at once) is returned as it is."""
        if isinstance(job, Refuse):
            return job
        self._jobs.append(job)
        return None

    def step(self) -> tuple[list[F.Checked], Refuse | None]:
        """Read the next slice of the file the first Check asks about
        (checking.py): its Checked frames, or why it cannot go on."""
        job = self._jobs[0]
        try:
            frames = job.step()
        except (OSError, SourceShrank) as e:
            job.close()
            self._jobs.popleft()
            return [], Refuse(job.op, F.ErrorCode.IO_ERROR, f"cannot check it: {e}")
        if job.done:
            self._jobs.popleft()
        return frames, None

    def close(self) -> None:
        for job in self._jobs:
            job.close()
        self._jobs.clear()
