"""`jupyter ssh-spec`: install, convert, check, sync (and build, for `make specs`) kernelspecs of the
DistributedProvisioner. Option names and defaults follow the seed's `jupyter ssh-spec install --help`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Float, Unicode, default

from . import __version__, specs
from .config import AccessOptions, CallbackOptions, SshOptions, parse_port_range
from .spechosts import Settings, Spec, check, sync
from .specs import SpecError, SpecOptions
from .ssh import SshPool

PROVISIONER = specs.PROVISIONER


class _App(JupyterApp):
    """Common plumbing: one-line errors and a non-zero exit."""

    version = __version__

    @default("log_format")
    def _log_format_default(self) -> str:
        return "[%(levelname)1.1s %(asctime)s.%(msecs).03d %(name)s] %(message)s"

    @default("log_datefmt")
    def _log_datefmt_default(self) -> str:
        return "%Y-%m-%d %H:%M:%S"

    def fail(self, message: str) -> NoReturn:
        self.log.error(message)
        self.exit(1)
        raise SystemExit(1)  # for type checkers: exit() does not return


class BaseSpecApp(AccessOptions, _App):
    """Options of the commands that write kernelspecs (plus the shared ones of `config.AccessOptions`)."""

    user = Bool(False, config=True, help="Install into the per-user kernels directory (jupyter --data-dir).")
    prefix = Unicode(config=True, help="Install into PREFIX/share/jupyter/kernels/ (e.g. an environment).")
    replace = Bool(False, config=True, help="Overwrite an existing kernelspec of the same name.")
    spark = Bool(False, config=True, help="Make a Spark spec: the kernel runs as the driver, via bin/run.sh.")
    kernel_name = Unicode(config=True, help="Directory name of the spec. Default: ssh_<language>[_spark].")
    display_name = Unicode(config=True, help="Name shown to users. Default: '<Language> SSH[ (with Spark)]'.")
    language = Unicode("Python", config=True, help="Kernel language: Python, R or Scala (any case).")
    interpreter = Unicode(
        config=True,
        help="Absolute path of the kernel's interpreter on the hosts (python, or Rscript for R). "
        "Default: the Python running this command; Rscript from PATH.",
    )
    spark_home = Unicode(config=True, help="Where Spark is installed on the hosts (SPARK_HOME; else /opt/spark).")
    spark_init_mode = Unicode(
        "lazy", config=True, help="When the Spark context is created: lazy, eager, none, or connect (Spark Connect)."
    )
    share_level = Unicode(
        "user", config=True, help="Connect mode: who shares a Spark Connect engine: kernel, user, group or server."
    )
    toree_jar = Unicode(
        config=True,
        help="Scala: Apache Toree's toree-assembly-*.jar to copy into the spec. Default: the one of the apache-toree "
        "package beside --spark-home's pyspark, or importable here.",
    )
    extra_spark_opts = Unicode(config=True, help="More spark-submit options, added to SPARK_OPTS.")
    hadoop_conf_dir = Unicode(
        specs.DEFAULT_HADOOP_CONF_DIR,
        config=True,
        help="YARN specs: the Hadoop client configuration directory on the hosts (HADOOP_CONF_DIR, YARN_CONF_DIR).",
    )
    yarn_jars = Unicode(
        config=True,
        help="YARN specs: spark.yarn.jars, e.g. 'local:/opt/spark/jars/*' (Spark at that path on every NodeManager) "
        "or 'hdfs:///spark/jars/*' (pre-staged), so Spark's jars are not zipped and uploaded for every kernel.",
    )
    yarn_archive = Unicode(
        config=True,
        help="YARN specs: spark.yarn.archive, a pre-staged archive of Spark's jars (hdfs:///spark/jars.zip).",
    )
    ipykernel_subclass_name = Unicode(
        specs.DEFAULT_KERNEL_CLASS, config=True, help="Python kernels: the ipykernel Kernel class to run."
    )

    @default("spark_home")
    def _spark_home_default(self) -> str:
        return os.environ.get("SPARK_HOME", "/opt/spark")

    aliases = {
        **base_aliases,
        "prefix": "BaseSpecApp.prefix",
        "kernel-name": "BaseSpecApp.kernel_name",
        "display-name": "BaseSpecApp.display_name",
        "language": "BaseSpecApp.language",
        "interpreter": "BaseSpecApp.interpreter",
        "spark-home": "BaseSpecApp.spark_home",
        "spark-init-mode": "BaseSpecApp.spark_init_mode",
        "share-level": "BaseSpecApp.share_level",
        "toree-jar": "BaseSpecApp.toree_jar",
        "extra-spark-opts": "BaseSpecApp.extra_spark_opts",
        "hadoop-conf-dir": "BaseSpecApp.hadoop_conf_dir",
        "yarn-jars": "BaseSpecApp.yarn_jars",
        "yarn-archive": "BaseSpecApp.yarn_archive",
        "authorized-users": "BaseSpecApp.authorized_users",
        "unauthorized-users": "BaseSpecApp.unauthorized_users",
        "port-range": "BaseSpecApp.port_range",
        "launch-timeout": "BaseSpecApp.launch_timeout",
        "ipykernel-subclass-name": "BaseSpecApp.ipykernel_subclass_name",
    }
    flags = {
        "user": ({"BaseSpecApp": {"user": True}}, "Install into the per-user kernels directory."),
        "sys-prefix": ({"BaseSpecApp": {"prefix": sys.prefix}}, f"Install into {sys.prefix}/share/jupyter/kernels."),
        "spark": ({"BaseSpecApp": {"spark": True}}, "Make a Spark spec (bin/run.sh starts the kernel)."),
        "replace": ({"BaseSpecApp": {"replace": True}}, "Overwrite an existing spec of the same name."),
        "debug": base_flags["debug"],
    }

    def given(self, name: str) -> bool:
        """True when the option was set on the command line or in a config file."""
        return any(name in self.config[c.__name__] for c in type(self).mro() if c.__name__ in self.config)

    def provisioner_config(self, remote_hosts: list[str] | None = None) -> dict[str, Any]:
        """metadata.kernel_provisioner.config entries: the options that differ from their defaults."""
        if self.launch_timeout <= 0:
            raise SpecError(f"--launch-timeout must be a positive number of seconds, not {self.launch_timeout}")
        try:
            parse_port_range(self.port_range)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        defaults = self.trait_defaults("authorized_users", "unauthorized_users", "port_range")
        config: dict[str, Any] = {}
        if self.given("launch_timeout") or "GP_LAUNCH_TIMEOUT" in os.environ:  # else the template's (longer for Spark)
            seconds = self.launch_timeout
            config["launch_timeout"] = int(seconds) if seconds.is_integer() else seconds
        if remote_hosts is not None:
            config["remote_hosts"] = remote_hosts
        for name in ("authorized_users", "unauthorized_users"):
            if getattr(self, name) != defaults[name]:
                config[name] = sorted(getattr(self, name))
        if self.port_range != defaults["port_range"]:
            config["port_range"] = self.port_range
        return config


class SshSpecInstaller(BaseSpecApp):
    """Creates a Jupyter kernel specification for use within a cluster of hosts via SSH."""

    name = "jupyter-ssh-spec-install"
    description = "Creates a kernelspec whose kernels the DistributedProvisioner starts on remote hosts over SSH."
    examples = """
