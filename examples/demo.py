"""Run the Spark notebooks in examples/ with `jupyter execute` through the DistributedProvisioner.

    python -m examples.demo                 # embedded default: host localhost (no SSH), Spark local[*]
    python -m examples.demo --standalone    # SSH hosts in network namespaces and a standalone cluster (root)
    python -m examples.demo --yarn          # SSH hosts in network namespaces and a YARN cluster (root, make yarn-lab)

Each notebook runs in a fresh kernel of an `ssh_python_spark` spec written to a temporary JUPYTER_PATH; the demo
prints every application id (from the kernel's first-use message) and the notebook's text results.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pyspark

from spark_gateway.specs import SpecOptions, install

HERE = Path(__file__).resolve().parent
SPARK_HOME = str(Path(pyspark.__file__).resolve().parent)
KERNEL = "ssh_python_spark"
APP_LINE = re.compile(
    r"^Spark application (\S+) \((\S+)\) on (\S+); Spark UI: (\S+?)(?:; YARN tracking URL: (\S+))?$", re.M
)
Context = Iterator[tuple[str, dict[str, str], dict[str, str]]]  # master, gateway env, more SpecOptions


@contextlib.contextmanager
def embedded(work: Path) -> Context:
    """The embedded default: kernels on this machine, Spark in local mode."""
    yield "local[*]", {"GP_REMOTE_HOSTS": "localhost"}, {}


@contextlib.contextmanager
def standalone(work: Path) -> Context:
    """Three SSH hosts in network namespaces; a standalone master and two workers on the last one."""
    from testlab.hostlab import HostLab  # run as `python -m examples.demo` from the repository root
    from testlab.spark_cluster import SparkCluster

    lab = HostLab.start(3)
    try:
        cluster = SparkCluster.start(lab)
        try:
            print(f"standalone cluster {cluster.url} on {lab.hosts[-1].name}; kernels on sg-host1, sg-host2")
            hosts = ",".join(h.name for h in lab.hosts[:-1])
            yield cluster.url, {"GP_REMOTE_HOSTS": hosts, "GP_SSH_CONFIG_FILE": str(lab.ssh_config)}, {}
        finally:
            cluster.stop()
    finally:
        lab.stop()


@contextlib.contextmanager
def yarn(work: Path) -> Context:
    """Three SSH hosts in network namespaces; a YARN ResourceManager on the last, NodeManagers on the first two."""
    from testlab.hostlab import HostLab  # run as `python -m examples.demo` from the repository root
    from testlab.yarn_lab import YarnLab

    lab = HostLab.start(3)
    try:
        cluster = YarnLab.start(lab)
        try:
            print(f"YARN ResourceManager {cluster.web_url}; NodeManagers and kernels on sg-host1, sg-host2")
            hosts = ",".join(h.name for h in lab.hosts[:-1])
            small = "--conf spark.yarn.am.memory=512m --executor-memory 512m --num-executors 1 --executor-cores 1"
            spec = {"hadoop_conf_dir": str(cluster.conf_dir), "yarn_jars": f"local:{SPARK_HOME}/jars/*",
                    "extra_spark_opts": small}  # fmt: skip
            yield "yarn", {"GP_REMOTE_HOSTS": hosts, "GP_SSH_CONFIG_FILE": str(lab.ssh_config)}, spec
        finally:
            cluster.stop()
    finally:
        lab.stop()


def run(notebook: Path, work: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    """Execute a copy of `notebook` in `work` with `jupyter execute`; return the executed notebook."""
    copy = work / notebook.name
    shutil.copy(notebook, copy)
    jupyter = str(Path(sys.executable).parent / "jupyter")
    cmd = [jupyter, "execute", f"--kernel_name={KERNEL}", "--inplace", "--timeout=600", str(copy)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"jupyter execute {notebook.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return nbformat.read(copy, as_version=4)


def text_outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out["text"])
            elif "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"] + "\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--standalone", action="store_true", help="run against a standalone cluster on SSH hosts")
    where.add_argument("--yarn", action="store_true", help="run against a YARN cluster on SSH hosts")
    parser.add_argument("--mode", choices=("lazy", "eager"), default="lazy", help="Spark context initialization")
    args = parser.parse_args(argv)
    notebooks = sorted(HERE.glob("*.ipynb"))
    work = Path(tempfile.mkdtemp(prefix="sg-demo-"))
    user = getpass.getuser()
    try:
        context = standalone if args.standalone else yarn if args.yarn else embedded
        with context(work) as (master, gateway_env, extra):
            opts, _ = SpecOptions(spark=True, spark_master=master, spark_home=SPARK_HOME, interpreter=sys.executable,
                                  spark_init_mode=args.mode, kernel_name=KERNEL, **extra).resolve()  # fmt: skip
            install(opts, work / "jupyter" / "kernels" / KERNEL)
            env = {
                **os.environ,
                **gateway_env,
                "JUPYTER_PATH": str(work / "jupyter"),
                "GP_KERNEL_LOG_DIR": str(work),
                "KERNEL_USERNAME": os.environ.get("KERNEL_USERNAME") or ("demo" if user == "root" else user),
            }
            for notebook in notebooks:
                started = time.monotonic()
                nb = run(notebook, work, env)
                output = text_outputs(nb)
                apps = APP_LINE.findall(output)
                if not apps:
                    sys.exit(f"{notebook.name}: no Spark application was reported; kernel logs in {work}")
                print(f"== {notebook.name} ({time.monotonic() - started:.1f} s, {master}, {args.mode} mode)")
                for app_id, name, app_master, ui, tracking in apps:
                    yarn_ui = f", YARN tracking URL {tracking}" if tracking else ""
                    print(f"application id: {app_id} (name {name}, master {app_master}, UI {ui}{yarn_ui})")
                print(APP_LINE.sub("", output).strip())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
