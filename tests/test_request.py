"""`LaunchRequest.build`: a start request judged whole, with no host, connection or server (pure)."""

from __future__ import annotations

import getpass
import shlex
import subprocess

import pytest
from jupyter_client.kernelspec import KernelSpec

from spark_gateway.config import GatewayOptions
from spark_gateway.errors import ProvisionerError
from spark_gateway.request import LaunchRequest

ARGV = ["python", "launch.py", "--kernel-id", "{kernel_id}", "--spark-context-initialization-mode", "eager"]
YARN = {"SPARK_OPTS": "--master yarn --name ${KERNEL_ID} ${KERNEL_EXTRA_SPARK_OPTS}"}
STANDALONE = {"SPARK_OPTS": "--master spark://m:7077 ${KERNEL_EXTRA_SPARK_OPTS}"}


def options(**traits: object) -> GatewayOptions:
    return GatewayOptions(remote_hosts=["h1", "h2:2222"], **traits)


def build(env: dict[str, str], spec_env: dict[str, str] | None = None, kid: str = "k-1", **traits: object):
    spec = KernelSpec(argv=ARGV, display_name="Spec", env=spec_env or {})
    return LaunchRequest.build(kid, spec, {"KERNEL_USERNAME": "alice", **env}, ARGV, options(**traits))


def refused(status: int, match: str, *args: object, **kwargs: object) -> None:
    with pytest.raises(ProvisionerError, match=match) as exc:
        build(*args, **kwargs)  # type: ignore[arg-type]
    assert exc.value.status_code == status


def shell_value(word: str) -> str:
    """What the host's shell makes of an exported word."""
    return subprocess.run(["sh", "-c", f"printf %s {word}"], capture_output=True, text=True, check=True).stdout


def test_a_valid_request_carries_everything_the_launch_needs():
    req = build({"KERNEL_EXTRA_SPARK_OPTS": "--conf spark.x=1", "KERNEL_REMOTE_HOST": "h2:2222"}, YARN)
    assert (req.kernel_id, req.username, req.pinned, req.spark_mode) == ("k-1", "alice", "h2:2222", "eager")
    assert req.run_as is None and req.port_range == "0..0" and req.working_dir is None
    opts = shell_value(req.exports["SPARK_OPTS"])
    assert opts.startswith("--master yarn --name k-1 --conf spark.x=1 --conf spark.yarn.maxAppAttempts=1 ")
    assert shlex.split(opts)[-1].startswith("spark.yarn.tags=spark_gateway,") and opts.endswith(",k-1")  # last: wins
    assert shell_value(req.exports["KERNEL_ID"]) == "k-1" and shell_value(req.exports["KERNEL_USERNAME"]) == "alice"


@pytest.mark.parametrize("kid", ["", "-x", "a b", "a/b", "a\nb", "x" * 129, "ü"])
def test_kernel_ids_outside_the_safe_alphabet_are_400(kid):
    refused(400, "not a valid id", {}, kid=kid)


def test_users_are_authorized_before_anything_else():
    refused(403, "unauthorized_users", {"KERNEL_USERNAME": "root"})
    refused(403, "not listed in authorized_users", {"KERNEL_USERNAME": "bob"}, authorized_users={"alice"})
    assert build({}, authorized_users={"alice"}).username == "alice"
    assert build({"KERNEL_USERNAME": ""}, unauthorized_users=set()).username == getpass.getuser()


def test_client_values_no_environment_can_hold_are_400():
    refused(400, "NUL byte", {"KERNEL_X": "a\0b"})


@pytest.mark.parametrize("value", ["1..2", "80..2000", "40000..40500", "x"])
def test_a_bad_client_port_range_is_400(value):
    refused(400, "port_range", {"KERNEL_PORT_RANGE": value})


def test_a_pin_to_an_unconfigured_host_is_403():
    refused(403, "not one of the configured", {"KERNEL_REMOTE_HOST": "evil.example.com"})


def test_spark_options_are_checked_for_spark_specs_only():
    refused(400, "--master", {"KERNEL_EXTRA_SPARK_OPTS": "--master local"}, YARN)
    refused(400, "cannot be parsed", {"KERNEL_EXTRA_SPARK_OPTS": "--conf 'x"}, STANDALONE)
    assert build({"KERNEL_EXTRA_SPARK_OPTS": "--master local"}).exports["KERNEL_EXTRA_SPARK_OPTS"]  # plain kernel


def test_impersonation_runs_every_kernel_as_its_user_yarn_included():
    plain = build({}, STANDALONE, impersonation_enabled=True)
    assert plain.run_as == "alice" and plain.exports["GP_IMPERSONATION_ENABLED"] == "True"
    yarn = build({}, YARN, impersonation_enabled=True)
    assert yarn.run_as == "alice" and "--proxy-user" not in shell_value(yarn.exports["SPARK_OPTS"])
    refused(400, "KERNEL_USERNAME", {"KERNEL_USERNAME": "a b"}, impersonation_enabled=True)
    refused(400, "is required", {"KERNEL_USERNAME": ""}, impersonation_enabled=True)
    refused(403, "as root or as the gateway's own account", {"KERNEL_USERNAME": "root"}, impersonation_enabled=True,
            unauthorized_users=set())  # fmt: skip


def test_spec_env_is_rendered_against_client_values_and_a_bad_spec_is_500():
    req = build({"KERNEL_WORKING_DIR": "/w d"}, {"WHERE": "${KERNEL_WORKING_DIR}/x $(id)", "H": "${HOME}"})
    assert shell_value(req.exports["WHERE"]) == "/w d/x $(id)" and req.working_dir == "/w d"
    assert req.exports["H"] == '"${HOME}"'  # left to the host's shell
    refused(500, "kernelspec 'Spec'", {}, {"BAD-NAME": "x"})


def test_every_export_is_one_shell_word():
    req = build({"KERNEL_EVIL": "'; rm -rf / #", "KERNEL_EXTRA_SPARK_OPTS": "--conf a=$(x)"}, YARN)
    for name, word in req.exports.items():
        assert len(shlex.split(word)) <= 1, name
    assert shell_value(req.exports["KERNEL_EVIL"]) == "'; rm -rf / #"
