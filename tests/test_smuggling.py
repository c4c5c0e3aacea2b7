"""Client options cannot smuggle what the gateway controls (issue 12): JVM options and KERNEL_PORT_RANGE.

Unit tests of spark_gateway.spark's checks, and one end-to-end 400 through AsyncKernelManager on a lab host.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spark_gateway.config import check_port_range_narrows
from spark_gateway.spark import SparkOptsError, check_extra_spark_opts
from tests.conftest import add_spec, env, kernel_processes

SMUGGLED = [
    ("--driver-java-options -DHADOOP_PROXY_USER=hdfs", "'-DHADOOP_PROXY_USER=hdfs' is not allowed: it would choose"),
    ("--driver-java-options '-Xss4m -DHADOOP_USER_NAME=hdfs'", "'-DHADOOP_USER_NAME=hdfs' is not allowed"),
    ("--driver-java-options -Dspark.kerberos.keytab=/k", "'-Dspark.kerberos.keytab=/k' is not allowed: credentials"),
    ("--driver-java-options -Dspark.kerberos.principal=hdfs@R", "credentials are the gateway's"),
    ("--driver-java-options=-Dspark.master=local", "'-Dspark.master=local' is not allowed: the kernelspec's"),
    ("--driver-java-options -Dspark.app.name=x", "the application is named after the kernel id"),
    ("--driver-java-options -Duser.name=hdfs", "'-Duser.name=hdfs' is not allowed: it would choose"),
    ("--conf spark.driver.extraJavaOptions=-javaagent:/tmp/a.jar", "'-javaagent:/tmp/a.jar' is not allowed: it loads"),
    ("--conf 'spark.executor.extraJavaOptions=-Xss4m -agentlib:jdwp=x'", "'-agentlib:jdwp=x' is not allowed"),
    ("--driver-java-options -agentpath:/tmp/a.so", "'-agentpath:/tmp/a.so' is not allowed"),
    ("--driver-java-options -Xbootclasspath/a:/tmp", "replaces classes of the JVM itself"),
    ("--driver-java-options @/tmp/opts", "reads further JVM options from a file"),
    ("--driver-java-options -XX:VMOptionsFile=/tmp/o", "reads further JVM options from a file"),
    ("--driver-java-options '-Dspark.driver.extraJavaOptions=-javaagent:/a.jar'", "it loads a Java agent"),
    ("--conf spark.kerberos.access.hadoopFileSystems=hdfs://x", "may not set spark.kerberos.access"),
    ("--conf spark.executorEnv.HADOOP_USER_NAME=hdfs", "it would choose the user Hadoop or Spark acts as"),
    ("--conf spark.yarn.appMasterEnv.HADOOP_PROXY_USER=hdfs", "it would choose the user"),
    ("--driver-java-options '-Da=1 \"-Db'", "--driver-java-options cannot be parsed"),
]


@pytest.mark.parametrize(("text", "message"), SMUGGLED)
def test_jvm_options_cannot_set_what_the_gateway_controls(text: str, message: str) -> None:
    with pytest.raises(SparkOptsError, match="KERNEL_EXTRA_SPARK_OPTS") as info:
        check_extra_spark_opts(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "--driver-java-options '-Xss4m -XX:+UseG1GC -XX:MaxGCPauseMillis=200 -Dlog4j.configuration=file:/l.props'",
        "--conf 'spark.driver.extraJavaOptions=-Xss4m -Dlog4j2.level=WARN -Dfile.encoding=UTF-8'",
        "--conf spark.executorEnv.PYTHONHASHSEED=0 --driver-java-options -Dmy.app.setting=1",
    ],
)
def test_plain_jvm_tuning_passes(text: str) -> None:
    assert check_extra_spark_opts(text)


@pytest.mark.parametrize(
    ("operator", "client", "error"),
    [
        ("40000..42000", "40500..41500", None),
        ("40000..42000", "40000..42000", None),
        ("0..0", "50000..51000", None),
        ("40000..42000", "39000..41000", "must lie within the gateway's port_range 40000..42000"),
        ("40000..42000", "41000..43000", "must lie within"),
        ("40000..42000", "0..0", "must lie within"),
        ("40000..42000", "2000..1", "port_range '2000..1'"),
    ],
)
def test_kernel_port_range_may_only_narrow(operator: str, client: str, error: str | None) -> None:
    if error is None:
        check_port_range_narrows(operator, client)
    else:
        with pytest.raises(ValueError, match=error):
            check_port_range_narrows(operator, client)


@pytest.fixture
def spark_like_spec(kernels_dir: Path) -> str:
    """`ssh_python` with a Spark spec's SPARK_OPTS: the provisioner checks the client's options against it."""
    return add_spec(kernels_dir, "sec_spark_opts", lambda spec: spec["env"].update(
        SPARK_OPTS="--master local[1] --name ${KERNEL_ID} ${KERNEL_EXTRA_SPARK_OPTS}"))  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"KERNEL_EXTRA_SPARK_OPTS": "--driver-java-options -DHADOOP_PROXY_USER=hdfs"}, "-DHADOOP_PROXY_USER=hdfs"),
        ({"KERNEL_PORT_RANGE": "20000..30000"}, "must lie within the gateway's port_range 40000..42000"),
    ],
)
async def test_smuggling_is_refused_with_400_before_any_host_is_used(lab, managers, spark_like_spec, extra, message):
    km = managers(spark_like_spec, port_range="40000..42000")
    with pytest.raises(Exception, match=re.escape(message)) as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name, **extra))
    assert getattr(info.value, "status_code", None) == 400
    assert all(kernel_processes(host, km.kernel_id) == [] for host in lab.hosts)
