"""What the gateway knows of a kernel's SparkSession: asked of its launcher (control op `info`) and logged.

An eager kernel's session exists before the kernel is ready, so one question settles it; a lazy kernel's session
starts in the background, so a watch long-polls the launcher until it is ready or failed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from .control import ControlError

WATCH_LIMIT = 900.0  # seconds the gateway keeps asking a lazy kernel about its SparkSession
MISSES_LIMIT = 30  # unanswered questions in a row after which the watch gives up (poll() deals with the kernel)


class Kernel(Protocol):
    kernel_id: str
    log: Any

    async def control(self, op: str, args: dict[str, Any] | None = None, timeout: float = 3.0) -> dict[str, Any]: ...


class SparkWatch:
    """The launcher's report on one kernel's SparkSession (`report`), kept up to date while it starts."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.report: dict[str, Any] | None = None
        self._task: asyncio.Future | None = None

    async def start(self, mode: str) -> None:
        """After the kernel called back: learn its session at once (eager), or watch it start (lazy)."""
        if mode == "none":
            return
        self.report = {"state": "starting"}
        await self.ask(wait=0)
        if self.report.get("state") == "starting":
            self._task = asyncio.ensure_future(self._watch())

    def resume(self) -> None:
        """After a restore: watch again a session that was recorded while it started."""
        if (self.report or {}).get("state") == "starting" and self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        deadline, misses = time.monotonic() + WATCH_LIMIT, 0
        while (self.report or {}).get("state") == "starting" and time.monotonic() < deadline:
            misses = 0 if await self.ask(wait=4.0) else misses + 1
            if misses >= MISSES_LIMIT:
                return
            if misses:
                await asyncio.sleep(1.0)

    async def ask(self, wait: float) -> bool:
        """Ask the launcher about its SparkSession; log what changed. False if it did not answer."""
        kernel = self.kernel
        try:
            reply = await kernel.control("info", {"wait": wait}, timeout=wait + 3.0)
        except ControlError as exc:
            kernel.log.debug("kernel %s: no Spark info yet (%s)", kernel.kernel_id, exc)
            return False
        spark = reply.get("spark")
        if not isinstance(spark, dict) or spark == self.report:
            return True
        self.report = spark
        if spark.get("state") == "ready":
            kernel.log.info(
                "kernel %s: Spark application %s (%s) on %s, Spark UI %s%s",
                kernel.kernel_id, spark.get("app_id"), spark.get("app_name"), spark.get("master"), spark.get("ui_url"),
                f", YARN tracking URL {spark['tracking_url']}" if spark.get("tracking_url") else "",
            )  # fmt: skip
        elif spark.get("state") == "failed":
            kernel.log.warning("kernel %s: SparkSession failed: %s", kernel.kernel_id, spark.get("error"))
        return True
