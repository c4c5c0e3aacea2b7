"""`DistributedProvisioner`: starts kernels on a pool of hosts over SSH and manages their whole life."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import secrets
import shlex
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import paramiko
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from tornado import web
from traitlets import Bool, Float, Integer, List, Set, TraitError, Unicode, default, validate

from . import callback, tunnel
from .control import ControlError, ControlFailed, ControlRefused, control_request
from .hostvalues import ReportRefused, as_user, check_report
from .placement import (
    ALGORITHMS,
    KERNEL_INVENTORY,
    HostReport,
    HostSelector,
    PlacementError,
    check_algorithm,
    parse_hosts,
)
from .remote import LaunchHandle, LaunchScriptError, LocalLaunch, SshLaunch, check_env, launch_script, spec_value
from .spark import SparkOptsError, check_extra_spark_opts, check_username, spec_master
from .ssh import CommandResult, SshError, SshPool, SshSettings, in_thread, is_local, resolve
from .users import UserRefused, authorize

KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
INVENTORY_SHARING = 0.5  # seconds during which launches reuse a host's inventory
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
PLACEHOLDERS = ("kernel_id", "port_range", "response_address", "public_key")
SPARK_MODE_FLAG = "--spark-context-initialization-mode"
SPARK_WATCH_LIMIT = 900.0  # seconds the gateway keeps asking a lazy kernel about its SparkSession


class ProvisionerError(web.HTTPError):
    """A refused or failed kernel start: an HTTP status for REST clients, and a message saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)  # no format args: jupyter_server's API replies carry it verbatim
        self.message = message

    def __str__(self) -> str:
        return self.message


def _env_list(name: str, fallback: list[str]) -> list[str]:
    value = os.environ.get(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else fallback


def _env_bool(name: str, fallback: bool) -> bool:
    return os.environ.get(name, str(fallback)).strip().lower() in ("1", "true", "yes", "on")


def parse_port_range(value: str) -> tuple[int, int]:
    """Validate `lower..upper`: 0..0 (or lower == upper) disables; otherwise 1024-65535 spanning >= 1000 ports."""
    m = re.fullmatch(r"\s*(\d+)\s*\.\.\s*(\d+)\s*", value)
    if not m:
        raise ValueError(f"port_range {value!r} is not of the form LOWER..UPPER (e.g. 40000..41000, or 0..0)")
    lower, upper = int(m[1]), int(m[2])
    if lower == upper == 0 or (lower == upper and 1024 <= lower <= 65535):
        return 0, 0
    if not (1024 <= lower < upper <= 65535):
        raise ValueError(f"port_range {value!r}: ports must lie within 1024..65535 with LOWER < UPPER")
    if upper - lower < 1000:
        raise ValueError(f"port_range {value!r} spans {upper - lower} ports; it must span at least 1000")
    return lower, upper


def check_port_range_narrows(operator: str, client: str) -> None:
    """A client's KERNEL_PORT_RANGE must be a valid range inside the operator's port_range (any, when 0..0)."""
    low, high = parse_port_range(operator)
    lower, upper = parse_port_range(client)
    if (low, high) != (0, 0) and not (low <= lower and upper <= high and (lower, upper) != (0, 0)):
        raise ValueError(
            f"KERNEL_PORT_RANGE {client!r} must lie within the gateway's port_range {low}..{high}: "
            "a client may narrow the range, never leave it"
        )


def _trait_checked(check: Any, value: Any) -> Any:
    """Run a validator, turning its ValueError into the TraitError traitlets reports."""
    try:
        return check(value)
    except ValueError as exc:
        raise TraitError(str(exc)) from None


@dataclass
class _Gateway:
    """Per event loop: the response server and the addresses it listens on."""

    server: callback.ResponseServer
    ports: dict[str, int] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reaper: asyncio.Task | None = None
    inventories: dict[tuple[int, str], tuple[float, asyncio.Future]] = field(default_factory=dict)


_gateways: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gateway] = weakref.WeakKeyDictionary()
_pools: dict[tuple, SshPool] = {}
_selector = HostSelector()


class HostUnavailable(Exception):
    """The host could not be used at all (SSH failed before the kernel started): another host may be tried."""


_key_pair: Any = None
_key_lock = threading.Lock()


def _load_key() -> Any:
    """The gateway's RSA key pair: one per process, generated once even when many launches ask at once."""
    global _key_pair
    with _key_lock:
        if _key_pair is None:
            _key_pair = callback.generate_key_pair()
    return _key_pair


async def _private_key() -> Any:
    return _key_pair if _key_pair is not None else await in_thread(_load_key)


class DistributedProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Launches kernels on remote hosts over SSH (or on this machine without SSH)."""

    remote_hosts = List(
        Unicode(),
        config=True,
        help="Hosts kernels may run on: host, host:port or an ssh_config alias (GP_REMOTE_HOSTS, comma-separated).",
    )
    load_balancing_algorithm = Unicode(
        config=True, help=f"One of {', '.join(ALGORITHMS)} (GP_LOAD_BALANCING_ALGORITHM)."
    )
    launch_timeout = Float(config=True, help="Seconds to wait for the kernel's connection info (GP_LAUNCH_TIMEOUT).")
    port_range = Unicode(config=True, help="Kernel ports: LOWER..UPPER, or 0..0 for any (GP_PORT_RANGE).")
    authorized_users = Set(Unicode(), config=True, help="KERNEL_USERNAMEs allowed (GP_AUTHORIZED_USERS); empty: all.")
    unauthorized_users = Set(Unicode(), config=True, help="KERNEL_USERNAMEs refused (GP_UNAUTHORIZED_USERS).")
    remote_user = Unicode(config=True, help="SSH user; default: ssh_config's User, else ours (GP_REMOTE_USER).")
    remote_pwd = Unicode(config=True, help="SSH password, when keys are not used (GP_REMOTE_PWD).")
    remote_gss_ssh = Bool(config=True, help="Use GSSAPI (Kerberos) for SSH (GP_REMOTE_GSS_SSH).")
    ssh_port = Integer(config=True, help="SSH port when neither the entry nor ssh_config gives one (GP_SSH_PORT).")
    ssh_config_file = Unicode(config=True, help="OpenSSH client config to honour (GP_SSH_CONFIG_FILE).")
    ssh_connect_timeout = Float(config=True, help="Seconds to reach a host over SSH (GP_SSH_CONNECT_TIMEOUT).")
    response_ip = Unicode(config=True, help="Address kernels call back to; default: ours as seen by the host.")
    response_port = Integer(config=True, help="First port tried for the callback server (GP_RESPONSE_PORT).")
    response_port_retries = Integer(config=True, help="Further ports tried (GP_RESPONSE_PORT_RETRIES).")
    response_addr_any = Bool(config=True, help="Listen for callbacks on all interfaces (GP_RESPONSE_ADDR_ANY).")
    prohibited_local_ips = List(Unicode(), config=True, help="Never hand these out (GP_PROHIBITED_LOCAL_IPS).")
    kernel_log_dir = Unicode(
        config=True,
        help="Directory of kernel-<id>.log on each host (GP_KERNEL_LOG_DIR); default: /tmp/spark_gateway-<SSH user>, "
        "a 0700 directory of the gateway's SSH account.",
    )
    restart_same_host = Bool(True, config=True, help="Restart a kernel on the host it ran on.")
    enable_tunneling = Bool(
        config=True, help="Kernel ports, control and callback all through the SSH connection (GP_ENABLE_TUNNELING)."
    )
    unreachable_grace = Float(
        config=True, help="Seconds a kernel's host may stay silent before it is reported lost (GP_UNREACHABLE_GRACE)."
    )
    host_quarantine = Float(
        config=True, help="Seconds a failed host is left alone, doubling per failure up to 300 (GP_HOST_QUARANTINE)."
    )

    @default("enable_tunneling")
    def _tunneling_default(self) -> bool:
        return _env_bool("GP_ENABLE_TUNNELING", False)

    @default("unreachable_grace")
    def _grace_default(self) -> float:
        return float(os.environ.get("GP_UNREACHABLE_GRACE", "30"))

    @default("host_quarantine")
    def _quarantine_default(self) -> float:
        return float(os.environ.get("GP_HOST_QUARANTINE", "5"))

    impersonation_enabled = Bool(
        config=True,
        help="Run kernels as KERNEL_USERNAME: sudo -n -u for every spec, plus --proxy-user for YARN Spark specs "
        "(GP_IMPERSONATION_ENABLED).",
    )

    @default("remote_hosts")
    def _remote_hosts_default(self) -> list[str]:
        return _trait_checked(parse_hosts, _env_list("GP_REMOTE_HOSTS", ["localhost"]))

    @default("load_balancing_algorithm")
    def _lb_default(self) -> str:
        return _trait_checked(check_algorithm, os.environ.get("GP_LOAD_BALANCING_ALGORITHM", "round-robin"))

    @default("launch_timeout")
    def _launch_timeout_default(self) -> float:
        return float(os.environ.get("GP_LAUNCH_TIMEOUT", "30"))

    @default("port_range")
    def _port_range_default(self) -> str:
        value = os.environ.get("GP_PORT_RANGE", "0..0")
        _trait_checked(parse_port_range, value)
        return value

    @default("authorized_users")
    def _authorized_default(self) -> set[str]:
        return set(_env_list("GP_AUTHORIZED_USERS", []))

    @default("unauthorized_users")
    def _unauthorized_default(self) -> set[str]:
        return set(_env_list("GP_UNAUTHORIZED_USERS", ["root"]))

    @default("remote_user")
    def _remote_user_default(self) -> str:
        return os.environ.get("GP_REMOTE_USER", "")

    @default("remote_pwd")
    def _remote_pwd_default(self) -> str:
        return os.environ.get("GP_REMOTE_PWD", "")

    @default("remote_gss_ssh")
    def _gss_default(self) -> bool:
        return _env_bool("GP_REMOTE_GSS_SSH", False)

    @default("ssh_port")
    def _ssh_port_default(self) -> int:
        return int(os.environ.get("GP_SSH_PORT", "22"))

    @default("ssh_config_file")
    def _ssh_config_default(self) -> str:
        return os.environ.get("GP_SSH_CONFIG_FILE", "~/.ssh/config")

    @default("ssh_connect_timeout")
    def _connect_timeout_default(self) -> float:
        return float(os.environ.get("GP_SSH_CONNECT_TIMEOUT", "5"))

    @default("response_ip")
    def _response_ip_default(self) -> str:
        return os.environ.get("GP_RESPONSE_IP", "")

    @default("response_port")
    def _response_port_default(self) -> int:
        return int(os.environ.get("GP_RESPONSE_PORT", "8877"))

    @default("response_port_retries")
    def _response_retries_default(self) -> int:
        return int(os.environ.get("GP_RESPONSE_PORT_RETRIES", "10"))

    @default("response_addr_any")
    def _addr_any_default(self) -> bool:
        return _env_bool("GP_RESPONSE_ADDR_ANY", False)

    @default("prohibited_local_ips")
    def _prohibited_default(self) -> list[str]:
        return _env_list("GP_PROHIBITED_LOCAL_IPS", [])

    @default("kernel_log_dir")
    def _log_dir_default(self) -> str:
        return os.environ.get("GP_KERNEL_LOG_DIR", "")

    @default("impersonation_enabled")
    def _impersonation_default(self) -> bool:
        return _env_bool("GP_IMPERSONATION_ENABLED", False)

    @validate("load_balancing_algorithm")
    def _check_algorithm(self, proposal: Any) -> str:
        return _trait_checked(check_algorithm, proposal["value"])

    @validate("remote_hosts")
    def _check_hosts(self, proposal: Any) -> list[str]:
        return _trait_checked(parse_hosts, proposal["value"])

    @validate("port_range")
    def _check_port_range(self, proposal: Any) -> str:
        _trait_checked(parse_port_range, proposal["value"])
        return proposal["value"]

    # -- state of the kernel this instance manages (all of it in get_provisioner_info) --
    skipped: list[str] = []  # hosts passed over for this kernel, and why
    host: str | None = None
    pid: int | None = None
    pgid: int | None = None
    hostname: str | None = None
    listener: tuple[str, int, str] | None = None  # address, port, secret
    remote_connection_file: str | None = None
    run_user: str | None = None  # impersonated kernels: host commands on the kernel's reported values run as them
    launched_pid: int | None = None  # what the launch shell printed: the session and process group it created
    log_file: str | None = None
    spark: dict[str, Any] | None = None  # the launcher's report on its SparkSession (control op `info`)
    _spark_watch: asyncio.Future | None = None
    _restart_host: str | None = None
    _launch: LaunchHandle | None = None
    _exit_status: int | None = None
    _unreachable_since: float | None = None
    _tunnels: tunnel.Tunnels | None = None
    remote_ports: dict[str, int] | None = None  # tunnelled kernels: the ports on the host behind the local forwards

    # ------------------------------------------------------------------ plumbing
    @property
    def pool(self) -> SshPool:
        settings = SshSettings(
            config_file=self.ssh_config_file,
            port=self.ssh_port,
            user=self.remote_user,
            password=self.remote_pwd,
            gss_auth=self.remote_gss_ssh,
            connect_timeout=self.ssh_connect_timeout,
        )
        key = tuple(sorted(vars(settings).items(), key=lambda kv: kv[0]))
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in key)
        if key not in _pools:
            _pools[key] = SshPool(settings)
        return _pools[key]

    def _ssh_user(self, host: str) -> str:
        """The account commands run as on `host`: the SSH login (ours when the host is this machine)."""
        return getpass.getuser() if self._is_local(host) else resolve(host, self.pool.settings).user

    def _is_local(self, host: str) -> bool:
        return is_local(host, self.pool.settings)

    async def _run_on_host(self, host: str, command: str, timeout: float = 10.0) -> CommandResult:
        """Run a command we built (ints and quoted paths only) on `host`."""
        if self._is_local(host):
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
            return CommandResult(proc.returncode or 0, out.decode(), err.decode())
        return await in_thread(self.pool.run, host, command, b"", timeout)

    async def _gateway(self) -> _Gateway:
        key = await _private_key()
        loop = asyncio.get_running_loop()
        if loop not in _gateways:  # no await between this check and the assignment: one server per loop
            _gateways[loop] = _Gateway(callback.ResponseServer(key))
        return _gateways[loop]

    async def _response_address(self, host: str) -> str:
        """An address of ours that `host` can reach, with our callback server listening on it."""
        if self.response_ip:
            address = self.response_ip
        elif self._is_local(host):
            address = "127.0.0.1"
        else:
            address = await in_thread(self.pool.local_address, host) or ""
            if not address:
                raise ProvisionerError(
                    500, f"cannot tell which address {host} reaches this gateway at (ProxyJump?): set GP_RESPONSE_IP"
                )
        if address in self.prohibited_local_ips:
            raise ProvisionerError(
                500,
                f"the gateway address {host} would call back to ({address}) is in GP_PROHIBITED_LOCAL_IPS: "
                "set GP_RESPONSE_IP to an address that host can reach",
            )
        port = await self._listen("0.0.0.0" if self.response_addr_any else address)
        host_part = f"[{address}]" if ":" in address else address
        return f"{host_part}:{port}"

    async def _listen(self, bind: str) -> int:
        """The port our callback server listens on at `bind`, listening there first if need be."""
        gateway = await self._gateway()
        async with gateway.lock:
            if bind not in gateway.ports:
                first = next(iter(gateway.ports.values()), self.response_port)
                gateway.ports[bind] = await gateway.server.listen(bind, first, self.response_port_retries)
        return gateway.ports[bind]

    async def _tunneled_response_address(self, host: str) -> str:
        """A port on the host's loopback that the pooled connection forwards to our callback server."""
        local = await self._listen("127.0.0.1")
        transport = (await in_thread(self.pool.client, host)).get_transport()
        return f"127.0.0.1:{await in_thread(tunnel.callback_forward, transport, local)}"

    # ------------------------------------------------------------------ launch
    @property
    def has_process(self) -> bool:
        return self.pid is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        extra = kwargs.pop("extra_arguments", [])
        cmd = km.format_kernel_cmd(extra_arguments=extra) if km else self.kernel_spec.argv + extra
        return await super().pre_launch(cmd=cmd, **kwargs)

    def _authorize(self, env: dict[str, str]) -> str:
        """KERNEL_USERNAME checked by the canonical rule of `users.authorize` (400/403 before any host is used)."""
        accounts = {getpass.getuser()}
        if self.impersonation_enabled:  # the SSH logins hold the sudo right (ssh_config is read, no host is used)
            accounts |= {resolve(h, self.pool.settings).user for h in self.remote_hosts}
        try:
            return authorize(
                env.get("KERNEL_USERNAME"),
                default=getpass.getuser(),
                authorized=self.authorized_users,
                unauthorized=self.unauthorized_users,
                impersonating=self.impersonation_enabled,
                gateway_accounts=accounts,
            )
        except UserRefused as exc:
            raise ProvisionerError(exc.status, exc.message) from None

    @staticmethod
    def _check_client_env(env: dict[str, str]) -> None:
        try:
            for name, value in env.items():
                if name.startswith("KERNEL_"):
                    check_env(name, value)
        except LaunchScriptError as exc:
            raise ProvisionerError(400, str(exc)) from None

    def _exports(self, env: dict[str, str], username: str, token: str) -> dict[str, str]:
        """Names to shell words: client KERNEL_* values, then the kernelspec's env rendered against them."""
        values = {k: v for k, v in env.items() if k.startswith("KERNEL_")}
        values.update(KERNEL_ID=self.kernel_id, KERNEL_USERNAME=username)
        self._check_client_env(values)
        words = {name: shlex.quote(value) for name, value in values.items()}
        for name, template in (self.kernel_spec.env or {}).items():
            if name not in values:
                try:
                    check_env(name, str(template))
                except LaunchScriptError as exc:
                    raise ProvisionerError(500, f"kernelspec {self.kernel_spec.display_name!r}: {exc}") from None
                words[name] = spec_value(str(template), values)
        self._spark_exports(values, words, username)
        words["GP_LAUNCH_TOKEN"] = token
        words["GP_KERNEL_LOG_DIR"] = shlex.quote(os.path.dirname(self.log_file or ""))
        return words

    # ------------------------------------------------------------------ placement
    async def _ensure_reaper(self) -> None:
        """Retry cleanups owed to unreachable hosts until each host answers (one task per event loop)."""
        gateway = await self._gateway()
        if gateway.reaper is None or gateway.reaper.done():
            gateway.reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        while self.pool.health.owed:
            await asyncio.sleep(max(0.5, self.host_quarantine / 2))
            for host in [h for h in list(self.pool.health.owed) if not self.pool.health.quarantined(h)]:
                await self._probe(host)

    def _host_failed(self, host: str, reason: str) -> None:
        seconds = self.pool.health.failed(host, reason)
        self.log.warning("host %s is unavailable (%s): left alone for %.0f s", host, reason, seconds)
        self.pool.drop(host)

    async def _probe(self, host: str) -> str | None:
        """Check a host that failed before; run the cleanups it is owed. Returns the failure, if any."""
        try:
            await self._run_on_host(host, "true", timeout=self.ssh_connect_timeout)
        except (SshError, OSError, asyncio.TimeoutError) as exc:
            self._host_failed(host, str(exc))
            return str(exc)
        self.pool.health.recovered(host)
        self.log.info("host %s answers again", host)
        for command in self.pool.health.take_owed(host):
            with contextlib.suppress(SshError, OSError, asyncio.TimeoutError):
                await self._run_on_host(host, command)
        return None

    async def _reports(self, hosts: list[str], skipped: list[str]) -> dict[str, HostReport]:
        """What each host runs and how busy it is, asked over the pooled connections in parallel."""

        gateway = await self._gateway()

        async def inventory(host: str) -> HostReport:
            taken_at = time.monotonic()
            result = await self._run_on_host(host, KERNEL_INVENTORY, timeout=self.ssh_connect_timeout + 5)
            return HostReport.parse(result.stdout, taken_at)

        async def ask(host: str) -> HostReport | None:
            # launches placed at about the same time share one inventory per host
            started, shared = gateway.inventories.get((id(self.pool), host), (0.0, None))
            if shared is None or time.monotonic() - started > INVENTORY_SHARING:
                shared = asyncio.ensure_future(inventory(host))
                gateway.inventories[(id(self.pool), host)] = (time.monotonic(), shared)
            try:
                return await asyncio.shield(shared)
            except (SshError, OSError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
                if not self.pool.health.quarantined(host):
                    self._host_failed(host, str(exc))
                skipped.append(f"{host}: {exc}")
                return None

        answers = await asyncio.gather(*(ask(h) for h in hosts))
        return {h: r for h, r in zip(hosts, answers, strict=True) if r is not None}

    async def _place(self, pinned: str | None, tried: set[str], skipped: list[str]) -> str:
        """A host for this launch: the restart's host, the pin, or the algorithm's pick among healthy hosts."""
        if self._restart_host and self.restart_same_host:
            host, self._restart_host = self._restart_host, None
            return host
        if pinned:
            try:
                return _selector.pin(self.remote_hosts, pinned)
            except PlacementError as exc:
                raise ProvisionerError(403, str(exc)) from None
        usable = []
        for host in self.remote_hosts:
            why = None if host in tried else self.pool.health.quarantined(host)
            if why:
                skipped.append(f"{host}: {why}")
            elif host not in tried:
                usable.append(host)
        suspects = [h for h in usable if self.pool.health.suspect(h)]
        for host, failure in zip(suspects, await asyncio.gather(*(self._probe(h) for h in suspects)), strict=True):
            if failure:
                usable.remove(host)
                skipped.append(f"{host}: {failure}")
        algorithm = self.load_balancing_algorithm
        reports = await self._reports(usable, skipped) if algorithm != "round-robin" else {}
        if not (reports or (usable and algorithm == "round-robin")):
            raise ProvisionerError(503, "no remote host can take the kernel:\n  " + "\n  ".join(skipped))
        if algorithm == "least-connection":
            return _selector.least_connection(reports)
        if algorithm == "least-load":
            return _selector.least_load(reports)
        return _selector.round_robin(self.remote_hosts, usable)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        env: dict[str, str] = kwargs.get("env") or {}
        if not KERNEL_ID.match(self.kernel_id or ""):
            raise ProvisionerError(400, f"kernel id {self.kernel_id!r} is not a valid id (letters, digits, . _ -)")
        username = self._authorize(env)
        self._check_spark_request(env, username)
        port_range = env.get("KERNEL_PORT_RANGE") or self.port_range
        try:
            check_port_range_narrows(self.port_range, port_range)
        except ValueError as exc:
            raise ProvisionerError(400, str(exc)) from None
        self.pool.health.base = self.host_quarantine
        self._check_client_env(env)
        pinned = env.get("KERNEL_REMOTE_HOST") or None
        sticky = bool(self._restart_host and self.restart_same_host)
        tried: set[str] = set()
        self.skipped = []
        while True:
            host = await self._place(pinned, tried, self.skipped)
            _selector.launching(host, self.kernel_id)
            self.host = host
            try:
                connection = await self._launch_on(host, cmd, env, username, port_range, kwargs.get("cwd"))
            except HostUnavailable as exc:
                _selector.launched(host, self.kernel_id, ok=False)
                self.host = None
                self._host_failed(host, str(exc))
                self.skipped.append(f"{host}: {exc}")
                if pinned or sticky:
                    raise ProvisionerError(503, f"cannot start a kernel on {host}: {exc}") from None
                tried.add(host)
                continue
            except BaseException:
                _selector.launched(host, self.kernel_id, ok=False)
                self.host = None
                raise
            _selector.launched(host, self.kernel_id)
            if self.skipped:
                self.log.info("kernel %s placed on %s; skipped: %s", self.kernel_id, host, "; ".join(self.skipped))
            return connection

    async def _launch_on(
        self, host: str, cmd: list[str], env: dict[str, str], username: str, port_range: str, cwd: str | None
    ) -> KernelConnectionInfo:
        local = self._is_local(host)
        tunneled = self.enable_tunneling and not local
        try:
            if tunneled:
                response_address = await self._tunneled_response_address(host)
            else:
                response_address = await self._response_address(host)
        except (SshError, paramiko.SSHException, EOFError) as exc:
            raise HostUnavailable(str(exc)) from None
        gateway = await self._gateway()
        token = secrets.token_hex(32)
        public_key = callback.public_key_b64(await _private_key())
        values = {
            "kernel_id": self.kernel_id,
            "port_range": port_range,
            "response_address": response_address,
            "public_key": public_key,
        }
        argv = [re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), arg) for arg in cmd]
        log_dir = self.kernel_log_dir.rstrip("/") or f"/tmp/spark_gateway-{self._ssh_user(host)}"
        self.log_file = f"{log_dir}/kernel-{self.kernel_id}.log"
        workdir = env.get("KERNEL_WORKING_DIR") or (str(cwd) if local and cwd else None)  # nbclient passes a Path
        exports = self._exports(env, username, token)
        if tunneled:
            exports["GP_KERNEL_IP"] = "127.0.0.1"  # reachable only through the tunnel
        self.run_user = self._run_as(username)
        script = launch_script(
            argv, exports, self.log_file, workdir, self.run_user, private_log_dir=not self.kernel_log_dir
        )
        payload = gateway.server.register(self.kernel_id, token)
        started = time.monotonic()
        try:
            if local:
                handle: LaunchHandle = await LocalLaunch.start(script, env)
            else:
                handle = await SshLaunch.start(self.pool, host, script)
        except (SshError, OSError) as exc:
            gateway.server.unregister(self.kernel_id)
            raise HostUnavailable(str(exc)) from None
        self.pid = self.pgid = self.launched_pid = handle.pid
        info = await self._await_callback(host, handle, payload, gateway)
        try:
            check_report(info, self.kernel_id, handle.pid, impersonated=self.run_user is not None)
        except ReportRefused as exc:
            await self._signal_host(host, signal.SIGKILL, group=True)  # the group the launch created
            self.pid = self.pgid = None
            raise ProvisionerError(500, f"kernel {self.kernel_id} on {host} was killed: {exc}") from None
        self.log.info(
            "kernel %s running on %s (%s) pid %s, ready in %.2f s",
            self.kernel_id,
            host,
            info.get("hostname"),
            info.get("pid"),
            time.monotonic() - started,
        )
        connection = self._adopt_payload(host, info, await self._kernel_ip(host))
        if tunneled:
            connection = await self._tunnel_ports(host, connection)
        await self._start_spark_watch(argv)
        return connection

    async def _await_callback(
        self, host: str, handle: LaunchHandle, payload: asyncio.Future, gateway: _Gateway
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
                    f"kernel {self.kernel_id} died on {host} before reporting its connection info "
                    f"(exit status {outcome.status}). Last lines of {self.log_file} there:\n{outcome.tail}",
                )
            await self._signal_host(host, signal.SIGKILL, group=True)
            tail = await self._log_tail(host)
            raise ProvisionerError(
                500,
                f"kernel {self.kernel_id} on {host} sent no connection info within launch_timeout="
                f"{self.launch_timeout:g} s; it was killed. Check that {host} can reach the gateway's response "
                f"address, or raise GP_LAUNCH_TIMEOUT. Last lines of {self.log_file} there:\n{tail}",
            )
        except BaseException:
            gateway.server.unregister(self.kernel_id)
            self.pid = self.pgid = None
            raise
        finally:
            handle.detach()
            died.cancel()

    async def _kernel_ip(self, host: str) -> str:
        if self._is_local(host):
            return "127.0.0.1"
        return await in_thread(self.pool.peer_address, host)

    def _adopt_payload(self, host: str, info: dict[str, Any], ip: str) -> KernelConnectionInfo:
        conn = dict(info["connection_info"])
        conn["ip"] = ip
        conn["key"] = conn["key"].encode() if isinstance(conn["key"], str) else conn["key"]
        self.pid, self.pgid, self.hostname = info["pid"], info["pgid"], info.get("hostname")
        self.listener = (ip, int(info["listener_port"]), info["listener_secret"])
        self.remote_connection_file = info.get("connection_file")
        self._exit_status = None
        self.connection_info = conn
        return conn

    async def _tunnel_ports(self, host: str, conn: KernelConnectionInfo) -> KernelConnectionInfo:
        """Forward the kernel's ports and its listener to local ports; clients then connect to 127.0.0.1."""
        assert self.listener is not None
        if self.remote_ports is None:  # the ports as the kernel bound them on its host
            self.remote_ports = {name: int(conn[name]) for name in PORT_NAMES} | {"listener": self.listener[1]}
        transport = (await in_thread(self.pool.client, host)).get_transport()
        self._tunnels = tunnel.Tunnels(transport)
        forwarded = {name: self._tunnels.forward(self.remote_ports[name]) for name in PORT_NAMES}
        conn = dict(conn, ip="127.0.0.1") | forwarded
        self.listener = ("127.0.0.1", self._tunnels.forward(self.remote_ports["listener"]), self.listener[2])
        self.connection_info = conn
        return conn

    async def _log_tail(self, host: str) -> str:
        try:
            res = await self._run_on_host(host, f"tail -n 30 {shlex.quote(self.log_file or '')}")
            return res.stdout.strip()
        except (SshError, OSError, asyncio.TimeoutError) as exc:
            return f"(log unavailable: {exc})"

    # ------------------------------------------------------------------ Spark: SPARK_OPTS, impersonation, info
    def _spark_master(self) -> str | None:
        return spec_master(str((self.kernel_spec.env or {}).get("SPARK_OPTS", "")))

    def _check_spark_request(self, values: dict[str, str], username: str) -> None:
        """Refuse (400) malformed or smuggling KERNEL_EXTRA_SPARK_OPTS of Spark specs, before any host is used."""
        extra = values.get("KERNEL_EXTRA_SPARK_OPTS")
        try:
            if extra is not None and "SPARK_OPTS" in (self.kernel_spec.env or {}):
                check_extra_spark_opts(extra)
            if self.impersonation_enabled:
                check_username(username)
        except SparkOptsError as exc:
            raise ProvisionerError(400, str(exc)) from None

    def _spark_exports(self, values: dict[str, str], words: dict[str, str], username: str) -> None:
        """Check the client's Spark options (`_check_spark_request`); add --proxy-user when impersonating YARN."""
        self._check_spark_request(values, username)
        if self.impersonation_enabled:
            words["GP_IMPERSONATION_ENABLED"] = "True"
            if self._spark_master() == "yarn" and "SPARK_OPTS" in words:
                words["SPARK_OPTS"] += shlex.quote(f" --proxy-user {username}")  # a checked name: one token

    def _run_as(self, username: str) -> str | None:
        """Whom `sudo -u` runs the kernel as: KERNEL_USERNAME when impersonating, for every spec (YARN ones too)."""
        return username if self.impersonation_enabled else None

    async def _start_spark_watch(self, argv: list[str]) -> None:
        """Learn the kernel's SparkSession: at once when eager, from a background watch while a lazy one starts."""
        mode = argv[argv.index(SPARK_MODE_FLAG) + 1] if SPARK_MODE_FLAG in argv[:-1] else "none"
        if mode == "none":
            return
        self.spark = {"state": "starting"}
        await self._spark_info(wait=0)
        if self.spark.get("state") == "starting":
            self._spark_watch = asyncio.ensure_future(self._watch_spark())

    async def _watch_spark(self) -> None:
        deadline, misses = time.monotonic() + SPARK_WATCH_LIMIT, 0
        while self.listener and (self.spark or {}).get("state") == "starting" and time.monotonic() < deadline:
            misses = 0 if await self._spark_info(wait=4.0) else misses + 1
            if misses >= 30:  # the kernel is gone or unreachable; poll() and the restarter deal with that
                return
            if misses:
                await asyncio.sleep(1.0)

    async def _spark_info(self, wait: float) -> bool:
        """Ask the launcher (control op `info`) about its SparkSession; log what changed. False if unreachable."""
        try:
            reply = await self._control("info", {"wait": wait}, timeout=wait + 3.0)
        except ControlError as exc:
            self.log.debug("kernel %s: no Spark info yet (%s)", self.kernel_id, exc)
            return False
        spark = reply.get("spark")
        if not isinstance(spark, dict) or spark == self.spark:
            return True
        self.spark = spark
        if spark.get("state") == "ready":
            self.log.info(
                "kernel %s: Spark application %s (%s) on %s, Spark UI %s",
                self.kernel_id, spark.get("app_id"), spark.get("app_name"), spark.get("master"), spark.get("ui_url"),
            )  # fmt: skip
        elif spark.get("state") == "failed":
            self.log.warning("kernel %s: its SparkSession could not be created: %s", self.kernel_id, spark.get("error"))
        return True

    # ------------------------------------------------------------------ lifecycle
    async def _control(self, op: str, args: dict[str, Any] | None = None, timeout: float = 3.0) -> dict[str, Any]:
        if self.listener is None:
            raise ControlError("no control listener is known for this kernel")
        ip, port, secret = self.listener
        return await control_request(ip, port, secret, op, args, timeout=timeout)

    async def _signal_host(self, host: str, signum: int, group: bool) -> bool:
        """Signal the kernel over SSH (or locally); True when the process (group) existed."""
        # `kill -N -PGID`, never `kill -N -- -PGID`: dash's kill reads "--" as a pid and signals nothing
        target = f"-{int(self.pgid or 0)}" if group else str(int(self.pid or 0))
        if self.pool.health.quarantined(host):
            return False
        try:
            res = await self._run_on_host(host, as_user(f"kill -{int(signum)} {target}", self.run_user))
        except (SshError, OSError, asyncio.TimeoutError) as exc:
            self.log.warning("cannot signal kernel %s on %s: %s", self.kernel_id, host, exc)
            self._host_failed(host, str(exc) or type(exc).__name__)
            return False
        return res.status == 0

    async def poll(self) -> int | None:
        if self.pid is None or self.host is None:
            return 0 if self._exit_status is None else self._exit_status
        try:
            await self._control("poll", timeout=2.0)
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

    async def _alive_on_host(self, host: str) -> bool | None:
        """Ask the host whether the kernel process runs (a zombie awaiting its reaper does not); None: no answer."""
        if self.pool.health.quarantined(host):
            return None
        try:
            check = f"ps -o stat= -p {int(self.pid or 0)} | grep -q '^[^Z]'"
            res = await self._run_on_host(host, as_user(check, self.run_user))
        except (SshError, OSError, asyncio.TimeoutError) as exc:
            self.log.warning("cannot reach %s to check kernel %s: %s", host, self.kernel_id, exc)
            self._host_failed(host, str(exc) or type(exc).__name__)
            return None
        return res.status == 0

    async def wait(self) -> int | None:
        while (status := await self.poll()) is None:
            await asyncio.sleep(0.05)
        return status

    async def send_signal(self, signum: int) -> None:
        if signum == 0:
            await self.poll()
            return
        await self._deliver(int(signum), group=False)

    async def _deliver(self, signum: int, group: bool) -> None:
        if self.pid is None or self.host is None:
            return
        try:
            await self._control("signal", {"signum": signum, "group": group})
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

    async def terminate(self, restart: bool = False) -> None:
        await self._deliver(signal.SIGTERM, group=True)

    async def kill(self, restart: bool = False) -> None:
        await self._deliver(signal.SIGKILL, group=True)

    async def cleanup(self, restart: bool = False) -> None:
        """Leave nothing behind on the host: no process of the kernel's group, no connection file."""
        host = self.host
        if host is None:
            return
        if self.pgid is not None:
            files = " ".join(shlex.quote(f) for f in (self.remote_connection_file,) if f)
            groups = " ".join(f"-{int(g)}" for g in dict.fromkeys((self.pgid, self.launched_pid)) if g)
            command = f"kill -9 {groups} 2>/dev/null; {'rm -f ' + files if files else 'true'}"
            command = as_user(command, self.run_user)
            try:
                if self.pool.health.quarantined(host):
                    raise SshError(self.pool.health.quarantined(host) or "")
                await self._run_on_host(host, command)
            except (SshError, OSError, asyncio.TimeoutError) as exc:
                self.log.warning(
                    "cleanup of kernel %s on %s failed (%s); it will run when the host answers again",
                    self.kernel_id, host, exc,
                )  # fmt: skip
                self.pool.health.owe(host, command)
                await self._ensure_reaper()
        if self._tunnels is not None:
            self._tunnels.close()
            self._tunnels = None
        self.remote_ports = None
        if self._spark_watch is not None:
            self._spark_watch.cancel()
            self._spark_watch = None
        self._restart_host = host if restart else None
        self.host = self.pid = self.pgid = self.listener = self.launched_pid = None

    async def get_provisioner_info(self) -> dict[str, Any]:
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
            launched_pid=self.launched_pid,
            run_user=self.run_user,
            listener=list(self.listener) if self.listener else None,
            connection_file=self.remote_connection_file,
            log_file=self.log_file,
            spark=self.spark,
            skipped=self.skipped,
            remote_ports=self.remote_ports,
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        conn = dict(self.connection_info or {})
        if isinstance(conn.get("key"), str):
            conn["key"] = conn["key"].encode()
        self.connection_info = conn
        self.host = provisioner_info["host"]
        self.hostname = provisioner_info.get("hostname")
        self.pid, self.pgid = provisioner_info["pid"], provisioner_info["pgid"]
        self.launched_pid, self.run_user = provisioner_info.get("launched_pid"), provisioner_info.get("run_user")
        listener = provisioner_info.get("listener")
        self.listener = (listener[0], int(listener[1]), listener[2]) if listener else None
        self.remote_connection_file = provisioner_info.get("connection_file")
        self.log_file = provisioner_info.get("log_file")
        self.spark = provisioner_info.get("spark")
        self.skipped = provisioner_info.get("skipped", [])
        self.remote_ports = provisioner_info.get("remote_ports")
        if self.remote_ports and self.host:  # tunnelled: the old gateway's local ports died with it
            await self._tunnel_ports(self.host, self.connection_info)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.launch_timeout)