jupyter ssh-spec install --remote-hosts=node1 --remote-hosts=node2
jupyter ssh-spec install --spark --spark-master spark://10.0.0.5:7077 --spark-home=/usr/local/spark
jupyter ssh-spec install --language R --spark --spark-master yarn --user
"""

    spark_master = Unicode(
        "yarn", config=True, help="Spark master for --spark: yarn (client mode), spark://HOST:PORT or local[*]."
    )

    aliases = {
        **BaseSpecApp.aliases,
        "remote-hosts": "SshSpecInstaller.remote_hosts",
        "spark-master": "SshSpecInstaller.spark_master",
    }
    flags = dict(BaseSpecApp.flags)

    def spec_options(self) -> SpecOptions:
        """The options as given (`resolve()` validates them and fills in the defaults)."""
        hosts = list(self.remote_hosts)
        explicit = hosts if hosts != self.trait_defaults("remote_hosts") else None
        return SpecOptions(
            language=self.language,
            spark=self.spark,
            spark_master=self.spark_master,
            kernel_name=self.kernel_name,
            display_name=self.display_name,
            interpreter=self.interpreter,
            spark_home=self.spark_home,
            spark_init_mode=self.spark_init_mode,
            share_level=self.share_level,
            extra_spark_opts=self.extra_spark_opts,
            kernel_class_name=self.ipykernel_subclass_name,
            toree_jar=self.toree_jar,
            hadoop_conf_dir=self.hadoop_conf_dir,
            yarn_jars=self.yarn_jars,
            yarn_archive=self.yarn_archive,
            config=self.provisioner_config(explicit),
        )

    def start(self) -> None:
        if self.extra_args:
            self.fail(f"unexpected argument {self.extra_args[0]!r}: {self.name} takes options only (see --help)")
        try:
            target = specs.kernels_dir(self.user, self.prefix)
            opts, warnings = self.spec_options().resolve()
            for warning in warnings:
                self.log.warning(warning)
            specs.check_free(target / opts.kernel_name, self.replace)
            self.log.info("Installing kernel specification for '%s'", opts.display_name)
            path = specs.install(opts, target / opts.kernel_name, self.replace)
        except (SpecError, OSError) as exc:
            self.fail(str(exc))
        self.log.info("Installed kernelspec %s in %s", opts.kernel_name, path)


class SshSpecBuilder(SshSpecInstaller):
    """Builds every kernelspec (Python, R, Scala; plain and Spark) for one Spark master, plus a tarball."""

    name = "jupyter-ssh-spec-build"
    description = (
        "Builds the whole set of kernelspecs (what `make specs` runs) into --output, with paths in argv under "
        "the kernels directory the install options select, and a tarball of them in --dist."
    )
    examples = "jupyter ssh-spec build --spark-master yarn --output build/kernelspecs --dist dist\n"

    output = Unicode("build/kernelspecs", config=True, help="Directory the specs are built in.")
    dist = Unicode("dist", config=True, help="Directory of the tarball.")

    aliases = {**SshSpecInstaller.aliases, "output": "SshSpecBuilder.output", "dist": "SshSpecBuilder.dist"}

    def start(self) -> None:
        if self.extra_args:
            self.fail(f"unexpected argument {self.extra_args[0]!r}: {self.name} takes options only (see --help)")
        for option in ("kernel_name", "display_name", "spark", "language"):
            if self.given(option):
                self.fail(f"build makes every spec under its default name: --{option.replace('_', '-')} does not apply")
        try:
            install_root = specs.kernels_dir(self.user, self.prefix)
            base = self.spec_options()
            base.resolve()  # the plain Python spec must build: bad options fail here, once
            kind = specs.master_kind(base.spark_master)
            built, skipped = specs.build_set(base, Path(self.output), install_root)
            if not built:
                self.fail("no kernelspec could be built: " + "; ".join(skipped))
            name = f"spark_gateway-{__version__}-kernelspecs-{kind}.tar.gz"
            archive = specs.tarball(built, Path(self.dist) / name)
        except (SpecError, OSError) as exc:
            self.fail(str(exc))
        for path in built:
            toree = (specs.load(path).get("metadata") or {}).get("spark_gateway") or {}
            fits = f" ({toree['toree']}: fits {toree['fits_spark']})" if toree.get("fits_spark") else ""
            print(f"built {path.name} in {path}{fits}")
        for line in skipped:
            print(line)
        print(f"wrote {archive}: unpack it in {install_root} on the gateway and on every host")


class SshSpecConverter(_App):
    """Converts an installed Spark kernelspec between YARN client mode and a standalone Spark master."""

    name = "jupyter-ssh-spec-convert"
    description = (
        "Writes a copy of a Spark kernelspec (given by name or path) beside it for another master: "
        "--to standalone --spark-master spark://HOST:PORT, or --to yarn. The source is never modified."
    )
    examples = """
