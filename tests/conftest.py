"""Test configuration.

Without a GPU, Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``): it must
be set before triton is imported anywhere, hence here, at the top of the first file pytest loads.
"""

import os

try:  # decide before importing torch's triton integration
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """``S2H_FAILURE_LOG=path``: append each failure's report as it happens (a GPU run's stage
    can be cut by its time limit before pytest prints its summary)."""
    path = os.environ.get("S2H_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
