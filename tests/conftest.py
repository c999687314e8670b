from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

_LOADGROUP = "nas_headprune_loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    # torch is imported where tests run: in a plain run, or in each pytest-xdist worker (one torch
    # thread each); the controlling process of `-n 2` runs no test and does not pay for the import
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker and getattr(config.option, "numprocesses", None):
        if config.option.dist == "load":  # -n without another --dist
            # tests go to the workers one at a time in the order given below (slow ones first), and
            # a module marked xdist_group stays on one worker, which builds its module fixtures once
            config.option.dist = "loadgroup"
            config.option.loadscopereorder = False
        return
    if worker and getattr(config, "workerinput", {}).get(_LOADGROUP):
        config.option.loadgroup = True  # the workers name each test with its group, as the scheduler expects
    import torch

    torch.set_num_threads(1 if worker else max(1, min(2, torch.get_num_threads())))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(pytest-xdist, in the controlling process) tell each worker whether tests carry their group."""
    node.workerinput[_LOADGROUP] = node.config.option.dist == "loadgroup"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_key" in metafunc.fixturenames:
        from zoo import MODEL_ZOO

        metafunc.parametrize("zoo_key", sorted(MODEL_ZOO))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the tests marked slow first (a stable sort keeps the order otherwise): under `-n 2` the short
    # ones then fill in at the end instead of one worker idling while the other runs a long test
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