jupyter ssh-spec convert ssh_python_spark --to standalone --spark-master spark://10.0.0.5:7077
jupyter ssh-spec convert /usr/local/share/jupyter/kernels/ssh_python_spark_standalone --to yarn
"""
    to = Unicode(config=True, help="Target: standalone or yarn.")
    hadoop_conf_dir = Unicode(
        specs.DEFAULT_HADOOP_CONF_DIR,
        config=True,
        help="--to yarn: HADOOP_CONF_DIR and YARN_CONF_DIR on the hosts, unless the spec sets them already.",
    )
    spark_master = Unicode(config=True, help="Standalone master URL, spark://HOST:PORT (for --to standalone).")
    replace = Bool(False, config=True, help="Overwrite an existing spec of the target name.")

    aliases = {
        **base_aliases,
        "to": "SshSpecConverter.to",
        "spark-master": "SshSpecConverter.spark_master",
        "hadoop-conf-dir": "SshSpecConverter.hadoop_conf_dir",
    }
    flags = {
        "replace": ({"SshSpecConverter": {"replace": True}}, "Overwrite an existing spec of the target name."),
        "debug": base_flags["debug"],
    }

    def start(self) -> None:
        if len(self.extra_args) != 1:
            self.fail("give exactly one kernelspec (name or directory) to convert")
        try:
            path = specs.convert(
                find_spec(self.extra_args[0]), self.to, self.spark_master, self.replace, self.hadoop_conf_dir
            )
        except (SpecError, OSError) as exc:
            self.fail(str(exc))
        self.log.info("Wrote kernelspec %s in %s", path.name, path)


def find_spec(arg: str) -> Path:
    """A kernelspec directory from a path, or from a name in Jupyter's kernel search path."""
    path = Path(arg).expanduser()
    if "/" in arg or path.is_dir():
        if not (path / "kernel.json").is_file():
            raise SpecError(f"{arg} is not a kernelspec directory (no kernel.json in it)")
        return Path(os.path.abspath(path))
    found = KernelSpecManager().find_kernel_specs().get(arg.lower())
    if found is None:
        raise SpecError(f"no kernelspec named {arg!r} is installed (`jupyter kernelspec list` shows those that are)")
    return Path(found)


