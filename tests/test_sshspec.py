"""`jupyter ssh-spec` (install, convert, check, sync, build) and `make specs`: the real CLI in subprocesses, and
real SSH hosts (testlab/hostlab.py) whose private kernels directories make `sync` and `check` meaningful."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from spark_gateway import __version__, specs
from spark_gateway.specs import SpecOptions, manifest
from spark_gateway.ssh import SshPool, SshSettings
from testlab.hostlab import HostLab, LabHost, lab_hosts
from tests.conftest import env, execute, gateway_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KERNELS = "/usr/local/share/jupyter/kernels"
CHECKS = ("ssh", "spec", "interpreter", "spark-submit", "callback", "ports")
SPARK_TEMPLATE = ROOT / "kernelspecs" / "ssh_python_spark"
needs_spark = pytest.mark.skipif(
    not (SPARK_TEMPLATE / "kernel.json").is_file() or not (SPARK_TEMPLATE / "bin" / "run.sh").is_file(),
    reason="the Spark templates (kernelspecs/ssh_python_spark/kernel.json and bin/run.sh, issue 4) are not here yet",
)
R_LAUNCHER = ROOT / "kernel-launchers" / "R" / "scripts" / "launch_IRkernel.R"
LISTENER_FILES = {
    "scripts/server_listener.py",
    *(f"scripts/{p.name}" for p in (ROOT / "kernel-launchers" / "shared" / "scripts").glob("sg_*.py")),
}
R_FILES = {"kernel.json", "logo-64x64.png", "scripts/launch_IRkernel.R", *LISTENER_FILES}
PYTHON_FILES = {
    "kernel.json",
    "logo-64x64.png",
    "scripts/launch_ipykernel.py",
    "scripts/sg_ipykernel.py",
    "scripts/spark_notebook.py",
    "scripts/spark_connect.py",
    *LISTENER_FILES,
}


# ------------------------------------------------------------------------------------------------ helpers
def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No GP_*, JUPYTER_* or XDG_* from the caller: defaults are the documented ones."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", **extra}


def sshspec(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-m", "spark_gateway.sshspec", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(home, **env), timeout=60)


def on(host: LabHost, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """`jupyter ssh-spec ARGS` run inside a lab host (its network, mounts and private kernels directory)."""
    env = [f"{k}={v}" for k, v in clean_env(home).items()]
    return host.run(["env", "-i", *env, PY, "-m", "spark_gateway.sshspec", *args], check=False, timeout=120)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def kernel_json(spec_dir: Path) -> dict:
    return json.loads((spec_dir / "kernel.json").read_text())


def config_of(spec: dict) -> dict:
    return spec["metadata"]["kernel_provisioner"]["config"]


def remote_listing(host: LabHost, path: str) -> str:
    """sha256 and mode of every file of a directory on a host ('' when it does not exist), caches left out."""
    files = "find . -name __pycache__ -prune -o -type f"
    script = f"cd {path} 2>/dev/null || exit 0; {files} -printf '%m %p\\n' | sort; "
    script += f"{files} -print | sort | xargs sha256sum"
    return host.run(["sh", "-c", script]).stdout


def tables(out: str) -> dict[str, dict[str, dict[str, str]]]:
    """The check tables of a command's output: spec -> host -> check -> status."""
    result: dict[str, dict[str, dict[str, str]]] = {}
    current: dict[str, dict[str, str]] | None = None
    for line in out.splitlines():
        cells = line.split()
        if line and not line.startswith(" ") and ": /" in line:
            current = result.setdefault(line.split(":")[0], {})
        elif current is not None and len(cells) == len(CHECKS) + 1 and set(cells[1:]) <= {"ok", "FAIL", "skip", "n/a"}:
            current[cells[0]] = dict(zip(CHECKS, cells[1:], strict=True))
    return result


# ------------------------------------------------------------------------------------------------ install
def test_install_writes_the_seed_layout_with_an_absolute_interpreter(tmp_path: Path) -> None:
    proc = sshspec("install", f"--prefix={tmp_path}", home=tmp_path)
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "ssh_python"
    assert proc.returncode == 0, proc.stderr
    assert f"Installed kernelspec ssh_python in {spec_dir}" in proc.stderr
    assert files(spec_dir) == PYTHON_FILES
    for rel, src in (
        ("launch_ipykernel.py", "python"),
        ("sg_ipykernel.py", "python"),
        ("spark_notebook.py", "python"),
        ("server_listener.py", "shared"),
    ):
        assert (spec_dir / "scripts" / rel).read_bytes() == (
            ROOT / "kernel-launchers" / src / "scripts" / rel
        ).read_bytes()
    spec = kernel_json(spec_dir)
    assert spec["argv"][0] == PY and os.path.isabs(PY) and os.access(PY, os.X_OK)
    assert spec["argv"][1:] == [
        "-s", f"{spec_dir}/scripts/launch_ipykernel.py",
        "--kernel-id", "{kernel_id}", "--port-range", "{port_range}", "--response-address", "{response_address}",
        "--public-key", "{public_key}", "--kernel-class-name", "ipykernel.ipkernel.IPythonKernel",
    ]  # fmt: skip
    assert (spec["display_name"], spec["language"], spec["env"], spec["interrupt_mode"]) == (
        "Python SSH", "python", {}, "signal"
    )  # fmt: skip
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "distributed-provisioner",
        "config": {"launch_timeout": 30},
    }
    loaded = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]).get_kernel_spec("ssh_python")
    assert loaded.argv == spec["argv"] and loaded.metadata["kernel_provisioner"]["provisioner_name"]


