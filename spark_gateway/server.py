"""jupyter_server integration: kernel sessions that survive a gateway restart.

Enable with ``c.ServerApp.kernel_manager_class = "spark_gateway.server.DistributedMappingKernelManager"``.
Every kernel started through the `distributed-provisioner` is recorded in a session store (kernel id, kernelspec,
the provisioner's info: host, pids, connection info, listener, tunnels, Spark application, and the client's
``KERNEL_*`` start values for restarts). When the server starts, each recorded kernel that still answers is adopted
again (same id, same process, same variables); one that no longer runs is cleaned up on its host and forgotten.
A kernel whose host does not answer is retried for ``unreachable_grace`` seconds, then cleaned up when the host
returns. Records hold secrets (the kernel's key, the listener's secret): they are never logged.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import paramiko
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_data_dir
from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager, ServerKernelManager
from jupyter_server.utils import ApiPath
from traitlets import Bool, Type, Unicode, default

from .gateway import Gateway
from .provisioner import DistributedProvisioner
from .spark import spec_master
from .ssh import SshError

RECORD_VERSION = 1
log = logging.getLogger(__name__)


class SessionStore(abc.ABC):
    """Where kernel sessions are kept; implement it over a shared database to let several gateways share them."""

    @classmethod
    def create(cls, manager: DistributedMappingKernelManager) -> SessionStore:
        """The store a kernel manager uses; the default calls the class without arguments."""
        return cls()

    @abc.abstractmethod
    def load_all(self) -> dict[str, dict[str, Any]]:
        """Every stored record, by kernel id (unreadable records are skipped, with a log line)."""

    @abc.abstractmethod
    def save(self, kernel_id: str, record: dict[str, Any]) -> None:
        """Store (or replace) the record of `kernel_id` atomically."""

    @abc.abstractmethod
    def delete(self, kernel_id: str) -> None:
        """Forget `kernel_id`; no error if it is not stored."""


class FileSessionStore(SessionStore):
    """One 0600 JSON file per kernel in a 0700 directory, each replaced atomically (temporary file + rename)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)  # mkdir's mode is masked by the umask, and the directory may predate us

    @classmethod
    def create(cls, manager: DistributedMappingKernelManager) -> SessionStore:
        return cls(manager.session_dir)

    def _path(self, kernel_id: str) -> Path:
        if not kernel_id or "/" in kernel_id or kernel_id.startswith("."):
            raise ValueError(f"kernel id {kernel_id!r} cannot name a session file")
        return self.directory / f"{kernel_id}.json"

    def load_all(self) -> dict[str, dict[str, Any]]:
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                # the record is left in place for the operator; its content (secrets) is not logged
                log.warning("kernel session %s is unreadable (%s); skipped", path, type(exc).__name__)
                continue
            if isinstance(record, dict) and record.get("kernel_id") == path.stem:
                records[path.stem] = record
        return records

    def save(self, kernel_id: str, record: dict[str, Any]) -> None:
        target = self._path(kernel_id)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, kernel_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(kernel_id).unlink()


class DistributedKernelManager(ServerKernelManager):
    """jupyter_server's kernel manager that records its session each time its kernel (re)starts."""

    async def _async_post_start_kernel(self, **kw: Any) -> None:
        await super()._async_post_start_kernel(**kw)
        if isinstance(self.parent, DistributedMappingKernelManager):
            await self.parent.record_session(self)


