"""Test ordering for parallel runs: the longest kinds of test start first.

pytest-xdist hands tests to its workers in collection order, so a learning test collected last would run alone at the
end while the other workers idle. Putting ``slow`` tests first, then ``integration`` ones, then the rest (each group
in its collection order) shortens the tail of ``make test-ci-slow``; the fast suite (neither marker) keeps its order.
Tests do not depend on their order (docs/design/CONVENTIONS.md, "Tests").
"""

from __future__ import annotations

import pytest


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("slow") is not None:
        return 0
    if item.get_closest_marker("integration") is not None:
        return 1
    return 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stable sort: slow, then integration, then every other test."""
    items.sort(key=_rank)
