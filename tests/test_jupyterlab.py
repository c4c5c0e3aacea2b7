"""JupyterLab in a real browser: `jupyter lab` with the provisioner and a Spark kernelspec on the lab hosts, driven
through Selenium by Debian's headless Chromium (`chromium`, `chromium-driver`; no browser download). It opens a
notebook on the remote Spark kernel, runs a multi-second job and sees the live progress display and the result,
interrupts a long job, restarts the kernel and shuts it down. Screenshots go to the test's tmp dir."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab
from testlab.spark_cluster import SPARK_HOME, SparkCluster
from tests.conftest import env, kernel_processes

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover (the test extra installs it)
    webdriver = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and webdriver is not None),
    reason="needs Debian's chromium and chromium-driver (`make system-deps`) and selenium (`make install`)",
)
TOKEN = uuid.uuid4().hex
SPEC = "lab_spark"
DISPLAY = "Spark on the lab hosts"
JOB = "print(sc.parallelize(range(8), 8).map(lambda x: (__import__('time').sleep(1), x)[1]).sum())"
LONG = "sc.parallelize([0], 1).foreach(lambda _: __import__('time').sleep(3600))"
AFTER = "print('after restart', 6 * 7)"


@contextmanager
def jupyter_lab(lab: HostLab, root: Path, kernels: Path) -> Iterator[str]:
    """`jupyter lab` serving `root`, its kernelspecs from `kernels`, kernels on the lab's hosts; yields its URL."""
    (root / "jp").mkdir()
    (root / "jp" / "kernels").symlink_to(kernels)
    news = root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" toast over the cells
    port = free_port()
    log = (root / "lab.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--allow-root", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env(JUPYTER_PATH=str(root / "jp"), JUPYTER_CONFIG_DIR=str(root / "cfg"),
                JUPYTERLAB_SETTINGS_DIR=str(root / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(root / "ws"),
                GP_REMOTE_HOSTS=",".join(h.name for h in lab.hosts), GP_SSH_CONFIG_FILE=str(lab.ssh_config)),
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        until(lambda: server_up(base), 90, lambda: f"jupyter lab did not start: {(root / 'lab.log').read_text()}")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_up(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/status", headers=auth(), timeout=2).ok
    except requests.ConnectionError:
        return False


def auth() -> dict[str, str]:
    return {"Authorization": f"token {TOKEN}"}


def until(predicate: Callable[[], Any], timeout: float, message: Callable[[], str] | str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message or f"not within {timeout} s")
        time.sleep(0.25)
    return result


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": code}
             for code in (JOB, LONG, AFTER)]  # fmt: skip
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": SPEC, "display_name": DISPLAY, "language": "python"}},
    }))  # fmt: skip


def test_spark_notebook_in_jupyterlab(lab, kernels_dir, spark_cluster: SparkCluster, browser, tmp_path):
    opts, _ = SpecOptions(spark=True, spark_master=spark_cluster.url, spark_init_mode="lazy", spark_home=SPARK_HOME,
                          kernel_name=SPEC, display_name=DISPLAY).resolve()  # fmt: skip
    install(opts, kernels_dir / SPEC, replace=True)
    root = tmp_path / "root"
    root.mkdir()
    notebook(root / "spark.ipynb")
    driver = browser

    def shot(name: str) -> None:
        driver.save_screenshot(str(tmp_path / f"{name}.png"))

    def cells() -> list[Any]:
        return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")

    def output(i: int) -> str:
        return cells()[i].find_element(By.CSS_SELECTOR, ".jp-Cell-outputWrapper").text

    def run(i: int) -> None:
        cells()[i].find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()  # selects it (command mode)
        webdriver.ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()

    def command(name: str) -> None:
        driver.execute_script(f"window.jupyterapp.commands.execute({json.dumps(name)})")

    def kernels() -> list[dict[str, Any]]:
        return requests.get(f"{base}/api/kernels", headers=auth(), timeout=10).json()

    with jupyter_lab(lab, root, kernels_dir) as base:
        driver.get(f"{base}/lab/tree/spark.ipynb?token={TOKEN}")
        try:
            until(lambda: len(cells()) == 3, 120, "the notebook did not open")
            until(lambda: DISPLAY in driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel-toolbar").text, 60,
                  "the notebook's toolbar does not name the Spark kernel")  # fmt: skip
            (kernel,) = until(kernels, 120, "no kernel started")
            assert kernel["name"] == SPEC
            host = next(h for h in lab.hosts if kernel_processes(h, kernel["id"]))

            # A multi-second job: its progress display while it runs, then the final state and the result.
            run(0)
            until(lambda: "running" in output(0) and "/8" in output(0), 300, lambda: f"no progress: {output(0)!r}")
            shot("running")
            cells()[0].screenshot(str(tmp_path / "spark-progress-running-cell.png"))
            until(lambda: "28" in output(0).splitlines(), 180, lambda: f"no result: {output(0)!r}")
            page = output(0)
            assert "done" in page and "8/8" in page, page
            table = cells()[0].find_element(By.CSS_SELECTOR, "table.sg-spark-progress")
            link = table.find_element(By.CSS_SELECTOR, "a").get_attribute("href")
            assert "/jobs/job/?id=" in link, link
            shot("spark-progress")
            cells()[0].screenshot(str(tmp_path / "spark-progress-cell.png"))  # the cell alone (README's picture)

            # Interrupting a long job cancels it; the display ends as cancelled.
            run(1)
            until(lambda: "running" in output(1), 120, lambda: f"no progress: {output(1)!r}")
            command("notebook:interrupt-kernel")
            until(lambda: "KeyboardInterrupt" in output(1), 60, lambda: f"not interrupted: {output(1)!r}")
            until(lambda: "cancelled" in output(1), 30, lambda: f"no final state: {output(1)!r}")
            shot("interrupted")

            # Restart (confirming Lab's dialog), then the kernel runs cells again.
            pid_before = {pid for pid, _ in kernel_processes(host, kernel["id"])}
            command("notebook:restart-kernel")
            until(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"), 30, "no restart dialog")
            driver.find_element(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept").click()
            until(lambda: ({pid for pid, _ in kernel_processes(host, kernel["id"])} - pid_before), 120,
                  "no new kernel process after the restart")  # fmt: skip
            run(2)
            until(lambda: "after restart 42" in output(2), 120, lambda: f"no output after restart: {output(2)!r}")
            shot("restarted")

            # Shut down from Lab: the kernel and its processes on the host are gone.
            command("kernelmenu:shutdown")
            if driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept"):
                driver.find_element(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept").click()
            until(lambda: not kernels(), 60, "the kernel is still listed after shutdown")
            until(lambda: not kernel_processes(host, kernel["id"]), 30, "the kernel's processes outlived shutdown")
        except BaseException:
            shot("failure")
            raise
