"""The gateway: what one process shares between every kernel it manages, owned by one object.

`Gateway.instance()` holds the RSA key pair, one `Cluster` per set of SSH settings (pooled connections, `Host`s,
their health, cleanups owed to them) and, per event loop, the callback server with its ports, the reapers retrying
owed cleanups and the host inventories that concurrent launches share. `Gateway.reset()` gives tests a fresh one.
Nothing here is about one kernel: that is `provisioner.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from traitlets.config import SingletonConfigurable

from . import callback, limits, yarn
from .config import CallbackOptions
from .errors import ProvisionerError
from .health import Health
from .hosts import Host
from .placement import KERNEL_INVENTORY, HostReport, HostSelector, PlacementError
from .protocol import format_address
from .ssh import SshError, SshPool, SshSettings
from .tunnel import CallbackForwards

INVENTORY_SHARING = 0.5  # seconds during which launches reuse a host's inventory
HOST_ERRORS = (SshError, OSError, asyncio.TimeoutError)


class Cluster:
    """The hosts one set of SSH settings reaches: the pool of connections, each entry's `Host`, their health."""

    def __init__(self, settings: SshSettings, log: logging.Logger) -> None:
        self.pool = SshPool(settings)
        self.health = Health()
        self.log = log
        self._hosts: dict[str, Host] = {}
        self._lock = threading.Lock()

    def host_now(self, entry: str) -> Host:
        """The entry's `Host` (blocking: the first call may ask DNS whether it is this machine)."""
        with self._lock:
            if entry not in self._hosts:
                self._hosts[entry] = Host(entry, self.pool)
            return self._hosts[entry]

    async def host(self, entry: str) -> Host:
        known = self._hosts.get(entry)
        return known if known is not None else await self.pool.call(self.host_now, entry)

    def failed(self, entry: str, reason: str, base: float) -> None:
        """Quarantine a host that could not be used (base: the caller's host_quarantine) and drop its connection."""
        seconds = self.health.failed(entry, reason, base)
        self.log.warning("host %s is unavailable (%s): left alone for %.0f s", entry, reason, seconds)
        self.pool.drop(entry)

    async def probe(self, entry: str, timeout: float, base: float) -> str | None:
        """Check a host that failed before and run the cleanups it is owed. Returns the failure, if any."""
        try:
            host = await self.host(entry)
            await host.arun("true", timeout=timeout)
        except HOST_ERRORS as exc:
            self.failed(entry, str(exc), base)
            return str(exc)
        self.health.recovered(entry)
        self.log.info("host %s answers again", entry)
        for command in self.health.take_owed(entry):
            with contextlib.suppress(*HOST_ERRORS):
                await host.arun(command)
        return None


@dataclass
class LoopState:
    """What is bound to one event loop."""

    server: callback.ResponseServer
    ports: dict[str, int] = field(default_factory=dict)  # bind address -> callback server port
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reapers: dict[int, asyncio.Task] = field(default_factory=dict)  # id(cluster) -> its reaper
    inventories: dict[tuple[int, str], tuple[float, asyncio.Future]] = field(default_factory=dict)


