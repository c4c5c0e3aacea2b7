"""`DistributedProvisioner`: the life of one kernel on a pool of hosts, from start request to cleanup.

Each hook's docstring names its caller in jupyter_client, as `provisioner_base.py` does. The hooks delegate:
the request is judged by `request.LaunchRequest`, hosts are chosen by `placement`, reached through the
process-wide `gateway.Gateway` (SSH pools, callback server, health), the kernel is started by the quoted launch
script of `remote`, and talked to through its control listener (`control`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import signal
import time
from typing import Any

import paramiko
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase

from . import engines, tunnel, yarn
from .callback import public_key_b64
from .config import GatewayOptions
from .control import ControlChannel, ControlError, ControlFailed, ControlRefused, poll_lease
from .errors import ProvisionerError
from .gateway import HOST_ERRORS, Cluster, Gateway
from .hosts import Host
from .hostvalues import ReportRefused, as_user, check_report
from .placement import PlacementError
from .protocol import INFO_MAX_WAIT, PORT_NAMES
from .remote import LaunchHandle, launch_script
from .request import LaunchRequest
from .spark import spec_master
from .sparkwatch import SparkWatch
from .ssh import SshError

__all__ = ["DistributedProvisioner", "ProvisionerError"]


class HostUnavailable(Exception):
    """The host could not be used at all (SSH failed before the kernel started): another host may be tried."""


class DistributedProvisioner(GatewayOptions, KernelProvisionerBase):  # type: ignore[misc]
    """Launches kernels on remote hosts over SSH (or on this machine without SSH). Options: `config.py`."""

    # -- state of the kernel this instance manages (all of it in get_provisioner_info) --
    host: str | None = None
    pid: int | None = None
    pgid: int | None = None
    hostname: str | None = None
    listener: tuple[str, int, str] | None = None  # address, port, secret
    remote_connection_file: str | None = None
    log_file: str | None = None
    run_user: str | None = None  # impersonated kernels: host commands on the kernel's reported values run as them
    launched_pid: int | None = None  # what the launch shell printed: the session and process group it created
    remote_ports: dict[str, int] | None = None  # tunnelled kernels: the ports on the host behind the local forwards
    _restart_host: str | None = None
    _exit_status: int | None = None
    _unreachable_since: float | None = None
    _tunnels: tunnel.Tunnels | None = None
    _control: ControlChannel | None = None
    _cluster: tuple[Gateway, Cluster] | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skipped: list[str] = []  # hosts passed over for this kernel, and why
        self.spark_watch = SparkWatch(self)

    # ------------------------------------------------------------------ plumbing
    @property
    def gateway(self) -> Gateway:
        return Gateway.instance()

    @property
    def cluster(self) -> Cluster:
        """The hosts as this kernel's SSH settings reach them (kernelspecs may differ in SSH settings)."""
        gateway = self.gateway
        if self._cluster is None or self._cluster[0] is not gateway:  # settled once per gateway (reset in tests)
            self._cluster = (gateway, gateway.cluster(self.ssh_settings()))
        return self._cluster[1]

    async def _host(self, entry: str) -> Host:
        return await self.cluster.host(entry)

    def _host_failed(self, entry: str, reason: str) -> None:
        self.cluster.failed(entry, reason, self.host_quarantine)

    async def _run_on(self, entry: str, command: str, timeout: float = 10.0) -> Any:
        """Run a command we built (ints and quoted paths only) on a host that is not quarantined."""
        if why := self.cluster.health.quarantined(entry):
            raise SshError(why)
        return await (await self._host(entry)).arun(command, timeout)

    # ------------------------------------------------------------------ launch
    @property
    def has_process(self) -> bool:
        """Whether a kernel is running under this provisioner. KernelManager asserts it after launch_kernel()."""
        return self.pid is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by KernelManager.pre_start_kernel(): the kernel command with Jupyter's placeholders filled in
        (ours, `{response_address}` and the like, are filled per host in launch_kernel)."""
        km = self.parent
        extra = kwargs.pop("extra_arguments", [])
        cmd = km.format_kernel_cmd(extra_arguments=extra) if km else self.kernel_spec.argv + extra
        return await super().pre_launch(cmd=cmd, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by KernelManager.launch_kernel(): judge the request, place it, start it, return its connection.

        Every 400/403 is raised before any host is touched; a host that cannot be used is skipped (and
        quarantined) unless the kernel is pinned or restarting in place.
        """
        request = LaunchRequest.build(self.kernel_id, self.kernel_spec, kwargs.get("env") or {}, cmd, self)
        if request.spark_mode == "connect":  # the kernel goes to its Spark Connect engine's host (engines.py)
            request = await engines.place_request(self, request, cmd)
        self.gateway.kernel_ids.add(self.kernel_id)
        if self._yarn:  # the gateway's first YARN kernel: orphans of an earlier run are killed (yarn.Sweeps)
            self.gateway.yarn_sweeps.on_launch(
                self.kernel_spec.env, self.yarn_gateway_id, self.gateway.kernel_ids, self.log
            )
        try:
            if self.max_kernels_per_user > 0:
                try:
                    await self.gateway.admit(
                        self.cluster, self.kernel_id, request.username, self.remote_hosts, self.max_kernels_per_user,
                        timeout=self.ssh_connect_timeout + 5,
                    )  # fmt: skip
                except PermissionError as exc:
                    raise ProvisionerError(403, str(exc)) from None
            return await self._start(request, cmd, kwargs)
        except BaseException:
            self.gateway.kernel_ids.discard(self.kernel_id)  # no kernel of this id runs (YARN reconciliation)
            raise
        finally:
            self.gateway.user_launches.end(self.kernel_id)  # admitted: the hosts now show it, or not

    async def _start(self, request: LaunchRequest, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        """Place the kernel and start it, moving on to another host when one cannot be used at all."""
        sticky = bool(self._restart_host and self.restart_same_host)
        tried: set[str] = set()
        self.skipped = []
        selector = self.gateway.selector
        while True:
            entry = await self._place(request.pinned, tried)
            selector.launching(entry, self.kernel_id)
            self.host = entry
            try:
                connection = await self._launch_on(entry, cmd, request, kwargs)
            except HostUnavailable as exc:
                selector.launched(entry, self.kernel_id, ok=False)
                self.host = None
                self._host_failed(entry, str(exc))
                self.skipped.append(f"{entry}: {exc}")
                if request.pinned or sticky:
                    raise ProvisionerError(503, f"cannot start a kernel on {entry}: {exc}") from None
                tried.add(entry)
                continue
            except BaseException:
                selector.launched(entry, self.kernel_id, ok=False)
                self.host = None
                raise
            selector.launched(entry, self.kernel_id)
            if self.skipped:
                self.log.info("kernel %s placed on %s; skipped: %s", self.kernel_id, entry, "; ".join(self.skipped))
            return connection

    async def _place(self, pinned: str | None, tried: set[str]) -> str:
        """A host for this launch: the restart's host, the pin, or the algorithm's pick among healthy hosts."""
        if self._restart_host and self.restart_same_host:
            entry, self._restart_host = self._restart_host, None
            return entry
        if pinned:
            return pinned
        try:
            return await self.gateway.choose_host(
                self.cluster, self.remote_hosts, self.load_balancing_algorithm, tried, self.skipped,
                probe_timeout=self.ssh_connect_timeout, quarantine=self.host_quarantine,
            )  # fmt: skip
        except PlacementError as exc:
            raise ProvisionerError(503, str(exc)) from None

    async def _launch_on(
        self, entry: str, cmd: list[str], request: LaunchRequest, kwargs: dict[str, Any]
    ) -> KernelConnectionInfo:
        tunneled = False
        try:
            host = await self._host(entry)
            tunneled = self.enable_tunneling and not host.local
            response_address = await self.gateway.response_address(host, tunneled, self)
        except (SshError, paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnavailable(str(exc)) from None
        state = await self.gateway.loop_state()
        token = secrets.token_hex(32)
        values = {
            "kernel_id": self.kernel_id,
            "port_range": request.port_range,
            "response_address": response_address,
            "public_key": public_key_b64(await self.gateway.private_key()),
        }
        argv = [re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), arg) for arg in cmd]
        log_dir = self.kernel_log_dir.rstrip("/") or f"/tmp/spark_gateway-{await host.pool.call(host.login)}"
        self.log_file = f"{log_dir}/kernel-{self.kernel_id}.log"
        cwd = kwargs.get("cwd")
        workdir = request.working_dir or (str(cwd) if host.local and cwd else None)  # nbclient passes a Path
        exports = dict(request.exports, GP_KERNEL_LOG_DIR=shlex.quote(log_dir))
        exports["GP_ORPHAN_TIMEOUT"] = shlex.quote(f"{max(0.0, self.orphan_timeout):g}")
        if tunneled:
            exports["GP_KERNEL_IP"] = "127.0.0.1"  # reachable only through the tunnel
        self.run_user = request.run_as
        script = launch_script(
            argv, exports, self.log_file, workdir, self.run_user, private_log_dir=not self.kernel_log_dir, token=token
        )
        payload = state.server.register(self.kernel_id, token)
        started = time.monotonic()
        try:
            handle = await host.launch(script, kwargs.get("env"))
        except (SshError, OSError) as exc:
            state.server.unregister(self.kernel_id)
            raise HostUnavailable(str(exc)) from None
        self.pid = self.pgid = self.launched_pid = handle.pid
        info = await self._await_callback(entry, handle, payload, state.server)
        try:
            check_report(info, self.kernel_id, handle.pid, impersonated=self.run_user is not None)
        except ReportRefused as exc:
            await self._signal_host(entry, signal.SIGKILL, group=True)  # the group the launch created
            self.pid = self.pgid = None
            raise ProvisionerError(500, f"kernel {self.kernel_id} on {entry} was killed: {exc}") from None
        self.log.info(
            "kernel %s running on %s (%s) pid %s, ready in %.2f s",
            self.kernel_id, entry, info.get("hostname"), info.get("pid"), time.monotonic() - started,
        )  # fmt: skip
        connection = self._adopt_payload(info, await host.pool.call(host.address))
        if tunneled:
            connection = await self._tunnel_ports(host, connection)
        await self._until_bound(started + self.launch_timeout)
        await self.spark_watch.start(request.spark_mode)
        return connection

    async def _until_bound(self, deadline: float) -> None:
        """Until the kernel's sockets are bound (control op `ready`), so that its clients connect at their first
        attempt instead of after ZMQ's reconnect interval (100 ms). Only a wait: a listener that cannot be asked
        leaves the kernel to its clients' retries, and a kernel that dies is then found dead like any other."""
        try:
            if not await self._channel().until_bound(deadline, INFO_MAX_WAIT):
                self.log.warning("kernel %s: sockets still not bound at the launch timeout", self.kernel_id)
        except ControlError as exc:
            self.log.warning("kernel %s: cannot ask whether its ports are bound (%s)", self.kernel_id, exc)

    async def _await_callback(
        self, entry: str, handle: LaunchHandle, payload: asyncio.Future, server: Any
    ) -> dict[str, Any]:
        died = asyncio.ensure_future(handle.exited())
        deadline = time.monotonic() + self.launch_timeout
        try:
            waiting = {payload, died}
            while True:
                done, _ = await asyncio.wait(
                    waiting, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
                )
                if payload in done:
                    return payload.result()
                if died not in done:
                    break  # launch_timeout
                outcome = died.result()
                if outcome.status is None:  # only the SSH watch broke: the kernel may still call back
                    waiting = {payload}
                    continue
                raise ProvisionerError(
                    500,
                    f"kernel {self.kernel_id} died on {entry} before reporting its connection info "
                    f"(exit status {outcome.status}). Last lines of {self.log_file} there:\n{outcome.tail}",
                )
            await self._signal_host(entry, signal.SIGKILL, group=True)
            tail = await self._log_tail(entry)
            raise ProvisionerError(
                500,
                f"kernel {self.kernel_id} on {entry} sent no connection info within launch_timeout="
                f"{self.launch_timeout:g} s; it was killed. Check that {entry} can reach the gateway's response "
                f"address, or raise GP_LAUNCH_TIMEOUT. Last lines of {self.log_file} there:\n{tail}",
            )
        except BaseException:
            server.unregister(self.kernel_id)
            self.pid = self.pgid = None
            raise
        finally:
            handle.detach()
            died.cancel()

    def _adopt_payload(self, info: dict[str, Any], ip: str) -> KernelConnectionInfo:
        conn = dict(info["connection_info"])
        conn["ip"] = ip
        conn["key"] = conn["key"].encode() if isinstance(conn["key"], str) else conn["key"]
        self.pid, self.pgid, self.hostname = info["pid"], info["pgid"], info.get("hostname")
        self.listener = (ip, int(info["listener_port"]), info["listener_secret"])
        self.remote_connection_file = info.get("connection_file")
        self._exit_status = None
        self.connection_info = conn
        return conn

    async def _tunnel_ports(self, host: Host, conn: KernelConnectionInfo) -> KernelConnectionInfo:
        """Forward the kernel's ports and its listener to local ports; clients then connect to 127.0.0.1."""
        assert self.listener is not None
        if self.remote_ports is None:  # the ports as the kernel bound them on its host
            self.remote_ports = {name: int(conn[name]) for name in PORT_NAMES} | {"listener": self.listener[1]}
        self._tunnels = tunnel.Tunnels(await host.pool.call(host.transport))
        forwarded = {name: self._tunnels.forward(self.remote_ports[name]) for name in PORT_NAMES}
        conn = dict(conn, ip="127.0.0.1") | forwarded
        self.listener = ("127.0.0.1", self._tunnels.forward(self.remote_ports["listener"]), self.listener[2])
        self.connection_info = conn
        return conn

    async def _log_tail(self, entry: str) -> str:
        try:
            res = await self._run_on(entry, f"tail -n 30 {shlex.quote(self.log_file or '')}")
            return res.stdout.strip()
        except HOST_ERRORS as exc:
            return f"(log unavailable: {exc})"

    # ------------------------------------------------------------------ talking to the running kernel
    async def control(self, op: str, args: dict[str, Any] | None = None, timeout: float = 3.0) -> dict[str, Any]:
        """One authenticated request to the kernel's control listener (raises ControlError)."""
        return await self._channel().request(op, args, timeout=timeout)

    def _channel(self) -> ControlChannel:
        """The kept connection to the kernel's listener as now known (a restart or a tunnel changes it)."""
        if self.listener is None:
            raise ControlError("no control listener is known for this kernel")
        if self._control is None or self._control.address != self.listener:
            self._close_control()
            self._control = ControlChannel(*self.listener)
        return self._control

    async def _control_vouches(self) -> bool:
        """The kept control connection proves the kernel alive (ControlChannel.vouches) within its lease."""
        channel = self._control
        lease = poll_lease(self.unreachable_grace, self.orphan_timeout)
        return channel is not None and channel.address == self.listener and await channel.vouched(lease)

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    async def _signal_host(self, entry: str, signum: int, group: bool) -> bool:
        """Signal the kernel over SSH (or locally); True when the process (group) existed."""
        # `kill -N -PGID`, never `kill -N -- -PGID`: dash's kill reads "--" as a pid and signals nothing
        target = f"-{int(self.pgid or 0)}" if group else str(int(self.pid or 0))
        if self.cluster.health.quarantined(entry):
            return False
        try:
            res = await self._run_on(entry, as_user(f"kill -{int(signum)} {target}", self.run_user))
        except HOST_ERRORS as exc:
            self.log.warning("cannot signal kernel %s on %s: %s", self.kernel_id, entry, exc)
            self._host_failed(entry, str(exc) or type(exc).__name__)
            return False
        return res.status == 0

    async def poll(self) -> int | None:
        """Called by KernelManager.is_alive() (the restarter, jupyter_server's activity checks): None while the
        kernel runs. A silent host is given `unreachable_grace` before the kernel is reported lost."""
        if self.pid is None or self.host is None:
            return 0 if self._exit_status is None else self._exit_status
        try:
            if not await self._control_vouches():
                await self.control("poll", timeout=2.0)
            self._unreachable_since = None
            return None
        except ControlError:
            pass
        alive = await self._alive_on_host(self.host)
        if alive is None:  # neither the listener nor the host answers: lost only after a grace period
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since < self.unreachable_grace:
                return None
            self.log.warning(
                "kernel %s: %s unreachable for %.0f s; reporting the kernel lost", self.kernel_id, self.host,
                now - self._unreachable_since,
            )  # fmt: skip
        elif alive:
            self._unreachable_since = None
            return None
        self._exit_status = 1
        return 1

    async def _alive_on_host(self, entry: str) -> bool | None:
        """Ask the host whether the kernel process runs (a zombie awaiting its reaper does not); None: no answer."""
        if self.cluster.health.quarantined(entry):
            return None
        try:
            check = f"ps -o stat= -p {int(self.pid or 0)} | grep -q '^[^Z]'"
            res = await self._run_on(entry, as_user(check, self.run_user))
        except HOST_ERRORS as exc:
            self.log.warning("cannot reach %s to check kernel %s: %s", entry, self.kernel_id, exc)
            self._host_failed(entry, str(exc) or type(exc).__name__)
            return None
        return res.status == 0

    async def wait(self) -> int | None:
        """Called by KernelManager.finish_shutdown() and the restarter: until poll() reports an exit status."""
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.05)
        return status

    async def send_signal(self, signum: int) -> None:
        """Called by KernelManager.signal_kernel() (interrupt_mode "signal"): through the kernel's listener."""
        if signum == 0:
            await self.poll()
            return
        await self._deliver(int(signum), group=False)

    async def terminate(self, restart: bool = False) -> None:
        """Called by KernelManager.finish_shutdown() when the kernel did not exit on request: SIGTERM its group."""
        await self._deliver(signal.SIGTERM, group=True)

    async def kill(self, restart: bool = False) -> None:
        """Called by KernelManager.kill_kernel() (shutdown now=True, restart, or after terminate): SIGKILL."""
        await self._deliver(signal.SIGKILL, group=True)

    async def _deliver(self, signum: int, group: bool) -> None:
        if self.pid is None or self.host is None:
            return
        try:
            await self.control("signal", {"signum": signum, "group": group})
        except ControlRefused as exc:  # e.g. an interrupt the kernel would mishandle: not sent, and the client is told
            if getattr(self.parent, "shutting_down", False):  # shutdown and restart interrupt first: moot then
                self.log.debug("kernel %s: signal %d not sent while shutting down: %s", self.kernel_id, signum, exc)
                return
            self.log.warning("kernel %s: signal %d not sent: %s", self.kernel_id, signum, exc)
            raise ProvisionerError(409, f"kernel {self.kernel_id} was not sent signal {signum}: {exc}") from None
        except ControlFailed as exc:  # the listener's own checks said no: never bypassed with a raw signal over SSH
            self.log.warning("kernel %s: signal %d failed at its listener: %s", self.kernel_id, signum, exc)
            if signum not in (signal.SIGTERM, signal.SIGKILL):  # shutdown goes on: cleanup kills the group
                raise ProvisionerError(500, f"kernel {self.kernel_id} was not sent signal {signum}: {exc}") from None
        except ControlError as exc:
            self.log.warning("control listener of %s unreachable (%s); signalling over SSH", self.kernel_id, exc)
            await self._signal_host(self.host, signum, group)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager.cleanup_resources() after the kernel ended: nothing of it is left on its host
        (no process of its group, no connection file); a host that cannot be reached is owed the cleanup."""
        entry = self.host
        if entry is None:
            return
        if self.pgid is not None:
            files = " ".join(shlex.quote(f) for f in (self.remote_connection_file,) if f)
            groups = " ".join(f"-{int(g)}" for g in dict.fromkeys((self.pgid, self.launched_pid)) if g)
            command = as_user(f"kill -9 {groups} 2>/dev/null; {'rm -f ' + files if files else 'true'}", self.run_user)
            try:
                await self._run_on(entry, command)
            except HOST_ERRORS as exc:
                self.log.warning(
                    "cleanup of kernel %s on %s failed (%s); it will run when the host answers again",
                    self.kernel_id, entry, exc,
                )  # fmt: skip
                self.cluster.health.owe(entry, command)
                await self.gateway.ensure_reaper(self.cluster, self.host_quarantine, self.ssh_connect_timeout)
        if self._tunnels is not None:
            self._tunnels.close()
            self._tunnels = None
        self.remote_ports = None
        self.spark_watch.stop()
        self.gateway.kernel_ids.discard(self.kernel_id or "")
        if self._yarn:
            await yarn.reconcile_for(self.kernel_spec.env, self.gateway.kernel_ids, self.yarn_gateway_id, self.log)
        self._restart_host = entry if restart else None
        self._close_control()
        self.host = self.pid = self.pgid = self.listener = self.launched_pid = None

    # ------------------------------------------------------------------ persistence
    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called by whoever persists kernel sessions (e.g. a jupyter_server kernel manager): all this kernel's
        state, JSON-serialisable."""
        info = await super().get_provisioner_info()
        conn = dict(info.get("connection_info") or {})
        if isinstance(conn.get("key"), bytes):
            conn["key"] = conn["key"].decode()
        info.update(
            connection_info=conn,
            host=self.host,
            hostname=self.hostname,
            pid=self.pid,
            pgid=self.pgid,
            listener=list(self.listener) if self.listener else None,
            connection_file=self.remote_connection_file,
            log_file=self.log_file,
            spark=self.spark_watch.report,
            skipped=self.skipped,
            remote_ports=self.remote_ports,
            launched_pid=self.launched_pid,
            run_user=self.run_user,
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Called by whoever restores kernel sessions, before the kernel is used: adopt a running kernel (a new
        gateway process rebuilds its tunnels)."""
        await super().load_provisioner_info(provisioner_info)
        conn = dict(self.connection_info or {})
        if isinstance(conn.get("key"), str):
            conn["key"] = conn["key"].encode()
        self.connection_info = conn
        self.host = provisioner_info["host"]
        self.hostname = provisioner_info.get("hostname")
        self.pid, self.pgid = provisioner_info["pid"], provisioner_info["pgid"]
        listener = provisioner_info.get("listener")
        self.listener = (listener[0], int(listener[1]), listener[2]) if listener else None
        self.remote_connection_file = provisioner_info.get("connection_file")
        self.log_file = provisioner_info.get("log_file")
        self.spark_watch.report = provisioner_info.get("spark")
        self.skipped = provisioner_info.get("skipped", [])
        self.remote_ports = provisioner_info.get("remote_ports")
        self.launched_pid, self.run_user = provisioner_info.get("launched_pid"), provisioner_info.get("run_user")
        self.gateway.kernel_ids.add(self.kernel_id)  # a restored kernel runs: its YARN application is not an orphan
        if self._tunnels is not None:  # a previous attempt's forwards
            self._tunnels.close()
            self._tunnels = None
        if self.remote_ports and self.host:  # tunnelled: the old gateway's local ports died with it
            await self._tunnel_ports(await self._host(self.host), self.connection_info)

    async def probe(self) -> str:
        """Called by whoever restores kernel sessions, after load_provisioner_info(): "alive", "gone", or
        "unreachable" (neither the listener nor the host answers)."""
        try:
            await self.control("poll", timeout=3.0)
            return "alive"
        except ControlError:
            alive = await self._alive_on_host(self.host or "")
        return "unreachable" if alive is None else "alive" if alive else "gone"

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        """Called by the restarter: a kernel is stable once it has lived this long (at least launch_timeout)."""
        return max(recommended, self.launch_timeout)

    @property
    def _yarn(self) -> bool:
        return spec_master(str((self.kernel_spec.env or {}).get("SPARK_OPTS", ""))) == "yarn"

    @property
    def spark(self) -> dict[str, Any] | None:
        """The launcher's report on its SparkSession (control op `info`), as last learnt."""
        return self.spark_watch.report
