"""What counts as loopback when the cluster's listeners are checked."""

from __future__ import annotations

import pytest

from pdserve.cluster.local_ray import is_loopback


@pytest.mark.parametrize("host,expected", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("localhost", True),
    ("::ffff:127.0.0.1", True),  # an IPv6 socket bound to IPv4 loopback (Ray's gRPC servers)
    ("0.0.0.0", False), ("::", False), ("::ffff:0.0.0.0", False), ("192.0.2.2", False),
    ("10.1.2.3", False), ("fe80::1%eth0", False), ("example.com", False),
])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected
