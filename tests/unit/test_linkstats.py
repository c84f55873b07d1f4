"""LinkStats.state: what status shows for a link."""

from __future__ import annotations

from replicator.stats import LinkStats


def test_auth_failed_stays_until_a_handshake_succeeds() -> None:
    """A retry (connecting, handshake) after a refused key does not hide the
    refusal: status keeps exit code 3 and "auth_failed" until it is fixed."""
    s = LinkStats("b", "127.0.0.1:1")
    s.set_state("auth_failed")
    since = s.since
    for state in ("connecting", "handshake"):
        s.set_state(state)
        assert (s.state, s.since) == ("auth_failed", since)
    s.set_state("connected")
    assert s.state == "connected"
    s.set_state("backoff")
    s.set_state("connecting")
    assert s.state == "connecting"  # other failures are not sticky
