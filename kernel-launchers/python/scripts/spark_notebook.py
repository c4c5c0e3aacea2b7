"""What a Python Spark kernel shows in the notebook: live progress of each cell's Spark jobs, and ``%spark``.

Every cell runs its jobs in a job group of its own (``sg-cell-N``), so an interrupt cancels exactly that cell's jobs
and the progress display shows only them. One display per cell (``display_id``), updated in place from a thread
with its own py4j connection that reads Spark's status tracker while the cell runs: it first looks POLL_DELAY
after the cell starts (a shorter cell costs one look at its end), then every POLL_INTERVAL, and sleeps on an event
while no cell runs. ``SPARK_GATEWAY_PROGRESS=off`` in the kernelspec's env, or ``%spark progress off``, turns the
display off (the job groups stay).
"""

from __future__ import annotations

import html
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("launch_ipykernel")
PROGRESS_ENV = "SPARK_GATEWAY_PROGRESS"
POLL_DELAY = 0.5  # seconds before the first look at a running cell's jobs
POLL_INTERVAL = 0.4  # seconds between looks (and display updates) while the cell runs
FINAL_WAIT = 3.0  # seconds the end of a cell waits for its final display
BAR = 20  # characters of the text progress bar
TERMINAL = ("SUCCEEDED", "FAILED")


def progress_enabled(environ: dict[str, str] | None = None) -> bool:
    """False when SPARK_GATEWAY_PROGRESS is off/0/false/no (the kernelspec's env), else True."""
    value = (environ if environ is not None else os.environ).get(PROGRESS_ENV, "on")
    return value.strip().lower() not in ("off", "0", "false", "no")


# ------------------------------------------------------------------------------------------------ model


@dataclass
class StageView:
    stage_id: int
    name: str = ""
    total: int = 0
    done: int = 0
    active: int = 0
    failed: int = 0
    submitted: float | None = None  # epoch seconds


@dataclass
class JobView:
    job_id: int
    status: str = "RUNNING"  # RUNNING, SUCCEEDED, FAILED, UNKNOWN (Spark's JobExecutionStatus)
    stage_ids: list[int] = field(default_factory=list)
    stages: dict[int, StageView] = field(default_factory=dict)
    seen: float = field(default_factory=time.time)
    ended: float | None = None

    @property
    def tasks(self) -> tuple[int, int, int, int]:
        """(done, total, active, failed) over the job's stages; a finished job's untouched stages were skipped (their
        output was reused) and do not count."""
        views = [s for s in self.stages.values() if self.status != "SUCCEEDED" or s.done or s.active or s.failed]
        return (sum(s.done for s in views), sum(s.total for s in views), sum(s.active for s in views),
                sum(s.failed for s in views))  # fmt: skip

    @property
    def name(self) -> str:
        """The job's call site: the name of its last (result) stage."""
        return self.stages[max(self.stages)].name if self.stages else ""

    def elapsed(self, now: float) -> float:
        starts = [s.submitted for s in self.stages.values() if s.submitted]
        return max(0.0, (self.ended or now) - min(starts, default=self.seen))

    def word(self, interrupted: bool) -> str:
        if self.status == "SUCCEEDED":
            return "done"
        if self.status == "FAILED":
            return "cancelled" if interrupted else "failed"
        return "cancelled" if interrupted and self.ended else self.status.lower()


# ------------------------------------------------------------------------------------------------ rendering


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 60 else f"{int(value // 60)} min {int(value % 60)} s"


def job_url(ui_url: str | None, job_id: int) -> str | None:
    return f"{ui_url.rstrip('/')}/jobs/job/?id={job_id}" if ui_url else None


def render_text(jobs: list[JobView], ui_url: str | None, now: float, interrupted: bool) -> str:
    """The text/plain form: one line per job (bar, tasks done/total, active, failed, elapsed, link), stages below."""
    lines = []
    for job in jobs:
        done, total, active, failed = job.tasks
        filled = BAR * done // total if total else 0
        bar = "#" * filled + "-" * (BAR - filled)
        link = job_url(ui_url, job.job_id)
        line = (f"Spark job {job.job_id} {job.word(interrupted):<9} [{bar}] {done}/{total} tasks, {active} active, "
                f"{failed} failed, {_seconds(job.elapsed(now))}  {job.name}")  # fmt: skip
        lines.append(line + (f"  {link}" if link else ""))
        if len(job.stages) > 1:
            for stage in job.stages.values():
                lines.append(f"  stage {stage.stage_id}: {stage.done}/{stage.total} tasks, {stage.active} active, "
                             f"{stage.failed} failed  {stage.name}")  # fmt: skip
    return "\n".join(lines)


