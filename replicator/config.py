"""The node's TOML configuration, validated by pydantic v2.

Unknown keys are refused (a typo must never silently disable something), and
every error names the file, the TOML key path and what is wrong, e.g.
``/etc/replicator/replicator.toml: mirrors.media.push_to[1]: unknown peer 'c'``.
``load`` is the only entry point; it also reads and checks the key files.
"""

from __future__ import annotations

import os
import pwd
import stat
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .blockmap import NAMES, available
from .errors import ConfigError, KeyFileError
from .net import canonical_address, is_unspecified, parse_address
from .rates import parse_rate

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _address(v: str) -> str:
    """HOST:PORT, returned canonical (an IPv6 host in brackets, compressed);
    net.parse_address says what is wrong and what to write."""
    return canonical_address(v)


#: Bytes per second: an integer, or a string with a unit (rates.py).
Rate = Annotated[int, BeforeValidator(parse_rate)]


class NodeConfig(_Strict):
    name: Name
    listen: str
    state_dir: str = "/var/lib/replicator"
    control_socket: str = "/run/replicator/control.sock"
    #: Seconds between pings on an idle link.
    heartbeat_interval: float = Field(1.0, gt=0, le=60)
    #: A peer silent for this long is declared dead and reconnected.
    dead_after: float = Field(6.0, gt=0, le=600)
    #: Reconnect backoff: first and longest wait, in seconds.
    backoff_initial: float = Field(0.2, gt=0, le=60)
    backoff_max: float = Field(30.0, gt=0, le=3600)
    #: Payloads up to this many bytes are received with the frame that
    #: announces them (one recv) instead of two splices; 0 splices everything.
    inline_max: int = Field(16384, ge=0, le=1 << 20)
    #: MiB per second a scrub (``replicatorctl verify``) reads on each side.
    verify_rate: float = Field(64.0, gt=0)
    #: Optional Prometheus endpoint, HOST:PORT.
    metrics_listen: str | None = None
    #: Partial files (of interrupted transfers) untouched for this many
    #: seconds are removed, unless a session holds them open (janitor.py).
    partial_max_age: float = Field(7 * 86400.0, gt=0)

    _listen = field_validator("listen")(_address)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, v: str | None) -> str | None:
        return None if v is None else _address(v)


class PeerConfig(_Strict):
    address: str
    key_file: str
    #: What this node sends to the peer, at most, in bytes per second (0: no
    #: limit); paced by the kernel (net.pace). A reload changing only this
    #: applies it to the live connection.
    bwlimit: Rate = 0

    @field_validator("address")
    @classmethod
    def _peer_address(cls, v: str) -> str:
        v = _address(v)
        host = parse_address(v)[0]
        if is_unspecified(host):
            raise ValueError(
                f"{v!r} means every address of a host, which only a listener can use: "
                "give an address the peer is reachable at"
            )
        return v


class MirrorConfig(_Strict):
    path: str
    push_to: list[Name] = []
    accept_from: list[Name] = []
    delete: bool = True
    exclude: list[str] = []
    #: Seconds between full reconciliations with each target.
    rescan_interval: float = Field(3600.0, gt=0)
    #: Must be true when a peer is in both push_to and accept_from: changes
    #: then flow both ways and conflicts are resolved (docs/topologies.md).
    two_way: bool = False
    #: What this node applies as a pushing peer declared it; the rest it
    #: keeps its own (docs/security.md): "owners" (uid/gid, when running as
    #: root), "special_bits" (setuid, setgid, sticky), extended attributes
    #: and ACLs; and, as a sender, "hardlinks" (hardlinks.py). Default: none.
    preserve: list[
        Literal["owners", "special_bits", "xattrs", "acls", "security_xattrs", "hardlinks"]
    ] = []
    #: The digest of block maps this node sends for this mirror (every file
    #: is verified against its map before it is published; blockmap.py):
    #: "xxh3-128" (fast), or "blake3" (cryptographic; needs the blake3 package).
    digest: Literal["xxh3-128", "blake3"] = "xxh3-128"
    #: With preserve = ["owners"]: map users and groups by name ("names",
    #: rsync's default as root; an unknown name keeps its number) or apply
    #: the peer's numbers ("numeric", rsync's --numeric-ids).
    owners: Literal["names", "numeric"] = "names"
    #: Seconds between scrubs of this mirror against each target
    #: (``replicatorctl verify`` without --repair); 0: only when asked.
    verify_interval: float = Field(0.0, ge=0)

    @field_validator("digest")
    @classmethod
    def _digest_available(cls, v: str) -> str:
        if not available(NAMES[v]):
            raise ValueError(f"digest {v!r} needs the {v} package (pip install {v})")
        return v

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"mirror path {v!r} must be absolute")
        return os.path.normpath(v)


