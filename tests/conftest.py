import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter, which must be chosen before
# triton.jit decorates any kernel, i.e. before o1kernels is imported. With a GPU the tests run the compiled
# kernels that ship (CPU-device Triton cases are then skipped as unavailable).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
