from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from zoo import MODEL_ZOO  # noqa: E402

# one torch thread per worker when pytest-xdist runs the tests in several processes
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture(params=sorted(MODEL_ZOO))
def zoo_key(request: pytest.FixtureRequest) -> str:
    return request.param
