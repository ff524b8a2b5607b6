"""Reconnect back-off: a fleet that lost its broker together does not reconnect in lockstep."""

from __future__ import annotations

import random

from edge_agent.contract.mqtt_session import jittered, spread_wait


def test_reconnect_waits_spread_between_half_and_the_whole_back_off() -> None:
    rng = random.Random(7)
    waits = [jittered(8.0, rng) for _ in range(1000)]  # a thousand devices whose broker restarted
    assert all(4.0 <= w <= 8.0 for w in waits)
    assert max(waits) - min(waits) > 3.5  # spread over the whole allowed range, not one instant
    assert len(set(waits)) == len(waits)  # no two devices at the same instant


def test_a_lost_session_first_waits_anywhere_in_the_spread_window() -> None:
    rng = random.Random(7)
    waits = [spread_wait(10.0, rng) for _ in range(1000)]  # a thousand devices whose broker restarted
    assert all(0.0 <= w <= 10.0 for w in waits)
    per_second = [sum(s <= w < s + 1 for w in waits) for s in range(10)]
    assert max(per_second) < 1000 / 3  # no second of the window takes a third of the fleet
    assert min(per_second) > 0  # the whole window is used, its first second included
