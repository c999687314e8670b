from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from zoo import MODEL_ZOO  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(params=sorted(MODEL_ZOO))
def zoo_key(request: pytest.FixtureRequest) -> str:
    return request.param
