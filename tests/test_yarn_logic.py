"""Pure logic of spark_gateway.yarn: the RM address from a Hadoop configuration, tags, orphans, a spec's queue.
(Against a real ResourceManager: tests/test_yarn.py.)"""

from __future__ import annotations

import getpass
import logging
import shlex
import socket
from pathlib import Path

import pytest

from spark_gateway import yarn
from spark_gateway.config import GatewayOptions
from testlab.yarn_lab import site_xml


def test_rm_web_url_follows_the_hadoop_configuration(tmp_path: Path) -> None:
    assert yarn.rm_web_url([tmp_path]) is None  # no yarn-site.xml
    site = tmp_path / "yarn-site.xml"
    site.write_text(site_xml({"yarn.resourcemanager.hostname": "rm.example"}))
    assert yarn.rm_web_url([tmp_path / "missing", tmp_path]) == "http://rm.example:8088"
    rm = "yarn.resourcemanager"
    site.write_text(site_xml({f"{rm}.hostname": "rm", f"{rm}.webapp.address": f"${{{rm}.hostname}}:9999"}))
    assert yarn.rm_web_url([tmp_path]) == "http://rm:9999"
    site.write_text(site_xml({"yarn.http.policy": "HTTPS_ONLY", "yarn.resourcemanager.hostname": "rm"}))
    assert yarn.rm_web_url([tmp_path]) == "https://rm:8090"
    ha = {
        f"{rm}.ha.enabled": "true",
        f"{rm}.ha.rm-ids": "rm2,rm1",
        f"{rm}.hostname.rm1": "a",
        f"{rm}.hostname.rm2": "b",
    }
    site.write_text(site_xml(ha))
    assert yarn.rm_web_url([tmp_path]) == "http://b:8088"  # HA: the first id listed
    site.write_text("<configuration><property>")
    with pytest.raises(yarn.YarnError, match="is not valid XML"):
        yarn.rm_web_url([tmp_path])


def test_conf_dirs_prefer_the_spec_then_the_gateway_environment(tmp_path: Path) -> None:
    spec = {"HADOOP_CONF_DIR": str(tmp_path), "YARN_CONF_DIR": "${HOME}/conf"}  # a host-side reference: not ours
    assert yarn.conf_dirs(spec, {"HADOOP_CONF_DIR": "/nonexistent"}) == [tmp_path]
    assert yarn.conf_dirs({}, {"YARN_CONF_DIR": str(tmp_path)}) == [tmp_path]


def test_gateway_id_trait_reads_its_environment_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SG_YARN_GATEWAY_ID", raising=False)
    assert (
        GatewayOptions().yarn_gateway_id == yarn.default_gateway_id() == f"{getpass.getuser()}@{socket.gethostname()}"
    )
    monkeypatch.setenv("SG_YARN_GATEWAY_ID", "GW 1")
    assert GatewayOptions().yarn_gateway_id == "GW 1"
    assert GatewayOptions(yarn_gateway_id="gw-2").yarn_gateway_id == "gw-2"  # configuration wins


def test_tags_orphans_and_queues() -> None:
    gateway = yarn.gateway_tag("GW 1")
    assert gateway == "sg-gateway:gw_1"
    words = shlex.split(yarn.submit_conf("k-1", "GW 1"))
    assert words == ["--conf", "spark.yarn.maxAppAttempts=1", "--conf", f"spark.yarn.tags=spark_gateway,{gateway},k-1"]
    apps = [
        {"id": "a1", "applicationTags": f"k-1,spark_gateway,{gateway}"},  # live kernel
        {"id": "a2", "applicationTags": f"k-2,spark_gateway,{gateway}"},  # its kernel is gone: orphan
        {"id": "a3", "applicationTags": "k-3,spark_gateway,sg-gateway:other"},  # another gateway's
        {"id": "a4", "applicationTags": "k-4"},  # not a gateway's at all
        {"id": "a5", "applicationTags": ""},
    ]
    assert yarn.orphans(apps, {"K-1"}, gateway) == ["a2"]
    assert yarn.spec_queue("--master yarn --name x ${KERNEL_EXTRA_SPARK_OPTS}") == "default"
    assert yarn.spec_queue("--master yarn --queue q1 ${KERNEL_EXTRA_SPARK_OPTS}") == "q1"
    assert yarn.spec_queue("--queue=q2 --conf spark.yarn.queue=q3") == "q3"


@pytest.mark.asyncio
async def test_sweeps_skip_what_they_cannot_ask_and_wait_for_a_restore(tmp_path: Path, caplog) -> None:
    """No Hadoop configuration: nothing to sweep; a broken one: a warning, not an exception; while a restore is under
    way a launch does not sweep (the real RM: tests/test_yarn.py)."""
    sweeps, log = yarn.Sweeps(), logging.getLogger("test")
    assert await sweeps.sweep({}, "gw", set(), log) == [] and not sweeps.swept
    (tmp_path / "yarn-site.xml").write_text("<configuration><property>")
    with caplog.at_level(logging.WARNING):
        assert await sweeps.sweep({"HADOOP_CONF_DIR": str(tmp_path)}, "gw", set(), log) == []
    assert "is not valid XML" in caplog.text and not sweeps.swept
    sweeps.restoring = True
    sweeps.on_launch({"HADOOP_CONF_DIR": str(tmp_path)}, "gw", set(), log)
    assert not sweeps.tasks
