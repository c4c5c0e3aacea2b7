"""Spark options of a kernel: checking the client's `KERNEL_EXTRA_SPARK_OPTS`, reading the spec's master.

Pure functions (no I/O). The options reach spark-submit through `PYSPARK_SUBMIT_ARGS`, which pyspark splits with
`shlex` and runs without a shell, so these checks are about what spark-submit is asked, not about quoting.
"""

from __future__ import annotations

import re
import shlex

# spark-submit options a client may add, and whether each takes a value.
ALLOWED_OPTIONS: dict[str, bool] = {
    "--conf": True,
    "-c": True,
    "--archives": True,
    "--driver-class-path": True,
    "--driver-cores": True,
    "--driver-java-options": True,
    "--driver-library-path": True,
    "--driver-memory": True,
    "--exclude-packages": True,
    "--executor-cores": True,
    "--executor-memory": True,
    "--files": True,
    "--jars": True,
    "--num-executors": True,
    "--packages": True,
    "--py-files": True,
    "--queue": True,
    "--repositories": True,
    "--total-executor-cores": True,
    "--verbose": False,
    "-v": False,
}
# spark-submit options the gateway or the kernelspec controls (or that would not start a kernel at all).
CONTROLLED_OPTIONS = {
    "--master": "the kernelspec's SPARK_OPTS sets the master",
    "--deploy-mode": "kernels are Spark drivers in client mode",
    "--name": "the application is named after the kernel id",
    "--proxy-user": "impersonation (the gateway's) runs the kernel as its user",
    "--principal": "credentials are the gateway's to configure",
    "--keytab": "credentials are the gateway's to configure",
    "--properties-file": "it could override the options the gateway controls",
    "--remote": "kernels run classic Spark drivers, not Spark Connect clients",
    "--class": "the kernel is the application",
    "--supervise": "it applies to cluster mode only",
    "--kill": "it does not start an application",
    "--status": "it does not start an application",
    "--help": "it does not start an application",
    "-h": "it does not start an application",
    "--version": "it does not start an application",
    "--usage-error": "it does not start an application",
}
CONTROLLED_CONFS = {
    "spark.master": "--master",
    "spark.submit.deployMode": "--deploy-mode",
    "spark.app.name": "--name",
    "spark.remote": "--remote",
    "spark.api.mode": "--remote",
    "spark.kerberos.principal": "--principal",
    "spark.kerberos.keytab": "--keytab",
    "spark.yarn.principal": "--principal",
    "spark.yarn.keytab": "--keytab",
}
# confs whose value is a JVM command line: checked like --driver-java-options
JAVA_OPTION_CONFS = {
    "spark.driver.extraJavaOptions",
    "spark.driver.defaultJavaOptions",
    "spark.executor.extraJavaOptions",
    "spark.executor.defaultJavaOptions",
    "spark.yarn.am.extraJavaOptions",
}
CONTROLLED_PREFIXES = {"spark.kerberos.": "--principal", "spark.yarn.kerberos.": "--principal"}
# confs that set a process environment: the variables that choose the Hadoop/Spark user are the gateway's
ENV_CONF_PREFIXES = ("spark.executorEnv.", "spark.yarn.appMasterEnv.", "spark.kubernetes.driverEnv.")
# JVM options that load code before Spark starts, or read further options from a file
JVM_LOADERS = {
    "-javaagent": "it loads a Java agent into the JVM before Spark starts",
    "-agentlib": "it loads a native agent into the JVM before Spark starts",
    "-agentpath": "it loads a native agent into the JVM before Spark starts",
    "-Xbootclasspath": "it replaces classes of the JVM itself",
    "-XX:Flags=": "it reads further JVM options from a file",
    "-XX:VMOptionsFile=": "it reads further JVM options from a file",
    "@": "it reads further JVM options from a file",
}
MASTER_OPT = re.compile(r"(?:^|\s+)--master(?:=|\s+)(\S+)")  # in a SPARK_OPTS template; group 1: the master
INIT_FLAG = "--spark-context-initialization-mode"  # a Spark kernel's argv: lazy, eager or none
EXAMPLE = "e.g. --conf spark.executor.memory=1g --num-executors 2"