_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "cancelled": "#757575", "running": "#1565c0"}


def _bar_html(done: int, total: int, colour: str) -> str:
    percent = 100 * done // total if total else 0
    return (f'<div style="display:inline-block;width:12em;height:0.8em;background:#e0e0e0;vertical-align:middle">'
            f'<div style="width:{percent}%;height:100%;background:{colour}"></div></div>')  # fmt: skip


def render_html(jobs: list[JobView], ui_url: str | None, now: float, interrupted: bool) -> str:
    """The text/html form: a table of the cell's jobs and their stages, each job linked to the Spark UI."""
    cell = 'style="padding:1px 8px;text-align:left"'
    heads = ("job", "state", "tasks", "", "active", "failed", "elapsed", "call site")
    rows = ["<tr>" + "".join(f"<th {cell}>{head}</th>" for head in heads) + "</tr>"]
    for job in jobs:
        done, total, active, failed = job.tasks
        word = job.word(interrupted)
        link = job_url(ui_url, job.job_id)
        label = f'<a href="{html.escape(link)}" target="_blank">{job.job_id}</a>' if link else str(job.job_id)
        rows.append(f"<tr><td {cell}>{label}</td><td {cell}>{word}</td><td {cell}>"
                    f"{_bar_html(done, total, _COLOURS.get(word, '#1565c0'))}</td><td {cell}>{done}/{total}</td>"
                    f"<td {cell}>{active}</td><td {cell}>{failed}</td><td {cell}>{_seconds(job.elapsed(now))}</td>"
                    f"<td {cell}>{html.escape(job.name)}</td></tr>")  # fmt: skip
        if len(job.stages) > 1:
            for s in job.stages.values():
                rows.append(f"<tr style=\"color:#616161\"><td {cell}></td><td {cell}>stage {s.stage_id}</td>"
                            f"<td {cell}>{_bar_html(s.done, s.total, '#90a4ae')}</td><td {cell}>{s.done}/{s.total}"
                            f"</td><td {cell}>{s.active}</td><td {cell}>{s.failed}</td><td {cell}></td>"
                            f"<td {cell}>{html.escape(s.name)}</td></tr>")  # fmt: skip
    return f'<table class="sg-spark-progress" style="font-size:0.9em">{"".join(rows)}</table>'


# ------------------------------------------------------------------------------------------------ per cell


@dataclass
class Cell:
    number: int
    group: str
    parent: dict[str, Any]
    display_id: str
    bound: bool = False  # its job group is set on the main thread's JVM thread
    ended: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    jobs: dict[int, JobView] = field(default_factory=dict)
    shown: bool = False
    last: dict[str, Any] | None = None  # the content last sent


