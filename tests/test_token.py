"""Issue 12: the launch token never reaches user code (real lab host, real local users, impersonation).

The gateway writes the token on the launch shell's stdin (a here-document for the kernel's stdin); the launcher
reads it before anything of the user's runs and calls back before the user's site dir (`.pth` files), IPython's
config and startup files. Here the kernel's user plants both, each running a probe that gathers everything it can
read (its environment, /proc/self/environ, its ancestors' and children's environments, every command line on the
host, its stdin) and the time it ran; the gateway's real callback server says which token it expected and when
the callback was accepted.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_gateway.callback import ResponseServer
from testlab.gateway import write_spec
from testlab.lab_accounts import Accounts
from tests import test_scala_kernel as scala
from tests import test_security as security
from tests.conftest import env, execute, kernel_processes

pytestmark = pytest.mark.asyncio
# fixtures of the modules that own them
accounts, as_gateway = security.accounts, security.as_gateway
cluster35, scala_specs = scala.cluster35, scala.scala_specs

PROBE = """
import json, os, time

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError as exc:
        return "<%s>" % type(exc).__name__

def _ppid(pid):
    try:
        return int(_read("/proc/%s/stat" % pid).rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0

seen = {"where": WHERE, "time": time.time(), "pid": os.getpid(), "kernel_id": os.environ.get("KERNEL_ID"),
        "os_environ": dict(os.environ), "self_environ": _read("/proc/self/environ")}
chain, pid = [], os.getppid()
while pid > 1:
    chain.append(_read("/proc/%d/environ" % pid))
    pid = _ppid(pid)
seen["ancestors"] = chain
pids = [p for p in os.listdir("/proc") if p.isdigit()]
seen["children"] = [_read("/proc/%s/environ" % p) for p in pids if _ppid(p) == os.getpid()]
seen["cmdlines"] = [_read("/proc/%s/cmdline" % p) for p in pids]
try:
    blocking = os.get_blocking(0)
    os.set_blocking(0, False)
    seen["stdin"] = os.read(0, 65536).decode("latin-1")
    os.set_blocking(0, blocking)
except OSError as exc:
    seen["stdin"] = repr(exc)
with open(OUT, "a") as f:
    f.write(json.dumps(seen) + "\\n")
"""


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """Kernel id -> the token the gateway's callback server expects, and when it accepted the callback (recorded
    before its reply goes out, so before the launcher can go on)."""
    seen: dict[str, dict[str, Any]] = {}
    register, accept = ResponseServer.register, ResponseServer._accept

    def spy_register(self: ResponseServer, kernel_id: str, launch_token: str) -> Any:
        seen[kernel_id] = {"token": launch_token}
        return register(self, kernel_id, launch_token)

    async def spy_accept(self: ResponseServer, raw: bytes) -> str:
        kernel_id = await accept(self, raw)
        seen[kernel_id]["accepted"] = time.time()
        return kernel_id

    monkeypatch.setattr(ResponseServer, "register", spy_register)
    monkeypatch.setattr(ResponseServer, "_accept", spy_accept)
    return seen


@pytest.fixture(scope="module")
def user_site_python(accounts: Accounts) -> Iterator[str]:
    """A kernel Python whose user site dir is active (a venv with system site-packages, ours on its path), as a
    system or conda Python is: the user's `.pth` files run at start-up unless the launcher is started with -s."""
    venv = accounts.base / "usersite-python"
    subprocess.run(
        [sys._base_executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    ours = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    for packages in venv.glob("lib/python3*/site-packages"):
        (packages / "sg-lab.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    yield str(venv / "bin" / "python")


def plant(accounts: Accounts, user: str, python: str) -> Path:
    """The user's `.pth` file and IPython startup file, both running the probe; returns the probe's output file."""
    home = accounts.home(user)
    out = home / "probe.jsonl"
    probe = home / "probe.py"
    probe.write_text(PROBE)
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], check=True,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    site = home / ".local" / "lib" / f"python{version}" / "site-packages"
    startup = home / ".ipython" / "profile_default" / "startup"
    site.mkdir(parents=True)
    startup.mkdir(parents=True)
    run = "exec(open({probe!r}).read(), {{'WHERE': {where!r}, 'OUT': {out!r}}})"
    (site / "zz-steal.pth").write_text("import os; " + run.format(probe=str(probe), where="pth", out=str(out)) + "\n")
    (startup / "00-steal.py").write_text(run.format(probe=str(probe), where="startup", out=str(out)) + "\n")
    uid = accounts.uids[user]
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(home)], check=True)
    return out