class DistributedMappingKernelManager(AsyncMappingKernelManager):
    """AsyncMappingKernelManager whose remote kernels outlive a restart (or a crash) of the server."""

    session_store_class = Type(
        FileSessionStore, klass=SessionStore, config=True, help="SessionStore subclass that keeps kernel sessions."
    )
    session_dir = Unicode(
        config=True,
        help="Directory of the default FileSessionStore (default: <Jupyter data dir>/spark_gateway/sessions).",
    )
    keep_kernels_on_exit = Bool(
        True,
        config=True,
        help="When the server stops normally, leave remote kernels running (recorded, adopted at the next start) "
        "instead of shutting them down; their orphan_timeout ends them if no gateway returns.",
    )

    @default("kernel_manager_class")
    def _default_kernel_manager_class(self) -> str:
        return "spark_gateway.server.DistributedKernelManager"

    @default("session_dir")
    def _session_dir_default(self) -> str:
        return os.path.join(jupyter_data_dir(), "spark_gateway", "sessions")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = self.session_store_class.create(self)
        Gateway.instance().yarn_sweeps.restoring = True  # no YARN sweep before the recorded kernels are known
        self.restoring: dict[str, asyncio.Task] = {}
        self.restored: asyncio.Future | None = None
        with contextlib.suppress(RuntimeError):  # no loop yet (e.g. built outside a server): restore_sessions()
            asyncio.get_running_loop()
            self.restored = asyncio.ensure_future(self.restore_sessions())
        if self.restored is None:
            from tornado.ioloop import IOLoop

            IOLoop.current().add_callback(self._restore_later)

    async def _restore_later(self) -> None:
        if self.restored is None:
            self.restored = asyncio.ensure_future(self.restore_sessions())

    # ------------------------------------------------------------------ recording
    async def record_session(self, km: Any) -> None:
        """Store the session of a kernel of ours that has just (re)started."""
        provisioner = km.provisioner
        if not isinstance(provisioner, DistributedProvisioner) or not provisioner.has_process:
            return
        env = (km._launch_args or {}).get("env") or {}
        record = {
            "version": RECORD_VERSION,
            "kernel_id": km.kernel_id,
            "kernel_name": km.kernel_name,
            "provisioner_info": await provisioner.get_provisioner_info(),
            "kernel_env": {k: v for k, v in env.items() if k.startswith("KERNEL_")},
            "cwd": str((km._launch_args or {}).get("cwd") or "") or None,
            "recorded_at": time.time(),
        }
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.store.save, km.kernel_id, record)
        except Exception as exc:  # noqa: BLE001 (the kernel runs on; it is only not restorable)
            self.log.error("kernel %s: its session could not be recorded: %s", km.kernel_id, exc)

    def remove_kernel(self, kernel_id: str) -> Any:
        """A kernel leaves the map (shut down, or dead): its session is forgotten."""
        try:
            self.store.delete(kernel_id)
        except Exception as exc:  # noqa: BLE001 (the record is retried at the next start: the kernel is gone then)
            self.log.error("kernel %s: its session record could not be removed: %s", kernel_id, exc)
        return super().remove_kernel(kernel_id)

    async def shutdown_all(self, now: bool = False) -> None:  # type: ignore[override]
        """At server exit: detach from recorded remote kernels (they are adopted again at the next start)."""
        if not self.keep_kernels_on_exit:
            await super().shutdown_all(now=now)
            return
        for task in self.restoring.values():
            task.cancel()
        for kernel_id in list(self._kernels):
            km = self._kernels[kernel_id]
            if isinstance(km.provisioner, DistributedProvisioner) and km.provisioner.has_process:
                self.log.info("kernel %s left running on %s; it is adopted at the next start", kernel_id,
                              km.provisioner.host)  # fmt: skip
                km.stop_restarter()
                self._kernels.pop(kernel_id, None)
            else:
                await self.shutdown_kernel(kernel_id, now=now)

    # ------------------------------------------------------------------ restoring
    async def restore_sessions(self) -> None:
        """Adopt every recorded kernel that still answers; clean up the others; then sweep YARN (`sweep_yarn`)."""
        try:
            records = await asyncio.get_running_loop().run_in_executor(None, self.store.load_all)
        except BaseException:
            Gateway.instance().yarn_sweeps.restoring = False
            raise
        if records:
            self.log.info("restoring %d recorded kernel session(s)", len(records))
        # recorded kernels count as running until found gone (a cleanup meanwhile must not kill their applications)
        Gateway.instance().kernel_ids.update(records)
        for kernel_id, record in records.items():
            if kernel_id not in self._kernels:
                self.restoring[kernel_id] = asyncio.ensure_future(self._restore(kernel_id, record))
        if self.restoring:
            outcomes = await asyncio.gather(*self.restoring.values(), return_exceptions=True)
            for kernel_id, outcome in zip(list(self.restoring), outcomes, strict=False):
                if isinstance(outcome, Exception):
                    self.log.error("kernel %s could not be restored: %r", kernel_id, outcome)
        await self.sweep_yarn()

    async def sweep_yarn(self) -> None:
        """Kill the YARN applications of this gateway's tag whose kernels it does not run, at the ResourceManager of
        every YARN kernelspec (`yarn.Sweeps`; an unreachable RM is a warning, swept again at its next launch)."""
        gateway = Gateway.instance()
        gateway.yarn_sweeps.restoring = False
        factory = KernelProvisionerFactory.instance(parent=self)
        for name in sorted(self.kernel_spec_manager.find_kernel_specs()):
            try:
                spec = self.kernel_spec_manager.get_kernel_spec(name)
                if spec_master(str((spec.env or {}).get("SPARK_OPTS", ""))) != "yarn":
                    continue
                provisioner = factory.create_provisioner_instance(f"yarn-sweep-{name}", spec, parent=self)
            except Exception as exc:  # noqa: BLE001 (a broken kernelspec fails its own starts, not this sweep)
                self.log.warning("kernelspec %s not swept for YARN orphans: %s", name, exc)
                continue
            if isinstance(provisioner, DistributedProvisioner):
                await gateway.yarn_sweeps.sweep(spec.env, provisioner.yarn_gateway_id, gateway.kernel_ids, self.log)

    def _new_manager(self, kernel_id: str, record: dict[str, Any]) -> Any:
        km, _, _ = self.pre_start_kernel(record.get("kernel_name"), {"kernel_id": kernel_id})
        km.kernel_id = kernel_id
        km.provisioner = KernelProvisionerFactory.instance(parent=self).create_provisioner_instance(
            kernel_id, km.kernel_spec, parent=km
        )
        env = {**os.environ, **(record.get("kernel_env") or {})}
        km._launch_args = {"env": env} | ({"cwd": record["cwd"]} if record.get("cwd") else {})
        return km

    async def _restore(self, kernel_id: str, record: dict[str, Any]) -> None:
        try:
            km = self._new_manager(kernel_id, record)
        except Exception as exc:  # noqa: BLE001 (e.g. its kernelspec was removed)
            self.log.error("kernel %s cannot be restored (%s); its record is kept", kernel_id, exc)
            return
        provisioner = km.provisioner
        if not isinstance(provisioner, DistributedProvisioner):
            self.log.warning("kernel %s: its kernelspec no longer uses distributed-provisioner; forgotten", kernel_id)
            self.store.delete(kernel_id)
            return
        info = record.get("provisioner_info") or {}
        deadline = time.monotonic() + provisioner.unreachable_grace
        while True:
            state = await self._reattach(provisioner, info)
            if state != "unreachable" or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        if state == "alive":
            await self._adopt(km, provisioner)
            return
        reason = "no longer runs" if state == "gone" else f"its host {info.get('host')} does not answer"
        self.log.warning("kernel %s %s; cleaning it up and forgetting it", kernel_id, reason)
        if provisioner.host is not None:
            await provisioner.cleanup()  # unreachable host: the cleanup is owed and runs when the host answers
        self.store.delete(kernel_id)
        self.restoring.pop(kernel_id, None)

    async def _reattach(self, provisioner: DistributedProvisioner, info: dict[str, Any]) -> str:
        """Load the recorded info (tunnels re-opened); "alive", "gone" or "unreachable"."""
        try:
            await provisioner.load_provisioner_info(info)
        except (SshError, paramiko.SSHException, OSError, EOFError, asyncio.TimeoutError) as exc:
            self.log.info("kernel %s: host %s not reachable yet (%s)", provisioner.kernel_id, info.get("host"), exc)
            return "unreachable"
        return await provisioner.probe()

    async def _adopt(self, km: Any, provisioner: DistributedProvisioner) -> None:
        kernel_id = km.kernel_id
        with contextlib.suppress(FileNotFoundError):  # the previous server's file (tunnelled: other local ports)
            os.unlink(km.connection_file)
        km._reconcile_connection_info(provisioner.connection_info)
        km._attempted_start = True  # as after a start: shutdown and restart then make their own `ready` futures
        km.start_restarter()
        km._connect_control_socket()
        if not km.ready.done():
            km.ready.set_result(None)
        self._kernels[kernel_id] = km
        self._kernel_connections[kernel_id] = 0
        km.execution_state = "idle"
        km.reason = ""
        km.last_activity = utcnow()
        await self._finish_kernel_start(kernel_id)
        provisioner.spark_watch.resume()  # a SparkSession recorded while starting is watched again
        if not self._initialized_culler:
            self.initialize_culler()
        self.restoring.pop(kernel_id, None)
        self.log.info("kernel %s restored: running on %s, pid %s", kernel_id, provisioner.host, provisioner.pid)

    async def _async_start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, path: ApiPath | None = None, **kwargs: Any
    ) -> str:
        if kernel_id is not None and kernel_id in self.restoring:  # a client asks for a kernel being restored
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.restoring[kernel_id])
        return await super()._async_start_kernel(kernel_id=kernel_id, path=path, **kwargs)

    start_kernel = _async_start_kernel  # type: ignore[assignment]
