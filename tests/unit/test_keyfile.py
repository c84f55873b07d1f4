"""Key files must belong to root or to the daemon's own user: whoever owns
one can rewrite it (and chmod it readable), whatever its mode says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicator import config
from replicator.errors import KeyFileError

KEY = b"0123456789abcdef0123456789abcdef\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")

#: A uid that is neither root nor us, and most likely nobody's.
OTHER = 4242


def _key(tmp_path: Path, uid: int, name: str = "k.key") -> Path:
    p = tmp_path / name
    p.write_bytes(KEY)
    p.chmod(0o600)
    os.chown(p, uid, -1)
    return p


def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    p = _key(tmp_path, OTHER)
    with pytest.raises(KeyFileError) as e:
        config.read_key(str(p))
    msg = str(e.value)
    assert str(p) in msg
    assert f"owned by uid {OTHER}" in msg
    assert f"chown root {p}" in msg  # we run as root: root is who should own it


def test_key_owned_by_root_or_the_daemon_user_is_read(tmp_path: Path) -> None:
    assert config.read_key(str(_key(tmp_path, 0))) == KEY.strip()
    # the daemon's own user, whoever that is (here: OTHER is allowed explicitly)
    p = _key(tmp_path, OTHER, "svc.key")
    assert config.read_key(str(p), owners={0, OTHER}) == KEY.strip()


def test_owner_is_checked_before_the_content_is_used(tmp_path: Path) -> None:
    """Mode 0600 does not help: the owner can chmod it and rewrite it."""
    p = _key(tmp_path, OTHER)
    p.chmod(0o400)
    with pytest.raises(KeyFileError, match="owned by uid 4242"):
        config.read_key(str(p))


def test_daemon_and_check_config_refuse_it(tmp_path: Path) -> None:
    key = _key(tmp_path, OTHER)
    (tmp_path / "srv").mkdir()
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f"""
[node]
name = "a"
listen = "127.0.0.1:1"
state_dir = "{tmp_path}/state"
control_socket = "{tmp_path}/control.sock"

[peers.b]
address = "127.0.0.1:2"
key_file = "{key}"

[mirrors.m]
path = "{tmp_path}/srv"
push_to = ["b"]
"""
    )
    for cmd, fix in (
        ([sys.executable, "-m", "replicator", "--config", str(cfg)], f"chown root {key}"),
        # (check-config also accepts the packaged unit's user, if there is one)
        ([sys.executable, "-m", "replicator.ctl", "check-config", str(cfg)], "; run: chown "),
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert f"peers.b.key_file: key file {key}: owned by uid {OTHER}" in r.stderr
        assert fix in r.stderr
    # check-config as root accepts the user the daemon runs as (--user)
    r = subprocess.run(
        [sys.executable, "-m", "replicator.ctl", "check-config", "--user", str(OTHER), str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
