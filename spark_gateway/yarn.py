"""YARN client mode: what the gateway adds to a YARN kernel's spark-submit, and a small ResourceManager REST client.

Every YARN application a kernel starts carries three tags (`spark.yarn.tags`): ``spark_gateway``, the gateway's own
tag ``sg-gateway:<id>`` (id: the provisioner's `yarn_gateway_id`, env `SG_YARN_GATEWAY_ID`, default
``<user>@<host name>`` of the gateway process: `default_gateway_id`; gateways run by one account on one host against
one ResourceManager must set distinct ids) and the kernel id; and it is
attempted once (`spark.yarn.maxAppAttempts=1`: Jupyter's restarter restarts kernels, YARN must not restart their
ApplicationMaster behind the gateway's back).
Reconciliation (`reconcile`) kills, through the RM's REST API (``PUT /ws/v1/cluster/apps/{id}/state``), every live
application carrying this gateway's tag whose kernel the gateway no longer runs.

The ResourceManager's web address comes from the Hadoop client configuration the gateway can read: the spec's
``YARN_CONF_DIR`` / ``HADOOP_CONF_DIR`` when that directory exists on the gateway too, else the gateway's own
environment variables of those names. With ResourceManager HA, the first RM id listed is used (HA is untested
here); with `yarn.http.policy=HTTPS_ONLY`, its https address. Kerberos-protected (SPNEGO) REST APIs are not
supported: there, reconciliation logs that it could not reach the RM and YARN's own timeouts apply.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shlex
import socket
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

GATEWAY_TAG = "spark_gateway"
GATEWAY_ID_PREFIX = "sg-gateway:"
LIVE_STATES = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING")
REST_TIMEOUT = 5.0


class YarnError(RuntimeError):
    """The ResourceManager could not be found or asked; the message says which and why."""


def default_gateway_id() -> str:
    """``<user>@<host name>`` of the gateway process: `yarn_gateway_id` when SG_YARN_GATEWAY_ID is unset."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def gateway_tag(gateway_id: str) -> str:
    """The YARN tag of the gateway of id `gateway_id` (lowercase ASCII, as YARN stores tags)."""
    return GATEWAY_ID_PREFIX + re.sub(r"[^a-z0-9@._-]", "_", gateway_id.lower())[:80]


def submit_conf(kernel_id: str, gateway_id: str) -> str:
    """spark-submit options the gateway appends to a YARN kernel's SPARK_OPTS (last, so they win)."""
    tags = f"{GATEWAY_TAG},{gateway_tag(gateway_id)},{kernel_id}"
    return f" --conf spark.yarn.maxAppAttempts=1 --conf {shlex.quote(f'spark.yarn.tags={tags}')}"


def conf_dirs(spec_env: Mapping[str, Any], environ: Mapping[str, str]) -> list[Path]:
    """Hadoop client configuration directories the gateway can read, best first."""
    found = []
    for source in (spec_env, environ):
        for name in ("YARN_CONF_DIR", "HADOOP_CONF_DIR"):
            value = str(source.get(name) or "")
            if value and "$" not in value and "{" not in value and Path(value).is_dir():
                found.append(Path(value))
    return found


def read_site(path: Path) -> dict[str, str]:
    """The properties of a Hadoop `*-site.xml` ({} if absent); `${name}` references to other properties resolved."""
    if not path.is_file():
        return {}
    try:
        root = ET.parse(path).getroot()  # noqa: S314 (the operator's own configuration file)
    except ET.ParseError as exc:
        raise YarnError(f"{path} is not valid XML ({exc}): fix or regenerate it") from None
    props = {}
    for prop in root.iter("property"):
        name, value = prop.findtext("name"), prop.findtext("value")
        if name:
            props[name.strip()] = (value or "").strip()
    for _ in range(3):
        for key, value in props.items():
            for ref, target in props.items():
                value = value.replace(f"${{{ref}}}", target)
            props[key] = value
    return props


def rm_web_url(dirs: Iterable[Path]) -> str | None:
    """The ResourceManager's web address (``http://host:port``) named by the first directory that has a
    yarn-site.xml, or None."""
    for conf_dir in dirs:
        site = read_site(conf_dir / "yarn-site.xml")
        if not site and not (conf_dir / "yarn-site.xml").is_file():
            continue
        https = site.get("yarn.http.policy", "HTTP_ONLY") == "HTTPS_ONLY"
        key, port, scheme = (
            ("yarn.resourcemanager.webapp.https.address", 8090, "https") if https
            else ("yarn.resourcemanager.webapp.address", 8088, "http")
        )  # fmt: skip
        suffix = ""
        if site.get("yarn.resourcemanager.ha.enabled", "false").lower() == "true":
            ids = [i.strip() for i in site.get("yarn.resourcemanager.ha.rm-ids", "").split(",") if i.strip()]
            suffix = f".{ids[0]}" if ids else ""
        address = site.get(key + suffix) or site.get(key)
        if not address:
            host = site.get("yarn.resourcemanager.hostname" + suffix) or site.get("yarn.resourcemanager.hostname")
            address = f"{host or '0.0.0.0'}:{port}"
        if address.startswith("0.0.0.0:"):
            host = site.get("yarn.resourcemanager.hostname" + suffix) or site.get("yarn.resourcemanager.hostname")
            address = f"{host or 'localhost'}:{address.rsplit(':', 1)[1]}"
        return f"{scheme}://{address}"
    return None