class SshSpecChecker(SshOptions, AccessOptions, CallbackOptions, _App):
    """Preflight of kernelspecs on every remote host they name (options shared with the provisioner: `config`)."""

    name = "jupyter-ssh-spec-check"
    description = (
        "For each remote host of each kernelspec (all DistributedProvisioner specs when none is named): SSH login "
        "and host key, the spec present with identical content, the interpreter and ipykernel, spark-submit for "
        "Spark specs, a connection from the host back to this gateway, and a reachable kernel port."
    )
    examples = "jupyter ssh-spec check ssh_python ssh_python_spark --ssh-config ~/.ssh/config\n"

    timeout = Float(10.0, config=True, help="Seconds each network probe may take.")

    _options = ("remote_user", "ssh_port", "timeout", "remote_hosts", "port_range", "response_ip", "response_port")
    aliases = {
        **base_aliases,
        **{name.replace("_", "-"): f"SshSpecChecker.{name}" for name in _options},
        "ssh-config": "SshSpecChecker.ssh_config_file",
        "connect-timeout": "SshSpecChecker.ssh_connect_timeout",
    }
    flags = {"debug": base_flags["debug"]}

    def targets(self) -> list[Spec]:
        names = list(self.extra_args)
        if not names:
            names = [
                name
                for name, path in sorted(KernelSpecManager().find_kernel_specs().items())
                if _provisioner_of(Path(path)) == PROVISIONER
            ]
            if not names:
                raise SpecError("no DistributedProvisioner kernelspec is installed: name one, or install one first")
        result = []
        for arg in names:
            path = find_spec(arg)
            data = specs.load(path)
            if _provisioner_of(path) != PROVISIONER:
                raise SpecError(f"{path} is not a DistributedProvisioner kernelspec: nothing to check on remote hosts")
            config = data["metadata"]["kernel_provisioner"].get("config") or {}
            hosts = [str(h) for h in config.get("remote_hosts") or self.remote_hosts]
            result.append(Spec(path.name, path, data, hosts, str(config.get("port_range") or self.port_range)))
        return result

    def settings(self) -> Settings:
        return Settings(SshPool(self.ssh_settings()), self.response_ip, self.response_port, self.timeout)

    def start(self) -> None:
        try:
            targets = self.targets()
        except SpecError as exc:
            self.fail(str(exc))
        settings = self.settings()
        try:
            passed = check(targets, settings)
        finally:
            settings.close()
        if not passed:
            self.fail("some checks failed: see the fixes above")


class SshSpecSyncer(SshSpecChecker):
    """Copies kernelspecs to every remote host they name, then checks them."""

    name = "jupyter-ssh-spec-sync"
    description = (
        "Copies each kernelspec (all DistributedProvisioner specs when none is named) to every remote host it "
        "names, at the same path, over SFTP: hosts that already have an identical copy are skipped, others get "
        "the new copy renamed into place at once. Then runs the check."
    )
    examples = "jupyter ssh-spec sync ssh_python --ssh-config ~/.ssh/config\n"

    def start(self) -> None:
        try:
            targets = self.targets()
        except SpecError as exc:
            self.fail(str(exc))
        settings = self.settings()
        try:
            copied = sync(targets, settings)
            print()
            passed = check(targets, settings)
        finally:
            settings.close()
        if not copied:
            self.fail("some hosts could not be brought up to date: see the lines marked FAILED above")
        if not passed:
            self.fail("some checks failed: see the fixes above")


def _provisioner_of(path: Path) -> str | None:
    try:
        return specs.load(path)["metadata"]["kernel_provisioner"]["provisioner_name"]
    except (SpecError, KeyError, TypeError):
        return None


class SshSpecApp(_App):
    """`jupyter ssh-spec`: kernelspecs for the DistributedProvisioner."""

    name = "jupyter-ssh-spec"
    description = "Creates, converts, checks and distributes kernelspecs of the DistributedProvisioner (SSH)."
    subcommands = {
        "install": (SshSpecInstaller, SshSpecInstaller.__doc__ or ""),
        "convert": (SshSpecConverter, SshSpecConverter.__doc__ or ""),
        "check": (SshSpecChecker, SshSpecChecker.__doc__ or ""),
        "sync": (SshSpecSyncer, SshSpecSyncer.__doc__ or ""),
        "build": (SshSpecBuilder, SshSpecBuilder.__doc__ or ""),
    }
    aliases: dict = {}
    flags: dict = {}

    def start(self) -> None:
        super().start()  # runs the subcommand, if any
        print(f"No subcommand given: use one of {', '.join(self.subcommands)}\n")
        self.print_subcommands()
        self.exit(1)


main = launch_instance = SshSpecApp.launch_instance

if __name__ == "__main__":
    main()
