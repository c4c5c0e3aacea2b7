"""Pure logic of the per-user limit: the host inventory's parsing and the refusal message."""

from __future__ import annotations

from spark_gateway.limits import UserLaunches, parse_user_inventory, refusal


def test_inventory_lines_map_kernel_ids_to_users_first_seen_wins():
    text = "k1 alice\nk1 root\nk2 bob\n\nnot a line at all\nk3 carol extra\n"
    assert parse_user_inventory(text) == {"k1": "alice", "k2": "bob"}


def test_refusal_says_how_many_run_and_where():
    assert refusal("alice", 3, {"h1": ["k1"], "h2": ["k2"]}, []) is None
    message = refusal("alice", 2, {"h1": ["k1"], "h2": ["k2"], "h3": []}, [])
    assert message is not None and "already runs 2 kernel(s)" in message and "max_kernels_per_user=2" in message
    assert "k1 on h1" in message and "k2 on h2" in message and "h3" not in message
    assert "k9 starting" in (refusal("alice", 2, {"h1": ["k1"]}, ["k9"]) or "")


def test_launches_count_only_earlier_ones_of_the_same_user():
    launches = UserLaunches()
    assert launches.begin("a", "alice") == []
    assert launches.begin("b", "bob") == []
    assert launches.begin("c", "alice") == ["a"]
    launches.end("a")
    assert launches.begin("d", "alice") == ["c"]
