"""Which host a kernel goes to: round-robin, least-connection, least-load, or a validated `KERNEL_REMOTE_HOST` pin.

The hosts are the truth: least-connection counts the kernels actually running on each host (whichever gateway
started them) plus this gateway's launches still in flight, so counts survive gateway restarts and are shared by
every gateway using the same hosts.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass

from .ssh import split_host_port

ALGORITHMS = ("round-robin", "least-connection", "least-load")
LOAD_TIE = 0.05  # least-load: headrooms closer than this (5% of a host's CPU or memory) count as equal
# What `KERNEL_INVENTORY` prints on a host: the ids of the kernels running there, then its load figures.
KERNEL_INVENTORY = (
    "ps -ww -eo args= | grep -o -e '--kernel-id [A-Za-z0-9._-]*' | sort -u; "
    "echo '--'; cat /proc/loadavg; getconf _NPROCESSORS_ONLN; grep -E '^Mem(Total|Available):' /proc/meminfo"
)
_ID = re.compile(r"--kernel-id ([A-Za-z0-9._-]+)")


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
        raise PlacementError(f"load_balancing_algorithm {name!r} is not supported; use one of: {', '.join(ALGORITHMS)}")
    return name


@dataclass(frozen=True)
class HostReport:
    """What a host runs and how busy it is, as `KERNEL_INVENTORY` printed it."""

    kernel_ids: frozenset[str]
    load1: float
    cpus: int
    mem_total: int
    mem_available: int
    taken_at: float = 0.0  # monotonic time the inventory was asked for

    @classmethod
    def parse(cls, text: str, taken_at: float = 0.0) -> HostReport:
        ids_part, _, load_part = text.partition("--\n")
        lines = load_part.split("\n")
        mem = dict(re.findall(r"^(Mem\w+):\s+(\d+)", load_part, re.M))
        return cls(
            kernel_ids=frozenset(_ID.findall(ids_part)),
            load1=float(lines[0].split()[0]),
            cpus=max(1, int(lines[1])),
            mem_total=int(mem["MemTotal"]),
            mem_available=int(mem["MemAvailable"]),
            taken_at=taken_at,
        )

    def headroom(self, extra_kernels: int = 0) -> float:
        """Free share of CPU (negative when overloaded) plus free share of memory; each kernel still launching
        counts as one more unit of load."""
        cpu = 1.0 - (self.load1 + extra_kernels) / self.cpus
        return cpu + self.mem_available / max(1, self.mem_total)


def check_pin(hosts: list[str], pinned: str) -> str:
    """`KERNEL_REMOTE_HOST` must name a configured host: a pin anywhere else would point our SSH identity there."""
    if pinned not in hosts:
        raise PlacementError(
            f"KERNEL_REMOTE_HOST={pinned!r} is not one of the configured remote hosts "
            f"({', '.join(hosts)}); a kernel can only be pinned to a configured host"
        )
    return pinned


class HostSelector:
    """Per-process placement state: the round-robin position, and this gateway's recent launches on each host.

    A launch counts from the moment it is placed (so a burst spreads) until an inventory asked for after it
    completed shows the host's own truth (so a shared, slightly older inventory never undercounts).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self.pending: dict[str, dict[str, float | None]] = {}  # host -> kernel id -> completion time (None: in flight)

    def recent(self, host: str, report: HostReport) -> set[str]:
        """This gateway's launches on `host` that `report` may not show yet."""
        with self._lock:
            launches = self.pending.get(host, {})
            for kid in [k for k, done in launches.items() if done is not None and done < time.monotonic() - 60]:
                del launches[kid]
            return {k for k, done in launches.items() if done is None or done >= report.taken_at}

    def round_robin(self, hosts: list[str], usable: list[str]) -> str:
        """The next usable host in configured order; unusable ones are passed over."""
        with self._lock:
            for _ in range(len(hosts)):
                host = hosts[self._next % len(hosts)]
                self._next += 1
                if host in usable:
                    return host
        raise PlacementError("no usable host")

    def least_connection(self, reports: dict[str, HostReport]) -> str:
        """Fewest kernels (running there, or launching from here); ties broken at random so gateways spread."""
        counts = {h: len(r.kernel_ids | self.recent(h, r)) for h, r in reports.items()}
        low = min(counts.values())
        return random.choice([h for h, c in counts.items() if c == low])

    def least_load(self, reports: dict[str, HostReport]) -> str:
        """Most headroom (free CPU share + free memory share), counting launches in flight as load. Hosts within
        LOAD_TIE of the best are equally good (idle kernels add no load, and memory figures jitter): among them the
        fewest kernels wins, then chance."""
        recent = {h: self.recent(h, r) for h, r in reports.items()}
        room = {h: r.headroom(len(recent[h] - r.kernel_ids)) for h, r in reports.items()}
        best = max(room.values())
        near = [h for h in reports if room[h] >= best - LOAD_TIE]
        return min(near, key=lambda h: (len(reports[h].kernel_ids | recent[h]), random.random()))

    def launching(self, host: str, kernel_id: str) -> None:
        with self._lock:
            self.pending.setdefault(host, {})[kernel_id] = None

    def launched(self, host: str, kernel_id: str, ok: bool = True) -> None:
        """The launch ended: a running kernel stays counted until an inventory shows it, a failed one is dropped."""
        with self._lock:
            launches = self.pending.setdefault(host, {})
            if ok:
                launches[kernel_id] = time.monotonic()
            else:
                launches.pop(kernel_id, None)
