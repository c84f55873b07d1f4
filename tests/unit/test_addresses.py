"""Addresses, IPv4 and IPv6: what the config accepts, how it writes them,
what it refuses and the message that says what to write instead."""

from __future__ import annotations

import socket

import pytest

from replicator import config, net
from replicator.errors import ConfigError
from replicator.localcluster import free_port

from ..helpers import ipv6_missing


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("198.18.0.2:7301", ("198.18.0.2", 7301)),
        ("storage-b.example:7301", ("storage-b.example", 7301)),
        ("[::1]:7301", ("::1", 7301)),
        ("[::]:7301", ("::", 7301)),
        ("[fd52:7e11::2]:1", ("fd52:7e11::2", 1)),
        ("[FD52:7E11:0:0::0002]:65535", ("fd52:7e11::2", 65535)),  # canonical form
    ],
)
def test_addresses_that_parse(text: str, parsed: tuple[str, int]) -> None:
    assert net.parse_address(text) == parsed
    assert net.canonical_address(text) == net.format_address(*parsed)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nowhere", "'nowhere' is not HOST:PORT (e.g. '198.18.0.2:7301', or '[fd00::2]:7301'"),
        ("host:0", "the port must be 1 to 65535"),
        ("host:65536", "the port must be 1 to 65535"),
        ("::1:7301", "write an IPv6 address in brackets, then the port: '[::1]:7301'"),
        ("fd52:7e11::2:7301", "'[fd52:7e11::2]:7301'"),
        ("fd52::2", "'[fd52::2]:PORT'"),
        ("[::1]", "has no port: write '[::1]:PORT'"),
        ("[198.18.0.2]:7301", "'198.18.0.2' is not an IPv6 address; brackets are for IPv6 only"),
        ("[fe80::1]:7301", "link-local and scoped IPv6 addresses"),
        ("[fe80::1%eth0]:7301", "use a global or unique-local (fd00::/8) address"),
        ("fe80::1%eth0:7301", "link-local and scoped IPv6 addresses"),
        ("[fd52::2%eth0]:7301", "link-local and scoped IPv6 addresses"),
        ("[::ffff:198.18.0.2]:7301", "IPv4-mapped IPv6 address: write '198.18.0.2:7301'"),
        ("[::1:7301", "is not HOST:PORT"),
    ],
)
def test_addresses_refused_say_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as e:
        net.parse_address(text)
    assert says in str(e.value)


def test_format_and_peer_host() -> None:
    assert net.format_address("fd52::2", 7301) == "[fd52::2]:7301"
    assert net.format_address("198.18.0.2", 7301) == "198.18.0.2:7301"
    # an IPv4 client of a dual-stack listener shows as IPv4
    assert net.peer_host("::ffff:198.18.0.2") == "198.18.0.2"
    assert net.peer_host("fd52::2") == "fd52::2"
    assert net.peer_host("198.18.0.2") == "198.18.0.2"
    assert net.is_unspecified("::") and net.is_unspecified("0.0.0.0")
    assert not net.is_unspecified("::1") and not net.is_unspecified("a.example")


CONFIG = """
[node]
name = "a"
listen = "{listen}"
{node_extra}
[peers.b]
address = "{peer}"
key_file = "/k/a-b.key"
"""


def parse(listen: str = "[::]:7301", peer: str = "[fd52::2]:7301", node_extra: str = "") -> str:
    """The errors of a config, or its canonical addresses."""
    try:
        c = config.parse(CONFIG.format(listen=listen, peer=peer, node_extra=node_extra), "f.toml")
    except ConfigError as e:
        return str(e)
    return f"{c.node.listen} {c.peers['b'].address} {c.node.metrics_listen}"


def test_config_keeps_addresses_canonical() -> None:
    assert parse() == "[::]:7301 [fd52::2]:7301 None"
    assert parse("[FD52:0::1]:7301", "[FD52::0:2]:7301", 'metrics_listen = "[::1]:9100"') == (
        "[fd52::1]:7301 [fd52::2]:7301 [::1]:9100"
    )
    assert parse("0.0.0.0:7301", "198.18.0.2:7301") == "0.0.0.0:7301 198.18.0.2:7301 None"


def test_config_errors_name_the_key_and_what_to_write() -> None:
    assert parse(listen="::1:7301") == (
        "f.toml: node.listen: '::1:7301': write an IPv6 address in brackets, then the port: "
        "'[::1]:7301'"
    )
    assert parse(peer="[fe80::2%eth0]:7301").startswith(
        "f.toml: peers.b.address: '[fe80::2%eth0]:7301': link-local and scoped IPv6 addresses"
    )
    assert parse(node_extra='metrics_listen = "[fe80::1]:9100"').startswith(
        "f.toml: node.metrics_listen: '[fe80::1]:9100': link-local"
    )
    # a wildcard is for listening, not for reaching a peer
    assert parse(peer="[::]:7302") == (
        "f.toml: peers.b.address: '[::]:7302' means every address of a host, which only a "
        "listener can use: give an address the peer is reachable at"
    )
    assert "peers.b.address: '0.0.0.0:7302' means every address" in parse(peer="0.0.0.0:7302")
    # the same peer address written differently is still this node's own
    assert "is this node's own listen address [fd52::1]:7301" in parse(
        "[fd52::1]:7301", "[FD52:0::1]:7301"
    )


def test_listen_socket_family() -> None:
    port = free_port()
    with net.listen_socket(f"127.0.0.1:{port}", 1) as s:
        assert s.family == socket.AF_INET
    reason = ipv6_missing("lo")
    if reason:
        pytest.skip(reason)
    port = free_port("::1")
    with net.listen_socket(f"[::1]:{port}", 1) as s:
        assert s.family == socket.AF_INET6
        assert s.getsockname()[:2] == ("::1", port)