def readable_everywhere(pids: list[int]) -> str:
    """What root reads of `pids`' environments, and every command line on this machine."""
    texts = []
    for path in [f"/proc/{pid}/environ" for pid in pids] + glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            texts.append(Path(path).read_bytes().decode("latin-1"))
    return "\n".join(texts)


def in_memory(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the readable memory of process `pid` (read as root)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                found = found or needle in mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
    return found


async def test_user_code_runs_after_the_callback_and_never_sees_the_token(
    accounts,
    as_gateway,
    tokens,
    user_site_python,
):
    """alice's `.pth` file and IPython startup file run only once the gateway accepted the callback, and find the
    token nowhere: not in the environment, /proc/self/environ, ancestors', children's, command lines, stdin; nor is
    it left in the kernel process's memory. Her user site still works in the kernel."""
    out = plant(accounts, "alice", user_site_python)
    kernels = accounts.base / "kernels"
    write_spec(kernels / "usersite_python", python=user_site_python)
    subprocess.run(["chmod", "-R", "a+rX", str(kernels / "usersite_python")], check=True)
    km = as_gateway("usersite_python")
    await security.start(km, accounts, "alice")
    expected = tokens[km.kernel_id]
    token = expected["token"]
    assert re.fullmatch(r"[0-9a-f]{64}", token) and "accepted" in expected

    text, reply = await execute(km, "import site, sys; print(site.getusersitepackages() in sys.path, flush=True)")
    assert reply["status"] == "ok" and text.strip() == "True", text
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ours = {r["where"]: r for r in records if r["kernel_id"] == km.kernel_id}
    assert set(ours) == {"pth", "startup"}, [(r["where"], r["pid"], r["kernel_id"]) for r in records]
    assert ours["pth"]["pid"] == ours["startup"]["pid"]  # the kernel's own process
    for where, record in ours.items():
        assert record["time"] > expected["accepted"], f"the {where} file ran before the callback was accepted"
        assert token not in json.dumps(record), f"the {where} file found the launch token"
        assert record["cmdlines"] and record["ancestors"], "the probe read nothing"

    pids = [pid for pid, _ in accounts.host.processes()]
    leaked = token in readable_everywhere(pids)
    assert pids and not leaked, "the launch token is in an environment or command line on the host"
    kernel = [pid for pid, cmd in kernel_processes(accounts.host, km.kernel_id) if "sudo" not in cmd.split()[0]]
    assert kernel
    for pid in kernel:
        assert not in_memory(pid, token.encode()), f"the token is still in the memory of kernel process {pid}"


async def test_an_r_kernel_never_holds_the_token_in_an_environment(lab, managers, kernels_dir, tokens):
    """R (IRkernel) and its server_listener.py: the token is in no environment nor argv on the host (the listener
    reads it from the stdin R passes on; R never reads it)."""
    from tests.test_r_kernel import install_r_spec

    if not shutil.which("Rscript"):
        pytest.skip("Rscript is not installed: `make system-deps` installs r-base-core and r-cran-irkernel")
    host = lab.hosts[1]
    km = managers(install_r_spec(kernels_dir, "token_r"))
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    token = tokens[km.kernel_id]["token"]
    assert len(kernel_processes(host, km.kernel_id)) == 2  # R and its listener
    leaked = token in readable_everywhere([pid for pid, _ in host.processes()])
    assert not leaked, "the launch token is in an environment or command line on the host"
    text, reply = await execute(km, 'cat(nzchar(Sys.getenv("GP_LAUNCH_TOKEN")))')
    assert reply["status"] == "ok" and text == "FALSE"


R_PROBE = """#!/bin/sh
# probe.sh WHERE OUT R_PID: what a user's R start-up file can read of the token, appended to OUT
{
  echo "== $1 ran"
  for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' <"$f"; echo; done
  echo "== stdin"
  timeout 2 cat
  echo "== stdin reopened"
  timeout 2 cat "/proc/$3/fd/0"
  echo "== end $1"
} >>"$2" 2>/dev/null
"""


async def test_an_r_users_startup_files_run_after_the_token_is_taken(accounts, as_gateway, tokens):
    """alice's `~/.Renviron` and `~/.Rprofile` still take effect in her R kernel, but run only once the listener has
    taken the token from R's stdin: her profile finds it nowhere (stdin, reopened stdin, environments, command
    lines), and a site profile her `.Renviron` names (R_PROFILE) never runs (it would run before the launcher)."""
    from tests.test_r_kernel import install_r_spec

    if not shutil.which("Rscript"):
        pytest.skip("Rscript is not installed: `make system-deps` installs r-base-core and r-cran-irkernel")
    kernels = accounts.base / "kernels"
    install_r_spec(kernels, "alice_r")
    subprocess.run(["chmod", "-R", "a+rX", str(kernels / "alice_r")], check=True)
    home = accounts.home("alice")
    out, probe = home / "r-probe.txt", home / "probe.sh"
    probe.write_text(R_PROBE)
    run = 'system2("/bin/sh", c("{probe}", "{where}", "{out}", Sys.getpid()))\n'
    (home / "site-steal.R").write_text(run.format(probe=probe, where="site-profile", out=out))
    (home / ".Renviron").write_text(f"SG_RENVIRON_VAR=from-renviron\nR_PROFILE={home / 'site-steal.R'}\n")
    (home / ".Rprofile").write_text(run.format(probe=probe, where="rprofile", out=out) + 'sg_profile <- "ran"\n')
    uid = accounts.uids["alice"]
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(home)], check=True)

    km = as_gateway("alice_r")
    await security.start(km, accounts, "alice")
    token = tokens[km.kernel_id]["token"]
    text, reply = await execute(km, 'cat(sg_profile, Sys.getenv("SG_RENVIRON_VAR"))')
    assert reply["status"] == "ok" and text == "ran from-renviron", text
    found = out.read_text()
    assert "== rprofile ran" in found and "== end rprofile" in found, found[-2000:]
    assert "server_listener.py" in found, "the probe read no command line"
    assert "== site-profile ran" not in found, "a site profile named by the user's .Renviron ran"
    assert token not in found, "alice's .Rprofile found the launch token"
    leaked = token in readable_everywhere([pid for pid, _ in accounts.host.processes()])
    assert not leaked, "the launch token is in an environment or command line on the host"


