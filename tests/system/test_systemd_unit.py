"""The systemd integration files and the man pages, checked with systemd's
own tools on this machine (no running systemd needed):

* systemd-analyze verify is silent on the unit, alone and with each example
  drop-in;
* systemd-analyze security --offline rates the unit's exposure at 2.0 or
  less (and the run-as-root variant stays close);
* the system calls the daemon makes are in the unit's filter;
* systemd-sysusers and systemd-tmpfiles accept their files;
* the man pages describe every option, command and config key there is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from replicator import __version__, config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "replicatord.service"
DROPINS = sorted((SYSTEMD / "dropins").glob("*.conf"))
MAN = ROOT / "packaging" / "man"

#: What the daemon does that a seccomp filter could break: the data path
#: (sendfile, splice, pipe2 + fcntl F_SETPIPE_SZ), change detection
#: (inotify), durability (fsync, syncfs), publishing (renameat2, utimensat).
DAEMON_SYSCALLS = [
    "sendfile",
    "splice",
    "pipe2",
    "fcntl",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "fsync",
    "fdatasync",
    "syncfs",
    "renameat2",
    "utimensat",
    "fchmodat",
    "openat",
    "statx",
    "socket",
    "accept4",
    "setsockopt",
]
#: Only as root (owner preservation): the run-as-root drop-in allows them.
ROOT_SYSCALLS = ["fchown", "fchownat"]

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def merged(tmp_path: Path, *dropins: Path) -> Path:
    """The unit with ``dropins`` appended: what systemd reads (a drop-in's
    assignments are applied after the unit's, in order), in one file that
    the offline tools take. ExecStart= points at an installed replicatord
    (the package's, else this virtualenv's): verify checks that it exists."""
    text = UNIT.read_text()
    if not os.access("/usr/bin/replicatord", os.X_OK):
        here = Path(sys.executable).parent / "replicatord"
        assert here.exists(), "no replicatord to point ExecStart= at"
        text = text.replace("ExecStart=/usr/bin/replicatord", f"ExecStart={here}")
    for d in dropins:
        text += "\n" + d.read_text()
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def exposure(unit: Path) -> float:
    r = analyze("security", "--offline=yes", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, f"no exposure level in:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize("dropin", [None, *DROPINS], ids=lambda d: d.name if d else "unit")
def test_verify_is_silent(tmp_path: Path, dropin: Path | None) -> None:
    unit = merged(tmp_path, *([dropin] if dropin else []))
    r = analyze("verify", "--man=no", str(unit))
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    level = exposure(merged(tmp_path))
    print(f"exposure of replicatord.service: {level}")
    assert level <= 2.0


@needs_analyze
def test_running_as_root_stays_confined(tmp_path: Path) -> None:
    level = exposure(merged(tmp_path, SYSTEMD / "dropins" / "run-as-root.conf"))
    print(f"exposure of replicatord.service with run-as-root.conf: {level}")
    assert level <= 2.5


def test_unit_has_the_promised_settings() -> None:
    s = unit_settings(UNIT.read_text())
    expect = {
        "Type": "notify",
        "ExecStart": "/usr/bin/replicatord --config /etc/replicator/replicator.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "User": "replicator",
        "StateDirectory": "replicator",
        "RuntimeDirectory": "replicator",
        "ConfigurationDirectory": "replicator",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {k: s.get(k, [None])[-1] for k in expect} == expect
    assert s["SystemCallFilter"][0] == "@system-service"
    # ProcSubset=pid would hide /proc/sys: the daemon reads kernel/random/boot_id
    # (resume safety across reboots) and fs/pipe-max-size there.
    assert "ProcSubset" not in s
    # The stop drain (a few seconds) fits well within the stop timeout.
    assert 20 <= int(s["TimeoutStopSec"][-1].rstrip("s")) <= 90


def _expand(group: str) -> set[str]:
    """The system calls of a systemd-analyze syscall-filter group, nested
    groups included."""
    r = analyze("syscall-filter", "--no-pager", group)
    assert r.returncode == 0, r.stderr
    out: set[str] = set()
    for line in r.stdout.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        out |= _expand(name) if name.startswith("@") else {name}
    return out


@needs_analyze
def test_syscall_filter_allows_what_the_daemon_does() -> None:
    s = unit_settings(UNIT.read_text())
    allowed = set().union(*(_expand(g) for g in s["SystemCallFilter"][0].split()))
    denied = set().union(*(_expand(g.lstrip("~")) for g in s["SystemCallFilter"][1].split()))
    assert s["SystemCallFilter"][1].startswith("~")
    effective = allowed - denied
    assert set(DAEMON_SYSCALLS) <= effective, set(DAEMON_SYSCALLS) - effective
    # As user replicator the daemon never chowns; as root (the drop-in) it must.
    root = unit_settings((SYSTEMD / "dropins" / "run-as-root.conf").read_text())
    assert not set(ROOT_SYSCALLS) & effective
    readded = set().union(*(_expand(g) for g in root["SystemCallFilter"]))
    assert set(ROOT_SYSCALLS) <= effective | readded


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for kind in ("sysusers", "tmpfiles"):
        d = tmp_path / "usr" / "lib" / f"{kind}.d"
        d.mkdir(parents=True)
        shutil.copy(SYSTEMD / f"replicator.{kind}.conf", d / "replicator.conf")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        args = [tool, f"--root={tmp_path}"] + (["--create"] if "tmpfiles" in tool else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0 and "rror" not in r.stderr, r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(
        r"^replicator:x:\d+:\d+:.*:/var/lib/replicator:/usr/sbin/nologin$", passwd, re.M
    )
    keys = (tmp_path / "etc" / "replicator" / "keys").stat()
    assert keys.st_uid == 0 and keys.st_mode & 0o7777 == 0o750


def test_sysctl_file_names_real_keys() -> None:
    values: dict[str, int] = {}
    for line in (SYSTEMD / "replicator-sysctl.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value)
    assert set(values) == {
        "fs.inotify.max_user_watches",
        "fs.inotify.max_user_instances",
        "fs.inotify.max_queued_events",
    }
    for key, n in values.items():
        assert Path("/proc/sys", *key.split(".")).exists()
        assert n >= 1024


# -- man pages -----------------------------------------------------------------


def roff_text(page: str) -> str:
    """The page's words without roff escapes (\\- is -, fonts dropped)."""
    text = (MAN / page).read_text()
    return re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\(dq", '"')


def help_text(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, *args, "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    return r.stdout


def long_options(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z-]+)", text))


def test_replicatord_man_page_has_every_option() -> None:
    opts = long_options(help_text("-m", "replicator"))
    assert "--config" in opts
    missing = {o for o in opts if o not in roff_text("replicatord.8")}
    assert not missing


def test_replicatorctl_man_page_has_every_command_and_option() -> None:
    usage = help_text("-m", "replicator.ctl")
    commands = re.search(r"\{([a-z,-]+)\}", usage)
    assert commands
    page = roff_text("replicatorctl.8")
    missing = set()
    for cmd in commands.group(1).split(","):
        if not re.search(rf"^\.B {re.escape(cmd)}\b", page, re.M):
            missing.add(cmd)
        missing |= {f"{cmd} {o}" for o in long_options(help_text("-m", "replicator.ctl", cmd))}
        missing -= {f"{cmd} {o}" for o in long_options(page)}
    missing |= {o for o in long_options(usage) if o not in page}
    assert not missing


def test_config_man_page_has_every_key() -> None:
    page = roff_text("replicator.toml.5")
    sections: dict[str, type[BaseModel]] = {
        "[node]": config.NodeConfig,
        "[peers.NAME]": config.PeerConfig,
        "[mirrors.NAME]": config.MirrorConfig,
    }
    missing = []
    for section, model in sections.items():
        assert f".SH {section}" in page
        body = page.split(f".SH {section}")[1].split("\n.SH ")[0]
        # Each key heads a paragraph: ".BR key ..." (two keys may share one).
        missing += [
            f"{section} {k}"
            for k in model.model_fields
            if not re.search(rf"^\.BR .*\b{k}\b", body, re.M)
        ]
    assert not missing


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
@pytest.mark.parametrize("page", ["replicatord.8", "replicatorctl.8", "replicator.toml.5"])
def test_man_page_renders_without_warnings(page: str) -> None:
    r = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert page.split(".")[0] in r.stdout
    assert f'"replicator {__version__}"' in (MAN / page).read_text().split("\n.TH ")[1]
