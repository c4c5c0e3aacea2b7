"""Kernelspec directories built from the templates in `kernelspecs/` and the launchers in `kernel-launchers/`.

One source of truth for `jupyter ssh-spec`, `make specs` and the tests. A template is a kernelspec directory
(`kernelspecs/ssh_<language>[_spark]/`) whose strings may hold `{resource_dir}` (the spec's installed directory),
`{interpreter}` (an absolute interpreter path) and `{python}` (this Python: it runs server_listener.py for R
kernels); Spark templates describe a YARN client spec, and the master is rewritten from `--spark-master`. Every
spec is assembled in a staging directory beside its destination and moved into place with renames, so nobody ever
sees a half-written spec and a failed `--replace` keeps the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resources import data_dir
from .spark import INIT_FLAG, MASTER_OPT, spec_master

LANGUAGES = {"python": "python", "r": "R", "scala": "scala"}  # key -> kernel.json "language"
LABELS = {"python": "Python", "r": "R", "scala": "Scala"}
KERNEL_NAMES = {"python": "ssh_python", "r": "ssh_r", "scala": "ssh_scala"}
DISPLAY_NAMES = {"python": "Python SSH", "r": "R SSH", "scala": "Scala SSH"}
SPARK_SUFFIX = "_spark"
SPARK_DISPLAY_SUFFIX = " (with Spark)"
INIT_MODES = ("lazy", "eager", "connect", "none")
SHARE_LEVELS = ("kernel", "user", "group", "server")  # connect mode: who shares a Spark Connect engine
SHARE_FLAG = "--engine-share-level"
DEFAULT_KERNEL_CLASS = "ipykernel.ipkernel.IPythonKernel"
DEFAULT_KERNELS_DIR = Path("/usr/local/share/jupyter/kernels")
PROVISIONER = "distributed-provisioner"
CLASS_FLAG = "--kernel-class-name"
EXTRA_OPTS_REF = "${KERNEL_EXTRA_SPARK_OPTS}"
DEFAULT_HADOOP_CONF_DIR = "/etc/hadoop/conf"  # YARN specs: HADOOP_CONF_DIR and YARN_CONF_DIR on the hosts
IGNORED = ("__pycache__", "*.pyc")  # never part of a spec: written next to the launchers when they run

# (glob under kernel-launchers/, directory in the spec) per language; every one needs the listener and its modules
SHARED = [("shared/scripts/server_listener.py", "scripts"), ("shared/scripts/sg_*.py", "scripts")]
LAUNCHERS: dict[str, list[tuple[str, str]]] = {
    "python": [
        ("python/scripts/launch_ipykernel.py", "scripts"),
        ("python/scripts/sg_ipykernel.py", "scripts"),
        ("python/scripts/spark_notebook.py", "scripts"),
        ("python/scripts/spark_connect.py", "scripts"),
        *SHARED,
    ],
    "r": [("R/scripts/launch_IRkernel.R", "scripts"), *SHARED],
    "scala": [("scala/scripts/launch_toree.sh", "scripts"), *SHARED],
}
# Apache Toree's assembly (not part of this repository: `pip install apache-toree`), copied into a Scala spec's lib/.
TOREE_JAR = "toree-assembly-*.jar"
TOREE_SCALA = {"0.5": "2.12"}  # Toree release (major.minor) -> the Scala it is built for (apache-toree 0.5.0: Spark 3)
SPARK_OF_SCALA = {"2.12": "Spark 3.x", "2.13": "Spark 3.x built for Scala 2.13, or Spark 4.x"}
INTERPRETERS = {"python": "python3", "r": "Rscript"}  # looked up on PATH when not given; Scala runs spark-submit

_KERNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")  # jupyter_client's rule, minus names starting with a dot
_ENDPOINT = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})"
_STANDALONE = re.compile(rf"spark://{_ENDPOINT}(?:,{_ENDPOINT})*\Z")
_LOCAL = re.compile(r"local(?:\[(?:\*|[1-9]\d*)(?:,[1-9]\d*)?\])?\Z")
_DEPLOY_OPT = re.compile(r"(?:^|\s+)--deploy-mode(?:=|\s+)\S+")
_CONVERTED_NAME = re.compile(r"_(?:standalone|yarn)\Z")
_CONVERTED_DISPLAY = re.compile(r"\s*\(with Spark(?: standalone| on YARN)?\)\Z")
CONVERSIONS = {"standalone": ("_standalone", " (with Spark standalone)"), "yarn": ("_yarn", " (with Spark on YARN)")}


class SpecError(ValueError):
    """Bad input, or a file the spec needs is missing: the message says which, and what to do."""


# ------------------------------------------------------------------------------------------------ validation
def language_key(value: str) -> str:
    """'Python', 'R' or 'Scala' in any case -> 'python', 'r' or 'scala'."""
    key = value.strip().lower()
    if key not in LANGUAGES:
        raise SpecError(f"unknown language {value!r}: choose Python, R or Scala")
    return key


def init_mode(value: str) -> str:
    mode = value.strip().lower()
    if mode not in INIT_MODES:
        raise SpecError(f"unknown Spark context initialization mode {value!r}: choose lazy, eager, connect or none")
    return mode


def master_kind(url: str) -> str:
    """'yarn', 'standalone' (spark://HOST:PORT[,HOST:PORT...]) or 'local' (local, local[N], local[*], local[N,F])."""
    if url == "yarn":
        return "yarn"
    if _STANDALONE.match(url) and all(0 < int(p) < 65536 for p in re.findall(r":(\d+)(?=,|\Z)", url)):
        return "standalone"
    if _LOCAL.match(url):
        return "local"
    raise SpecError(
        f"Spark master {url!r} is not supported: use yarn (YARN client mode), spark://HOST:PORT (standalone) "
        "or local[*] / local[N] (local mode)"
    )


def kernel_name(value: str) -> str:
    """A kernel directory name as jupyter_client stores it: lower case, spaces as underscores, no path tricks."""
    name = value.strip().replace(" ", "_").lower()
    if not _KERNEL_NAME.match(name):
        raise SpecError(
            f"kernel name {value!r} is not valid: use letters, digits, '.', '_' and '-', not starting with '.' "
            "(e.g. ssh_python)"
        )
    return name


def interpreter(language: str, path: str = "") -> str:
    """The interpreter written into the spec: `path` when given (absolute); else this Python for Python, and a bare
    `Rscript` for R, which each host resolves on its own PATH (`jupyter ssh-spec check` verifies it there), so specs
    build on a machine without R."""
    tool = INTERPRETERS.get(language)
    if tool is None:
        return ""
    if not path:
        if language == "r":
            return tool
        path = sys.executable
    if not os.path.isabs(path):
        raise SpecError(f"interpreter {path!r} must be an absolute path (e.g. /usr/bin/{tool})")
    if language == "r":  # the hosts' path: `check` verifies it on each of them
        return path
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SpecError(f"interpreter {path} does not exist or is not executable: pass an existing {tool}")
    return path


def kernel_class(name: str) -> str | None:
    """Check an ipykernel class name; returns a warning when it cannot be imported here (it may exist on the hosts)."""
    if not re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", name):
        raise SpecError(f"--ipykernel-subclass-name {name!r} is not a dotted class name (e.g. {DEFAULT_KERNEL_CLASS})")
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as exc:
        return f"cannot import {name} here ({exc}): the kernel's Python must be able to, on every host"
    from ipykernel.kernelbase import Kernel

    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        raise SpecError(f"--ipykernel-subclass-name {name} is not a subclass of ipykernel.kernelbase.Kernel")
    return None


def spark_master_of(spec: dict) -> str | None:
    """The `--master` in a kernelspec's SPARK_OPTS, or None for a spec without one (not a Spark spec)."""
    return spec_master(str((spec.get("env") or {}).get("SPARK_OPTS", "")))


def set_master(spark_opts: str, master: str) -> str:
    """SPARK_OPTS with `--master` (and `--deploy-mode client` for YARN) replaced, everything else kept verbatim."""
    rest = _DEPLOY_OPT.sub("", MASTER_OPT.sub("", spark_opts)).strip()
    head = f"--master {master}" + (" --deploy-mode client" if master_kind(master) == "yarn" else "")
    return f"{head} {rest}".rstrip()


# ------------------------------------------------------------------------------------------------ options
@dataclass
class SpecOptions:
    """One kernelspec: the `install` options, normalised by `resolve()`."""

    language: str = "python"
    spark: bool = False
    spark_master: str = "yarn"
    kernel_name: str = ""  # default: ssh_<language>[_spark]
    display_name: str = ""  # default: "<Language> SSH[ (with Spark)]"
    interpreter: str = ""  # default: this Python, or Rscript on PATH
    spark_home: str = "/opt/spark"
    spark_init_mode: str = "lazy"
    share_level: str = "user"  # connect mode: kernel, user, group or server
    extra_spark_opts: str = ""
    kernel_class_name: str = DEFAULT_KERNEL_CLASS
    toree_jar: str = ""  # Scala: default found by find_toree_jar()
    hadoop_conf_dir: str = DEFAULT_HADOOP_CONF_DIR  # YARN: the hosts' Hadoop client configuration
    yarn_jars: str = ""  # YARN: spark.yarn.jars (e.g. local:/opt/spark/jars/*), so no jar is uploaded per kernel
    yarn_archive: str = ""  # YARN: spark.yarn.archive (a pre-staged archive of Spark's jars)
    config: dict[str, Any] = field(default_factory=dict)  # metadata.kernel_provisioner.config entries

    @property
    def template(self) -> str:
        return KERNEL_NAMES[self.language] + (SPARK_SUFFIX if self.spark else "")

    def resolve(self) -> tuple[SpecOptions, list[str]]:
        """Validated, defaulted copy, and warnings about options that do not apply. Raises SpecError."""
        lang = language_key(self.language)
        mode = init_mode(self.spark_init_mode)
        if self.share_level not in SHARE_LEVELS:
            raise SpecError(f"unknown share level {self.share_level!r}: choose {', '.join(SHARE_LEVELS)}")
        if mode == "connect" and self.language.strip().lower() != "python":
            raise SpecError("--spark-init-mode connect is for Python kernels only")
        master_kind(self.spark_master)
        warnings = []
        if not self.spark:
            for option, value, default in (
                ("--spark-master", self.spark_master, "yarn"),
                ("--spark-init-mode", mode, "lazy"),
                ("--extra-spark-opts", self.extra_spark_opts, ""),
            ):
                if value != default:
                    warnings.append(f"{option} is ignored without --spark")
        if lang != "python" and self.kernel_class_name != DEFAULT_KERNEL_CLASS:
            warnings.append(f"--ipykernel-subclass-name is ignored for language {LANGUAGES[lang]}")
        elif lang == "python" and (warning := kernel_class(self.kernel_class_name)):
            warnings.append(warning)
        yarn_given = [(o, v) for o, v in (("--yarn-jars", self.yarn_jars), ("--yarn-archive", self.yarn_archive)) if v]
        if self.hadoop_conf_dir != DEFAULT_HADOOP_CONF_DIR:
            yarn_given.append(("--hadoop-conf-dir", self.hadoop_conf_dir))
        if not (self.spark and master_kind(self.spark_master) == "yarn"):
            warnings += [f"{option} applies to YARN Spark specs only: ignored" for option, _ in yarn_given]
        elif not os.path.isabs(self.hadoop_conf_dir):
            raise SpecError(
                f"--hadoop-conf-dir {self.hadoop_conf_dir!r} must be an absolute path (e.g. /etc/hadoop/conf)"
            )
        if (self.spark or lang == "scala") and not os.path.isabs(self.spark_home):
            raise SpecError(f"--spark-home {self.spark_home!r} must be an absolute path (e.g. /opt/spark)")
        suffix = (SPARK_SUFFIX, SPARK_DISPLAY_SUFFIX) if self.spark else ("", "")
        name = kernel_name(self.kernel_name or KERNEL_NAMES[lang] + suffix[0])
        _template_dir(KERNEL_NAMES[lang] + suffix[0])
        _launcher_files(lang)  # what is missing is said before the interpreter is looked for
        toree = ""
        if lang == "scala":
            toree = str(find_toree_jar(self.toree_jar, self.spark_home))
            if warning := check_toree_scala(Path(toree), self.spark_home):
                warnings.append(warning)
        elif self.toree_jar:
            warnings.append(f"--toree-jar is ignored for language {LANGUAGES[lang]}")
        resolved = dataclasses.replace(
            self,
            language=lang,
            spark_init_mode=mode if self.spark else "none",
            kernel_name=name,
            display_name=self.display_name or DISPLAY_NAMES[lang] + suffix[1],
            interpreter=interpreter(lang, self.interpreter),
            extra_spark_opts=self.extra_spark_opts.strip() if self.spark else "",
            toree_jar=toree,
            config=dict(self.config),
        )
        return resolved, warnings


def kernels_dir(user: bool = False, prefix: str = "") -> Path:
    """Where `install` puts specs: the per-user registry, PREFIX/share/jupyter/kernels, or the system one."""
    if user and prefix:
        raise SpecError("--user and --prefix/--sys-prefix exclude each other: choose one")
    if user:
        from jupyter_core.paths import jupyter_data_dir

        return Path(jupyter_data_dir()) / "kernels"
    if prefix:
        return Path(os.path.abspath(os.path.expanduser(prefix))) / "share" / "jupyter" / "kernels"
    return DEFAULT_KERNELS_DIR


# ------------------------------------------------------------------------------------------------ building
def _template_dir(name: str) -> Path:
    path = data_dir("kernelspecs") / name
    if not (path / "kernel.json").is_file():
        raise SpecError(f"kernelspec template kernelspecs/{name}/kernel.json is missing from this installation")
    return path


def _launcher_files(language: str) -> list[tuple[Path, str]]:
    """(file, directory in the spec) of every launcher file a language needs; SpecError naming one missing."""
    root, files = data_dir("kernel-launchers"), []
    for pattern, subdir in LAUNCHERS[language]:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if not found:
            raise SpecError(
                f"{LABELS[language]} kernelspecs need kernel-launchers/{pattern}, "
                "which this spark_gateway installation does not have"
            )
        files += [(path, subdir) for path in found]
    return files


def find_toree_jar(explicit: str = "", spark_home: str = "") -> Path:
    """Apache Toree's assembly jar: `explicit`, else kernel-launchers/scala/lib/, else the apache-toree package's
    (`toree/lib/`) beside SPARK_HOME's pyspark (pip's pyspark: SPARK_HOME is site-packages/pyspark) or importable
    by this Python, else the `apache_toree_scala` kernelspec of this environment. SpecError when there is none."""
    if explicit:
        path = Path(os.path.abspath(os.path.expanduser(explicit)))
        if not path.is_file():
            raise SpecError(f"--toree-jar {explicit} does not exist: pass the path of toree-assembly-<version>.jar")
        if not fnmatch.fnmatch(path.name, TOREE_JAR):
            raise SpecError(f"--toree-jar {explicit} is not Apache Toree's assembly ({TOREE_JAR})")
        return path
    places = [data_dir("kernel-launchers") / "scala" / "lib"]
    if spark_home:
        places.append(Path(spark_home).parent / "toree" / "lib")
    with contextlib.suppress(ImportError, ValueError):
        found = importlib.util.find_spec("toree")
        if found is not None and found.origin:
            places.append(Path(found.origin).parent / "lib")
    places.append(Path(sys.prefix) / "share" / "jupyter" / "kernels" / "apache_toree_scala" / "lib")
    for place_ in places:
        jars = sorted(place_.glob(TOREE_JAR)) if place_.is_dir() else []
        if jars:
            return jars[-1]
    raise SpecError(
        f"Scala kernelspecs need Apache Toree's {TOREE_JAR}, found neither beside --spark-home's pyspark nor in this "
        "Python: pip install apache-toree==0.5.0 (into the environment of a Spark 3.x pyspark), or pass "
        "--toree-jar=/path/to/toree-assembly-<version>.jar"
    )


def spark_scala_version(spark_home: str) -> tuple[str, str] | None:
    """(Scala version, jar name) of `SPARK_HOME/jars/scala-library-<version>.jar`, or None when not found here."""
    jars = sorted(Path(spark_home, "jars").glob("scala-library-*.jar")) if spark_home else []
    if not jars:
        return None
    return jars[-1].name[len("scala-library-") : -len(".jar")], jars[-1].name


def toree_fits(jar: Path) -> str:
    """Which Spark versions a Toree assembly runs on, from its release (e.g. `Spark 3.x (Scala 2.12)`)."""
    m = re.match(r"toree-assembly-(\d+\.\d+)\.", jar.name)
    scala = TOREE_SCALA.get(m[1]) if m else None
    if scala is None:
        return "unknown (a Toree release not known here)"
    return f"{SPARK_OF_SCALA.get(scala, 'Spark')} (Scala {scala})"


def check_toree_scala(jar: Path, spark_home: str) -> str | None:
    """SpecError when Toree's Scala differs from the Spark's at `spark_home`; a warning when it cannot be told."""
    m = re.match(r"toree-assembly-(\d+\.\d+)\.", jar.name)
    toree_scala = TOREE_SCALA.get(m[1]) if m else None
    if toree_scala is None:
        return f"cannot tell which Scala {jar.name} is built for: its Spark must use the same Scala"
    found = spark_scala_version(spark_home)
    if found is None:
        return (
            f"no Spark at {spark_home} on this machine ({spark_home}/jars/scala-library-*.jar): cannot check that it "
            f"uses Scala {toree_scala}, which {jar.name} needs; the launcher checks it on each host"
        )
    version, name = found
    spark_scala = ".".join(version.split(".")[:2])
    if spark_scala != toree_scala:
        raise SpecError(
            f"Apache Toree {jar.name} is built for Scala {toree_scala} ({SPARK_OF_SCALA.get(toree_scala, 'Spark')}), "
            f"but the Spark at {spark_home} uses Scala {version} ({name}): its Scala kernels would die with "
            f"NoSuchMethodError; pass --spark-home of a {SPARK_OF_SCALA.get(toree_scala, 'matching Spark')} "
            "installation (e.g. pip install 'pyspark==3.5.*' apache-toree==0.5.0), see docs/scala-kernels.md"
        )
    return None


def _substitute(value: str, subs: dict[str, str]) -> str:
    for key, new in subs.items():
        value = value.replace(key, new)
    return value


def _set_flag(argv: list[str], flag: str, value: str) -> None:
    if flag in argv[:-1]:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def render(opts: SpecOptions, install_dir: Path) -> dict[str, Any]:
    """The kernel.json of resolved `opts` installed at `install_dir`."""
    spec = json.loads((_template_dir(opts.template) / "kernel.json").read_text())
    # {python}: the Python of launchers that use server_listener.py from another language (R)
    subs = {"{resource_dir}": str(install_dir), "{interpreter}": opts.interpreter, "{python}": sys.executable}
    spec["argv"] = [_substitute(str(a), subs) for a in spec["argv"]]
    env = spec["env"] = {k: _substitute(str(v), subs) for k, v in (spec.get("env") or {}).items()}
    if opts.spark or "SPARK_HOME" in env:
        env["SPARK_HOME"] = opts.spark_home
    if opts.spark:
        spark_opts = set_master(env.get("SPARK_OPTS", EXTRA_OPTS_REF), opts.spark_master)
        extra = opts.extra_spark_opts
        if master_kind(opts.spark_master) == "yarn":
            env["HADOOP_CONF_DIR"] = env["YARN_CONF_DIR"] = opts.hadoop_conf_dir
            confs = (("spark.yarn.jars", opts.yarn_jars), ("spark.yarn.archive", opts.yarn_archive))
            extra = " ".join([*(f"--conf {shlex.quote(f'{k}={v}')}" for k, v in confs if v), extra]).strip()
        if extra:
            if EXTRA_OPTS_REF in spark_opts:
                spark_opts = spark_opts.replace(EXTRA_OPTS_REF, f"{extra} {EXTRA_OPTS_REF}", 1)
            else:
                spark_opts = f"{spark_opts} {extra}"
        env["SPARK_OPTS"] = spark_opts
        if opts.language in ("python", "r", "scala"):
            _set_flag(spec["argv"], INIT_FLAG, opts.spark_init_mode)
        if opts.spark_init_mode == "connect":
            _set_flag(spec["argv"], SHARE_FLAG, opts.share_level)
        if opts.language == "python":
            env["PYSPARK_PYTHON"] = opts.interpreter
    elif opts.language == "scala":
        _set_flag(spec["argv"], INIT_FLAG, "none")  # Toree without a Spark context (spark-submit runs it anyway)
    if opts.language == "python":
        _set_flag(spec["argv"], CLASS_FLAG, opts.kernel_class_name)
    spec["display_name"] = opts.display_name
    spec["language"] = LANGUAGES[opts.language]
    if opts.toree_jar:
        spec.setdefault("metadata", {})["spark_gateway"] = {"toree": Path(opts.toree_jar).name,
                                                            "fits_spark": toree_fits(Path(opts.toree_jar))}  # fmt: skip
    provisioner = spec.setdefault("metadata", {}).setdefault("kernel_provisioner", {"provisioner_name": PROVISIONER})
    provisioner.setdefault("config", {}).update(opts.config)
    return spec


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED)


