"""Configuration shared by the provisioner and the `jupyter ssh-spec` applications: one definition per option.

Each option is a traitlet whose default comes from its `GP_*` environment variable, read when an instance first
asks for it (never at import), and validated where it is set. The mixins group options by concern, so that an
application takes only what it uses: `SshOptions` (reaching hosts), `AccessOptions` (who may start kernels where),
`CallbackOptions` (the gateway's callback server) and `GatewayOptions` (all of them, plus placement and lifecycle).
"""

from __future__ import annotations

import os
import re
from typing import Any

from traitlets import Bool, Float, Integer, List, Set, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from .placement import ALGORITHMS, check_algorithm, parse_hosts
from .ssh import SshSettings
from .yarn import default_gateway_id


def env_list(name: str, fallback: list[str]) -> list[str]:
    """A comma-separated environment variable as a list (empty items dropped)."""
    value = os.environ.get(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else fallback


def env_bool(name: str, fallback: bool) -> bool:
    return os.environ.get(name, str(fallback)).strip().lower() in ("1", "true", "yes", "on")


def env_float(name: str, fallback: float) -> float:
    return float(os.environ.get(name, fallback))


def env_int(name: str, fallback: int) -> int:
    return int(os.environ.get(name, fallback))


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


def trait_checked(check: Any, value: Any) -> Any:
    """Run a validator, turning its ValueError into the TraitError traitlets reports."""
    try:
        return check(value)
    except ValueError as exc:
        raise TraitError(str(exc)) from None


class SshOptions(LoggingConfigurable):
    """How the gateway reaches hosts over SSH."""

    remote_user = Unicode(config=True, help="SSH user; default: ssh_config's User, else ours (GP_REMOTE_USER).")
    remote_pwd = Unicode(config=True, help="SSH password, when keys are not used (GP_REMOTE_PWD).")
    remote_gss_ssh = Bool(config=True, help="Use GSSAPI (Kerberos) for SSH (GP_REMOTE_GSS_SSH).")
    ssh_port = Integer(config=True, help="SSH port when neither the entry nor ssh_config gives one (GP_SSH_PORT).")
    ssh_config_file = Unicode(config=True, help="OpenSSH client config to honour (GP_SSH_CONFIG_FILE).")
    ssh_connect_timeout = Float(config=True, help="Seconds to reach a host over SSH (GP_SSH_CONNECT_TIMEOUT).")

    @default("remote_user")
    def _remote_user_default(self) -> str:
        return os.environ.get("GP_REMOTE_USER", "")

    @default("remote_pwd")
    def _remote_pwd_default(self) -> str:
        return os.environ.get("GP_REMOTE_PWD", "")

    @default("remote_gss_ssh")
    def _gss_default(self) -> bool:
        return env_bool("GP_REMOTE_GSS_SSH", False)

    @default("ssh_port")
    def _ssh_port_default(self) -> int:
        return env_int("GP_SSH_PORT", 22)

    @default("ssh_config_file")
    def _ssh_config_default(self) -> str:
        return os.environ.get("GP_SSH_CONFIG_FILE", "~/.ssh/config")

    @default("ssh_connect_timeout")
    def _connect_timeout_default(self) -> float:
        return env_float("GP_SSH_CONNECT_TIMEOUT", 5.0)

    def ssh_settings(self) -> SshSettings:
        return SshSettings(
            config_file=self.ssh_config_file,
            port=self.ssh_port,
            user=self.remote_user,
            password=self.remote_pwd,
            gss_auth=self.remote_gss_ssh,
            connect_timeout=self.ssh_connect_timeout,
        )


class AccessOptions(LoggingConfigurable):
    """Which hosts kernels run on, who may start them, on which ports, and how long a start may take."""

    remote_hosts = List(
        Unicode(),
        config=True,
        help="Hosts kernels may run on: host, host:port or an ssh_config alias (GP_REMOTE_HOSTS, comma-separated; "
        "default: localhost).",
    )
    authorized_users = Set(Unicode(), config=True, help="KERNEL_USERNAMEs allowed (GP_AUTHORIZED_USERS); empty: all.")
    unauthorized_users = Set(
        Unicode(), config=True, help="KERNEL_USERNAMEs refused (GP_UNAUTHORIZED_USERS; default: root)."
    )
    port_range = Unicode(
        config=True, help="Kernel ports: LOWER..UPPER spanning >= 1000, or 0..0 for any (GP_PORT_RANGE; default: 0..0)."
    )
    launch_timeout = Float(
        config=True, help="Seconds to wait for the kernel's connection info (GP_LAUNCH_TIMEOUT; default: 30)."
    )

    @default("remote_hosts")
    def _remote_hosts_default(self) -> list[str]:
        return trait_checked(parse_hosts, env_list("GP_REMOTE_HOSTS", ["localhost"]))

    @default("authorized_users")
    def _authorized_default(self) -> set[str]:
        return set(env_list("GP_AUTHORIZED_USERS", []))

    @default("unauthorized_users")
    def _unauthorized_default(self) -> set[str]:
        return set(env_list("GP_UNAUTHORIZED_USERS", ["root"]))

    @default("port_range")
    def _port_range_default(self) -> str:
        value = os.environ.get("GP_PORT_RANGE", "0..0")
        trait_checked(parse_port_range, value)
        return value

    @default("launch_timeout")
    def _launch_timeout_default(self) -> float:
        return env_float("GP_LAUNCH_TIMEOUT", 30.0)

    @validate("remote_hosts")
    def _check_hosts(self, proposal: Any) -> list[str]:
        return trait_checked(parse_hosts, proposal["value"])

    @validate("port_range")
    def _check_port_range(self, proposal: Any) -> str:
        trait_checked(parse_port_range, proposal["value"])
        return proposal["value"]


class CallbackOptions(LoggingConfigurable):
    """Where kernels call the gateway back with their connection info."""

    response_ip = Unicode(config=True, help="Address kernels call back to; default: ours as seen by the host.")
    response_port = Integer(config=True, help="First port tried for the callback server (GP_RESPONSE_PORT).")
    response_port_retries = Integer(config=True, help="Further ports tried (GP_RESPONSE_PORT_RETRIES).")
    response_addr_any = Bool(config=True, help="Listen for callbacks on all interfaces (GP_RESPONSE_ADDR_ANY).")
    prohibited_local_ips = List(Unicode(), config=True, help="Never hand these out (GP_PROHIBITED_LOCAL_IPS).")

    @default("response_ip")
    def _response_ip_default(self) -> str:
        return os.environ.get("GP_RESPONSE_IP", "")

    @default("response_port")
    def _response_port_default(self) -> int:
        return env_int("GP_RESPONSE_PORT", 8877)

    @default("response_port_retries")
    def _response_retries_default(self) -> int:
        return env_int("GP_RESPONSE_PORT_RETRIES", 10)

    @default("response_addr_any")
    def _addr_any_default(self) -> bool:
        return env_bool("GP_RESPONSE_ADDR_ANY", False)

    @default("prohibited_local_ips")
    def _prohibited_default(self) -> list[str]:
        return env_list("GP_PROHIBITED_LOCAL_IPS", [])


class GatewayOptions(SshOptions, AccessOptions, CallbackOptions):
    """Every option of the `DistributedProvisioner` (`c.DistributedProvisioner.NAME`, or per kernelspec)."""

    load_balancing_algorithm = Unicode(
        config=True, help=f"One of {', '.join(ALGORITHMS)} (GP_LOAD_BALANCING_ALGORITHM)."
    )
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
    impersonation_enabled = Bool(
        config=True,
        help="Run kernels as KERNEL_USERNAME (sudo -n -u), for every spec; a YARN application is then that user's "
        "(GP_IMPERSONATION_ENABLED).",
    )

    orphan_timeout = Float(
        config=True,
        help="Seconds a kernel nobody polls (its gateway gone) runs before it shuts itself down; 0: never "
        "(GP_ORPHAN_TIMEOUT; default: 1800).",
    )
    yarn_gateway_id = Unicode(
        config=True,
        help="This gateway's id in the YARN tag of its kernels' applications, sg-gateway:<id> (SG_YARN_GATEWAY_ID; "
        "default: <user>@<host name>); gateways sharing an account, a host and a ResourceManager need distinct ids.",
    )
    engine_idle_timeout = Float(
        config=True,
        help="Connect-mode kernelspecs: seconds a Spark Connect engine with no attached kernel runs before it stops; "
        "0: never (GP_ENGINE_IDLE_TIMEOUT; default: 600).",
    )
    engine_account = Unicode(
        config=True,
        help="Connect-mode kernelspecs under impersonation: the local account (on every host) that group- and "
        "server-level Spark Connect engines run as; the gateway's SSH account must be allowed to `sudo -u` it "
        "(GP_ENGINE_ACCOUNT; default: none, and those levels are refused).",
    )
    max_kernels_per_user = Integer(
        config=True,
        help="Kernels one KERNEL_USERNAME may run over all hosts; 0: no limit (GP_MAX_KERNELS_PER_USER; default: 0).",
    )

    @default("orphan_timeout")
    def _orphan_default(self) -> float:
        return env_float("GP_ORPHAN_TIMEOUT", 1800.0)

    @default("yarn_gateway_id")
    def _yarn_gateway_id_default(self) -> str:
        return os.environ.get("SG_YARN_GATEWAY_ID") or default_gateway_id()

    @default("engine_idle_timeout")
    def _engine_idle_default(self) -> float:
        return env_float("GP_ENGINE_IDLE_TIMEOUT", 600.0)

    @default("engine_account")
    def _engine_account_default(self) -> str:
        return os.environ.get("GP_ENGINE_ACCOUNT", "")

    @default("max_kernels_per_user")
    def _max_per_user_default(self) -> int:
        return env_int("GP_MAX_KERNELS_PER_USER", 0)

    @default("load_balancing_algorithm")
    def _lb_default(self) -> str:
        return trait_checked(check_algorithm, os.environ.get("GP_LOAD_BALANCING_ALGORITHM", "round-robin"))

    @default("kernel_log_dir")
    def _log_dir_default(self) -> str:
        return os.environ.get("GP_KERNEL_LOG_DIR", "")

    @default("enable_tunneling")
    def _tunneling_default(self) -> bool:
        return env_bool("GP_ENABLE_TUNNELING", False)

    @default("unreachable_grace")
    def _grace_default(self) -> float:
        return env_float("GP_UNREACHABLE_GRACE", 30.0)

    @default("host_quarantine")
    def _quarantine_default(self) -> float:
        return env_float("GP_HOST_QUARANTINE", 5.0)

    @default("impersonation_enabled")
    def _impersonation_default(self) -> bool:
        return env_bool("GP_IMPERSONATION_ENABLED", False)

    @validate("load_balancing_algorithm")
    def _check_algorithm(self, proposal: Any) -> str:
        return trait_checked(check_algorithm, proposal["value"])
