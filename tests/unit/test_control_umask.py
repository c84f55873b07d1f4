"""The control socket is created with its mode without touching the umask:
the umask is process-wide, and other threads create files meanwhile."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from replicator import control
from replicator.control import ControlServer, request


def _no_umask(mask: int) -> int:
    raise AssertionError(f"os.umask({mask:#o}) called: it changes the mode of every thread's files")


def _echo(req: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "echo": req}


@pytest.mark.parametrize("stale", [False, True])
def test_socket_mode_without_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stale: bool
) -> None:
    path = tmp_path / "run" / "control.sock"
    if stale:  # a socket file left by a daemon that was killed
        path.parent.mkdir()
        path.write_text("")
    monkeypatch.setattr(os, "umask", _no_umask)
    server = ControlServer(str(path), _echo)
    server.start()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == control.SOCKET_MODE == 0o660
        assert request(str(path), {"cmd": "ping"}) == {"ok": True, "echo": {"cmd": "ping"}}
        # nothing is left of the temporary folder the socket was bound in
        assert sorted(os.listdir(path.parent)) == ["control.sock"]
    finally:
        server.close()
    assert not path.exists()


def test_files_made_by_other_threads_keep_their_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the umask swap broke: a file another thread creates while the
    server starts gets the process umask, never the socket's 0117."""
    old = os.umask(0o022)
    try:
        stop = threading.Event()
        modes: set[int] = set()

        def create() -> None:
            i = 0
            while not stop.is_set():
                p = tmp_path / f"f{i % 8}"
                fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o777)
                os.close(fd)
                modes.add(stat.S_IMODE(os.stat(p).st_mode))
                os.unlink(p)
                i += 1

        t = threading.Thread(target=create)
        t.start()
        try:
            for i in range(200):
                s = ControlServer(str(tmp_path / f"c{i}.sock"), _echo)
                s.start()
                s.close()
        finally:
            stop.set()
            t.join()
        assert modes == {0o755}
    finally:
        os.umask(old)
