"""Which host a kernel goes to: round-robin, least-connection, or a validated `KERNEL_REMOTE_HOST` pin."""

from __future__ import annotations

import threading
from collections import Counter

from .ssh import split_host_port

ALGORITHMS = ("round-robin", "least-connection")


class PlacementError(ValueError):
    """No host can be chosen for this request."""


def parse_hosts(value: str | list[str]) -> list[str]:
    """Normalise a host list given as a comma-separated string or a list; entries are validated."""
    items = value.split(",") if isinstance(value, str) else value
    hosts = [h.strip() for h in items if h and h.strip()]
    for h in hosts:
        split_host_port(h)  # raises with the entry's name
        if any(c.isspace() for c in h) or h.startswith("-"):
            raise PlacementError(f"remote host entry {h!r} is not a host name, address or host:port")
    return hosts


def check_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        raise PlacementError(
            f"load_balancing_algorithm {name!r} is not supported; use one of: {', '.join(ALGORITHMS)}"
        )
    return name


class HostSelector:
    """Per-process placement state shared by every provisioner instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self.kernels: Counter[str] = Counter()

    def choose(self, hosts: list[str], algorithm: str, pinned: str | None = None) -> str:
        """Pick a host from `hosts` and count a kernel on it; a pin must name a configured host."""
        if not hosts:
            raise PlacementError(
                "no remote hosts are configured: set c.DistributedProvisioner.remote_hosts, GP_REMOTE_HOSTS, or "
                "remote_hosts in the kernelspec's metadata.kernel_provisioner.config"
            )
        with self._lock:
            if pinned is not None:
                if pinned not in hosts:
                    raise PlacementError(
                        f"KERNEL_REMOTE_HOST={pinned!r} is not one of the configured remote hosts "
                        f"({', '.join(hosts)}); a kernel can only be pinned to a configured host"
                    )
                host = pinned
            elif check_algorithm(algorithm) == "least-connection":
                host = min(hosts, key=lambda h: (self.kernels[h], hosts.index(h)))
            else:
                host = hosts[self._next % len(hosts)]
                self._next += 1
            self.kernels[host] += 1
            return host

    def adopt(self, host: str) -> None:
        """Count a kernel placed elsewhere (a restart on its host, or a re-attached kernel)."""
        with self._lock:
            self.kernels[host] += 1

    def release(self, host: str) -> None:
        """A kernel on `host` is gone (shut down, failed to start, or found dead)."""
        with self._lock:
            if self.kernels[host] > 0:
                self.kernels[host] -= 1
