"""CPU pinning settings (``balancer.affinity``), without pinning anything."""

from __future__ import annotations

import pytest

from hashmesh.balancer.affinity import AUTO, chosen, parse_cpus
from hashmesh.balancer.config import BalancerSettings
from hashmesh.core.settings import SettingsError


def test_cpus_are_parsed_as_off_auto_numbers_and_ranges() -> None:
    assert parse_cpus("") == ()
    assert parse_cpus(" OFF ") == ()
    assert parse_cpus("auto") == AUTO
    assert parse_cpus("1") == (1,)
    assert parse_cpus("2,0,2") == (0, 2)
    assert parse_cpus("2-4,7") == (2, 3, 4, 7)
    for wrong in ("one", "1-", "-2", "1,,2", "1.5", "3-1"):
        with pytest.raises(SettingsError, match="HASHMESH_BALANCER_CPUS"):
            parse_cpus(wrong)


def test_auto_gives_each_index_a_cpu_of_its_own_from_the_last() -> None:
    allowed = {0, 1, 2, 3}
    assert [chosen(AUTO, allowed, index) for index in range(5)] == [
        (3,),
        (2,),
        (1,),
        (0,),
        (3,),  # more processes than CPUs: they share, in turn
    ]


def test_explicit_cpus_must_be_allowed() -> None:
    assert chosen((0, 2), {0, 1, 2}) == (0, 2)
    with pytest.raises(SettingsError, match=r"\[5\]"):
        chosen((1, 5), {0, 1, 2})


def test_where_the_platform_cannot_pin_auto_pins_nothing_and_cpus_are_refused() -> None:
    assert chosen(AUTO, None, 3) == ()
    with pytest.raises(SettingsError, match="cannot pin"):
        chosen((1,), None)


def test_the_defaults_are_the_synchronous_listener_pinned_to_one_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HASHMESH_BALANCER_SERVER", "HASHMESH_BALANCER_CPUS"):
        monkeypatch.delenv(name, raising=False)
    settings = BalancerSettings.from_env()
    assert (settings.server, settings.cpus, settings.cpu_index) == ("sync", AUTO, 0)
    monkeypatch.setenv("HASHMESH_BALANCER_SERVER", "AIO")
    monkeypatch.setenv("HASHMESH_BALANCER_CPUS", "off")
    settings = BalancerSettings.from_env()
    assert (settings.server, settings.cpus) == ("aio", ())
    monkeypatch.setenv("HASHMESH_BALANCER_SERVER", "threads")
    with pytest.raises(SettingsError, match="HASHMESH_BALANCER_SERVER"):
        BalancerSettings.from_env()
