from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # torch is imported where tests run: in a plain run, or in each pytest-xdist worker (one torch
    # thread each); the controlling process of `-n 2` runs no test and does not pay for the import
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker and getattr(config.option, "numprocesses", None):
        return
    import torch

    torch.set_num_threads(1 if worker else max(1, min(2, torch.get_num_threads())))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_key" in metafunc.fixturenames:
        from zoo import MODEL_ZOO

        metafunc.parametrize("zoo_key", sorted(MODEL_ZOO))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the tests marked slow first (a stable sort keeps the order otherwise): under `-n 2` the short
    # ones then fill in at the end instead of one worker idling while the other runs a long test
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
