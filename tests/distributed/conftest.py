"""Registers the ``slow`` marker used by the opt-in tests here (``GEOMERASE_RUN_SLOW=1`` runs them)."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: opt-in (minutes on 2 CPU cores); run with GEOMERASE_RUN_SLOW=1")
