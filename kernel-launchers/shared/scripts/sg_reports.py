"""Reports the `info` op serves: a JSON file a launcher keeps current, or a JVM's SparkContext found by itself."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any

import sg_protocol as protocol
from sg_procinfo import has_thread, process_listening

log = logging.getLogger("server_listener")

MAX_MESSAGE = protocol.MAX_MESSAGE


class PolledReport:
    """An `info` report read by polling: ``read()`` gives it, a call waits up to ``wait`` seconds for a change."""

    interval = 0.1

    def read(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, wait: float) -> dict[str, Any]:
        """The report, once it differs from what it was when asked, or after ``wait`` seconds."""
        first, deadline = self.read(), time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(self.interval)
            if (report := self.read()) != first:
                return report
        return first


class FileReport(PolledReport):
    """The report of a launcher in another language: the JSON object it keeps in a file (replaced atomically, by
    rename). ``{}`` while the file is missing or unreadable."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return {}
        return report if isinstance(report, dict) else {}


DAG_SCHEDULER_THREAD = "dag-scheduler-event-loop"  # a JVM runs it exactly while it has a SparkContext


class JvmSparkReport(PolledReport):
    """``{"spark": ...}`` of a JVM kernel (Toree) that reports nothing itself: `starting` until PID runs a
    SparkContext's DAG scheduler thread, then `ready` with what the driver's Spark UI (REST API) says about it."""

    interval = 0.25
    UI_GRACE = 15.0  # seconds after the context appears within which its UI must answer (else: spark.ui.enabled off)

    def __init__(self, pid: int, kernel_ports: list[int]) -> None:
        self.pid, self.kernel_ports = pid, set(kernel_ports)
        self._ready: dict[str, Any] | None = None
        self._context_seen = 0.0

    def read(self) -> dict[str, Any]:
        if self._ready is None and has_thread(self.pid, DAG_SCHEDULER_THREAD):
            self._context_seen = self._context_seen or time.monotonic()
            details = self._from_ui()
            if details or time.monotonic() - self._context_seen > self.UI_GRACE:
                self._ready = {"state": "ready", "error": None, "app_id": None, "app_name": None, "master": None,
                               "ui_url": None, "spark_version": None, **details}  # fmt: skip
                log.info("SparkContext of pid %d: %s", self.pid, json.dumps(self._ready, sort_keys=True))
        return {"spark": self._ready or {"state": "starting", "error": None}}

    def _from_ui(self) -> dict[str, Any]:
        """The application's details from the first of PID's listening ports that answers as a Spark UI."""
        for address, port in sorted(process_listening(self.pid), key=lambda a: (not 4040 <= a[1] < 4140, a[1])):
            if port in self.kernel_ports:
                continue
            base = f"http://{address if ':' not in address else f'[{address}]'}:{port}/api/v1"
            try:
                apps = _get_json(f"{base}/applications")
                if not (isinstance(apps, list) and apps and isinstance(apps[0], dict) and "id" in apps[0]):
                    continue
                props = dict(_get_json(f"{base}/applications/{apps[0]['id']}/environment").get("sparkProperties", []))
                version = _get_json(f"{base}/version").get("spark")
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            host = props.get("spark.driver.host") or address
            return {"app_id": apps[0]["id"], "app_name": apps[0].get("name"), "master": props.get("spark.master"),
                    "ui_url": f"http://{host}:{port}", "spark_version": version}  # fmt: skip
        return {}


def _get_json(url: str) -> Any:
    """GET a local URL (a Spark UI's REST API) and parse its JSON; quick to give up on ports that are no UI."""
    with urllib.request.urlopen(url, timeout=1.0) as reply:  # noqa: S310 (http to PID's own listening port)
        return json.loads(reply.read(MAX_MESSAGE * 16))
