"""Test-owned network namespaces joined to the host by veth pairs.

Addresses come from 198.18.0.0/15 (the project's own test hosts); IPv6
ones (``Lan(n, ipv6=True)``) are unique-local, fd52:7e11:<k>::<i>/64, and
exist only inside the namespaces. A namespace can be rate-limited with tbf
(to catch a transfer in the middle) and its link cut with ``ip link set ...
down``. Everything is removed on close(), even after a failed test.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_counter = itertools.count(1)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def available() -> bool:
    return os.geteuid() == 0 and sh("ip", "netns", "list", check=False).returncode == 0


def _v6_on(interface: str) -> str:
    """The sysctl that enables IPv6 on ``interface`` (a new namespace may
    inherit disable_ipv6 = 1 from the host's defaults)."""
    return f"net.ipv6.conf.{interface}.disable_ipv6=0"


class Netns:
    """Namespace ``name`` with address ``ns_ip``; the host end has ``host_ip``."""

    def __init__(self) -> None:
        i = next(_counter)
        tag = f"{os.getpid() % 100000}x{i}"
        self.name = f"rpl{tag}"
        self.host_if = f"rh{tag}"[:15]
        self.ns_if = f"rn{tag}"[:15]
        third = (os.getpid() + i) % 250 + 1
        self.host_ip = f"198.18.{third}.1"
        self.ns_ip = f"198.18.{third}.2"
        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            sh("ip", "link", "set", self.ns_if, "netns", self.name)
            sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            self.run("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.run("ip", "link", "set", self.ns_if, "up")
            self.run("ip", "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check)

    def rate(self, mbit: int) -> None:
        """Limit host → namespace traffic to ``mbit`` Mbit/s (tbf)."""
        sh(
            "tc",
            "qdisc",
            "replace",
            "dev",
            self.host_if,
            "root",
            "tbf",
            "rate",
            f"{mbit}mbit",
            "burst",
            "256kb",
            "latency",
            "200ms",
        )

    def unrate(self) -> None:
        sh("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)

    def cut(self) -> None:
        sh("ip", "link", "set", self.host_if, "down")

    def restore(self) -> None:
        sh("ip", "link", "set", self.host_if, "up")

    def close(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)


class Lan:
    """``n`` namespaces on one bridge, addresses 198.19.<k>.<i+1>/24 and,
    with ``ipv6``, also fd52:7e11:<k>::<i+1>/64 (``address(i, 6)``): a small
    network of storage nodes. ``cut(i)``/``restore(i)`` take host i's cable out."""

    def __init__(self, n: int, ipv6: bool = False) -> None:
        k = next(_counter)
        tag = f"{os.getpid() % 10000}y{k}"
        self.bridge = f"rb{tag}"[:15]
        self.hosts: list[tuple[str, str, str]] = []  # (netns, host-side veth, address)
        #: Host i's IPv6 address (with ``ipv6``).
        self.hosts6: list[str] = []
        subnet = (os.getpid() + k) % 250 + 1
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        try:
            sh("ip", "link", "set", self.bridge, "up")
            for i in range(n):
                ns, hv, nv = f"rl{tag}h{i}", f"rv{tag}h{i}"[:15], f"rw{tag}h{i}"[:15]
                addr = f"198.19.{subnet}.{i + 1}"
                sh("ip", "netns", "add", ns)
                self.hosts.append((ns, hv, addr))
                sh("ip", "link", "add", hv, "type", "veth", "peer", "name", nv)
                sh("ip", "link", "set", nv, "netns", ns)
                sh("ip", "link", "set", hv, "master", self.bridge)
                sh("ip", "link", "set", hv, "up")
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", nv)
                if ipv6:
                    # nodad: usable at once (duplicate address detection
                    # would keep it "tentative", unbindable, for a second)
                    addr6 = f"fd52:7e11:{subnet:x}::{i + 1:x}"
                    sh("ip", "netns", "exec", ns, "sysctl", "-qw", _v6_on(nv))
                    sh(
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "ip",
                        "addr",
                        "add",
                        f"{addr6}/64",
                        "dev",
                        nv,
                        "nodad",
                    )
                    self.hosts6.append(addr6)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", nv, "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def address(self, i: int, family: int = 4) -> str:
        """Host i's address of that family (4 or 6), without brackets."""
        return self.hosts6[i] if family == 6 else self.hosts[i][2]

    def cut(self, i: int) -> None:
        sh("ip", "link", "set", self.hosts[i][1], "down")

    def restore(self, i: int) -> None:
        sh("ip", "link", "set", self.hosts[i][1], "up")

    def close(self) -> None:
        for ns, hv, _ in self.hosts:
            sh("ip", "link", "del", hv, check=False)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
