"""The worker's garbage-collector freeze (``worker.gc_freeze``): frozen cycles are not collected until
a model swap re-freezes, which collects them first."""

from __future__ import annotations

import gc
import weakref

import pytest

from anomaly.step_runner import refreeze_gc as _refreeze_gc


class _Node:
    pass


def _cycle() -> weakref.ref:
    """A reference cycle reachable from nowhere once this returns; the weak reference tells if it lives."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def thawed():
    assert gc.get_freeze_count() == 0, "another test left objects frozen"
    yield
    gc.unfreeze()


def test_a_frozen_cycle_survives_collections_until_refreeze(thawed):
    gc.disable()  # only the explicit collections below
    try:
        alive = _cycle_built_then_frozen()
        gc.collect()
        assert alive() is not None  # frozen: the collector does not see it
        _refreeze_gc()
        assert alive() is None  # thawed and collected
        assert gc.get_freeze_count() > 0  # and what is left is frozen again
    finally:
        gc.enable()


def _cycle_built_then_frozen() -> weakref.ref:
    ref = _cycle()
    gc.freeze()
    return ref


def test_without_freeze_the_cycle_is_collected(thawed):
    ref = _cycle()
    gc.collect()
    assert ref() is None