def test_install_through_the_jupyter_command(tmp_path: Path) -> None:
    jupyter = Path(PY).parent / "jupyter"
    proc = subprocess.run(
        [str(jupyter), "ssh-spec", "install", f"--prefix={tmp_path}", "--kernel-name=via_jupyter"],
        capture_output=True, text=True, env=clean_env(tmp_path, PATH=f"{Path(PY).parent}:{os.environ['PATH']}"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "share/jupyter/kernels/via_jupyter/kernel.json").is_file()


OPTION_CASES = [
    # (arguments, environment, kernel name, what the option must do to kernel.json)
    (["--kernel-name=Team Kernel"], {}, "team_kernel", lambda s: s["display_name"] == "Python SSH"),
    (["--display-name=Team Python"], {}, "ssh_python", lambda s: s["display_name"] == "Team Python"),
    (["--language=PYTHON"], {}, "ssh_python", lambda s: s["language"] == "python"),
    (["--remote-hosts=node1", "--remote-hosts=node2:2222"], {}, "ssh_python",
     lambda s: config_of(s) == {"launch_timeout": 30, "remote_hosts": ["node1", "node2:2222"]}),
    ([], {"GP_REMOTE_HOSTS": "node1,node2"}, "ssh_python", lambda s: config_of(s) == {"launch_timeout": 30}),
    (["--remote-hosts=node3"], {"GP_REMOTE_HOSTS": "node1,node2"}, "ssh_python",
     lambda s: config_of(s)["remote_hosts"] == ["node3"]),
    (["--authorized-users=bob", "--authorized-users=alice"], {}, "ssh_python",
     lambda s: config_of(s) == {"launch_timeout": 30, "authorized_users": ["alice", "bob"]}),
    (["--unauthorized-users=mallory"], {}, "ssh_python",
     lambda s: config_of(s) == {"launch_timeout": 30, "unauthorized_users": ["mallory"]}),
    (["--unauthorized-users=root"], {}, "ssh_python", lambda s: config_of(s) == {"launch_timeout": 30}),
    (["--port-range=40000..41000"], {}, "ssh_python",
     lambda s: config_of(s) == {"launch_timeout": 30, "port_range": "40000..41000"}),
    (["--launch-timeout=90"], {}, "ssh_python", lambda s: config_of(s) == {"launch_timeout": 90}),
    ([], {"GP_LAUNCH_TIMEOUT": "75"}, "ssh_python", lambda s: config_of(s) == {"launch_timeout": 75}),
    (["--ipykernel-subclass-name=ipykernel.inprocess.ipkernel.InProcessKernel"], {}, "ssh_python",
     lambda s: s["argv"][-2:] == ["--kernel-class-name", "ipykernel.inprocess.ipkernel.InProcessKernel"]),
    (["--interpreter=/bin/sh"], {}, "ssh_python", lambda s: s["argv"][0] == "/bin/sh"),
    (["--spark-init-mode=eager", "--extra-spark-opts=--conf a=b"], {}, "ssh_python",
     lambda s: "--spark-context-initialization-mode" not in s["argv"] and s["env"] == {}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "name", "effect"), OPTION_CASES, ids=[" ".join(c[0]) or str(c[1]) for c in OPTION_CASES]
)
def test_install_option_lands_in_the_spec(tmp_path: Path, args: list[str], env: dict, name: str, effect) -> None:
    proc = sshspec("install", f"--prefix={tmp_path}", *args, home=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    spec_dir = tmp_path / "share/jupyter/kernels" / name
    assert files(spec_dir) == PYTHON_FILES
    assert effect(kernel_json(spec_dir)), kernel_json(spec_dir)
    if "--spark-init-mode=eager" in args:
        assert "--spark-init-mode is ignored without --spark" in proc.stderr
        assert "--extra-spark-opts is ignored without --spark" in proc.stderr


def test_install_logging_config_file_and_help(tmp_path: Path) -> None:
    config = tmp_path / "ssh_spec_config.py"
    config.write_text("c.BaseSpecApp.display_name = 'From config'\nc.BaseSpecApp.launch_timeout = 45\n")
    proc = sshspec("install", f"--prefix={tmp_path}", f"--config={config}", "--log-level=WARN", home=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    spec = kernel_json(tmp_path / "share/jupyter/kernels/ssh_python")
    assert spec["display_name"] == "From config" and config_of(spec) == {"launch_timeout": 45}
    debug = sshspec("install", f"--prefix={tmp_path}", "--replace", "--debug", home=tmp_path)
    assert debug.returncode == 0 and "for config files" in debug.stderr  # jupyter_core's debug message
    help_text = sshspec("install", "--help", home=tmp_path).stdout
    for option in (
        "--user", "--sys-prefix", "--prefix=", "--spark", "--debug", "--remote-hosts=", "--spark-master=",
        "--kernel-name=", "--display-name=", "--language=", "--spark-home=", "--spark-init-mode=",
        "--extra-spark-opts=", "--authorized-users=", "--unauthorized-users=", "--port-range=", "--launch-timeout=",
        "--ipykernel-subclass-name=", "--log-level=", "--config=", "--replace", "--interpreter=",
    ):  # fmt: skip
        assert f"\n{option}" in help_text, option
    for default in ("Default: 'yarn'", "Default: 'Python'", "else /opt/spark", "Default: 'lazy'",
                    "default: root", "default: 0..0", "default: 30", "default: localhost"):  # fmt: skip
        assert default in help_text, default
    help_all = sshspec("install", "--help-all", home=tmp_path).stdout
    assert "--BaseSpecApp.spark_home" in help_all and "--SshSpecInstaller.spark_master" in help_all


def test_install_locations_user_and_sys_prefix(tmp_path: Path) -> None:
    user = sshspec("install", "--user", home=tmp_path)
    assert user.returncode == 0, user.stderr
    assert files(tmp_path / ".local/share/jupyter/kernels/ssh_python") == PYTHON_FILES
    # --sys-prefix is the running interpreter's sys.prefix: run the CLI from a throw-away environment
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    site = next((Path(PY).parent.parent / "lib").glob("python3*/site-packages"))
    proc = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "spark_gateway.sshspec", "install", "--sys-prefix"],
        capture_output=True, text=True, env=clean_env(tmp_path, PYTHONPATH=f"{ROOT}:{site}"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    spec_dir = env_dir / "share/jupyter/kernels/ssh_python"
    assert files(spec_dir) == PYTHON_FILES
    assert kernel_json(spec_dir)["argv"][0] == str(env_dir / "bin" / "python")


BAD_INPUT = [
    (["--language=Go"], "unknown language 'Go': choose Python, R or Scala"),
    (["--spark", "--spark-init-mode=sometimes"], "unknown Spark context initialization mode 'sometimes'"),
    (["--port-range=40000-41000"], "is not of the form LOWER..UPPER"),
    (["--port-range=40000..40100"], "it must span at least 1000"),
    (["--spark", "--spark-master=mesos://m:5050"], "Spark master 'mesos://m:5050' is not supported"),
    (["--spark", "--spark-master=spark://m"], "Spark master 'spark://m' is not supported"),
    (["--spark", "--spark-master=spark://m:7077;reboot"], "is not supported"),
    (["--spark", "--spark-master=local[0]"], "is not supported"),
    (["--user"], "--user and --prefix/--sys-prefix exclude each other"),
    (["--kernel-name=../escape"], "kernel name '../escape' is not valid"),
    (["--kernel-name=.hidden"], "kernel name '.hidden' is not valid"),
    (["--interpreter=python3"], "must be an absolute path"),
    (["--interpreter=/nonexistent/bin/python"], "/nonexistent/bin/python does not exist"),
    (["--launch-timeout=0"], "--launch-timeout must be a positive number"),
    (["--launch-timeout=soon"], "expected a float"),
    (["--ipykernel-subclass-name=os.path"], "is not a subclass of ipykernel.kernelbase.Kernel"),
    (["--ipykernel-subclass-name=my kernel"], "is not a dotted class name"),
    (["--spark", "--spark-home=opt/spark"], "--spark-home 'opt/spark' must be an absolute path"),
    (["surplus"], "unexpected argument 'surplus'"),
]
try:
    specs.find_toree_jar("", "/opt/spark")  # the default --spark-home, as the command below sees it
except specs.SpecError:
    BAD_INPUT.append((["--language=scala"], "Scala kernelspecs need Apache Toree's toree-assembly-*.jar"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A prefix holding the default spec, for bad input to (not) overwrite."""
    prefix = tmp_path_factory.mktemp("installed")
    assert sshspec("install", f"--prefix={prefix}", home=prefix).returncode == 0
    return prefix, prefix / "share/jupyter/kernels/ssh_python"


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_fails_in_one_line_and_leaves_the_spec_alone(
    installed: tuple[Path, Path], args: list[str], message: str
) -> None:
    prefix, spec_dir = installed
    before = manifest(spec_dir)
    line = error_line(sshspec("install", f"--prefix={prefix}", "--replace", *args, home=prefix))
    assert message in line
    assert manifest(spec_dir) == before
    assert sorted(p.name for p in spec_dir.parent.iterdir()) == ["ssh_python"]  # no staging directory left


def test_existing_spec_needs_replace(installed: tuple[Path, Path]) -> None:
    prefix, spec_dir = installed
    before = manifest(spec_dir)
    line = error_line(sshspec("install", f"--prefix={prefix}", "--display-name=Other", home=prefix))
    assert f"kernelspec {spec_dir} already exists: pass --replace to overwrite it" in line
    assert manifest(spec_dir) == before


def test_failed_replace_restores_the_previous_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one failure root cannot provoke for real (renaming the new spec into place) is injected."""
    opts, _ = SpecOptions(config={"launch_timeout": 30}).resolve()
    dest = specs.install(opts, tmp_path / "ssh_python")
    before = manifest(dest)
    rename = Path.rename

    def failing_rename(self: Path, target: Path) -> Path:
        if self.name == "new":
            raise OSError(errno.EIO, "injected I/O error")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    new_opts, _ = SpecOptions(display_name="Replacement", config={"launch_timeout": 30}).resolve()
    with pytest.raises(OSError, match="injected"):
        specs.install(new_opts, dest, replace=True)
    monkeypatch.undo()
    assert manifest(dest) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ssh_python"]


@needs_spark
@pytest.mark.parametrize(
    ("master", "head"),
    [
        ("yarn", "--master yarn --deploy-mode client --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "),
        ("spark://10.0.0.5:7077", "--master spark://10.0.0.5:7077 --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "),
        ("local[*]", "--master local[*] --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} "),
    ],
)
def test_spark_install_for_each_master(tmp_path: Path, master: str, head: str) -> None:
    args = ["--spark", f"--spark-master={master}", "--spark-home=/srv/spark", "--spark-init-mode=EAGER",
            "--extra-spark-opts=--conf spark.ui.enabled=false"]  # fmt: skip
    proc = sshspec("install", f"--prefix={tmp_path}", *args, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec_dir = tmp_path / "share/jupyter/kernels/ssh_python_spark"
    assert files(spec_dir) == PYTHON_FILES | {"bin/run.sh"}
    assert os.access(spec_dir / "bin/run.sh", os.X_OK)
    spec = kernel_json(spec_dir)
    assert spec["display_name"] == "Python SSH (with Spark)"
    assert spec["argv"][0] == f"{spec_dir}/bin/run.sh"
    assert spec["argv"][spec["argv"].index("--spark-context-initialization-mode") + 1] == "eager"
    assert spec["env"]["SPARK_HOME"] == "/srv/spark" and spec["env"]["PYSPARK_PYTHON"] == PY
    assert spec["env"]["SPARK_OPTS"].startswith(head), spec["env"]["SPARK_OPTS"]
    assert spec["env"]["SPARK_OPTS"].endswith("--conf spark.ui.enabled=false ${KERNEL_EXTRA_SPARK_OPTS}")
    assert "LAUNCH_OPTS" in spec["env"]
    assert config_of(spec) == config_of(json.loads((SPARK_TEMPLATE / "kernel.json").read_text()))


def test_r_layout(tmp_path: Path) -> None:
    opts, _ = SpecOptions(language="R").resolve()
    spec_dir = specs.install(opts, tmp_path / "kernels" / opts.kernel_name)
    assert spec_dir.name == "ssh_r"
    assert files(spec_dir) == R_FILES
    assert (spec_dir / "scripts/launch_IRkernel.R").read_bytes() == R_LAUNCHER.read_bytes()
    spec = kernel_json(spec_dir)
    assert spec["argv"] == [
        "Rscript", "--no-init-file", "--no-environ", f"{spec_dir}/scripts/launch_IRkernel.R",
        "--kernel-id", "{kernel_id}", "--port-range", "{port_range}", "--response-address", "{response_address}",
        "--public-key", "{public_key}", "--spark-context-initialization-mode", "none",
    ]  # fmt: skip
    assert spec["env"] == {"GP_LISTENER_PYTHON": PY}  # the Python that runs server_listener.py beside the R kernel
    assert (spec["display_name"], spec["language"], config_of(spec)) == ("R SSH", "R", {"launch_timeout": 30})


@pytest.mark.parametrize(("master", "mode"), [("yarn", "lazy"), ("spark://m:7077", "eager")])
def test_r_spark_layout(tmp_path: Path, master: str, mode: str) -> None:
    options = SpecOptions(language="R", spark=True, spark_master=master, spark_home="/srv/spark", spark_init_mode=mode,
                          extra_spark_opts="--conf spark.ui.enabled=false")  # fmt: skip
    opts, _ = options.resolve()
    spec_dir = specs.install(opts, tmp_path / "kernels" / opts.kernel_name)
    assert spec_dir.name == "ssh_r_spark"
    assert files(spec_dir) == R_FILES | {"bin/run.sh"} and os.access(spec_dir / "bin/run.sh", os.X_OK)
    spec = kernel_json(spec_dir)
    assert spec["argv"][0] == f"{spec_dir}/bin/run.sh"
    assert spec["argv"][spec["argv"].index("--spark-context-initialization-mode") + 1] == mode
    head = f"--master {master} " + ("--deploy-mode client " if master == "yarn" else "")
    assert spec["env"]["SPARK_OPTS"] == (
        f"{head}--name ${{KERNEL_ID:-ERROR__NO__KERNEL_ID}} --conf spark.r.command=Rscript "
        "--conf spark.ui.enabled=false ${KERNEL_EXTRA_SPARK_OPTS}"
    )
    assert {k: spec["env"][k] for k in ("SPARK_HOME", "GP_RSCRIPT", "GP_LISTENER_PYTHON", "LAUNCH_OPTS")} == {
        "SPARK_HOME": "/srv/spark", "GP_RSCRIPT": "Rscript", "GP_LISTENER_PYTHON": PY, "LAUNCH_OPTS": ""
    }  # fmt: skip


@pytest.mark.parametrize(("spark", "mode"), [(False, "none"), (True, "eager")])
def test_scala_layouts(tmp_path: Path, spark: bool, mode: str) -> None:
    """Toree's jar is copied into lib/ (a stand-in file here: the real one is tested in tests/test_scala_kernel.py)."""
    jar = tmp_path / "toree-assembly-0.5.0-incubating.jar"
    jar.write_text("stand-in\n")
    master = {"spark_master": "spark://m:7077", "spark_init_mode": mode} if spark else {}  # else: no Spark context
    options = SpecOptions(language="Scala", spark=spark, spark_home=str(tmp_path / "no-spark"), toree_jar=str(jar),
                          **master)  # fmt: skip
    opts, warnings = options.resolve()
    assert warnings == [
        f"no Spark at {tmp_path}/no-spark on this machine ({tmp_path}/no-spark/jars/scala-library-*.jar): cannot "
        f"check that it uses Scala 2.12, which {jar.name} needs; the launcher checks it on each host"
    ]
    spec_dir = specs.install(opts, tmp_path / "kernels" / opts.kernel_name)
    assert spec_dir.name == ("ssh_scala_spark" if spark else "ssh_scala")
    assert files(spec_dir) == {"kernel.json", "logo-64x64.png", "bin/run.sh", "scripts/launch_toree.sh",
                               *LISTENER_FILES, f"lib/{jar.name}"}  # fmt: skip
    assert (spec_dir / "lib" / jar.name).read_bytes() == jar.read_bytes()
    for script in ("bin/run.sh", "scripts/launch_toree.sh"):
        assert os.access(spec_dir / script, os.X_OK)
    spec = kernel_json(spec_dir)
    assert spec["argv"][0] == f"{spec_dir}/bin/run.sh"
    assert spec["argv"][-2:] == ["--spark-context-initialization-mode", mode]
    assert spec["env"]["SPARK_OPTS"].startswith("--master spark://m:7077 " if spark else "--name ")
    assert spec["env"]["GP_LISTENER_PYTHON"] == PY and spec["env"]["__TOREE_OPTS__"] == "--alternate-sigint USR2"


def test_scala_spark_scala_mismatch_is_refused(tmp_path: Path) -> None:
    jar = tmp_path / "toree-assembly-0.5.0-incubating.jar"
    jar.write_text("stand-in\n")
    spark_home = tmp_path / "spark4"
    (spark_home / "jars").mkdir(parents=True)
    (spark_home / "jars" / "scala-library-2.13.16.jar").write_text("stand-in\n")
    options = SpecOptions(language="Scala", spark=True, spark_home=str(spark_home), toree_jar=str(jar))
    with pytest.raises(
        specs.SpecError,
        match=r"built for Scala 2\.12 \(Spark 3\.x\), but the Spark at .* uses Scala "
        r"2\.13\.16 \(scala-library-2\.13\.16\.jar\): its Scala kernels would die with NoSuchMethodError",
    ):
        options.resolve()
    (spark_home / "jars" / "scala-library-2.13.16.jar").rename(spark_home / "jars" / "scala-library-2.12.18.jar")
    assert options.resolve()[1] == []  # Spark 3 (Scala 2.12): no warning


# ------------------------------------------------------------------------------------------------ convert
def test_convert_refuses_non_spark_specs_and_unknown_names(installed: tuple[Path, Path], tmp_path: Path) -> None:
    prefix, spec_dir = installed
    before = manifest(spec_dir)
    path = {"JUPYTER_PATH": str(prefix / "share/jupyter")}
    line = error_line(sshspec("convert", "ssh_python", "--to=yarn", home=tmp_path, **path))
    assert "is not a Spark kernelspec" in line
    line = error_line(sshspec("convert", "no_such_spec", "--to=yarn", home=tmp_path, **path))
    assert "no kernelspec named 'no_such_spec' is installed" in line
    line = error_line(sshspec("convert", str(tmp_path), "--to=yarn", home=tmp_path))
    assert "is not a kernelspec directory" in line
    assert manifest(spec_dir) == before


@needs_spark
def test_convert_round_trip_and_refusals(tmp_path: Path) -> None:
    assert sshspec("install", f"--prefix={tmp_path}", "--spark", home=tmp_path).returncode == 0
    kernels = tmp_path / "share/jupyter/kernels"
    src, path = kernels / "ssh_python_spark", {"JUPYTER_PATH": str(tmp_path / "share/jupyter")}
    before = manifest(src)
    proc = sshspec("convert", "ssh_python_spark", "--to", "standalone", "--spark-master", "spark://10.0.0.5:7077",
                   home=tmp_path, **path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    standalone = kernels / "ssh_python_spark_standalone"
    spec = kernel_json(standalone)
    assert spec["display_name"] == "Python SSH (with Spark standalone)"
    assert spec["env"]["SPARK_OPTS"].startswith("--master spark://10.0.0.5:7077 --name ")
    assert "--deploy-mode" not in spec["env"]["SPARK_OPTS"]
    assert spec["argv"][0] == f"{standalone}/bin/run.sh"
    assert {k: v for k, v in manifest(standalone).items() if k != "kernel.json"} == {
        k: v for k, v in before.items() if k != "kernel.json"
    }
    proc = sshspec("convert", str(standalone), "--to=yarn", home=tmp_path)  # by path
    assert proc.returncode == 0, proc.stderr
    back = kernels / "ssh_python_spark_yarn"
    original = json.loads((src / "kernel.json").read_text().replace(str(src), str(back)))
    original["display_name"] = "Python SSH (with Spark on YARN)"
    assert kernel_json(back) == original
    for args, message in (
        (["--to=mesos"], "unknown conversion target 'mesos'"),
        (["--to=standalone"], "--to standalone needs --spark-master spark://HOST:PORT"),
        (["--to=standalone", "--spark-master=yarn"], "--to standalone needs --spark-master spark://HOST:PORT"),
        (["--to=yarn"], "already uses a yarn master"),
        (["--to=standalone", "--spark-master=spark://h:7077"], "ssh_python_spark_standalone already exists"),
    ):
        assert message in error_line(sshspec("convert", "ssh_python_spark", *args, home=tmp_path, **path))
    proc = sshspec("convert", "ssh_python_spark", "--to=standalone", "--spark-master=spark://h:7077", "--replace",
                   home=tmp_path, **path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert kernel_json(standalone)["env"]["SPARK_OPTS"].startswith("--master spark://h:7077 ")
    assert manifest(src) == before  # the source is never touched


# ------------------------------------------------------------------------------------------------ make specs
def make_specs(tmp_path: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "specs", f"SPECS_DIR={tmp_path / 'build'}",
           f"DIST_DIR={tmp_path / 'dist'}", *variables]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(tmp_path), timeout=120)


def test_make_specs_needs_a_master(tmp_path: Path) -> None:
    proc = make_specs(tmp_path)
    assert proc.returncode != 0 and "usage: make specs SPARK_MASTER=" in proc.stderr


@needs_spark
@pytest.mark.parametrize(("master", "kind"), [("yarn", "yarn"), ("spark://10.0.0.5:7077", "standalone")])
def test_make_specs_for_yarn_and_standalone(tmp_path: Path, master: str, kind: str) -> None:
    proc = make_specs(tmp_path, f"SPARK_MASTER={master}")
    assert proc.returncode == 0, proc.stderr
    spark = kernel_json(tmp_path / "build/ssh_python_spark")
    assert spark["env"]["SPARK_OPTS"].startswith(f"--master {master} ")
    assert ("--deploy-mode client" in spark["env"]["SPARK_OPTS"]) == (kind == "yarn")
    assert (tmp_path / "dist" / f"spark_gateway-{__version__}-kernelspecs-{kind}.tar.gz").is_file()
    # Every language, whatever this machine has: R names the hosts' Rscript, Scala carries Toree from the build cache
    built = sorted(p.name for p in (tmp_path / "build").iterdir())
    assert built == ["ssh_python", "ssh_python_spark", "ssh_r", "ssh_r_spark", "ssh_scala", "ssh_scala_spark"]
    assert kernel_json(tmp_path / "build/ssh_r")["argv"][0] == "Rscript"
    assert kernel_json(tmp_path / "build/ssh_r_spark")["env"]["GP_RSCRIPT"] == "Rscript"
    jar = "toree-assembly-0.5.0-incubating.jar"
    for name in ("ssh_scala", "ssh_scala_spark"):
        assert (tmp_path / "build" / name / "lib" / jar).is_file()
        assert kernel_json(tmp_path / "build" / name)["metadata"]["spark_gateway"] == {
            "toree": jar, "fits_spark": "Spark 3.x (Scala 2.12)"
        }  # fmt: skip
        assert f"built {name} in {tmp_path / 'build' / name} ({jar}: fits Spark 3.x (Scala 2.12))" in proc.stdout


# ------------------------------------------------------------------------------------------------ the hosts
@pytest.fixture(scope="module")
def lab() -> Iterator[HostLab]:
    """Three SSH hosts, each with a private /usr/local/share/jupyter/kernels (a shared session `lab` can replace
    this fixture: the tests below only need three netns hosts and put every host back as they found it)."""
    lab = HostLab.start(3)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def hosts(lab: HostLab) -> Iterator[list[LabHost]]:
    """The lab hosts with empty kernels directories and sshd up; the first one plays the gateway."""
    if lab.mode != "netns":
        pytest.skip("sync and check need hosts with private kernels directories (netns mode, root)")
    for host in lab.hosts:
        host.start_sshd()
        host.run(["sh", "-c", f"rm -rf {KERNELS}/* {KERNELS}/.[!.]*"])
    yield lab.hosts
    for host in lab.hosts:
        host.start_sshd()
        host.run(["sh", "-c", f"rm -rf {KERNELS}/* {KERNELS}/.[!.]*"])


def test_install_defaults_to_the_system_kernels_directory(hosts: list[LabHost], tmp_path: Path) -> None:
    gateway, other, _ = hosts
    here_before = os.path.exists(f"{KERNELS}/ssh_python")
    proc = on(gateway, "install", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"Installed kernelspec ssh_python in {KERNELS}/ssh_python" in proc.stderr
    listing = gateway.run(["sh", "-c", f"cd {KERNELS}/ssh_python && find . -type f | sort"]).stdout.split()
    assert listing == sorted(f"./{f}" for f in PYTHON_FILES)
    assert remote_listing(other, f"{KERNELS}/ssh_python") == ""
    assert os.path.exists(f"{KERNELS}/ssh_python") == here_before  # this machine's directory was not touched


def test_sync_copies_to_hosts_that_lack_the_spec_then_skips_identical_ones(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    gateway, one, two = hosts
    ssh = f"--ssh-config={lab.ssh_config}"
    assert (
        on(gateway, "install", f"--remote-hosts={one.name}", f"--remote-hosts={two.name}", home=tmp_path).returncode
        == 0
    )
    proc = on(gateway, "sync", "ssh_python", ssh, home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in (one, two):
        assert (
            f"{host.name}: ssh_python: copying {len(PYTHON_FILES)} files" in proc.stdout
            and "(missing there)" in proc.stdout
        )
        assert remote_listing(host, f"{KERNELS}/ssh_python") == remote_listing(gateway, f"{KERNELS}/ssh_python")
        # compiled there by the kernel's Python, so that kernels of users who cannot write the spec do not compile
        cached = host.run(["sh", "-c", f"ls {KERNELS}/ssh_python/scripts/__pycache__"]).stdout.split()
        assert {c.split(".")[0] for c in cached} >= {"sg_callback", "sg_control", "sg_ports"}, cached
    assert tables(proc.stdout)["ssh_python"] == {h.name: dict.fromkeys(CHECKS, "ok") | {"spark-submit": "n/a"}
                                                 for h in (one, two)}  # fmt: skip
    inode = one.run(["stat", "-c", "%i", f"{KERNELS}/ssh_python"]).stdout
    again = on(gateway, "sync", "ssh_python", ssh, home=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{one.name}: ssh_python: up to date" in again.stdout and "copying" not in again.stdout
    assert one.run(["stat", "-c", "%i", f"{KERNELS}/ssh_python"]).stdout == inode


def test_sync_replaces_stale_copies_and_reports_hosts_that_are_down(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    gateway, one, two = hosts
    ssh = f"--ssh-config={lab.ssh_config}"
    install = ["install", f"--remote-hosts={one.name}", f"--remote-hosts={two.name}"]
    assert on(gateway, *install, home=tmp_path).returncode == 0
    assert on(gateway, "sync", "ssh_python", ssh, home=tmp_path).returncode == 0
    one.run(["sh", "-c", f"echo tampered >> {KERNELS}/ssh_python/kernel.json; touch {KERNELS}/ssh_python/extra"])
    assert on(gateway, *install, "--replace", "--display-name=Python SSH v2", home=tmp_path).returncode == 0
    two.stop_sshd()
    proc = on(gateway, "sync", "ssh_python", ssh, home=tmp_path)
    assert proc.returncode == 1
    assert f"{one.name}: ssh_python: copying {len(PYTHON_FILES)} files" in proc.stdout
    assert "different content: kernel.json; only there: extra" in proc.stdout
    assert f"{two.name}: ssh_python: FAILED: cannot reach {two.name}" in proc.stdout
    assert "some hosts could not be brought up to date" in error_line(proc)
    assert tables(proc.stdout)["ssh_python"][two.name]["ssh"] == "FAIL"
    assert remote_listing(one, f"{KERNELS}/ssh_python") == remote_listing(gateway, f"{KERNELS}/ssh_python")
    two.start_sshd()
    proc = on(gateway, "sync", "ssh_python", ssh, home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{one.name}: ssh_python: up to date" in proc.stdout
    assert (
        f"{two.name}: ssh_python: copying {len(PYTHON_FILES)} files" in proc.stdout
        and "(different content: kernel.json)" in proc.stdout
    )
    assert remote_listing(two, f"{KERNELS}/ssh_python") == remote_listing(gateway, f"{KERNELS}/ssh_python")


WATCHER = """
import json, os, sys, time
path, sizes, deadline = sys.argv[1], {int(sys.argv[2]): "old", int(sys.argv[3]): "new"}, time.time() + 30
names = {"kernel.json", "logo-64x64.png", "scripts"}
seen = {"old": 0, "new": 0, "absent": 0, "partial": 0}
print("ready", flush=True)
while time.time() < deadline and not seen["new"]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        seen["absent"] += 1
        continue
    try:
        state = sizes.get(os.stat("scripts/blob.bin", dir_fd=fd).st_size, "partial")
        with open(os.open("kernel.json", os.O_RDONLY, dir_fd=fd)) as f:
            json.load(f)
        if not names <= set(os.listdir(fd)):
            state = "partial"
    except (OSError, ValueError):
        state = "partial"
    finally:
        os.close(fd)
    seen[state] += 1
print(json.dumps(seen), flush=True)
"""


def test_sync_never_shows_a_half_written_spec(lab: HostLab, hosts: list[LabHost], tmp_path: Path) -> None:
    gateway, one, _ = hosts
    ssh = f"--ssh-config={lab.ssh_config}"
    assert on(gateway, "install", f"--remote-hosts={one.name}", home=tmp_path).returncode == 0
    blob = f"{KERNELS}/ssh_python/scripts/blob.bin"
    gateway.run(["sh", "-c", f"head -c 8000000 /dev/urandom > {blob}"])
    assert on(gateway, "sync", "ssh_python", ssh, home=tmp_path).returncode == 0
    gateway.run(["sh", "-c", f"head -c 12000000 /dev/urandom > {blob}"])
    pool = SshPool(SshSettings(config_file=str(lab.ssh_config)))
    try:
        command = shlex.join([PY, "-c", WATCHER, f"{KERNELS}/ssh_python", "8000000", "12000000"])
        channel = pool.open_session(one.name, command)
        out = channel.makefile("r")
        assert out.readline().strip() == "ready"
        proc = on(gateway, "sync", "ssh_python", ssh, home=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seen = json.loads(out.readline())
        channel.close()
    finally:
        pool.close()
    assert seen["partial"] == 0 and seen["new"] > 0 and seen["old"] > 0, seen


def test_check_catches_spec_interpreter_spark_and_port_range_failures(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    gateway, one, two = hosts
    ssh = f"--ssh-config={lab.ssh_config}"
    remote = [f"--remote-hosts={one.name}", f"--remote-hosts={two.name}"]
    gateway_only = f"{KERNELS}/.gateway-only/python"  # exists in the gateway's private directory only
    gateway.run(["sh", "-c", f"mkdir -p {KERNELS}/.gateway-only && ln -s {PY} {gateway_only}"])
    system_python = "/usr/bin/python3"
    has_ipykernel = subprocess.run([system_python, "-c", "import ipykernel"], capture_output=True).returncode == 0
    for args in (
        ["--kernel-name=stale"],
        ["--kernel-name=nopython", f"--interpreter={gateway_only}"],
        ["--kernel-name=noipykernel", f"--interpreter={system_python}"],
        ["--kernel-name=nospark"],
        ["--kernel-name=badports"],
        ["--kernel-name=spark", "--spark", "--spark-master=local[*]", f"--spark-home={pyspark_dir()}"],
    ):
        if "--spark" in args and not ((SPARK_TEMPLATE / "kernel.json").is_file() and pyspark_dir()):
            continue
        assert on(gateway, "install", *remote, *args, home=tmp_path).returncode == 0
    for name, edit in (("nospark", {"SPARK_HOME": "/nonexistent/spark"}), ("badports", None)):
        path = f"{KERNELS}/{name}/kernel.json"
        spec = json.loads(gateway.run(["cat", path]).stdout)
        if edit:
            spec["env"].update(edit)
        else:
            config_of(spec)["port_range"] = "100..200"
        gateway.run(["sh", "-c", f"cat > {path}"], input=json.dumps(spec))
    names = gateway.run(["ls", KERNELS]).stdout.split()  # the specs above
    assert on(gateway, "sync", *names, ssh, home=tmp_path).returncode == 1  # sync runs the check: it fails
    one.run(["sh", "-c", f"echo '# edited' >> {KERNELS}/stale/scripts/launch_ipykernel.py"])
    two.run(["rm", "-rf", f"{KERNELS}/stale"])
    proc = on(gateway, "check", *names, ssh, home=tmp_path)
    assert proc.returncode == 1 and "some checks failed" in error_line(proc)
    result, out = tables(proc.stdout), proc.stdout
    assert result["stale"][one.name]["spec"] == result["stale"][two.name]["spec"] == "FAIL"
    differs = "differs (different content: scripts/launch_ipykernel.py)"
    assert f"{one.name} spec: {KERNELS}/stale on {one.name} {differs}" in out
    assert f"{two.name} spec: {KERNELS}/stale does not exist on {two.name}" in out
    assert "fix: jupyter ssh-spec sync stale" in out
    skipped = {"interpreter": "FAIL", "spark-submit": "n/a", "callback": "skip", "ports": "skip"}
    assert result["nopython"][one.name] == {"ssh": "ok", "spec": "ok"} | skipped
    assert f"{gateway_only} does not exist on {one.name}" in out
    if not has_ipykernel:
        assert result["noipykernel"][two.name]["interpreter"] == "FAIL"
        assert f"{system_python} on {two.name} cannot load the kernel: ModuleNotFoundError" in out
        assert f"fix: on {two.name}: {system_python} -m pip install ipykernel pycryptodome" in out
    assert result["nospark"][one.name]["spark-submit"] == "FAIL"
    assert f"/nonexistent/spark/bin/spark-submit is missing on {one.name}" in out
    assert result["badports"][two.name]["ports"] == "FAIL" and "port_range '100..200'" in out
    everything_ok = dict.fromkeys(CHECKS, "ok")
    for host in (one, two):  # what was fine stays fine
        assert result["nospark"][host.name] == everything_ok | {"spark-submit": "FAIL"}
        if "spark" in result:
            assert result["spark"][host.name] == everything_ok, out


def test_check_catches_login_and_host_key_failures(lab: HostLab, hosts: list[LabHost], tmp_path: Path) -> None:
    gateway, one, two = hosts
    remote = [f"--remote-hosts={one.name}", f"--remote-hosts={two.name}"]
    assert on(gateway, "install", *remote, home=tmp_path).returncode == 0
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    unknown = tmp_path / "ssh_config_unknown_keys"
    unknown.write_text(lab.ssh_config.read_text().replace(str(lab.known_hosts), str(empty)))
    two.stop_sshd()
    proc = on(gateway, "check", "ssh_python", f"--ssh-config={unknown}", home=tmp_path)
    result = tables(proc.stdout)["ssh_python"]
    assert proc.returncode == 1
    assert result[one.name] == {"ssh": "FAIL"} | dict.fromkeys(CHECKS[1:], "skip")
    assert f"host key of {one.name} ({one.address}:22) is unknown" in proc.stdout and "ssh-keyscan" in proc.stdout
    assert result[two.name]["ssh"] == "FAIL" and f"cannot reach {two.name}" in proc.stdout
    two.start_sshd()
    swapped = tmp_path / "known_hosts_swapped"  # sg-host2's names with sg-host3's key
    lines = lab.known_hosts.read_text().splitlines()
    key_of = {line.split()[0].split(",")[0]: line.split(None, 1)[1] for line in lines}
    swapped.write_text(f"{one.name},{one.address} {key_of[two.name]}\n")
    mismatch = tmp_path / "ssh_config_wrong_key"
    mismatch.write_text(lab.ssh_config.read_text().replace(str(lab.known_hosts), str(swapped)))
    proc = on(gateway, "check", "ssh_python", f"--ssh-config={mismatch}", home=tmp_path)
    assert tables(proc.stdout)["ssh_python"][one.name]["ssh"] == "FAIL"
    assert f"host key of {one.name} ({one.address}:22) does not match" in proc.stdout


def test_check_catches_a_gateway_address_hosts_cannot_reach(lab: HostLab, hosts: list[LabHost], tmp_path: Path) -> None:
    gateway, one, _ = hosts
    assert on(gateway, "install", f"--remote-hosts={one.name}", home=tmp_path).returncode == 0
    args = ["check", "ssh_python", f"--ssh-config={lab.ssh_config}"]
    assert on(gateway, "sync", "ssh_python", f"--ssh-config={lab.ssh_config}", home=tmp_path).returncode == 0
    proc = on(gateway, *args, "--response-ip=127.0.0.1", "--timeout=4", home=tmp_path)
    assert proc.returncode == 1
    assert tables(proc.stdout)["ssh_python"][one.name]["callback"] == "FAIL"
    assert f"{one.name} cannot connect to this gateway at 127.0.0.1:" in proc.stdout
    assert "GP_RESPONSE_IP" in proc.stdout


@pytest.mark.skipif(not (shutil.which("nft") or shutil.which("iptables")), reason="needs nft or iptables (nftables)")
def test_check_catches_firewalled_kernel_ports_and_callbacks(tmp_path: Path) -> None:
    """A lab of its own: the firewall cannot be taken down again."""
    with lab_hosts(2) as lab:
        if lab.mode != "netns":
            pytest.skip("needs netns hosts")
        first, walled = lab.hosts
        walled.firewall_ssh_only()
        rows = {}
        for gateway, target in ((first, walled), (walled, first)):
            assert on(gateway, "install", "--replace", f"--remote-hosts={target.name}", home=tmp_path).returncode == 0
            proc = on(gateway, "sync", "ssh_python", f"--ssh-config={lab.ssh_config}", "--timeout=4", home=tmp_path)
            assert proc.returncode == 1, proc.stdout
            rows[gateway.name] = tables(proc.stdout)["ssh_python"][target.name]
            if gateway is first:
                assert f"this gateway cannot connect to {walled.address}:" in proc.stdout
        fine = dict.fromkeys(CHECKS, "ok") | {"spark-submit": "n/a"}
        assert rows == {first.name: fine | {"ports": "FAIL"}, walled.name: fine | {"callback": "FAIL"}}


async def run_in_kernel(ksm: KernelSpecManager, name: str, lab: HostLab, code: str) -> list[str]:
    """Start kernel `name` through the DistributedProvisioner, run `code`, shut down; returns the output lines."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm, config=gateway_config(lab))
    await km.start_kernel(env=env())  # the spec's own remote_hosts decide where it runs
    try:
        out, reply = await execute(km, code, timeout=120)
    finally:
        await km.shutdown_kernel(now=True)
    assert reply["status"] == "ok", out
    return out.splitlines()


@pytest.mark.asyncio
async def test_make_specs_output_loads_and_starts_kernels(lab: HostLab, hosts: list[LabHost], tmp_path: Path) -> None:
    _, target, _ = hosts
    spark_home = Path(pyspark_dir()) if pyspark_dir() else Path("/opt/spark")
    opts = f"SPECS_OPTS=--remote-hosts={target.name} --spark-home={spark_home}"
    proc = make_specs(tmp_path, "SPARK_MASTER=local[*]", opts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = tmp_path / "build"
    built = sorted(p.name for p in build.iterdir())
    assert "ssh_python" in built
    assert ("ssh_python_spark" in built) == (SPARK_TEMPLATE / "kernel.json").is_file()
    assert "ssh_r" in built and "ssh_r_spark" in built  # Rscript is the hosts' (bare name), not the build machine's
    scala_ok = (specs.spark_scala_version(str(spark_home)) or ("2.12",))[0].startswith("2.12")
    assert ("ssh_scala" in built) == scala_ok  # Toree from the build cache; pyspark 4 here: its Scala 2.13 refused
    if not scala_ok:
        assert (
            "skipped ssh_scala: Apache Toree toree-assembly-0.5.0-incubating.jar is built for Scala 2.12" in proc.stdout
        )
    ksm = KernelSpecManager(kernel_dirs=[str(build)])
    assert sorted(k for k, path in ksm.find_kernel_specs().items() if Path(path).parent == build) == built
    for name in built:
        spec = ksm.get_kernel_spec(name)
        assert spec.metadata["kernel_provisioner"]["provisioner_name"] == "distributed-provisioner"
        assert spec.metadata["kernel_provisioner"]["config"]["remote_hosts"] == [target.name]
        assert [a for a in spec.argv if a.startswith("/usr/local/")][0].startswith(f"{KERNELS}/{name}/")
    (tarball,) = (tmp_path / "dist").glob("spark_gateway-*-kernelspecs-local.tar.gz")
    with tarfile.open(tarball) as tar:
        assert sorted({m.name.split("/")[0] for m in tar.getmembers()}) == built
    target.run(["tar", "-xzf", str(tarball), "-C", KERNELS])
    lines = await run_in_kernel(
        ksm, "ssh_python", lab, "import socket, sys; print(socket.gethostname(), sys.executable)"
    )
    assert lines == [f"{target.name} {ksm.get_kernel_spec('ssh_python').argv[0]}"]
    if "ssh_r" in built:
        assert await run_in_kernel(ksm, "ssh_r", lab, 'cat(Sys.info()[["nodename"]])') == [target.name]
    if "ssh_python_spark" in built and pyspark_dir() and shutil.which("java"):
        code = "from pyspark.sql import SparkSession; print(SparkSession.builder.getOrCreate().sparkContext.master)"
        assert (await run_in_kernel(ksm, "ssh_python_spark", lab, code))[-1] == "local[*]"


def pyspark_dir() -> str:
    """The Spark distribution pip's pyspark ships (bin/spark-submit included), if installed."""
    import importlib.util

    found = importlib.util.find_spec("pyspark")
    return str(Path(found.origin).parent) if found and found.origin else ""


def test_check_catches_an_r_listener_python_without_pycryptodome(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    system_python = "/usr/bin/python3"
    if not shutil.which("Rscript") or subprocess.run([system_python, "-c", "import Crypto"]).returncode == 0:
        pytest.skip("needs Rscript, and a system Python without pycryptodome to stand for a bare host")
    gateway, one, _ = hosts
    ssh = f"--ssh-config={lab.ssh_config}"
    assert on(gateway, "install", f"--remote-hosts={one.name}", "--language=R", "--kernel-name=r_bare",
              home=tmp_path).returncode == 0  # fmt: skip
    path = f"{KERNELS}/r_bare/kernel.json"
    spec = json.loads(gateway.run(["cat", path]).stdout)
    spec["env"]["GP_LISTENER_PYTHON"] = system_python  # the R kernel's protocol runs in server_listener.py there
    gateway.run(["sh", "-c", f"cat > {path}"], input=json.dumps(spec))
    on(gateway, "sync", "r_bare", ssh, home=tmp_path)
    proc = on(gateway, "check", "r_bare", ssh, home=tmp_path)
    assert proc.returncode == 1
    assert tables(proc.stdout)["r_bare"][one.name]["interpreter"] == "FAIL"
    assert f"the listener's Python {system_python} on {one.name} is missing or lacks pycryptodome" in proc.stdout
    assert f"fix: on {one.name}: {system_python} -m pip install pycryptodome" in proc.stdout


def test_check_catches_missing_sparkr_and_a_spark_of_the_wrong_scala(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    """R Spark specs need SparkR beside spark-submit; Scala specs a Spark on Scala 2.12. `check` says which host
    lacks what (pip's pyspark 4 has no SparkR and is Scala 2.13; the `make spark35` one fits Toree)."""
    from tests import test_scala_kernel as scala  # its Spark 3.5 + Toree environment (a module: no tests collected)

    if not (shutil.which("Rscript") and pyspark_dir()):
        pytest.skip("needs Rscript (r-base-core) and pip's pyspark")
    gateway, one, two = hosts
    ssh, remote = f"--ssh-config={lab.ssh_config}", [f"--remote-hosts={one.name}", f"--remote-hosts={two.name}"]
    spark = ["--spark", "--spark-master=local[*]"]
    installs = {"r_spark": ["--language=R", *spark, f"--spark-home={pyspark_dir()}"]}
    if scala.TOREE_JAR and scala.SPARK35_HOME:
        scala_args = ["--language=Scala", *spark, f"--spark-home={scala.SPARK35_HOME}"]
        scala_args.append(f"--toree-jar={scala.TOREE_JAR}")
        installs |= {"scala3": scala_args, "scala4": scala_args}
    for name, args in installs.items():
        assert on(gateway, "install", *remote, *args, f"--kernel-name={name}", home=tmp_path).returncode == 0
    if "scala4" in installs:  # then its hosts' Spark changed to Spark 4 (install itself refuses that)
        path = f"{KERNELS}/scala4/kernel.json"
        spec = json.loads(gateway.run(["cat", path]).stdout)
        spec["env"]["SPARK_HOME"] = pyspark_dir()
        gateway.run(["sh", "-c", f"cat > {path}"], input=json.dumps(spec))
    on(gateway, "sync", *installs, ssh, home=tmp_path)
    proc = on(gateway, "check", *installs, ssh, home=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result, out = tables(proc.stdout), proc.stdout
    for host in (one, two):
        assert result["r_spark"][host.name] == dict.fromkeys(CHECKS, "ok") | {"spark-submit": "FAIL"}, out
        assert f"{host.name} spark-submit: SparkR is not installed under {pyspark_dir()}/R/lib on {host.name}" in out
        if "scala3" in installs:
            assert result["scala3"][host.name] == dict.fromkeys(CHECKS, "ok"), out
            assert result["scala4"][host.name] == dict.fromkeys(CHECKS, "ok") | {"spark-submit": "FAIL"}, out
            assert f"the Spark at {pyspark_dir()} on {host.name} uses Scala 2.13" in out
    assert "fix: install a Spark distribution with R support" in out
    assert "Apache Toree 0.5 needs Scala 2.12" in out or "scala3" not in installs


def test_check_of_connect_specs_needs_a_spark_with_the_connect_server(
    lab: HostLab, hosts: list[LabHost], tmp_path: Path
) -> None:
    """`--spark-init-mode connect` specs: `check` finds the Spark Connect server jar under SPARK_HOME (pip's pyspark 4
    ships it, 3.5 does not) and the Connect client in the kernel's Python; argv names the share level."""
    from tests import test_scala_kernel as scala  # its Spark 3.5 environment (a module: no tests collected)

    if not (pyspark_dir() and scala.SPARK35_HOME):
        pytest.skip("needs pip's pyspark 4 and the `make spark35` environment")
    gateway, one, _ = hosts
    ssh, remote = f"--ssh-config={lab.ssh_config}", [f"--remote-hosts={one.name}"]
    connect = ["--spark", "--spark-master=local[*]", "--spark-init-mode=connect", "--share-level=group"]
    installs = {"connect4": [f"--spark-home={pyspark_dir()}"], "connect35": [f"--spark-home={scala.SPARK35_HOME}"]}
    for name, args in installs.items():
        assert on(gateway, "install", *remote, *connect, *args, f"--kernel-name={name}", home=tmp_path).returncode == 0
    argv = json.loads(gateway.run(["cat", f"{KERNELS}/connect4/kernel.json"]).stdout)["argv"]
    assert argv[argv.index("--spark-context-initialization-mode") + 1] == "connect"
    assert argv[argv.index("--engine-share-level") + 1] == "group"
    on(gateway, "sync", *installs, ssh, home=tmp_path)
    proc = on(gateway, "check", *installs, ssh, home=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result, out = tables(proc.stdout), proc.stdout
    assert result["connect4"][one.name] == dict.fromkeys(CHECKS, "ok"), out
    assert result["connect35"][one.name] == dict.fromkeys(CHECKS, "ok") | {"spark-submit": "FAIL"}, out
    assert f"{scala.SPARK35_HOME}/jars has no spark-connect_*.jar" in out
    bad = on(gateway, "install", *remote, *connect[:-1], "--share-level=team", "--kernel-name=bad", home=tmp_path)
    assert bad.returncode != 0 and "unknown share level 'team'" in bad.stdout + bad.stderr
