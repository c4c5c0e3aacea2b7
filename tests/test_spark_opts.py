"""spark_gateway.spark (checking KERNEL_EXTRA_SPARK_OPTS) and the control listener's `info` op: no JVM, no hosts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spark_gateway.control import ControlError, control_request
from spark_gateway.spark import SparkOptsError, check_extra_spark_opts, spec_master

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"))
import sg_control  # noqa: E402
import sg_protocol  # noqa: E402


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("--conf spark.executor.memory=1g --num-executors 2", ["--conf", "spark.executor.memory=1g", "--num-executors",
                                                              "2"]),
        ("--executor-memory=2g -v -c a=b", ["--executor-memory=2g", "-v", "-c", "a=b"]),
        ("--conf 'spark.x=$(id) `id`; y'", ["--conf", "spark.x=$(id) `id`; y"]),
        ('--driver-java-options "-Da=1 -Db=2"', ["--driver-java-options", "-Da=1 -Db=2"]),
        ("--conf spark.a=b=c\n--jars /x.jar", ["--conf", "spark.a=b=c", "--jars", "/x.jar"]),
    ],
)  # fmt: skip
def test_accepted_options_split_like_pyspark_does(text: str, tokens: list[str]) -> None:
    assert check_extra_spark_opts(text) == tokens


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("--conf 'a=b", "cannot be parsed (No closing quotation)"),
        ("$(touch /tmp/x)", "'$(touch' is not a spark-submit option (values follow their option)"),
        ("--conf a=b ; rm -rf /", "';' is not a spark-submit option"),
        ("--frobnicate 1", "'--frobnicate' is not a spark-submit option; allowed: --archives --conf"),
        ("--master yarn", "may not contain --master: the kernelspec's SPARK_OPTS sets the master"),
        ("--deploy-mode=cluster", "may not contain --deploy-mode"),
        ("--name x", "may not contain --name: the application is named after the kernel id"),
        ("--proxy-user root", "may not contain --proxy-user"),
        ("--properties-file /etc/x", "may not contain --properties-file"),
        ("--keytab /k --principal p", "may not contain --keytab"),
        ("--conf spark.master=local", "may not set spark.master"),
        ("-c spark.app.name=x", "may not set spark.app.name"),
        ("--conf spark.api.mode=connect", "may not set spark.api.mode"),
        ("--conf =1", "--conf needs KEY=VALUE"),
        ("--conf", "--conf needs a value"),
        ("--verbose=yes", "--verbose takes no value"),
    ],
)
def test_refused_options_say_what_and_why(text: str, message: str) -> None:
    with pytest.raises(SparkOptsError) as info:
        check_extra_spark_opts(text)
    assert str(info.value).startswith("KERNEL_EXTRA_SPARK_OPTS")
    assert message in str(info.value)


def test_spec_master() -> None:
    template = "--master yarn --deploy-mode client --name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} ${KERNEL_EXTRA_SPARK_OPTS}"
    assert spec_master(template) == "yarn"
    assert spec_master("--name x --master=spark://h:7077") == "spark://h:7077"
    assert spec_master("--name x") is None


@pytest.mark.asyncio
async def test_listener_info_op_reports_and_waits_within_bounds() -> None:
    calls: list[float] = []

    def info(wait: float) -> dict:
        calls.append(wait)
        return {"spark": {"state": "ready", "app_id": "app-1"}}

    listener = sg_control.ControlListener(0, 0, ip="127.0.0.1", info=info)
    bare = sg_control.ControlListener(0, 0, ip="127.0.0.1")
    listener.start()
    bare.start()
    try:
        reply = await control_request("127.0.0.1", listener.port, listener.secret_hex, "info", {"wait": 2})
        assert reply == {"ok": True, "spark": {"state": "ready", "app_id": "app-1"}} and calls == [2.0]
        assert await control_request("127.0.0.1", bare.port, bare.secret_hex, "info") == {"ok": True}
        for bad in (-1, sg_protocol.INFO_MAX_WAIT + 1, "1", True):
            with pytest.raises(ControlError, match="bad info args"):
                await control_request("127.0.0.1", listener.port, listener.secret_hex, "info", {"wait": bad})
        with pytest.raises(ControlError, match="connection closed"):  # the MAC still guards it
            await control_request("127.0.0.1", listener.port, "00" * 32, "info")
        assert calls == [2.0]
    finally:
        listener.stop()
        bare.stop()
