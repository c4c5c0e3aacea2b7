"""Placement and host-health logic (pure): choices, counts, headroom, quarantine backoff."""

from __future__ import annotations

import time

import pytest

from spark_gateway.health import Health
from spark_gateway.placement import HostReport, HostSelector, PlacementError, check_pin

INVENTORY = """--kernel-id 1111-aaaa
--kernel-id 2222-bbbb
--
0.50 0.40 0.30 1/200 12345
4
MemTotal:       16000000 kB
MemAvailable:    8000000 kB
"""


def report(ids: set[str], load: float = 0.0, cpus: int = 2, free: float = 0.5) -> HostReport:
    return HostReport(frozenset(ids), load, cpus, 1000, int(1000 * free))


def test_inventory_output_is_parsed():
    r = HostReport.parse(INVENTORY)
    assert r.kernel_ids == {"1111-aaaa", "2222-bbbb"}
    assert (r.load1, r.cpus, r.mem_total, r.mem_available) == (0.5, 4, 16000000, 8000000)
    assert r.headroom() == pytest.approx((1 - 0.5 / 4) + 0.5)
    assert r.headroom(extra_kernels=2) == pytest.approx((1 - 2.5 / 4) + 0.5)


def test_an_empty_grep_still_parses():
    assert HostReport.parse("--\n" + INVENTORY.split("--\n")[1]).kernel_ids == frozenset()


def test_round_robin_skips_unusable_hosts_and_pins_are_checked_against_the_configured_hosts():
    sel = HostSelector()
    hosts = ["a", "b", "c"]
    assert [sel.round_robin(hosts, hosts) for _ in range(4)] == ["a", "b", "c", "a"]
    assert check_pin(hosts, "c") == "c"
    assert sel.round_robin(hosts, ["a", "c"]) == "c"  # b is down: passed over
    with pytest.raises(PlacementError, match="not one of the configured"):
        check_pin(hosts, "evil")


def test_least_connection_counts_running_and_in_flight_kernels():
    sel = HostSelector()
    reports = {"a": report({"k1"}), "b": report(set()), "c": report({"k2", "k3"})}
    assert sel.least_connection(reports) == "b"
    sel.launching("b", "k9")
    sel.launching("b", "k8")
    assert sel.least_connection(reports) == "a"  # b now has two in flight
    sel.launching("a", "k1")  # a launch of a kernel the host already shows is counted once
    assert sel.least_connection(reports) == "a"
    sel.launched("b", "k9")
    sel.launched("b", "k8", ok=False)  # failed: no longer counted
    assert sel.least_connection(reports) in {"a", "b"}  # a 1, b 1 (k9 still counted: the inventory predates it)
    sel.launching("b", "k7")
    assert sel.least_connection(reports) == "a"
    newer = dict(reports, b=HostReport(frozenset({"k9"}), 0, 2, 1000, 500, taken_at=time.monotonic()))
    sel.launched("b", "k7", ok=False)
    assert sel.recent("b", newer["b"]) == set()  # k9 is in the newer inventory itself, k7 failed


def test_least_connection_breaks_ties_at_random():
    sel = HostSelector()
    reports = {h: report(set()) for h in "abc"}
    assert {sel.least_connection(reports) for _ in range(200)} == {"a", "b", "c"}


def test_least_load_prefers_headroom_and_counts_launches_in_flight():
    sel = HostSelector()
    reports = {"big": report(set(), load=2.0, cpus=8, free=0.6), "small": report(set(), load=1.0, cpus=2, free=0.4)}
    assert sel.least_load(reports) == "big"  # 0.75 + 0.6 against 0.5 + 0.4
    for i in range(4):  # each launch in flight counts as one more load: 0.25 + 0.6 < 0.9
        sel.launching("big", f"k{i}")
    assert sel.least_load(reports) == "small"


def test_least_load_counts_kernels_when_headrooms_are_nearly_equal():
    """Idle kernels add no load and memory figures jitter: near-equal hosts are split by kernel count."""
    sel = HostSelector()
    reports = {"a": report({"k1", "k2"}, free=0.51), "b": report({"k3"}, free=0.50), "busy": report(set(), load=4.0)}
    assert sel.least_load(reports) == "b"  # a's 0.01 more free memory is noise; b runs fewer kernels
    reports["a"] = report({"k1", "k2"}, free=0.70)
    assert sel.least_load(reports) == "a"  # a real difference in headroom still wins


def test_quarantine_doubles_and_expires():
    health = Health(ceiling=0.15)
    assert health.failed("h", "refused", 0.05) == pytest.approx(0.05)
    assert "refused" in (health.quarantined("h") or "")
    assert health.failed("h", "refused", 0.05) == pytest.approx(0.10)
    assert health.failed("h", "refused", 0.05) == pytest.approx(0.15)  # ceiling
    time.sleep(0.16)
    assert health.quarantined("h") is None and health.suspect("h")  # probe before use
    health.recovered("h")
    assert not health.suspect("h")


def test_owed_cleanups_are_handed_over_once():
    health = Health()
    health.owe("h", "kill -9 -- -12")
    health.owe("h", "rm -f x")
    assert health.take_owed("h") == ["kill -9 -- -12", "rm -f x"]
    assert health.take_owed("h") == []