class CellJobs:
    """Job group per cell, its live progress display and the final state (see the module docstring)."""

    def __init__(self, starter: Any, kernel: Any, enabled: bool) -> None:
        self.starter, self.kernel, self.enabled = starter, kernel, enabled
        self.cell: Cell | None = None
        self._count = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracker: Any = None  # the JVM's JavaSparkStatusTracker (used from the progress thread only)

    def install(self, shell: Any) -> None:
        shell.events.register("pre_run_cell", self.pre_run_cell)
        shell.events.register("post_run_cell", self.post_run_cell)

    # -- main thread
    def pre_run_cell(self, info: Any = None) -> None:
        self._count += 1
        parent = self.kernel.get_parent("shell")
        pid = os.getpid()
        self.cell = Cell(self._count, f"sg-cell-{self._count}", parent or {}, f"sg-spark-{pid}-{self._count}")
        code = (getattr(info, "raw_cell", "") or "").strip().splitlines()
        self._description = f"cell {self._count}: {code[0][:80] if code else ''}"
        if self.starter.session is not None:
            self.bind()

    def bind(self) -> None:
        """Put the main thread's jobs into the current cell's group (once the session exists)."""
        cell = self.cell
        if cell is None or cell.bound or threading.current_thread() is not threading.main_thread():
            return
        try:
            self.starter.session.sparkContext.setJobGroup(cell.group, self._description)
        except Exception as exc:  # a broken session: the cell's own call will say so
            log.warning("cannot set the cell's Spark job group: %r", exc)
            return
        cell.bound = True
        if self.enabled:
            self._serve(cell)

    def post_run_cell(self, result: Any = None) -> None:
        cell = self.cell
        if cell is None:
            return
        cell.interrupted = isinstance(getattr(result, "error_in_exec", None), KeyboardInterrupt)
        cell.ended.set()
        if cell.bound and self.enabled:
            cell.done.wait(FINAL_WAIT)  # its final state reaches the notebook before the cell's reply

    def cancel(self) -> None:
        """Cancel the current cell's jobs (any thread but the signalled main thread: it needs its own py4j call)."""
        cell, sc = self.cell, self.starter.session.sparkContext
        if cell is not None and cell.bound:
            sc.cancelJobGroup(cell.group)
            log.info("interrupt: cancelled the Spark jobs of %s (group %s)", self.starter.details.get("app_id"),
                     cell.group)  # fmt: skip
        else:
            sc.cancelAllJobs()
            log.info("interrupt: cancelled all Spark jobs of %s", self.starter.details.get("app_id"))

    # -- progress thread
    def _serve(self, cell: Cell) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spark-progress", daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()  # no cell with Spark: the thread sleeps here, no polling
            self._wake.clear()
            cell = self.cell
            if cell is None or not cell.bound:
                continue
            try:
                ended = cell.ended.wait(POLL_DELAY)
                while not ended:
                    self._look(cell)
                    if self.enabled:
                        self._publish(cell, final=False)
                    ended = cell.ended.wait(POLL_INTERVAL)
                self._look(cell, final=True)
                if self.enabled:
                    self._publish(cell, final=True)
            except Exception as exc:
                log.warning("Spark progress of cell %d failed: %r", cell.number, exc)
            finally:
                cell.done.set()

    def _look(self, cell: Cell, final: bool = False) -> None:
        """Read the state of the cell's jobs from the status tracker (finished jobs are not read again)."""
        if self._tracker is None:
            self._tracker = self.starter.session.sparkContext._jsc.statusTracker()
        tracker, now = self._tracker, time.time()
        for job_id in list(tracker.getJobIdsForGroup(cell.group)):
            job = cell.jobs.setdefault(int(job_id), JobView(int(job_id)))
            if job.ended is not None:
                continue
            info = tracker.getJobInfo(job.job_id)
            if info is None:
                continue
            if not job.stage_ids:
                job.stage_ids = sorted(int(s) for s in info.stageIds())
            job.status = str(info.status())
            for stage_id in job.stage_ids:
                stage = job.stages.get(stage_id)
                if stage is not None and stage.total and stage.done + stage.failed >= stage.total:
                    continue  # finished stage
                java = tracker.getStageInfo(stage_id)
                if java is None:  # skipped (its output was reused) or not submitted yet
                    continue
                submitted = java.submissionTime()
                job.stages[stage_id] = StageView(
                    stage_id, str(java.name()), java.numTasks(), java.numCompletedTasks(), java.numActiveTasks(),
                    java.numFailedTasks(), submitted / 1000 if submitted > 0 else None,
                )  # fmt: skip
            if job.status in TERMINAL:
                job.ended = now
        if final:
            for job in cell.jobs.values():
                if job.ended is None and cell.interrupted:
                    job.ended = now

    def _publish(self, cell: Cell, final: bool) -> None:
        if not cell.jobs:
            return
        jobs = [cell.jobs[j] for j in sorted(cell.jobs)]
        ui, now = self.starter.details.get("ui_url"), time.time()
        content = {
            "data": {"text/plain": render_text(jobs, ui, now, cell.interrupted and final),
                     "text/html": render_html(jobs, ui, now, cell.interrupted and final)},
            "metadata": {},
            "transient": {"display_id": cell.display_id},
        }  # fmt: skip
        if content == cell.last:
            return
        cell.last = content
        kind = "update_display_data" if cell.shown else "display_data"
        cell.shown = True
        kernel = self.kernel
        kernel.session.send(kernel.iopub_socket, kind, content, parent=cell.parent, ident=b"display_data")


# ------------------------------------------------------------------------------------------------ %spark


def _executors(sc: Any) -> list[dict[str, Any]] | str:
    """The application's live executors (the driver too), from its status store through py4j (what the Spark UI's
    REST API serves, without the UI's first-request start-up), or why not."""
    try:
        found = sc._jsc.sc().statusStore().executorList(True)
        executors = [found.apply(i) for i in range(found.size())]
        return [{"id": str(e.id()), "hostPort": str(e.hostPort()), "totalCores": int(e.totalCores()),
                 "maxMemory": int(e.maxMemory())} for e in executors]  # fmt: skip
    except Exception as exc:  # an internal API: say so rather than fail the magic
        return f"unknown ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _mib(value: Any) -> str:
    return f"{int(value) // (1024 * 1024)} MiB" if isinstance(value, (int, float)) else "?"