def _copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a spec directory, without caches and without the top-level names in `skip`."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if _ignored(n) or (Path(directory) == src and n in skip)]

    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=ignore)


def _fill(opts: SpecOptions, install_dir: Path, staging: Path) -> None:
    """Write the complete spec of resolved `opts` (to be installed at `install_dir`) into `staging`."""
    template = _template_dir(opts.template)
    spec = render(opts, install_dir)
    _copy_tree(template, staging, skip=("kernel.json",))
    if not list(staging.glob("logo-*")):
        for logo in _template_dir(KERNEL_NAMES[opts.language]).glob("logo-*"):
            shutil.copy2(logo, staging / logo.name)
    for path, subdir in _launcher_files(opts.language):
        (staging / subdir).mkdir(exist_ok=True)
        shutil.copy2(path, staging / subdir / path.name)
    if opts.toree_jar:
        (staging / "lib").mkdir(exist_ok=True)
        shutil.copy2(opts.toree_jar, staging / "lib" / Path(opts.toree_jar).name)
    for script in (staging / "bin").glob("*"):
        script.chmod(0o755)
    prefix = f"{install_dir}/"
    for arg in spec["argv"]:
        if arg.startswith(prefix) and not (staging / arg[len(prefix) :]).exists():
            raise SpecError(
                f"{opts.kernel_name}: argv refers to {arg[len(prefix) :]}, which neither kernelspecs/{opts.template}/ "
                "nor kernel-launchers/ provides in this installation"
            )
    (staging / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")


def check_free(dest: Path, replace: bool) -> None:
    if os.path.lexists(dest) and not replace:
        raise SpecError(f"kernelspec {os.path.abspath(dest)} already exists: pass --replace to overwrite it")


def place(dest: Path, fill: Callable[[Path], None], replace: bool = False) -> Path:
    """Build a spec with `fill(staging)` beside `dest`, then rename it into place.

    `dest` is never half-written: on any failure it is left as it was (a replaced spec is renamed back).
    """
    dest = Path(os.path.abspath(dest))
    check_free(dest, replace)
    dest.parent.mkdir(parents=True, exist_ok=True)
    box = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))  # no kernel.json at its top
    new, old = box / "new", box / "old"
    try:
        new.mkdir()
        fill(new)
        new.chmod(0o755)
        if dest.exists():
            dest.rename(old)
        try:
            new.rename(dest)
        except BaseException:
            if old.exists():
                old.rename(dest)
            raise
    finally:
        shutil.rmtree(box, ignore_errors=True)
    return dest