class Gateway(SingletonConfigurable):
    """Per-process state of the provisioner, keyed by SSH settings and by event loop."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.selector = HostSelector()
        self.callback_forwards = CallbackForwards()
        self.kernel_ids: set[str] = set()  # the kernels this gateway runs (YARN reconciliation)
        self.yarn_sweeps = yarn.Sweeps()  # YARN orphans of an earlier run, killed once per RM
        self.user_launches = limits.UserLaunches()  # launches admitted under max_kernels_per_user, still starting
        self._clusters: dict[tuple, Cluster] = {}
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = weakref.WeakKeyDictionary()
        self._key: Any = None
        self._key_lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        """Forget everything (tests): connections are closed, the next `instance()` starts afresh."""
        if cls.initialized():
            for cluster in cls.instance()._clusters.values():
                cluster.pool.close()
        cls.clear_instance()

    def cluster(self, settings: SshSettings) -> Cluster:
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(vars(settings).items()))
        if key not in self._clusters:
            self._clusters[key] = Cluster(settings, self.log)
        return self._clusters[key]

    def clusters(self) -> list[Cluster]:
        return list(self._clusters.values())

    # -- the key pair and the callback server --
    def _key_now(self) -> Any:
        with self._key_lock:  # generated once, even when many launches ask at once
            if self._key is None:
                self._key = callback.generate_key_pair()
        return self._key

    async def private_key(self) -> Any:
        return self._key if self._key is not None else await asyncio.to_thread(self._key_now)

    async def loop_state(self) -> LoopState:
        key = await self.private_key()
        loop = asyncio.get_running_loop()
        if loop not in self._loops:  # no await between this check and the assignment: one server per loop
            self._loops[loop] = LoopState(callback.ResponseServer(key))
        return self._loops[loop]

    async def listen(self, bind: str, first_port: int, retries: int) -> int:
        """The port our callback server listens on at `bind`, listening there first if need be."""
        state = await self.loop_state()
        async with state.lock:
            if bind not in state.ports:
                first = next(iter(state.ports.values()), first_port)
                state.ports[bind] = await state.server.listen(bind, first, retries)
        return state.ports[bind]

    async def response_address(self, host: Host, tunneled: bool, options: CallbackOptions) -> str:
        """An address of ours that `host` can reach, with our callback server listening on it."""
        first, retries = options.response_port, options.response_port_retries
        if tunneled:  # a port on the host's loopback that the pooled connection forwards to our callback server
            local = await self.listen("127.0.0.1", first, retries)
            transport = await host.pool.call(host.transport)
            return f"127.0.0.1:{await host.pool.call(self.callback_forwards.port, transport, local)}"
        address = options.response_ip or await host.pool.call(host.gateway_address) or ""
        if not address:
            raise ProvisionerError(
                500, f"cannot tell which address {host.entry} reaches this gateway at (ProxyJump?): set GP_RESPONSE_IP"
            )
        if address in options.prohibited_local_ips:
            raise ProvisionerError(
                500,
                f"the gateway address {host.entry} would call back to ({address}) is in GP_PROHIBITED_LOCAL_IPS: "
                "set GP_RESPONSE_IP to an address that host can reach",
            )
        bind = "0.0.0.0" if options.response_addr_any else address
        return format_address(address, await self.listen(bind, first, retries))

    # -- what hosts run, shared by launches placed at about the same time --
    async def inventory(self, cluster: Cluster, entry: str, timeout: float) -> HostReport:
        state = await self.loop_state()

        async def ask() -> HostReport:
            taken_at = time.monotonic()
            result = await (await cluster.host(entry)).arun(KERNEL_INVENTORY, timeout=timeout)
            return HostReport.parse(result.stdout, taken_at)

        started, shared = state.inventories.get((id(cluster), entry), (0.0, None))
        if shared is None or time.monotonic() - started > INVENTORY_SHARING:
            shared = asyncio.ensure_future(ask())
            state.inventories[(id(cluster), entry)] = (time.monotonic(), shared)
        return await asyncio.shield(shared)

    async def choose_host(
        self,
        cluster: Cluster,
        entries: list[str],
        algorithm: str,
        tried: set[str],
        skipped: list[str],
        probe_timeout: float,
        quarantine: float,
    ) -> str:
        """The algorithm's pick among the healthy `entries` not yet `tried`; hosts passed over are added to
        `skipped` with the reason. PlacementError listing every host's failure when none can take the kernel."""
        usable = []
        for entry in entries:
            why = None if entry in tried else cluster.health.quarantined(entry)
            if why:
                skipped.append(f"{entry}: {why}")
            elif entry not in tried:
                usable.append(entry)
        suspects = [h for h in usable if cluster.health.suspect(h)]
        probes = [cluster.probe(h, probe_timeout, quarantine) for h in suspects]
        for entry, failure in zip(suspects, await asyncio.gather(*probes), strict=True):
            if failure:
                usable.remove(entry)
                skipped.append(f"{entry}: {failure}")
        reports = {}
        if algorithm != "round-robin":
            reports = await self._reports(cluster, usable, skipped, probe_timeout + 5, quarantine)
        if not (reports or (usable and algorithm == "round-robin")):
            raise PlacementError("no remote host can take the kernel:\n  " + "\n  ".join(skipped))
        if algorithm == "least-connection":
            return self.selector.least_connection(reports)
        if algorithm == "least-load":
            return self.selector.least_load(reports)
        return self.selector.round_robin(entries, usable)

    async def _reports(
        self, cluster: Cluster, entries: list[str], skipped: list[str], timeout: float, quarantine: float
    ) -> dict[str, HostReport]:
        """What each host runs and how busy it is, asked over the pooled connections in parallel."""

        async def ask(entry: str) -> HostReport | None:
            try:
                return await self.inventory(cluster, entry, timeout)
            except (*HOST_ERRORS, ValueError, KeyError, IndexError) as exc:
                if not cluster.health.quarantined(entry):
                    cluster.failed(entry, str(exc), quarantine)
                skipped.append(f"{entry}: {exc}")
                return None

        answers = await asyncio.gather(*(ask(h) for h in entries))
        return {h: r for h, r in zip(entries, answers, strict=True) if r is not None}

    async def admit(
        self, cluster: Cluster, kernel_id: str, username: str, entries: list[str], limit: int, timeout: float
    ) -> None:
        """max_kernels_per_user: count the user's kernels on every host (and this gateway's launches still
        starting); PermissionError saying how many run and where when this start would pass `limit`."""
        earlier = self.user_launches.begin(kernel_id, username)

        async def inventory(entry: str) -> str:
            if why := cluster.health.quarantined(entry):  # known down: not waited for again
                raise SshError(why)
            return (await (await cluster.host(entry)).arun(limits.USER_INVENTORY, timeout=timeout)).stdout

        running, unknown = await limits.running_for(username, entries, inventory)
        running = {h: [k for k in ids if k != kernel_id] for h, ids in running.items()}
        starting = [k for k in earlier if not any(k in ids for ids in running.values())]
        if message := limits.refusal(username, limit, running, starting):
            raise PermissionError(message)
        if unknown:
            self.log.warning("kernels of %s not counted on hosts that did not answer: %s", username, "; ".join(unknown))

    # -- cleanups owed to hosts that could not be reached --
    async def ensure_reaper(self, cluster: Cluster, base: float, probe_timeout: float) -> None:
        """Retry the cluster's owed cleanups until each host answers: one task per cluster and event loop."""
        state = await self.loop_state()
        task = state.reapers.get(id(cluster))
        if task is None or task.done():
            state.reapers[id(cluster)] = asyncio.ensure_future(self._reap(cluster, base, probe_timeout))

    async def _reap(self, cluster: Cluster, base: float, probe_timeout: float) -> None:
        while cluster.health.owed:
            await asyncio.sleep(max(0.5, base / 2))
            for entry in [h for h in list(cluster.health.owed) if not cluster.health.quarantined(h)]:
                await cluster.probe(entry, probe_timeout, base)
