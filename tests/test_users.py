"""The canonical user-name rule (spark_gateway/users.py): pure logic; tests/test_security.py runs it on lab hosts."""

from __future__ import annotations

from typing import Any

import pytest

from spark_gateway.users import UserRefused, authorize, canonical, check_user_name

# full-width letters, Cyrillic o, a zero-width space, a NUL; too long; characters a user name does not have
VARIANTS_OF_ROOT = ["ROOT", "Root", " root", "root ", "root\n", "root@EXAMPLE.COM", "\uff52\uff4f\uff4f\uff54",
                    "r\u043e\u043et", "ro\u200bot", "root\x00", "ro.ot", "-root", "a" * 33]  # fmt: skip


def decide(name: str | None, **kw: Any) -> str:
    options: dict[str, Any] = {"default": "gw", "authorized": (), "unauthorized": ("root",), "impersonating": False}
    return authorize(name, **(options | kw))


@pytest.mark.parametrize("name", VARIANTS_OF_ROOT)
def test_every_variant_of_a_name_is_refused_not_normalised(name: str) -> None:
    with pytest.raises(UserRefused) as info:
        decide(name)
    assert info.value.status == 400 and "plain POSIX user name" in str(info.value)


@pytest.mark.parametrize("name", ["alice", "_svc", "bob-2", "a" * 32, "x_y-z0"])
def test_plain_names_pass(name: str) -> None:
    assert check_user_name(name) == name == decide(name)


@pytest.mark.parametrize("name", VARIANTS_OF_ROOT[:6])
def test_variants_do_not_get_into_authorized_users(name: str) -> None:
    with pytest.raises(UserRefused):
        decide(name, authorized={"root", "alice"}, unauthorized=())


def test_operator_lists_are_compared_canonically() -> None:
    assert canonical(" \uff21lice\n") == "alice"
    with pytest.raises(UserRefused, match="listed in unauthorized_users") as info:
        decide("root", unauthorized={" Root"})
    assert info.value.status == 403
    assert decide("alice", authorized={"ALICE"}) == "alice"
    with pytest.raises(UserRefused, match="not listed in authorized_users"):
        decide("bob", authorized={"ALICE"})


def test_default_user_only_without_impersonation() -> None:
    assert decide(None) == decide("") == "gw"
    with pytest.raises(UserRefused, match="KERNEL_USERNAME is required") as info:
        decide(None, impersonating=True)
    assert info.value.status == 400


@pytest.mark.parametrize("name", ["root", "sggw", "gw"])
def test_impersonation_refuses_root_and_the_gateway_accounts(name: str) -> None:
    with pytest.raises(UserRefused, match="gateway's own account") as info:
        decide(name, impersonating=True, unauthorized=(), gateway_accounts={"SGGW", "gw"})
    assert info.value.status == 403
    assert decide("alice", impersonating=True, gateway_accounts={"sggw"}) == "alice"