def install(opts: SpecOptions, dest: Path, replace: bool = False) -> Path:
    """Install the spec of resolved `opts` at `dest` (the directory named after the kernel)."""
    dest = Path(os.path.abspath(dest))
    return place(dest, lambda staging: _fill(opts, dest, staging), replace)


def build_set(base: SpecOptions, out_dir: Path, install_root: Path) -> tuple[list[Path], list[str]]:
    """Every language, plain and Spark, for `base.spark_master`, into `out_dir`; paths in argv under `install_root`.

    Returns the spec directories built and one line per spec skipped (what is missing).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if (old / "kernel.json").is_file():
            shutil.rmtree(old)
    built, skipped = [], []
    for language in LANGUAGES:
        for spark in (False, True):
            try:
                opts, _ = dataclasses.replace(base, language=language, spark=spark).resolve()
                install_dir = install_root / opts.kernel_name
                built.append(place(out_dir / opts.kernel_name, lambda s, o=opts, d=install_dir: _fill(o, d, s)))
            except SpecError as exc:
                name = KERNEL_NAMES[language] + (SPARK_SUFFIX if spark else "")
                skipped.append(f"skipped {name}: {exc}")
    return built, skipped


def tarball(spec_dirs: list[Path], path: Path) -> Path:
    """A .tar.gz of the spec directories, to unpack in the kernels directory of each host."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if _ignored(Path(info.name).name):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(path, "w:gz") as tar:
        for spec_dir in sorted(spec_dirs):
            tar.add(spec_dir, arcname=spec_dir.name, filter=clean)
    return path


