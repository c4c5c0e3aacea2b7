"""The launch script through a real /bin/sh: values arrive byte for byte, nothing in them executes."""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spark_gateway.placement import parse_hosts
from spark_gateway.remote import LaunchScriptError, check_env, launch_script, spec_value
from spark_gateway.ssh import split_host_port

DUMP = "import os, json, sys; json.dump(dict(os.environ), sys.stdout)"


def run_script(exports: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], str]:
    """Run a launch script whose 'kernel' dumps its environment into the log; return (environ, shell output)."""
    log = tmp_path / "kernel.log"
    script = launch_script([sys.executable, "-c", DUMP], exports, str(log))
    done = subprocess.run(
        ["/bin/sh", "-s"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": "/home/someone"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(log.read_text()), done.stdout


def test_every_character_arrives_intact(tmp_path):
    every = "".join(chr(c) for c in range(1, 128)) + "é数☃\U0001f600"
    values = {"KERNEL_ALL": every, "KERNEL_EMPTY": "", "KERNEL_QUOTE": "'", "KERNEL_NL": "\n\n"}
    environ, output = run_script({k: shlex.quote(v) for k, v in values.items()}, tmp_path)
    for name, value in values.items():
        assert environ[name] == value
    assert output.startswith("pid ") and "exit 0" in output


def test_nothing_in_a_value_executes(tmp_path):
    marker = tmp_path / "pwned"
    attacks = [
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"'; touch {marker}; '",
        f'"; touch {marker}; "',
        f"\ntouch {marker}\n",
        f"${{X:-$(touch {marker})}}",
    ]
    exports = {f"KERNEL_A{i}": shlex.quote(a) for i, a in enumerate(attacks)}
    environ, _ = run_script(exports, tmp_path)
    assert not marker.exists()
    assert [environ[f"KERNEL_A{i}"] for i in range(len(attacks))] == attacks


def test_spec_values_expand_only_variable_references(tmp_path):
    marker = tmp_path / "spec-pwned"
    client = {"KERNEL_ID": "k-1", "KERNEL_EXTRA_SPARK_OPTS": f"--conf a=b $(touch {marker})"}
    templates = {
        "SPARK_OPTS": "--name ${KERNEL_ID:-ERROR__NO__KERNEL_ID} ${KERNEL_EXTRA_SPARK_OPTS}",
        "PYTHONPATH": "${HOME}/.local/lib:$HOME/x",
        "WITH_DEFAULT": "${UNSET_THING:-fallback}/y",
        "LITERAL": f"keep `this` and $(touch {marker}) as text",
    }
    exports = {name: spec_value(t, client) for name, t in templates.items()}
    environ, _ = run_script(exports, tmp_path)
    assert environ["SPARK_OPTS"] == f"--name k-1 --conf a=b $(touch {marker})"
    assert environ["PYTHONPATH"] == "/home/someone/.local/lib:/home/someone/x"
    assert environ["WITH_DEFAULT"] == "fallback/y"
    assert environ["LITERAL"] == f"keep `this` and $(touch {marker}) as text"
    assert not marker.exists()


def test_dead_kernel_reports_exit_status_and_log_tail(tmp_path):
    log = tmp_path / "k.log"
    script = launch_script([sys.executable, "-c", "import sys; print('boom happened'); sys.exit(7)"], {}, str(log))
    out = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True, timeout=30).stdout
    lines = out.splitlines()
    assert lines[0].startswith("pid ") and lines[1] == "exit 7" and "boom happened" in lines[2:]


@pytest.mark.parametrize(("name", "value"), [("BAD-NAME", "x"), ("1X", "x"), ("OK", "nul\0byte")])
def test_unrepresentable_environment_is_refused(name, value):
    with pytest.raises(LaunchScriptError):
        check_env(name, value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("host", ("host", None)),
        ("host:2222", ("host", 2222)),
        ("[::1]:22", ("::1", 22)),
        ("[fe80::1]", ("fe80::1", None)),
    ],
)
def test_host_entries(entry, expected):
    assert split_host_port(entry) == expected


def test_host_list_parsing():
    assert parse_hosts(" a, b:2200 ,,c ") == ["a", "b:2200", "c"]
    with pytest.raises(ValueError):
        parse_hosts(["a b"])


def test_the_launch_token_reaches_only_the_kernels_stdin(tmp_path):
    """Through a real /bin/sh: the kernel reads the token on its stdin, and it is in no environment or argv."""
    token = secrets.token_hex(32)
    log = tmp_path / "kernel.log"
    read = "import os, json, sys; json.dump([sys.stdin.read(), dict(os.environ), sys.argv], sys.stdout)"
    script = launch_script([sys.executable, "-c", read], {"KERNEL_X": "x"}, str(log), token=token)
    assert [line for line in script.splitlines() if token in line] == [token]  # the here-document's one line
    done = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    stdin, environ, argv = json.loads(log.read_text())
    assert stdin == f"{token}\n"
    assert token not in json.dumps([environ, argv]) and environ["KERNEL_X"] == "x"


@pytest.mark.parametrize("token", ["", "ABC", "0" * 63, "0" * 64 + "\nSG_LAUNCH_TOKEN_END\ntouch /tmp/x", "g" * 64])
def test_a_malformed_launch_token_is_refused(token):
    with pytest.raises(LaunchScriptError, match="64 lowercase hex digits"):
        launch_script(["true"], {}, "/tmp/kernel.log", token=token)