def session_report(starter: Any, jobs: CellJobs) -> dict[str, Any]:
    """What ``%spark`` shows, without waiting for a session that is still starting."""
    d = starter.details
    report: dict[str, Any] = {
        "state": starter.state,
        "error": starter.error or None,
        "app_id": d.get("app_id"),
        "app_name": d.get("app_name"),
        "master": d.get("master"),
        "ui_url": d.get("ui_url"),
        "spark_version": d.get("spark_version"),
        "spark_opts": os.environ.get("SPARK_OPTS", ""),
        "extra_spark_opts": os.environ.get("KERNEL_EXTRA_SPARK_OPTS", ""),
        "progress": "on" if jobs.enabled else "off",
    }
    if starter.state == "starting" and starter.started:
        report["seconds"] = round(time.monotonic() - starter.started, 1)
    if starter.state == "ready" and starter.session is not None:
        conf = starter.session.sparkContext.getConf()
        report["deploy_mode"] = conf.get("spark.submit.deployMode", "client")
        if str(report["master"]).startswith("yarn"):
            report["yarn_app_id"] = d.get("app_id")
            report["yarn_tracking_url"] = next((v.split(",")[0] for k, v in conf.getAll()
                                                if k.endswith("AmIpFilter.param.PROXY_URI_BASES")), None)  # fmt: skip
        report["executors"] = _executors(starter.session.sparkContext)
    return report


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, text, link) rows of a report."""
    state = report["state"]
    if state == "failed":
        state += f": {report['error']}"
    elif state == "starting":
        state += f" ({report.get('seconds', 0)} s so far; `spark`, `sc` and `sql` wait for it on first use)"
    rows: list[tuple[str, str, str | None]] = [("state", state, None)]
    if report.get("app_id"):
        rows.append(("application", f"{report['app_id']} ({report['app_name']})", None))
        rows.append(("master", f"{report['master']}, deploy mode {report.get('deploy_mode', 'client')}", None))
        rows.append(("Spark", str(report.get("spark_version")), None))
        rows.append(("Spark UI", report["ui_url"] or "off", report["ui_url"]))
    if report.get("yarn_app_id"):
        url = report.get("yarn_tracking_url")
        rows.append(("YARN", f"{report['yarn_app_id']}" + (f", tracking URL {url}" if url else ""), url))
    executors = report.get("executors")
    if isinstance(executors, str):
        rows.append(("executors", executors, None))
    elif executors is not None:
        workers = [e for e in executors if e["id"] != "driver"]
        local = not workers and str(report.get("master", "")).startswith("local")
        shown = [e for e in executors if e["id"] == "driver"] if local else workers
        parts = [f"{e['hostPort']} ({e['totalCores']} cores, {_mib(e['maxMemory'])} storage memory)" for e in shown]
        label = "none but the driver (local mode)" if local else str(len(workers))
        rows.append(("executors", label + (": " + "; ".join(parts) if parts else ""), None))
    rows.append(("options", report["spark_opts"] or "(none)", None))
    if report["extra_spark_opts"]:
        rows.append(("extra options", f"{report['extra_spark_opts']} (KERNEL_EXTRA_SPARK_OPTS)", None))
    rows.append(("job progress", f"{report['progress']} (%spark progress on|off)", None))
    return rows


def report_text(report: dict[str, Any]) -> str:
    return "\n".join(f"{label:<14}{text}" for label, text, _ in _rows(report))


def report_html(report: dict[str, Any]) -> str:
    cells = []
    for label, text, link in _rows(report):
        value = html.escape(text)
        if link:
            value = value.replace(html.escape(link), f'<a href="{html.escape(link)}" target="_blank">'
                                                     f"{html.escape(link)}</a>")  # fmt: skip
        cells.append(f'<tr><th style="text-align:left;padding:1px 8px">{html.escape(label)}</th>'
                     f'<td style="text-align:left;padding:1px 8px">{value}</td></tr>')  # fmt: skip
    return f'<table class="sg-spark-session">{"".join(cells)}</table>'


def install_magic(shell: Any, starter: Any, jobs: CellJobs) -> None:
    """Register ``%spark`` (the session) and ``%spark progress on|off``."""
    from IPython.core.error import UsageError

    def spark(line: str) -> None:
        """%spark: this kernel's Spark application. %spark progress on|off: the live job display of cells."""
        words = line.split()
        if words and words[0] == "progress":
            if len(words) != 2 or words[1] not in ("on", "off"):
                raise UsageError("usage: %spark progress on|off")
            jobs.enabled = words[1] == "on"
            print(f"Spark job progress is {words[1]}")
            return
        if words:
            raise UsageError("usage: %spark (the session) or %spark progress on|off")
        report = session_report(starter, jobs)
        shell.display_pub.publish({"text/plain": report_text(report), "text/html": report_html(report)}, {})

    shell.register_magic_function(spark, "line", "spark")