class ResourceManager:
    """The RM's REST API (`/ws/v1/cluster`), blocking calls with a short timeout."""

    def __init__(self, url: str, user: str = "", timeout: float = REST_TIMEOUT) -> None:
        self.url, self.user, self.timeout = url.rstrip("/"), user, timeout

    def _call(self, method: str, path: str, query: dict[str, str] | None = None, body: Any = None) -> Any:
        query = {**(query or {}), **({"user.name": self.user} if self.user else {})}
        url = f"{self.url}/ws/v1/cluster/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 (RM URL)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:  # noqa: S310
                return json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode(errors="replace")
            raise YarnError(f"ResourceManager {self.url}: {method} {path} answered {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:
            raise YarnError(f"ResourceManager {self.url} unreachable ({exc}): is it running and reachable?") from None

    def apps(self, tag: str, states: Iterable[str] = LIVE_STATES) -> list[dict[str, Any]]:
        """Applications carrying `tag` (YARN lowercases tags) in one of `states`."""
        query = {"applicationTags": tag.lower(), "states": ",".join(states)}
        return ((self._call("GET", "apps", query) or {}).get("apps") or {}).get("app") or []

    def kill(self, app_id: str) -> None:
        self._call("PUT", f"apps/{urllib.parse.quote(app_id)}/state", body={"state": "KILLED"})


def kernel_of(app: Mapping[str, Any], gateway: str) -> str | None:
    """The kernel id an application of gateway tag `gateway` is tagged with (None if it is no such application)."""
    tags = [t for t in str(app.get("applicationTags") or "").split(",") if t]
    if GATEWAY_TAG not in tags or gateway not in tags:
        return None
    others = [t for t in tags if t != GATEWAY_TAG and not t.startswith(GATEWAY_ID_PREFIX)]
    return others[0] if len(others) == 1 else None


def orphans(apps: Iterable[Mapping[str, Any]], live_kernels: Iterable[str], gateway: str) -> list[str]:
    """Ids of gateway `gateway`'s applications whose kernel is not among `live_kernels` (pure)."""
    live = {k.lower() for k in live_kernels}
    return [str(a["id"]) for a in apps if (k := kernel_of(a, gateway)) is not None and k not in live]


def reconcile(rm: ResourceManager, live_kernels: Iterable[str], gateway: str) -> list[str]:
    """Kill the live applications of gateway tag `gateway` whose kernel is not in `live_kernels`; their ids."""
    killed = []
    for app_id in orphans(rm.apps(gateway), live_kernels, gateway):
        rm.kill(app_id)
        killed.append(app_id)
    return killed


async def reconcile_for(
    spec_env: Mapping[str, Any] | None, live_kernels: Iterable[str], gateway_id: str, log: Any
) -> None:
    """On a YARN kernel's cleanup: kill this gateway's applications whose kernel is gone (that one included)."""
    try:
        rm = resource_manager(spec_env, getpass.getuser())
        if rm is None:
            return
        for app_id in await asyncio.to_thread(reconcile, rm, set(live_kernels), gateway_tag(gateway_id)):
            log.info("killed YARN application %s: its kernel is gone", app_id)
    except YarnError as exc:
        log.warning("cannot reconcile YARN applications: %s", exc)


class Sweeps:
    """The start-up sweeps of one gateway process: once per (ResourceManager, gateway tag), the live applications of
    that tag whose kernel this gateway does not run are killed (left by a killed gateway, or by a kernel whose host
    was away when the gateway restarted and which it forgot).

    A sweep runs when the gateway first launches a kernel of a YARN spec (in the background), and, under
    `spark_gateway.server.DistributedMappingKernelManager`, for every YARN kernelspec once its recorded sessions are
    restored. While `restoring`, launches do not sweep: the restored kernels are not known yet.
    """

    def __init__(self) -> None:
        self.restoring = False
        self.swept: set[tuple[str, str]] = set()
        self.tasks: set[asyncio.Task] = set()  # launch-time sweeps still running

    def on_launch(self, spec_env: Mapping[str, Any] | None, gateway_id: str, live: set[str], log: Any) -> None:
        """A kernel of a YARN spec is launched (`live`: the gateway's kernel ids, that one included)."""
        if not self.restoring:
            task = asyncio.ensure_future(self.sweep(spec_env, gateway_id, live, log))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def sweep(self, spec_env: Mapping[str, Any] | None, gateway_id: str, live: set[str], log: Any) -> list[str]:
        """Kill the orphans of `gateway_id`'s tag at the spec's RM, unless that was done; the ids killed."""
        try:
            rm = resource_manager(spec_env, getpass.getuser())
        except YarnError as exc:  # e.g. a yarn-site.xml that is not XML
            log.warning("cannot sweep orphaned YARN applications: %s", exc)
            return []
        if rm is None or (key := (rm.url, gateway_tag(gateway_id))) in self.swept:
            return []
        self.swept.add(key)
        try:
            killed = await asyncio.to_thread(reconcile, rm, set(live), key[1])
        except YarnError as exc:
            self.swept.discard(key)  # tried again at the next launch
            log.warning("cannot sweep orphaned YARN applications (%s): %s", key[1], exc)
            return []
        for app_id in killed:
            log.info("killed YARN application %s (%s): no kernel of this gateway runs it", app_id, key[1])
        return killed


def resource_manager(spec_env: Mapping[str, Any] | None, user: str = "") -> ResourceManager | None:
    """The RM a YARN spec's kernels use, if the gateway can read its Hadoop configuration."""
    url = rm_web_url(conf_dirs(spec_env or {}, os.environ))
    return ResourceManager(url, user) if url else None


# ------------------------------------------------------------------------------------------------ ssh-spec check
def spec_queue(spark_opts: str) -> str:
    """The queue a spec's SPARK_OPTS names (`--queue Q` or `spark.yarn.queue=Q`), else YARN's `default`."""
    try:
        words = shlex.split(spark_opts)
    except ValueError:
        return "default"
    queue = "default"
    for i, word in enumerate(words):
        if word == "--queue" and i + 1 < len(words):
            queue = words[i + 1]
        elif word.startswith("--queue=") or word.startswith("spark.yarn.queue="):
            queue = word.split("=", 1)[1]
    return queue


def _queue_names(node: Any) -> set[str]:
    """Every queue name and path in the RM's scheduler description (capacity and fair schedulers)."""
    names: set[str] = set()
    if isinstance(node, dict):
        for key in ("queueName", "queuePath"):
            if isinstance(node.get(key), str):
                names.add(node[key])
        for value in node.values():
            names |= _queue_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _queue_names(value)
    return names


def probe(conf_dir: str, queue: str, timeout: float = REST_TIMEOUT) -> tuple[bool, str, str]:
    """From a host (`ssh-spec check` runs this file there): the Hadoop configuration in `conf_dir`, the RM it
    names answering (RPC port and REST API), `queue` known to its scheduler. (passed, detail, fix)."""
    site = Path(conf_dir) / "yarn-site.xml"
    if not site.is_file():
        return (
            False,
            f"{site} does not exist",
            (
                f"install the cluster's Hadoop client configuration (yarn-site.xml, core-site.xml) in {conf_dir}, or "
                "reinstall the spec with --hadoop-conf-dir set to where it is on every host"
            ),
        )
    props = read_site(site)
    url = rm_web_url([Path(conf_dir)]) or ""
    host = props.get("yarn.resourcemanager.hostname", "0.0.0.0")
    rpc = props.get("yarn.resourcemanager.address") or f"{host}:8032"
    rpc_host, _, rpc_port = rpc.rpartition(":")
    fix = f"start the ResourceManager, or fix {site} (yarn.resourcemanager.*address, hostname) and the network"
    try:
        socket.create_connection((rpc_host, int(rpc_port)), timeout).close()
    except (OSError, ValueError) as exc:
        return False, f"the ResourceManager's {rpc} (from {site}) does not answer: {exc}", fix
    try:
        rm = ResourceManager(url, timeout=timeout)
        state = (rm._call("GET", "info") or {}).get("clusterInfo", {}).get("state")
        names = _queue_names(rm._call("GET", "scheduler"))
    except YarnError as exc:
        return False, str(exc), fix
    if queue not in names and f"root.{queue}" not in names:
        known = ", ".join(sorted(n for n in names if not n.startswith("root.") and n != "root")) or "none"
        return (
            False,
            f"queue {queue!r} does not exist in {url} (queues: {known})",
            ("use an existing queue in the spec's SPARK_OPTS (--queue), or have the cluster's admin create it"),
        )
    return True, f"ResourceManager {rpc} ({state}), queue {queue}", ""
