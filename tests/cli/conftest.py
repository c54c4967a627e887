"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fail the test if the command starts or joins a Ray (it must refuse before that)."""
    ray = pytest.importorskip("ray")

    def refuse(*args, **kwargs):
        raise AssertionError("the command started Ray before refusing its flags")

    monkeypatch.setattr(ray, "init", refuse)