class Config(_Strict):
    node: NodeConfig
    peers: dict[Name, PeerConfig] = {}
    mirrors: dict[Name, MirrorConfig] = {}

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        if self.node.name in self.peers:
            raise _At(("peers", self.node.name), "a node cannot be its own peer")
        for name, p in self.peers.items():
            if p.address == self.node.listen:
                raise _At(
                    ("peers", name, "address"), f"is this node's own listen address {p.address}"
                )
        for name, m in self.mirrors.items():
            for field in ("push_to", "accept_from"):
                seen: set[str] = set()
                for i, peer in enumerate(getattr(m, field)):
                    if peer not in self.peers:
                        raise _At(("mirrors", name, field, i), f"unknown peer {peer!r}")
                    if peer in seen:
                        raise _At(("mirrors", name, field, i), f"peer {peer!r} is listed twice")
                    seen.add(peer)
            both = sorted(set(m.push_to) & set(m.accept_from))
            if both and not m.two_way:
                raise _At(
                    ("mirrors", name, "accept_from"),
                    f"peer {both[0]!r} is in both push_to and accept_from, which makes the mirror "
                    "two-way (concurrent changes resolved by newest mtime, loser kept as a "
                    "conflict copy); set two_way = true to confirm, or remove it from one list",
                )
            if m.two_way and not both:
                raise _At(
                    ("mirrors", name, "two_way"),
                    "two_way = true, but no peer is in both push_to and accept_from",
                )
        for a_name, a in self.mirrors.items():
            for b_name, b in self.mirrors.items():
                if a_name < b_name and _overlap(a.path, b.path):
                    raise _At(
                        ("mirrors", b_name, "path"),
                        f"{b.path} overlaps mirror {a_name!r} ({a.path}); mirrors must not nest",
                    )
        return self


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class _At(ValueError):
    """A cross-field error that knows its own key path."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


def key_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    exc = ctx.get("error")
    if isinstance(exc, _At):
        return f"{key_path(exc.loc)}: {exc}"
    loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/configuration.md)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{key_path(loc) or '(top level)'}: {msg}"


def parse(text: str, source: str = "<config>") -> Config:
    """Validate TOML ``text``; ConfigError lists every problem, one a line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return Config.model_validate(doc)
    except ValidationError as e:
        lines = [f"{source}: {_message(err)}" for err in e.errors()]  # type: ignore[arg-type]
        raise ConfigError("\n".join(lines)) from None


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config: {e.strerror}") from None
    return parse(text, str(p))


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def key_owners() -> frozenset[int]:
    """Who may own a key file: root, or the user the daemon runs as."""
    return frozenset({0, os.geteuid()})


def read_key(path: str, owners: Collection[int] | None = None) -> bytes:
    """The shared secret in ``path``; refused if others may read it, or if
    it belongs to anyone but ``owners`` (default ``key_owners()``): its
    owner could rewrite it, or chmod it readable."""
    allowed = key_owners() if owners is None else owners
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise KeyFileError(f"key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path}: not a regular file")
        if st.st_uid not in allowed:
            mine = max(allowed, default=0)  # the service user rather than root, if allowed
            try:
                name = pwd.getpwuid(mine).pw_name
            except KeyError:
                name = str(mine)
            raise KeyFileError(
                f"key file {path}: owned by {_user(st.st_uid)}, who could rewrite it; it must "
                f"belong to {' or '.join(_user(u) for u in sorted(allowed))}; run: "
                f"chown {name} {path}"
            )
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group/others read "
                f"it; run: chmod 600 {path}"
            )
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < 16:
        raise KeyFileError(
            f"key file {path}: the key is {len(key)} bytes; use at least 16 "
            f"(e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return key


def read_keys(
    cfg: Config, source: str | None = None, owners: Collection[int] | None = None
) -> dict[str, bytes]:
    """Every peer's key; KeyFileError naming the file, peer and problem."""
    keys = {}
    prefix = f"{source}: " if source else ""
    for name, peer in cfg.peers.items():
        try:
            keys[name] = read_key(peer.key_file, owners)
        except KeyFileError as e:
            raise KeyFileError(f"{prefix}peers.{name}.key_file: {e}") from None
    return keys


def check_filesystem(cfg: Config, source: str = "<config>") -> None:
    """What the schema cannot see: mirror roots that exist and are
    directories. ConfigError lists every problem, one a line."""
    problems = []
    for name, m in cfg.mirrors.items():
        if not os.path.exists(m.path):
            problems.append(
                f"{source}: mirrors.{name}.path: {m.path} does not exist "
                "(create it, or mount the disk that holds it)"
            )
        elif not os.path.isdir(m.path):
            problems.append(f"{source}: mirrors.{name}.path: {m.path} is not a directory")
    if problems:
        raise ConfigError("\n".join(problems))