class SparkOptsError(ValueError):
    """Client Spark options that cannot be passed to spark-submit; the message says which and why."""


def check_extra_spark_opts(text: str, name: str = "KERNEL_EXTRA_SPARK_OPTS") -> list[str]:
    """Split `text` like pyspark does (shlex) and check every token; return the tokens.

    Accepts `--option value` and `--option=value` for the options in ALLOWED_OPTIONS; refuses parse errors,
    unknown options, stray values and the options and confs the gateway controls.
    """
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise SparkOptsError(f"{name} cannot be parsed ({exc}): quote values like a shell would, {EXAMPLE}") from None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        option, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if option in CONTROLLED_OPTIONS:
            raise SparkOptsError(f"{name} may not contain {option}: {CONTROLLED_OPTIONS[option]}")
        if option not in ALLOWED_OPTIONS:
            what = "is not a spark-submit option" + ("" if token.startswith("-") else " (values follow their option)")
            allowed = " ".join(sorted(o for o in ALLOWED_OPTIONS if o.startswith("--")))
            raise SparkOptsError(f"{name}: {token!r} {what}; allowed: {allowed} ({EXAMPLE})")
        takes_value = ALLOWED_OPTIONS[option]
        if not takes_value:
            if eq:
                raise SparkOptsError(f"{name}: {option} takes no value, got {token!r}")
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(tokens):
            value, i = tokens[i + 1], i + 2
        else:
            raise SparkOptsError(f"{name}: {option} needs a value ({EXAMPLE})")
        if option in ("--conf", "-c"):
            _check_conf(value, name)
        elif option == "--driver-java-options":
            check_java_options(value, f"{name}: --driver-java-options")
    return tokens


def _check_conf(value: str, name: str) -> None:
    key, eq, conf_value = value.partition("=")
    if not eq or not key.strip():
        raise SparkOptsError(f"{name}: --conf needs KEY=VALUE, got {value!r} (e.g. --conf spark.executor.memory=1g)")
    _check_key(key.strip(), f"{name} may not set {key.strip()}")
    if key.strip() in JAVA_OPTION_CONFS:
        check_java_options(conf_value, f"{name}: --conf {key.strip()}")


def _check_key(key: str, refusal: str) -> None:
    """Refuse a Spark conf key (or a JVM system property, which Spark reads as one) the gateway controls."""
    option = CONTROLLED_CONFS.get(key) or next((o for p, o in CONTROLLED_PREFIXES.items() if key.startswith(p)), None)
    if option:
        raise SparkOptsError(f"{refusal}: {CONTROLLED_OPTIONS[option]}")
    env_name = next((key[len(p) :] for p in ENV_CONF_PREFIXES if key.startswith(p)), key)
    if env_name.upper().startswith("HADOOP_") or env_name.upper() in ("SPARK_USER", "USER.NAME"):
        raise SparkOptsError(f"{refusal}: it would choose the user Hadoop or Spark acts as, which the gateway sets")


def check_java_options(text: str, where: str) -> list[str]:
    """Check JVM options (`--driver-java-options`, `spark.*.extraJavaOptions`): plain tuning (-Xss4m, -XX:...,
    -Dlog4j...) passes; system properties for gateway-controlled keys or Hadoop users, agents, boot class path
    and option files are refused, naming the token."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise SparkOptsError(f"{where} cannot be parsed ({exc}): quote values like a shell would") from None
    for token in tokens:
        loader = next((flag for flag in JVM_LOADERS if token.startswith(flag)), None)
        if loader:
            raise SparkOptsError(f"{where}: JVM option {token!r} is not allowed: {JVM_LOADERS[loader]}")
        if token.startswith("-D"):
            key, _, value = token[2:].partition("=")
            _check_key(key.strip(), f"{where}: JVM option {token!r} is not allowed")
            if key.strip() in JAVA_OPTION_CONFS:
                check_java_options(value, f"{where}: {token!r}")
    return tokens


def spec_master(spark_opts: str) -> str | None:
    """The `--master` of a kernelspec's SPARK_OPTS template (None when it names none)."""
    m = MASTER_OPT.search(spark_opts)
    return m[1] if m else None