@scala.needs_spark35
async def test_a_scala_kernel_never_holds_the_token_in_an_environment(lab, managers, scala_specs, tokens):
    """Toree's JVM, spark-submit's and the launcher's shells, and the listener: the token is in no environment nor
    argv on the host."""
    host = lab.hosts[1]
    km = managers("ssh_scala_lazy")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    token = tokens[km.kernel_id]["token"]
    processes = kernel_processes(host, km.kernel_id)
    assert any("server_listener.py" in cmd for _, cmd in processes)
    assert any("org.apache.toree.Main" in cmd for _, cmd in processes)
    leaked = token in readable_everywhere([pid for pid, _ in host.processes()])
    assert not leaked, "the launch token is in an environment or command line on the host"


async def test_a_launcher_started_without_dash_s_says_so(accounts, as_gateway, user_site_python):
    """A hand-written spec that starts the launcher without `python -s` still works, and its log says that the user's
    site dir ran before the callback and how to fix it (there, `plant`'s probe would have taken the token from
    stdin: the launch fails with "no launch token on stdin")."""
    version = subprocess.run([user_site_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    site = accounts.home("bob") / ".local" / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "harmless.pth").write_text("# nothing\n")
    subprocess.run(["chown", "-R", f"{accounts.uids['bob']}:{accounts.uids['bob']}", str(accounts.home("bob"))])
    spec = write_spec(accounts.base / "kernels" / "no_dash_s", python=user_site_python)
    data = json.loads((spec / "kernel.json").read_text())
    data["argv"].remove("-s")
    (spec / "kernel.json").write_text(json.dumps(data))
    subprocess.run(["chmod", "-R", "a+rX", str(spec)], check=True)
    km = as_gateway("no_dash_s")
    await security.start(km, accounts, "bob")
    text, reply = await execute(km, "print(6 * 7)")
    assert reply["status"] == "ok" and text.strip() == "42"
    log = Path(km.provisioner.log_file).read_text()
    assert "is started without -s, so the user's site dir" in log and "start it with `python -s`" in log


async def test_a_broken_r_profile_fails_the_start_with_its_reason(accounts, as_gateway):
    """bob's `~/.Rprofile` stops with an error: the launcher, which now sources it itself, fails the start at once
    with the profile's path and message (R would not have started either)."""
    from tests.test_r_kernel import install_r_spec

    if not shutil.which("Rscript"):
        pytest.skip("Rscript is not installed: `make system-deps` installs r-base-core and r-cran-irkernel")
    kernels = accounts.base / "kernels"
    install_r_spec(kernels, "bob_r")
    subprocess.run(["chmod", "-R", "a+rX", str(kernels / "bob_r")], check=True)
    profile = accounts.home("bob") / ".Rprofile"
    profile.write_text('stop("bob\'s profile is broken")\n')
    uid = accounts.uids["bob"]
    os.chown(profile, uid, uid)
    km = as_gateway("bob_r")
    with pytest.raises(Exception, match="before reporting its connection info") as info:
        await security.start(km, accounts, "bob")
    message = str(info.value)
    assert f"the R profile {profile} failed: bob's profile is broken" in message, message
