"""OwnedFd: closed exactly once, handed over without closing, never reused."""

from __future__ import annotations

import errno
import os

import pytest

from replicator.fd import OwnedFd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def test_close_closes_once_and_forgets_the_number() -> None:
    r, w = os.pipe()
    os.close(w)
    f = OwnedFd(r)
    assert f.fd == f.fileno() == r and not f.closed
    f.close()
    assert f.closed and f.fd == -1 and not _is_open(r)
    # The number is reused at once; a second close must leave the new file alone.
    r2, w2 = os.pipe()
    try:
        f.close()
        assert _is_open(r2) and _is_open(w2)
    finally:
        os.close(r2)
        os.close(w2)


def test_fileno_of_a_closed_fd_raises() -> None:
    r, w = os.pipe()
    os.close(w)
    f = OwnedFd(r)
    f.close()
    with pytest.raises(ValueError):
        f.fileno()


def test_context_manager_closes_on_error() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(RuntimeError), OwnedFd(r) as f:
        assert f.fd == r
        raise RuntimeError("boom")
    assert f.closed and not _is_open(r)


def test_detach_hands_over_without_closing() -> None:
    r, w = os.pipe()
    os.close(w)
    f = OwnedFd(r)
    with f:
        assert f.detach() == r
    assert f.closed and _is_open(r)  # the new owner has it
    with pytest.raises(ValueError):
        f.detach()  # nothing left to hand over
    os.close(r)


def test_minus_one_holds_nothing() -> None:
    f = OwnedFd(-1)
    assert f.closed and f.fd == -1
    f.close()  # nothing to close
    with pytest.raises(ValueError):
        f.fileno()
    with pytest.raises(ValueError):
        OwnedFd(-2)


def test_repr_says_whether_it_is_open() -> None:
    r, w = os.pipe()
    os.close(w)
    f = OwnedFd(r)
    assert repr(f) == f"<OwnedFd {r}>"
    f.close()
    assert repr(f) == "<OwnedFd closed>"
