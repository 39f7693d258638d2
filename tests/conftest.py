"""Shared test configuration: offline hub, deterministic seeds, GPU marker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# scikit-learn runs its array-API input check only when SciPy's support is on;
# set before SciPy is imported so that no estimator check is skipped.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)  # noqa: NPY002  (random_state=None draws from it)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    # Test data are tiny: intra-op threads only add wake-up latency, which costs
    # ~10 ms per op on a shared 2-core machine (tens of times slower tests).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # scikit-learn's references too
        yield
    torch.set_num_threads(threads)
