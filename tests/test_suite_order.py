"""The suite's own order: tests marked long_running start first, the rest keep their order."""

from __future__ import annotations

import pytest

from tests.conftest import pytest_collection_modifyitems


class Item:
    """What the ordering hook reads of a collected test: its name and markers."""

    def __init__(self, name: str, *markers: str):
        self.name, self.markers = name, markers

    def get_closest_marker(self, name: str):
        return pytest.mark.long_running if name in self.markers else None


def test_long_running_tests_move_to_the_front_in_their_own_order():
    items = [Item("a"), Item("slow1", "long_running"), Item("b"), Item("c", "other"), Item("slow2", "long_running")]
    pytest_collection_modifyitems(items)
    assert [item.name for item in items] == ["slow1", "slow2", "a", "b", "c"]