# ------------------------------------------------------------------------------------------------ convert
def load(spec_dir: Path) -> dict[str, Any]:
    path = Path(spec_dir) / "kernel.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{spec_dir} is not a kernelspec: it has no kernel.json") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from None


def converted_names(name: str, display_name: str, to: str) -> tuple[str, str]:
    suffix, display_suffix = CONVERSIONS[to]
    return _CONVERTED_NAME.sub("", name) + suffix, _CONVERTED_DISPLAY.sub("", display_name) + display_suffix


def convert(
    src: Path, to: str, master: str = "", replace: bool = False, hadoop_conf_dir: str = DEFAULT_HADOOP_CONF_DIR
) -> Path:
    """Write a copy of Spark spec `src` beside it for another master (`to`: standalone or yarn). Never edits `src`."""
    src = Path(os.path.abspath(src))
    spec = load(src)
    current = spark_master_of(spec)
    if current is None:
        raise SpecError(f"{src} is not a Spark kernelspec (no --master in the SPARK_OPTS of its env): cannot convert")
    if to not in CONVERSIONS:
        raise SpecError(f"unknown conversion target {to!r}: use --to standalone or --to yarn")
    if to == "yarn":
        if master not in ("", "yarn"):
            raise SpecError(f"--to yarn takes no --spark-master (got {master!r}): YARN finds its master itself")
        master = "yarn"
    elif not master or master_kind(master) != "standalone":
        raise SpecError("--to standalone needs --spark-master spark://HOST:PORT (the standalone master's URL)")
    if master_kind(current) == to:
        raise SpecError(f"{src.name} already uses a {to} master ({current}); install a new spec to change it")
    name, display = converted_names(src.name, str(spec.get("display_name", src.name)), to)
    dest = src.parent / name
    old_prefix, new_prefix = str(src), str(dest)

    def moved(value: str) -> str:
        return new_prefix + value[len(old_prefix) :] if value.startswith(old_prefix + "/") else value

    spec["argv"] = [moved(str(a)) for a in spec["argv"]]
    spec["env"] = {k: moved(str(v)) for k, v in spec["env"].items()}
    spec["env"]["SPARK_OPTS"] = set_master(spec["env"]["SPARK_OPTS"], master)
    if to == "yarn":  # kept when converting to standalone (unused there), so yarn -> standalone -> yarn round-trips
        for name in ("HADOOP_CONF_DIR", "YARN_CONF_DIR"):
            spec["env"].setdefault(name, hadoop_conf_dir)
    spec["display_name"] = display

    def fill(staging: Path) -> None:
        _copy_tree(src, staging, skip=("kernel.json",))
        (staging / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")

    return place(dest, fill, replace)


# ------------------------------------------------------------------------------------------------ content
def manifest(root: Path) -> dict[str, tuple[str, bool]]:
    """relative path -> (sha256, executable) of every file of a spec (symlinks followed, caches ignored)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in filenames:
            path = Path(dirpath) / name
            if _ignored(name) or not path.is_file():
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            result[path.relative_to(root).as_posix()] = (digest, bool(path.stat().st_mode & stat.S_IXUSR))
    return result


def extract_toree_jar(sdist: Path, dest: Path) -> Path:
    """Copy Apache Toree's assembly jar out of PyPI's apache-toree sdist (`toree/lib/toree-assembly-*.jar`) into
    `dest` (`make specs`' build cache); SpecError when the archive has none."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(Path(m.name).name, TOREE_JAR)]
        if not members:
            raise SpecError(f"{sdist} holds no {TOREE_JAR}: is it PyPI's apache-toree source archive?")
        source = tar.extractfile(members[-1])
        assert source is not None
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(members[-1].name).name
        with source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
    return target


if __name__ == "__main__":  # `python -m spark_gateway.specs extract-toree SDIST DEST` (the Makefile's Toree cache)
    if len(sys.argv) != 4 or sys.argv[1] != "extract-toree":
        sys.exit("usage: python -m spark_gateway.specs extract-toree APACHE_TOREE_SDIST DEST_DIR")
    try:
        print(f"extracted {extract_toree_jar(Path(sys.argv[2]), Path(sys.argv[3]))}")
    except (SpecError, OSError, tarfile.TarError) as exc:
        sys.exit(f"error: {exc}")
