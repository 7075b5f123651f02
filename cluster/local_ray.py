"""Start the embedded (private, local) Ray instance with its listeners on loopback.

Every Ray process decides where to listen from one value, the node IP address: Ray's C++
gRPC servers (GCS, raylet node manager and object manager, every core worker, i.e. the
driver, the actors and the workers) bind that address's loopback when it is 127.0.0.1 and
*every* interface (`0.0.0.0`/`::`) otherwise; the dashboard agent (HTTP and gRPC), the
runtime-env agent, the metrics export endpoint and the dashboard/autoscaler Prometheus
endpoints bind loopback only when the node IP is loopback. So one non-loopback node IP
opens a dozen ports to the network, several of them serving Ray's metrics without auth.

`ray.init(_node_ip_address="127.0.0.1")` alone is not enough: `ray.init` rewrites a
loopback node address into the host's routable one (`services.resolve_ip_for_localhost`)
unless Ray believes clusters are off on this platform (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`
false, which Ray reads once, at import, into `ray_constants.ENABLE_RAY_CLUSTER`). While
`ray.init` runs we set both: the constant for this process, the variable for the Ray
processes it spawns (they inherit it). Both are restored afterwards; nothing else in Ray
reads them on Linux (checked against Ray 2.60: `services.get_node_ip_address` and the
`ray start` banner).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import ray_constants

_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, ::ffff:127.x (an IPv6 socket bound to IPv4 loopback) or localhost."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextmanager
def _loopback_node_address() -> Iterator[None]:
    before_env = os.environ.get(_CLUSTERS_ENV)
    before_const = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(_CLUSTERS_ENV, None)
        else:
            os.environ[_CLUSTERS_ENV] = before_env


def start_local_ray(node_ip_address: str, num_cpus: float, namespace: str) -> None:
    """`ray.init` a fresh private instance (even when a `ray start` cluster runs on this
    host) whose node address is `node_ip_address`: loopback keeps every Ray listener on
    loopback; any other address lets other hosts reach (and join) it, and then Ray listens
    on every interface (see the module docstring)."""
    # Ray starts its worker processes at niceness 15 (`worker_niceness`), beneath the raylet
    # and drivers; our workers are the engines that do the serving, and on a host shared
    # with anything else (another server, a build) niceness 15 lets that take the cores
    # first. They run at the host's normal priority.
    kwargs = dict(address="local", num_cpus=num_cpus, namespace=namespace,
                  include_dashboard=False, _node_ip_address=node_ip_address,
                  _system_config={"worker_niceness": 0})
    if not is_loopback(node_ip_address):
        ray.init(**kwargs)
        return
    with _loopback_node_address():
        ray.init(**kwargs)
    actual = ray.util.get_node_ip_address()
    if not is_loopback(actual):  # a Ray upgrade changed the mechanism: fail, never widen
        ray.shutdown()
        raise RuntimeError(f"the local Ray took node address {actual}, not loopback "
                           f"{node_ip_address}: its listeners would face the network")
