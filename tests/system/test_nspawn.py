"""The Debian package under a real systemd: boot a bookworm container
(tests/system/nspawn.py), install the .deb built by packaging/build-deb.sh, run two
nodes as two hardened services, and check what systemd sees of them.

Node a is the shipped replicatord.service plus a drop-in (its mirror in
ReadWritePaths=, WatchdogSec=5s to keep the watchdog test short); node b is
replicatord-b.service, a copy of the shipped unit with its own config, state
and runtime directories. a pushes mirror "m" (/srv/a/m) to b (/srv/b/m) over
the container's loopback.

These tests depend on the daemon speaking sd_notify (replicator/daemon.py
wiring replicator.sdnotify.Notifier): READY=1 for `systemctl start` of a
Type=notify unit to finish, WATCHDOG=1 for it to survive WatchdogSec=, and
RELOADING=1/READY=1 around a reload.

Environment: REPLICATOR_TEST_DEB=path uses that .deb instead of building;
REPLICATOR_TEST_ROOTFS and REPLICATOR_TEST_DEBIAN_MIRROR: see tests/system/nspawn.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import nspawn

pytestmark = pytest.mark.nspawn

ROOT = Path(__file__).resolve().parents[2]

A_TOML = """\
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.1:7302"
key_file = "/etc/replicator/keys/ab.key"

[mirrors.m]
path = "/srv/a/m"
push_to = ["b"]
"""

B_TOML = """\
[node]
name = "b"
listen = "127.0.0.1:7302"
state_dir = "/var/lib/replicator-b"
control_socket = "/run/replicator-b/control.sock"

[peers.a]
address = "127.0.0.1:7301"
key_file = "/etc/replicator/keys/ab.key"

[mirrors.m]
path = "/srv/b/m"
accept_from = ["a"]
preserve = ["owners"]
"""

UNIT = "replicatord.service"
UNIT_B = "replicatord-b.service"


def build_deb() -> Path:
    if os.environ.get("REPLICATOR_TEST_DEB"):
        return Path(os.environ["REPLICATOR_TEST_DEB"])
    r = subprocess.run(
        [str(ROOT / "packaging" / "build-deb.sh"), "--if-changed"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


class Node:
    """One replicatord service inside the container."""

    def __init__(self, c: nspawn.Container, unit: str, config: str) -> None:
        self.c, self.unit, self.config = c, unit, config

    def show(self, *props: str) -> dict[str, str]:
        r = self.c.run("systemctl", "show", self.unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.show(name)[name]

    def journal(self, lines: int = 40) -> str:
        r = self.c.run("journalctl", "--no-pager", "-u", self.unit, "-n", str(lines), check=False)
        return r.stdout

    def status(self) -> dict[str, Any]:
        # Exit status 3-5 reports a problem (a link down, ...) with the status.
        r = self.c.run("replicatorctl", "-c", self.config, "status", "--json", check=False)
        if r.returncode not in (0, 3, 4, 5):
            raise RuntimeError(f"replicatorctl status: {r.returncode}: {r.stderr}")
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def wait_active(self, timeout: float = 60) -> None:
        def active() -> bool:
            s = self.show("ActiveState", "SubState")
            if s["ActiveState"] == "failed":
                raise AssertionError(f"{self.unit} failed:\n{self.journal()}")
            return s["ActiveState"] == "active"

        try:
            nspawn.wait_for(active, timeout, f"{self.unit} to become active")
        except TimeoutError as e:
            s = self.show("ActiveState", "SubState", "StatusText")
            raise AssertionError(
                f"{e}: {s} (a Type=notify unit is active only after READY=1)\n{self.journal()}"
            ) from None

    def wait_link(self, peer: str, timeout: float = 30) -> dict[str, Any]:
        def connected() -> dict[str, Any] | None:
            link: dict[str, Any] = self.status()["links"][peer]
            return link if link["state"] == "connected" else None

        try:
            return dict(nspawn.wait_for(connected, timeout, f"{self.unit}'s link to {peer}"))
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.journal()}") from None


@pytest.fixture(scope="module")
def deb() -> Path:
    why = nspawn.missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"cannot boot containers in CI: {why}")
        pytest.skip(why)
    return build_deb()


@pytest.fixture(scope="module")
def container(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    rootfs = nspawn.ensure_rootfs()
    workdir = tmp_path_factory.mktemp("nspawn")
    with nspawn.Container(rootfs, workdir, binds={str(deb.parent): "/mnt/replicator"}) as c:
        r = c.run("dpkg", "-i", f"/mnt/replicator/{deb.name}", check=False, timeout=120)
        assert r.returncode == 0, f"dpkg -i failed:\n{r.stdout}\n{r.stderr}"
        yield c


@pytest.fixture(scope="module")
def nodes(container: nspawn.Container) -> tuple[Node, Node]:
    c = container
    c.run("sh", "-c", "head -c 32 /dev/urandom | base64 > /etc/replicator/keys/ab.key")
    c.run("chown", "replicator:replicator", "/etc/replicator/keys/ab.key")
    c.run("chmod", "600", "/etc/replicator/keys/ab.key")
    c.run("install", "-d", "-o", "replicator", "-g", "replicator", "/srv/a/m", "/srv/b/m")
    c.write("/etc/replicator/replicator.toml", A_TOML)
    c.write("/etc/replicator/b.toml", B_TOML)
    c.write(
        f"/etc/systemd/system/{UNIT}.d/test.conf",
        "[Service]\nReadWritePaths=/srv/a\nWatchdogSec=5s\n",
    )
    # Node b: the shipped unit with its own config, state and runtime dirs.
    shipped = c.run("cat", f"/lib/systemd/system/{UNIT}").stdout
    unit_b = (
        shipped.replace("/etc/replicator/replicator.toml", "/etc/replicator/b.toml")
        .replace("StateDirectory=replicator\n", "StateDirectory=replicator-b\n")
        .replace("RuntimeDirectory=replicator\n", "RuntimeDirectory=replicator-b\n")
    )
    assert unit_b.count("replicator-b") == 2 and "b.toml" in unit_b
    c.write(f"/etc/systemd/system/{UNIT_B}", unit_b)
    c.write(f"/etc/systemd/system/{UNIT_B}.d/test.conf", "[Service]\nReadWritePaths=/srv/b\n")
    c.run("systemctl", "daemon-reload")
    for toml in ("replicator.toml", "b.toml"):
        c.run("replicatorctl", "check-config", f"/etc/replicator/{toml}")
    c.run("systemctl", "start", "--no-block", UNIT_B, UNIT)
    a = Node(c, UNIT, "/etc/replicator/replicator.toml")
    b = Node(c, UNIT_B, "/etc/replicator/b.toml")
    return a, b


def wait_file(c: nspawn.Container, path: str, content: str, timeout: float = 30) -> None:
    def there() -> bool:
        r = c.run("cat", path, check=False)
        return r.returncode == 0 and r.stdout == content

    nspawn.wait_for(there, timeout, f"{path} to hold {content!r}")


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian is not installed")
def test_lintian_finds_no_errors(deb: Path) -> None:
    r = subprocess.run(["lintian", str(deb)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not re.search(r"^E: ", r.stdout, re.M), r.stdout + r.stderr


def test_package_installs_on_plain_bookworm(container: nspawn.Container) -> None:
    c = container
    assert c.run("id", "-u", "replicator").stdout.strip().isdigit()  # systemd-sysusers
    keys = c.run("stat", "-c", "%U:%G %a", "/etc/replicator/keys").stdout.strip()
    assert keys == "root:replicator 750"  # systemd-tmpfiles
    assert "disabled" in c.run("systemctl", "is-enabled", UNIT, check=False).stdout
    assert c.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert c.run("replicatord", "--version").stdout.startswith("replicatord ")
    assert "usage: replicatorctl" in c.run("replicatorctl", "--help").stdout
    # The bundled venv has no build path left in it.
    cfg = c.run("cat", "/usr/lib/replicator/venv/pyvenv.cfg").stdout
    assert "/tmp" not in cfg and "debian/replicator" not in cfg
    for page in ("replicatord", "replicatorctl", "replicator.toml"):
        c.run("sh", "-c", f"ls /usr/share/man/man*/{page}.[58].gz")
    # The installed unit as it stands (ExecStart= exists here).
    r = c.run("systemd-analyze", "verify", "--man=no", UNIT, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = c.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m and float(m.group(1)) <= 2.0, r.stdout[-500:] + r.stderr


def test_two_services_replicate(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    b.wait_active()
    a.wait_active()
    for n in nodes:
        assert a.c.run("systemctl", "is-active", n.unit).stdout.strip() == "active"
        assert n.prop("StatusText"), f"{n.unit} sent no STATUS="
        assert n.prop("User") == "replicator"
    a.wait_link("b")
    text = a.c.run("replicatorctl", "status").stdout
    assert "→ b" in text and "connected" in text
    a.c.write("/srv/a/m/hello.txt", "hello from a\n")
    wait_file(a.c, "/srv/b/m/hello.txt", "hello from a\n")
    owner = a.c.run("stat", "-c", "%U", "/srv/b/m/hello.txt").stdout.strip()
    assert owner == "replicator"  # not root: only a root daemon preserves owners


def test_logs_reach_journald_with_fields(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes

    def entries() -> list[dict[str, Any]]:
        out = a.c.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", "PEER=b").stdout
        return [json.loads(line) for line in out.splitlines()]

    found = nspawn.wait_for(entries, 20, "a journal entry of node a with PEER=b")
    e = found[-1]
    assert e["NODE"] == "a" and e["SYSLOG_IDENTIFIER"] == "replicatord"
    assert e["LOGGER"].startswith("replicator") and "PRIORITY" in e


def test_reload_keeps_links_up(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    before = a.wait_link("b")
    reloads = a.status().get("reloads", 0)
    pid = a.prop("MainPID")
    a.c.run("systemctl", "reload", UNIT, timeout=60)
    nspawn.wait_for(lambda: a.status().get("reloads", 0) > reloads, 20, "the reload to happen")
    a.wait_active(20)  # RELOADING=1 ... READY=1
    assert a.prop("MainPID") == pid
    after = a.wait_link("b")
    assert after["connects"] == before["connects"], "the reload reconnected the link"
    a.c.write("/srv/a/m/after-reload.txt", "still replicating\n")
    wait_file(a.c, "/srv/b/m/after-reload.txt", "still replicating\n")


def test_watchdog_restarts_a_hung_daemon(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    a.wait_active()
    s = a.show("MainPID", "NRestarts", "WatchdogUSec")
    assert s["WatchdogUSec"] == "5s"
    pid, restarts = s["MainPID"], int(s["NRestarts"])
    # Alive and pinging: the same process outlives two watchdog periods.
    nspawn.wait_for(lambda: a.status()["uptime"] > 11, 20, "node a to be up for 11 s")
    assert a.show("MainPID", "NRestarts") == {"MainPID": pid, "NRestarts": str(restarts)}
    a.c.run("kill", "-STOP", pid)

    def restarted() -> bool:
        now = a.show("MainPID", "NRestarts", "ActiveState")
        return (
            now["MainPID"] not in ("0", pid)
            and int(now["NRestarts"]) == restarts + 1
            and now["ActiveState"] == "active"
        )

    try:
        nspawn.wait_for(restarted, 60, "systemd to kill the stopped daemon and restart it")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{a.journal()}") from None
    assert "Watchdog timeout" in a.journal(200)
    a.wait_link("b")
    a.c.write("/srv/a/m/after-restart.txt", "back\n")
    wait_file(a.c, "/srv/b/m/after-restart.txt", "back\n")


def test_run_as_root_example_preserves_owners(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    c = a.c
    # Owners travel only between root daemons: the sender compares them
    # only as root, the receiver sets them only as root. A root daemon
    # takes only keys that belong to root.
    c.run("chown", "root:root", "/etc/replicator/keys/ab.key")
    for n in (a, b):
        c.run(
            "install",
            "-D",
            "-m644",
            "/usr/share/doc/replicator/examples/run-as-root.conf",
            f"/etc/systemd/system/{n.unit}.d/run-as-root.conf",
        )
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", UNIT_B, UNIT, timeout=60)
    for n in (a, b):
        n.wait_active()
        assert n.prop("User") == "root"
    a.wait_link("b")
    c.write("/srv/a/m/owned.txt", "owned by 1234\n", owner="1234:2345")
    wait_file(c, "/srv/b/m/owned.txt", "owned by 1234\n")

    def owner() -> str:
        return c.run("stat", "-c", "%u:%g", "/srv/b/m/owned.txt").stdout.strip()

    # The chown follows the file's creation: its change may arrive on its own.
    try:
        nspawn.wait_for(lambda: owner() == "1234:2345", 20, "the owner to arrive")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {owner()}\n{b.journal()}") from None


def test_stop_is_clean(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    for n in (a, b):
        t0 = time.monotonic()
        n.c.run("systemctl", "stop", n.unit, timeout=60)
        assert time.monotonic() - t0 < 20
        s = n.show("ActiveState", "Result", "ExecMainStatus")
        assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
            f"{n.unit}: {s}\n{n.journal()}"
        )
